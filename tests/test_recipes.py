"""Every recipe kind on every architecture: the built model equals, exactly in float32,
a reference stacked in memory from the sources' own layer modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from conftest import copy_with_two_token_ids_swapped

from dus.build import build_model
from dus.tiny import ARCHITECTURES
from reference import assemble, load, logits, sample_ids

N = 6  # layers of every tiny source here


def _check(built_dir, reference):
    built = load(built_dir)
    ids = sample_ids(built.config.vocab_size, length=20)
    assert built.config.num_hidden_layers == len(reference.model.layers)
    assert torch.equal(logits(built, ids), logits(reference, ids))
    return built, ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_duplicate_middle_layers(arch, tiny_models, tmp_path):
    source_dir = tiny_models(arch, num_layers=N)
    result = build_model({"duplicate": {"model": str(source_dir), "layers": [2, 5]}}, tmp_path / "out")
    order = [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert [layer.layer for layer in result.plan.layers] == order
    assert result.plan.seams == [5]
    _check(tmp_path / "out", assemble({"m": load(source_dir)}, [("m", i) for i in order], base="m"))
    _check_layer_types(source_dir, tmp_path / "out", order)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_interleave_two_finetunes(arch, tiny_models, tmp_path):
    a, b = tiny_models(arch, num_layers=N, seed=0), tiny_models(arch, num_layers=N, seed=1)
    recipe = {"interleave": {"models": [str(a), str(b)], "block": 2, "step": 1}}
    result = build_model(recipe, tmp_path / "out")
    # blocks of 2 starting every layer, alternating: a[0,2) b[1,3) a[2,4) b[3,5) a[4,6)
    order = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3), ("b", 4), ("a", 4), ("a", 5)]
    assert [(("a" if l.model == str(a) else "b"), l.layer) for l in result.plan.layers] == order
    sources = {"a": load(a), "b": load(b)}
    _check(tmp_path / "out", assemble(sources, order, base="a", head_from="a"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_graft_layer_range_from_donor(arch, tiny_models, tmp_path):
    base, donor = tiny_models(arch, num_layers=N, seed=0), tiny_models(arch, num_layers=N, seed=2)
    result = build_model({"graft": {"base": str(base), "donor": str(donor), "layers": [2, 4]}}, tmp_path / "out")
    order = [("b", 0), ("b", 1), ("d", 2), ("d", 3), ("b", 4), ("b", 5)]
    assert result.plan.seams == [2, 4]
    _check(tmp_path / "out", assemble({"b": load(base), "d": load(donor)}, order, base="b", head_from="b"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_expand_preserves_the_base_function(arch, tiny_models, tmp_path):
    source_dir = tiny_models(arch, num_layers=N)
    result = build_model({"expand": {"model": str(source_dir), "every": 3}}, tmp_path / "out")
    assert [layer.layer for layer in result.plan.layers] == [0, 1, 2, 2, 3, 4, 5, 5]
    assert result.plan.new_layers == [3, 7]
    assert result.plan.seams == []  # new blocks are the identity: no seam
    built, ids = _check(
        tmp_path / "out",
        assemble({"m": load(source_dir)}, [("m", i) for i in [0, 1, 2, 2, 3, 4, 5, 5]], base="m", zero_output={3, 7}),
    )
    assert torch.equal(logits(built, ids), logits(load(source_dir), ids))
    manifest = json.loads((tmp_path / "out" / "dus-manifest.json").read_text())
    assert manifest["plan"]["new_layers"] == [3, 7]


def test_expand_at_positions_zeroes_only_output_projections(tiny_models, tmp_path):
    source_dir = tiny_models("qwen2", num_layers=N)
    build_model({"expand": {"model": str(source_dir), "positions": [1]}}, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, safe_open(source_dir / "model.safetensors", "pt") as src:
        for name in out.keys():
            if ".layers.2." not in name:
                continue
            source_tensor = src.get_tensor(name.replace(".layers.2.", ".layers.1."))
            if "o_proj" in name or "down_proj" in name:
                assert not out.get_tensor(name).any(), name
            else:
                assert torch.equal(out.get_tensor(name), source_tensor), name


@pytest.mark.parametrize("arch", ["llama", "mixtral", "phi3"])
def test_duplicate_with_output_projection_scale(arch, tiny_models, tmp_path):
    source_dir = tiny_models(arch, num_layers=N)
    build_model({"duplicate": {"model": str(source_dir), "layers": [2, 4], "scale": 0.5}}, tmp_path / "out")
    order = [0, 1, 2, 3, 2, 3, 4, 5]
    reference = assemble(
        {"m": load(source_dir)}, [("m", i) for i in order], base="m", scale_output={2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}
    )
    _check(tmp_path / "out", reference)


def test_mergekit_style_scale_gradient_and_filters(tiny_models, tmp_path):
    """Per-source conditional scale with a gradient over the slice, falling through to a
    slice-level default: evaluated per layer exactly as mergekit does."""
    source_dir = tiny_models("llama", num_layers=N)
    recipe = {
        "slices": [
            {"sources": [{"model": str(source_dir), "layer_range": [0, 4]}]},
            {
                "sources": [{
                    "model": str(source_dir), "layer_range": [1, 6],
                    "parameters": {"scale": [{"filter": "o_proj", "value": [0.0, 1.0]}]},
                }],
                "parameters": {"scale": [{"filter": "down_proj", "value": 0.25}]},
            },
        ],
        "merge_method": "passthrough",
    }
    result = build_model(recipe, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, safe_open(source_dir / "model.safetensors", "pt") as src:
        for offset in range(5):
            t = offset / 4
            index, source_layer = 4 + offset, 1 + offset
            for part, factor in (("self_attn.o_proj", t), ("mlp.down_proj", 0.25), ("mlp.up_proj", None)):
                got = out.get_tensor(f"model.layers.{index}.{part}.weight")
                original = src.get_tensor(f"model.layers.{source_layer}.{part}.weight")
                expected = original if factor is None else original * factor
                assert torch.equal(got, expected), (index, part)
    assert result.plan.layers[4].transform.startswith("scale o_projx0")


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_seam_smoothing_blends_overlapping_layers(method, tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=N)
    recipe = {"solar": {"model": str(source_dir), "trim": 2}, "seam_smoothing": {"method": method, "width": 1}}
    result = build_model(recipe, tmp_path / "out")
    # SOLAR 6 -> 8: [0,1,2,3 | 2,3,4,5]; seam at 4. Output 3 (=A[3]) blends towards B's
    # layer 1, output 4 (=B[2]) towards A's layer 4, each by 1/3.
    blends = {i: layer.blend for i, layer in enumerate(result.plan.layers) if layer.blend}
    assert set(blends) == {3, 4}
    assert (blends[3].layer, blends[4].layer) == (1, 4)
    assert math.isclose(blends[3].t, 1 / 3) and math.isclose(blends[4].t, 1 / 3)
    name = "self_attn.q_proj.weight"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, safe_open(source_dir / "model.safetensors", "pt") as src:
        a, b = src.get_tensor(f"model.layers.3.{name}"), src.get_tensor(f"model.layers.1.{name}")
        got = out.get_tensor(f"model.layers.3.{name}")
        if method == "linear":
            assert torch.allclose(got, (2 / 3) * a + (1 / 3) * b, atol=1e-7)
        else:
            omega = torch.arccos(torch.dot(a.flatten() / a.norm(), b.flatten() / b.norm()))
            expected = (torch.sin(omega * 2 / 3) * a + torch.sin(omega / 3) * b) / torch.sin(omega)
            assert torch.allclose(got, expected, atol=1e-6)
        assert torch.equal(out.get_tensor(f"model.layers.0.{name}"), src.get_tensor(f"model.layers.0.{name}"))
    load(tmp_path / "out")


def test_non_layer_tensors_from_a_named_source(tiny_models, tmp_path):
    a, b = tiny_models("llama", num_layers=N, seed=0), tiny_models("llama", num_layers=N, seed=3)
    recipe = {
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 6]}]},
        ],
        "non_layer_from": str(b),
    }
    result = build_model(recipe, tmp_path / "out")
    assert result.plan.embeddings.model == result.plan.head.model == str(b)
    order = [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 2), ("b", 3), ("b", 4), ("b", 5)]
    _check(tmp_path / "out", assemble({"a": load(a), "b": load(b)}, order, base="b"))


def test_graft_warns_when_tokenizers_differ(tiny_models, tmp_path):
    base = tiny_models("llama", num_layers=N)
    donor, *_ = copy_with_two_token_ids_swapped(tiny_models("llama", num_layers=N, seed=4), tmp_path / "donor")
    result = build_model({"graft": {"base": str(base), "donor": str(donor), "layers": [1, 3]}}, tmp_path / "out")
    assert len(result.warnings) == 1
    assert "token id 65" in result.warnings[0] and "differ" in result.warnings[0]


def _check_layer_types(source_dir, out_dir, order):
    source = json.loads((source_dir / "config.json").read_text())
    out = json.loads((out_dir / "config.json").read_text())
    if "layer_types" in source:
        assert out["layer_types"] == [source["layer_types"][i] for i in order]
