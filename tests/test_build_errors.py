"""Bad input to `dus build`: one line naming the problem and the fix, exit 2, no output."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch


def _run(run_cli, tmp_path, recipe_text: str):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(recipe_text))
    result = run_cli("build", recipe, "-o", tmp_path / "out", "-q")
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: "), result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return lines[0]


def test_layer_range_outside_model(tiny_models, tmp_path, run_cli):
    model = tiny_models("llama", num_layers=4)
    message = _run(run_cli, tmp_path, f"""
        slices:
          - sources:
              - model: {model}
                layer_range: [0, 3]
          - sources:
              - model: {model}
                layer_range: [2, 9]
        merge_method: passthrough
    """)
    assert "recipe.yaml:8:22" in message and "[2, 9]" in message and "4 layers" in message
    assert "0 <= start < end <= 4" in message


def test_empty_layer_range(tiny_models, tmp_path, run_cli):
    model = tiny_models("llama", num_layers=4)
    message = _run(run_cli, tmp_path, f"""
        slices:
          - sources:
              - model: {model}
                layer_range: [3, 3]
    """)
    assert "recipe.yaml:5:22" in message and "empty" in message


def test_missing_model_path(tmp_path, run_cli):
    message = _run(run_cli, tmp_path, "solar: {model: /nowhere/model, trim: 2}\n")
    assert "/nowhere/model does not exist" in message and "local Hugging Face model directory" in message


def test_pickled_weights_are_refused_and_never_unpickled(tiny_models, tmp_path, run_cli, monkeypatch):
    source = tiny_models("llama", num_layers=4)
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("dus must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    message = _run(run_cli, tmp_path, f"solar: {{model: {pickled}, trim: 1}}\n")
    assert "pickled weights (pytorch_model.bin)" in message and "never unpickles" in message and "save_pretrained" in message


def test_unsupported_architecture(tiny_models, tmp_path, run_cli):
    source = tiny_models("llama", num_layers=4)
    odd = tmp_path / "odd"
    shutil.copytree(source, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (odd / "config.json").write_text(json.dumps(config))
    message = _run(run_cli, tmp_path, f"solar: {{model: {odd}, trim: 1}}\n")
    assert "'gpt2'" in message and "not supported" in message and "llama" in message and "qwen3" in message


@pytest.mark.parametrize("field,value", [("hidden_size", 64), ("num_kv_heads", 4), ("vocab_size", 300)])
def test_sources_whose_shapes_disagree(field, value, tiny_models, tmp_path, run_cli):
    a = tiny_models("llama", num_layers=4)
    b = tiny_models("llama", num_layers=4, seed=1, **{field: value})
    message = _run(run_cli, tmp_path, f"""
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}]
          - sources: [{{model: {b}, layer_range: [1, 4]}}]
    """)
    assert "disagree on" in message and "fine-tunes of the same base model" in message


def test_different_architectures(tiny_models, tmp_path, run_cli):
    a = tiny_models("llama", num_layers=4)
    b = tiny_models("qwen3", num_layers=4)
    message = _run(run_cli, tmp_path, f"graft: {{base: {a}, donor: {b}, layers: [1, 2]}}\n")
    assert "different architectures" in message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("solar: {model: M, trim: 2}\nlayer_rnge: 3\n", ["recipe.yaml:2:13", "unknown recipe key 'layer_rnge'"]),
        ("slices:\n  - sources:\n      - model: M\n        layer_range: [0, two]\n", ["recipe.yaml:4:22", "two integers"]),
        ("slices:\n  - sources:\n      - {model: M, layer_range: [0, 2], weight: 1}\n", ["recipe.yaml:3:49", "unknown key 'weight'"]),
        ("solar: {model: M, trim: -1}\n", ["recipe.yaml:1:25", "whole number >= 0"]),
        ("solar: {model: M, trim: 1}\nmerge_method: slerp\n", ["recipe.yaml:2:15", "passthrough"]),
        ("solar: {model: M\n", ["recipe.yaml:", "not valid YAML"]),
        ("- just\n- a list\n", ["a recipe is a YAML mapping"]),
        ("solar: {model: M, trim: 1}\nduplicate: {model: M, layers: [1, 2]}\n", ["exactly one of `slices` or a preset"]),
        ("slices:\n  - sources:\n      - {model: M, layer_range: [0, 2], parameters: {scale: fast}}\n", ["recipe.yaml:3:61", "scale must be"]),
        ("solar: {model: M, trim: 1}\ndtype: int4\n", ["recipe.yaml:2:8", "float32, float16 or bfloat16"]),
    ],
)
def test_malformed_recipe_names_the_location(text, expected, tmp_path, run_cli):
    message = _run(run_cli, tmp_path, text)
    for part in expected:
        assert part in message, message


def test_config_layer_count_disagrees_with_weights(tiny_models, tmp_path, run_cli):
    source = tiny_models("llama", num_layers=4)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (broken / "config.json").write_text(json.dumps(config))
    message = _run(run_cli, tmp_path, f"solar: {{model: {broken}, trim: 1}}\n")
    assert "says 6 layers" in message and "0..3" in message


def test_solar_cli_needs_trim_and_one_source(tiny_models, tmp_path, run_cli):
    model = tiny_models("llama", num_layers=4)
    result = run_cli("build", "--solar", model, "-o", tmp_path / "out")
    assert result.code == 2 and "--trim" in result.stderr
    result = run_cli("build", "--solar", model, "--trim", 4, "-o", tmp_path / "out")
    assert result.code == 2 and "leaves no layers" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("breakage", ["short_layer_types", "bad_derived_config"])
def test_source_config_that_transformers_rejects(breakage, tiny_models, tmp_path, run_cli):
    source = tiny_models("qwen2", num_layers=4)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    config = json.loads((broken / "config.json").read_text())
    if breakage == "short_layer_types":
        config["layer_types"] = config["layer_types"][:2]
    else:
        del config["layer_types"]  # transformers derives it, and rejects this config
        config["max_window_layers"] = "two"
    (broken / "config.json").write_text(json.dumps(config))
    message = _run(run_cli, tmp_path, f"solar: {{model: {broken}, trim: 1}}\n")
    assert "config" in message and "fix the source config" in message


def test_byte_copy_without_copy_file_range_gives_the_same_bytes(tiny_models, tmp_path, monkeypatch):
    """Where os.copy_file_range is missing (macOS, Windows) or refused, the buffered copy
    writes exactly the bytes the kernel path writes."""
    import os

    from dus.build import build_model

    source = tiny_models("llama", num_layers=4)
    build_model({"solar": {"model": str(source), "trim": 1}}, tmp_path / "kernel")
    monkeypatch.delattr(os, "copy_file_range")
    build_model({"solar": {"model": str(source), "trim": 1}}, tmp_path / "buffered")
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == (tmp_path / "buffered" / "model.safetensors").read_bytes()

    def refused(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    build_model({"solar": {"model": str(source), "trim": 1}}, tmp_path / "refused")
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == (tmp_path / "refused" / "model.safetensors").read_bytes()


def test_damaged_shard_index_is_one_line(tiny_models, tmp_path, run_cli):
    source = tiny_models("llama", num_layers=4)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    message = _run(run_cli, tmp_path, f"solar: {{model: {broken}, trim: 1}}\n")
    assert "model.safetensors.index.json" in message and "not valid JSON" in message and "re-download" in message


@pytest.mark.parametrize("recipe, expected", [
    ("solar: {{model: {m}, trim: 1}}\nseam_smoothing: {{method: linear, width: 9}}\n", ["recipe.yaml:2:17", "cannot blend the seam", "smaller width"]),
    ("expand: {{model: {m}, positions: [1, 1]}}\n", ["recipe.yaml:1:", "expand position 1 is listed twice"]),
    ("duplicate: {{model: {m}, layers: [1, 3], times: 100000000}}\n", ["recipe.yaml:1:", "over 4096 layers"]),
])
def test_options_that_cannot_be_honoured_are_refused(recipe, expected, tiny_models, tmp_path, run_cli):
    """Nothing is silently adjusted: what cannot be built as written is an error."""
    message = _run(run_cli, tmp_path, recipe.format(m=tiny_models("llama", num_layers=4)))
    for part in expected:
        assert part in message, message
