"""Damaged or incomplete sources never build a wrong model: every class of damage found by
hand (missing tensors, overlapping or short offsets, wrong shapes, unknown dtypes, an index
that disagrees with its shards, truncated data) is one line naming the file and the fix,
and a property test mutates headers at random: a clean error, or an output whose tensors
equal what `safetensors` itself reads."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def read_raw(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_raw(path, header, body):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def damaged_copy(source, target, mutate):
    shutil.copytree(source, target)
    header, body = read_raw(target / "model.safetensors")
    body = mutate(header, body) or body
    write_raw(target / "model.safetensors", header, body)
    return target


def build_error(run_cli, tmp_path, model):
    result = run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "out", "-q")
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: "), result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    return lines[0]


def drop(*names):
    def mutate(header, body):
        for name in names:
            del header[name]
        # close the holes: rewrite the body contiguously
        entries = sorted(((n, e) for n, e in header.items() if n != "__metadata__"), key=lambda item: item[1]["data_offsets"][0])
        new_body, offset = b"", 0
        for _, entry in entries:
            begin, end = entry["data_offsets"]
            new_body += body[begin:end]
            entry["data_offsets"] = [offset, offset + end - begin]
            offset += end - begin
        return new_body
    return mutate


def shift(name, delta):
    def mutate(header, body):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta, end + delta]
    return mutate


def setting(name, key, value):
    def mutate(header, body):
        header[name][key] = value
    return mutate


DAMAGE = {
    "missing lm_head": (drop("lm_head.weight"), "lack the output head"),
    "missing one down_proj": (drop("model.layers.2.mlp.down_proj.weight"), "layer 2 lacks 'mlp.down_proj.weight'"),
    "missing final norm": (drop("model.norm.weight"), "lack the final norm"),
    "overlapping offsets": (shift("model.layers.1.mlp.up_proj.weight", -4), "overlaps"),
    "length disagrees with shape": (setting("model.layers.0.self_attn.q_proj.weight", "shape", [3, 3]), "spans"),
    "transposed shape": (lambda h, b: h["model.layers.1.mlp.down_proj.weight"].update(
        shape=h["model.layers.1.mlp.down_proj.weight"]["shape"][::-1]) and None, "has shape"),
    "unknown dtype": (setting("model.norm.weight", "dtype", "F12"), "unknown dtype 'F12'"),
    "no offsets": (lambda h, b: h["model.norm.weight"].pop("data_offsets") and None, "lacks dtype, shape or data_offsets"),
    "truncated data": (lambda h, b: b[:-100], "truncated or padded"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_source_is_refused_in_one_line(damage, tiny_models, tmp_path, run_cli):
    mutate, expected = DAMAGE[damage]
    source = tiny_models("llama", num_layers=4, tie_word_embeddings=False)
    model = damaged_copy(source, tmp_path / "damaged", mutate)
    message = build_error(run_cli, tmp_path, model)
    assert expected in message and "re-download or re-save" in message, message


def test_index_that_leaves_out_a_shard_tensor_is_refused(tiny_models, tmp_path, run_cli):
    from dus.build import build_model

    source = tiny_models("llama", num_layers=4)
    sharded = tmp_path / "sharded"
    build_model({"solar": {"model": str(source), "trim": 0}}, sharded, shard_size=20000)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    dropped = sorted(index["weight_map"])[3]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    message = build_error(run_cli, tmp_path, sharded)
    assert repr(dropped) in message and "does not list it" in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_mutations_give_a_clean_error_or_the_true_tensors(data, tiny_models, tmp_path_factory):
    """Whatever is done to a header, dus either refuses with a DusError or builds a model whose
    every tensor equals what safetensors reads from the (mutated) source."""
    from safetensors import safe_open

    from dus.build import build_model
    from dus.errors import DusError

    source = tiny_models("llama", num_layers=4)
    work = tmp_path_factory.mktemp("mutation")
    header, body = read_raw(source / "model.safetensors")
    names = sorted(n for n in header if n != "__metadata__")
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["data_offsets", "shape", "dtype", "drop", "body"]))
    if field == "data_offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + data.draw(st.integers(-16, 16)), end + data.draw(st.integers(-16, 16))]
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "X9"]))
    elif field == "drop":
        del header[name]
    else:
        body = body[: data.draw(st.integers(0, len(body)))]
    model = work / "model"
    shutil.copytree(source, model)
    write_raw(model / "model.safetensors", header, body)
    try:
        build_model({"solar": {"model": str(model), "trim": 1}}, work / "out")
    except DusError as error:
        assert "\n" not in str(error)
        return
    with safe_open(str(model / "model.safetensors"), "pt") as original, safe_open(str(work / "out" / "model.safetensors"), "pt") as built:
        for out_name in built.keys():
            layer_map = {"model.layers.3.": "model.layers.1.", "model.layers.4.": "model.layers.2.", "model.layers.5.": "model.layers.3."}
            src_name = out_name
            for prefix, src in layer_map.items():
                if out_name.startswith(prefix):
                    src_name = src + out_name[len(prefix):]
            assert built.get_tensor(out_name).equal(original.get_tensor(src_name)), out_name
