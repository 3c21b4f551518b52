"""Healing the build plan in memory (the default) against healing the checkpoint as built
(`in_memory: false`): same seed, same settings, the same healed model; and what the
in-memory path shares, streams and falls back from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import changed_layers, tensors

from dus.build import build_model
from dus.heal.config import load_config
from dus.heal.run import heal
from dus.heal.teacher import shared_prefix

FAST = {
    "sft.report_to": "none",
    "sft.warmup_steps": 0,
    "sft.logging_steps": 1,
    "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2,
    "sft.max_length": 64,
    "sft.max_steps": 3,
    "seam.radius": 1,
    "calibrate.tokens": 256,
    "calibrate.window": 64,
}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("heal-memory")
    source = make_tiny_model(root / "source", "llama", num_layers=6, seed=5)
    # SOLAR 6 -> 8 (trim 2): [0 1 2 3 | 2 3 4 5], seam at 4, repeated copies 4 and 5
    build_model({"solar": {"model": str(source), "trim": 2}}, root / "built")
    prose = "\n\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(300))
    (root / "prose.txt").write_text(prose + "\n")
    return root


def run(space, out, **overrides):
    settings = {**FAST, "data.path": str(space / "prose.txt"), **overrides}
    return heal(space / "built", out, load_config(None, settings))


def relative_gap(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("student", ["band", "lora"])
def test_in_memory_heal_equals_the_heal_of_the_built_checkpoint(student, space, tmp_path):
    forced = {"distill.student": student, "calibrate.factors": [0.7]}  # layers 4, 5 scaled: frozen and trained
    memory = run(space, tmp_path / "memory", **forced)
    built = run(space, tmp_path / "built", **forced, in_memory=False)
    assert memory.record["in_memory"] is True and memory.record["logits"] == "chunked"
    assert built.record["in_memory"] is False and "in_memory is false" in built.record["built_because"]
    assert memory.record["calibration"]["factor"] == built.record["calibration"]["factor"]
    assert memory.record["calibration"]["scores"] == built.record["calibration"]["scores"]
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "built")
    assert a.keys() == b.keys()
    for name in a:
        assert relative_gap(a[name], b[name]) < 1e-5, name
    trained = changed_layers(space / "built", tmp_path / "memory")
    assert trained, "healing changed nothing"
    assert abs(memory.final_loss - built.final_loss) <= 1e-5 * max(1.0, abs(built.final_loss))
    # the healed manifest carries the calibrated plan: rebuilding from it gives the calibrated start
    manifest = json.loads((tmp_path / "memory" / "dus-manifest.json").read_text())
    scaled = [layer["index"] for layer in manifest["plan"]["layers"] if layer.get("scale")]
    assert scaled == memory.record["calibration"]["layers"]


def test_frozen_layers_are_byte_copies_of_the_source_and_the_teacher_is_shared(space, tmp_path):
    result = run(space, tmp_path / "out", **{"calibrate.enabled": False})
    assert result.record["layers"] == [3, 4]
    healed, source = tensors(tmp_path / "out"), tensors(space / "source")
    for out_index, source_index in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        for name, value in source.items():
            if f".layers.{source_index}." not in name:
                continue
            out_name = name.replace(f".layers.{source_index}.", f".layers.{out_index}.")
            assert torch.equal(healed[out_name], value) is (out_index not in (3, 4)), out_name
    # the band starts at 3: the teacher takes the student's hidden state after its layers 0-2
    from dus.manifest import read_manifest

    assert shared_prefix(read_manifest(space / "built").plan, "source-dir", {3, 4}) == 0  # another name: nothing
    plan = read_manifest(space / "built").plan
    assert shared_prefix(plan, plan.config_from, {3, 4}) == 3
    assert shared_prefix(plan, plan.config_from, {0}) == 0


def test_a_changed_source_is_no_teacher_and_falls_back_to_the_built_checkpoint_in_one_line(space, tmp_path, capsys):
    from dus.errors import DusError

    source = tmp_path / "source"
    shutil.copytree(space / "source", source)
    build_model({"solar": {"model": str(source), "trim": 2}}, tmp_path / "built")
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    settings = {**FAST, "data.path": str(space / "prose.txt"), "sft.max_steps": 1}
    # the default teacher is the build's source: changed, it is not the model the build came from
    with pytest.raises(DusError, match="is not the model this build came from .model.safetensors changed"):
        heal(tmp_path / "built", tmp_path / "refused", load_config(None, settings))
    assert not (tmp_path / "refused").exists()
    # named by its path, the user asks for it: the checkpoint as built is healed, one line says why
    result = heal(tmp_path / "built", tmp_path / "out", load_config(None, settings), teacher=str(source))
    assert result.record["in_memory"] is False
    assert "changed since the build (model.safetensors)" in result.record["built_because"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "healing the checkpoint as built" in line]
    assert len(lines) == 1
    band = heal(tmp_path / "built", tmp_path / "band", load_config(None, {**settings, "mode": "band"}))
    assert band.record["in_memory"] is False and band.record["teacher"] is None


def test_relative_sources_are_found_from_the_model_not_the_current_directory(space, tmp_path, monkeypatch):
    """A recipe's relative source path is resolved from where the build ran; a heal run from
    another directory, where another model sits at that relative path, still finds the source."""
    from dus.manifest import read_manifest

    (tmp_path / "a" / "models").mkdir(parents=True)
    (tmp_path / "b" / "models").mkdir(parents=True)
    shutil.copytree(space / "source", tmp_path / "a" / "models" / "src")
    from dus.tiny import make_tiny_model

    make_tiny_model(tmp_path / "b" / "models" / "src", "llama", num_layers=6, seed=99)  # an unrelated model
    monkeypatch.chdir(tmp_path / "a")
    build_model({"solar": {"model": "models/src", "trim": 2}}, tmp_path / "a" / "built")
    monkeypatch.chdir(tmp_path / "b")
    plan = read_manifest(tmp_path / "a" / "built").plan
    assert Path(plan.models["models/src"]).resolve() == (tmp_path / "a" / "models" / "src").resolve()
    settings = {**FAST, "data.path": str(space / "prose.txt"), "sft.max_steps": 1, "calibrate.enabled": False}
    result = heal(tmp_path / "a" / "built", tmp_path / "out", load_config(None, settings))
    assert result.record["in_memory"] is True
    assert Path(result.record["teacher"]).resolve() == (tmp_path / "a" / "models" / "src").resolve()


def test_a_healed_model_heals_again_from_its_checkpoint(space, tmp_path):
    first = run(space, tmp_path / "first", **{"sft.max_steps": 1})
    assert first.record["in_memory"] is True
    second = heal(tmp_path / "first", tmp_path / "second",
                  load_config(None, {**FAST, "data.path": str(space / "prose.txt"), "sft.max_steps": 1}))
    assert second.record["in_memory"] is False and "healed after it was built" in second.record["built_because"]
    history = json.loads((tmp_path / "second" / "dus-manifest.json").read_text())["history"]
    assert [entry["stage"] for entry in history] == ["build", "heal", "heal"]


def test_a_resumed_in_memory_band_heal_ends_where_an_uninterrupted_one_does(space, tmp_path):
    settings = {"sft.lr_scheduler_type": "constant", "sft.save_steps": 2, "calibrate.factors": [0.7]}
    run(space, tmp_path / "whole", **settings, **{"sft.max_steps": 4})
    run(space, tmp_path / "resumed", **settings, **{"sft.max_steps": 2})
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir()
    killed = checkpoint.with_name("checkpoint-3")  # a save cut short: no trainer_state.json
    shutil.copytree(checkpoint, killed)
    (killed / "trainer_state.json").unlink()
    config = load_config(None, {**FAST, **settings, "data.path": str(space / "prose.txt"), "sft.max_steps": 4})
    resumed = heal(space / "built", tmp_path / "resumed", config, resume=True)
    assert resumed.record["in_memory"] is True and resumed.record["resumed_from"].endswith("checkpoint-2")
    assert resumed.record["steps_this_run"] == 2
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "resumed")
    assert max(relative_gap(a[name], b[name]) for name in a) < 1e-6
