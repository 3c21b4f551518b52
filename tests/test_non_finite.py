"""No model that computes NaN leaves dus with exit 0 unannounced (issue 34): a transform of
`dus build` (a recipe scale, a dtype conversion) that turns finite weights infinite or NaN
is refused in one line, nothing left at the output path (a previous output kept as it
was); `dus import` of a GGUF that holds NaN or infinite weights says so in the line `dus
export` gives, and refuses a --dtype float16 that would make finite values infinite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("non-finite")
    return {dtype: make_tiny_model(root / dtype, "llama", num_layers=4, seed=5, dtype=dtype)
            for dtype in ("float32", "float16", "bfloat16")}


def _with_weight(source: Path, target: Path, name: str, value: float) -> Path:
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    weights[name][0, :2] = value
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _one_line(result, *fragments):
    """Exit 2 and one error line (import's progress bars aside) holding every fragment."""
    assert result.code == 2, result
    errors = [line for line in result.stderr.splitlines() if "dus: error:" in line]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.stderr
    assert errors[0].startswith("dus: error:") or "\r" in result.stderr, result.stderr


def _passthrough(model: Path, scale, extra: str = "") -> str:
    return (f"slices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 4]\n"
            f"  - sources:\n      - model: {model}\n        layer_range: [2, 4]\n"
            f"        parameters:\n          scale: {scale:.1e}\n"
            f"merge_method: passthrough\n{extra}")


# Every way a transform can leave the output dtype's range: a scale beyond it outright, a
# scale that overflows the weights of a narrow dtype, and a conversion to a narrower one.
CASES = {
    "scale 1e39 on float32": ("float32", "duplicate", 1e39, "", "scale 1e+39", "float32 holds at most 3.403e+38"),
    "scale 1e37 on float16": ("float16", "duplicate", 1e37, "", "scale 1e+37", "float16 holds at most 6.55e+04"),
    "scale 1e6 on float16 (every tensor)": ("float16", "passthrough", 1e6, "", "scale 1e+06", "out_dtype: float32"),
    "scale 1e39 on bfloat16 (every tensor)": ("bfloat16", "passthrough", 1e39, "", "scale 1e+39",
                                              "bfloat16 holds at most 3.39e+38"),
    "float32 to float16 out_dtype": ("big float32", "passthrough", 1.0, "out_dtype: float16\n",
                                     "conversion from float32 to float16", "out_dtype: float32"),
    "scale and conversion": ("float32", "passthrough", 1e6, "out_dtype: float16\n",
                             "scale 1e+06 and conversion from float32 to float16", "a scale of magnitude below"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_transform_that_overflows_is_refused_and_leaves_nothing(case, sources, tmp_path, run_cli):
    kind, recipe_kind, scale, extra, *fragments = CASES[case]
    model = sources.get(kind) or _with_weight(sources["float32"], tmp_path / "big", "model.layers.2.mlp.up_proj.weight",
                                               1e6)
    recipe = tmp_path / "recipe.yaml"
    if recipe_kind == "duplicate":
        recipe.write_text(f"duplicate: {{model: {model}, layers: [1, 3], times: 1, scale: {scale:.1e}}}\n{extra}")
    else:
        recipe.write_text(_passthrough(model, scale, extra))
    out = tmp_path / "out"
    result = run_cli("build", recipe, "-o", out)
    _one_line(result, "turns", "finite value", "into infinity or NaN", *fragments)
    assert result.stderr.count("\n") == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # A previous output is kept as it was: replaced only at the end, by a rename.
    previous = run_cli("build", "--solar", model, "--trim", "1", "-o", out)
    assert previous.code == 0, previous
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _one_line(run_cli("build", recipe, "-o", out, "--force"), "into infinity or NaN")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not list(tmp_path.glob(".out*"))


def test_scales_within_range_and_non_finite_sources_still_build(sources, tmp_path, run_cli):
    """The boundary: a large scale that stays finite builds; a source that already holds
    NaN is copied as it is (as a byte copy would), not blamed on the transform."""
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(_passthrough(sources["float16"], 100.0))
    assert run_cli("build", recipe, "-o", tmp_path / "ok").code == 0
    nan = _with_weight(sources["float32"], tmp_path / "nan", "model.layers.2.mlp.up_proj.weight", float("nan"))
    recipe.write_text(_passthrough(nan, 2.0))
    assert run_cli("build", recipe, "-o", tmp_path / "nan-out").code == 0


@pytest.mark.parametrize("value, dtype", [(float("nan"), "float32"), (float("inf"), "bfloat16"),
                                          (float("-inf"), "float16"), (float("nan"), "float16")])
def test_import_of_a_gguf_holding_non_finite_weights_warns_like_export(value, dtype, sources, tmp_path, run_cli):
    model = _with_weight(sources["float32"], tmp_path / "model", "model.layers.1.mlp.up_proj.weight", value)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.3.self_attn.o_proj.weight"][1, 1] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    exported = run_cli("export", model, "-o", tmp_path / "m.gguf", "--type", "f32")
    assert exported.code == 0, exported
    export_warning = [line for line in exported.stderr.splitlines() if line.startswith("warning:")]
    result = run_cli("import", tmp_path / "m.gguf", "-o", tmp_path / "imported", "--dtype", dtype)
    assert result.code == 0, result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    tail = ("holds 2 NaN or infinite values, and 1 more tensor too, written as they are: the model computes NaN; "
            "check the checkpoint (a diverged training or a damaged file?)")
    assert warnings[0] == f"warning: model.layers.1.mlp.up_proj.weight {tail}", warnings
    assert export_warning[0].endswith(tail)  # the same line export gives


def test_import_refuses_float16_that_would_overflow(sources, tmp_path, run_cli):
    model = _with_weight(sources["float32"], tmp_path / "model", "model.layers.1.mlp.up_proj.weight", 1e6)
    assert run_cli("export", model, "-o", tmp_path / "m.gguf", "--type", "f32").code == 0
    out = tmp_path / "imported"
    _one_line(run_cli("import", tmp_path / "m.gguf", "-o", out, "--dtype", "float16"),
              "--dtype float16: 2 finite values of m.gguf lie beyond float16's range", "--dtype float32 or bfloat16")
    assert not out.exists() and not list(tmp_path.glob(".imported*"))
    result = run_cli("import", tmp_path / "m.gguf", "-o", out, "--dtype", "bfloat16")
    assert result.code == 0 and not [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    imported = load_file(out / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in imported.values())
