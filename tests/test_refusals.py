"""Non-finite settings and training, and paths with `..`: refused in one line (exit 2),
nothing loadable left behind (issue: nothing lost, nothing random, nothing hangs)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dus.build import build_model

FAST = ["--steps", "2", "--batch-size", "1", "--max-length", "32", "--report-to", "none", "--set", "sft.logging_steps=1",
        "--set", "calibrate.enabled=false"]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("refusals")
    source = make_tiny_model(root / "source", "llama", num_layers=4, seed=3)
    build_model({"solar": {"model": str(source), "trim": 1}}, root / "built")
    (root / "text.txt").write_text("\n\n".join(f"Plain sentence {i} for a tiny heal." for i in range(60)) + "\n")
    return root


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "sft.learning_rate must be a finite number"),
    (["--lr", "nan"], "sft.learning_rate must be a finite number"),
    (["--epochs", "inf"], "sft.num_train_epochs must be a finite number"),
    (["--set", "distill.temperature=.inf"], "distill.temperature must be a positive finite number"),
    (["--set", "data.max_samples=-1"], "data.max_samples must be a whole number >= 1"),
])
def test_non_finite_or_negative_settings_are_refused_before_any_output(args, message, space, tmp_path, run_cli):
    result = run_cli("heal", space / "built", "-o", tmp_path / "out", "--data", space / "text.txt", *FAST, *args)
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result
    assert not (tmp_path / "out").exists()


def test_training_that_turns_non_finite_stops_without_a_model(space, tmp_path, run_cli):
    broken = tmp_path / "broken"
    shutil.copytree(space / "built", broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")  # inside the seam band
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("heal", broken, "-o", tmp_path / "out", "--data", space / "text.txt", *FAST,
                     "--set", "in_memory=false")
    errors = [line for line in result.stderr.splitlines() if line.startswith("dus: error:")]
    assert result.code == 2 and len(errors) == 1 and "no model was written" in errors[0], result
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_nan_recipe_scale_is_refused(space, tmp_path, run_cli):
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(f"duplicate: {{model: {space / 'source'}, layers: [1, 3], scale: .nan}}\n")
    result = run_cli("build", recipe, "-o", tmp_path / "out")
    assert result.code == 2 and "finite number" in result.stderr and not (tmp_path / "out").exists(), result


def test_force_through_dot_dot_replaces_the_output_in_place(space, tmp_path, run_cli):
    out = tmp_path / "B"
    assert run_cli("build", "--solar", space / "source", "--trim", 1, "-o", out).code == 0
    result = run_cli("build", "--solar", space / "source", "--trim", 2, "-o", out / ".." / "B", "--force")
    assert result.code == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]  # no hidden leftovers beside it
    assert len({k.split(".")[2] for k in load_file(out / "model.safetensors") if ".layers." in k}) == 4


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (alias_bomb(8), "expands to more than 100,000 values"),
    ("[" * 300 + "]" * 300 + "\n", "nested more than 50 levels"),
    ("[" * 20000 + "\n", "nested too deeply"),
    ("? [1, 2]\n: x\n", "is not a name"),
    ("solar: {model: m, 3: x}\n", "key 3 is not a name"),
])
def test_hostile_recipes_are_refused_quickly_in_one_line(text, message, tmp_path, run_cli):
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(text)
    result = run_cli("build", recipe, "-o", tmp_path / "out")
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result
    assert not (tmp_path / "out").exists()
