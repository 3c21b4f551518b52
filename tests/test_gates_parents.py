"""Learned per-layer gates and the `parents` preset: a gated child starts at parent A, a
gates-only heal changes no weight, folded gates give the in-memory model's logits, the swap
takes each layer from the parent that moved it more, and every bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tensors

from dus.build import build_model
from dus.errors import DusError
from dus.heal.config import load_config
from dus.heal.run import heal

FAST = {
    "sft.report_to": "none", "sft.warmup_steps": 0, "sft.logging_steps": 1, "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2, "sft.max_length": 32, "sft.max_steps": 3, "seam.radius": 1,
    "calibrate.enabled": False, "gates.lr": 0.5,
}


def fine_tune_of(base, out, layers, size, seed):
    """A copy of `base` whose given layers moved by `size` of their norm (a stand-in fine-tune)."""
    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    for shard in out.glob("*.safetensors"):
        weights = load_file(shard)
        for name, value in weights.items():
            if any(f".layers.{i}." in name for i in layers) and value.dim() == 2:
                noise = torch.randn(value.shape, generator=generator)
                weights[name] = value + size * noise * value.norm() / noise.norm()
        save_file(weights, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, A (moved most in layers 0-1) and B (moved most in layers 2-3), and some text."""
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("parents")
    base = make_tiny_model(root / "base", "llama", num_layers=4, seed=3)
    fine_tune_of(base, root / "A", [0, 1], 0.05, 1)
    fine_tune_of(base, root / "B", [2, 3], 0.05, 2)
    (root / "text.txt").write_text("\n\n".join(f"# {i} + {i} = ({2 * i}) once upon a time" for i in range(120)) + "\n")
    return root


def parents(family, **spec):
    return {"parents": {"models": [str(family / "A"), str(family / "B")], "base": str(family / "base"), **spec}}


def logits_of(directory, ids):
    from dus.checkpoint import ModelDir

    model = ModelDir(directory).load_model(torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


def test_a_gated_child_before_healing_gives_exactly_parent_as_logits(family, tmp_path):
    build_model(parents(family, method="gated", layers=[1, 3]), tmp_path / "gated")
    plan = json.loads((tmp_path / "gated" / "dus-manifest.json").read_text())["plan"]
    layers = [(layer["model"].rsplit("/", 1)[-1], layer["layer"]) for layer in plan["layers"]]
    assert layers == [("A", 0), ("A", 1), ("A", 2), ("B", 1), ("B", 2), ("A", 3)]
    assert str(family / "base") not in plan["models"].values()  # the base only chose the layers
    assert torch.equal(logits_of(tmp_path / "gated", IDS), logits_of(family / "A", IDS))
    # in memory too: the plan over the loaded sources is A, bit for bit
    from dus.assemble import assemble, load_sources
    from dus.plan import LayerPlan

    plan = LayerPlan.from_dict(plan)
    model = assemble(plan, load_sources(plan, torch.float32)).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits_of(family / "A", IDS))


def test_a_gated_child_whose_run_ends_at_the_top_is_still_a_with_as_head(family, tmp_path):
    build_model(parents(family, method="gated", layers=[2, 4]), tmp_path / "top")
    plan = json.loads((tmp_path / "top" / "dus-manifest.json").read_text())["plan"]
    assert plan["layers"][-1]["model"].endswith("/B") and plan["head"]["model"].endswith("/A")
    assert torch.equal(logits_of(tmp_path / "top", IDS), logits_of(family / "A", IDS))


def test_the_gated_run_defaults_to_where_b_moved_more(family, tmp_path):
    build_model(parents(family, method="gated"), tmp_path / "gated")
    plan = json.loads((tmp_path / "gated" / "dus-manifest.json").read_text())["plan"]
    inserted = [layer["layer"] for layer in plan["layers"] if layer["model"].endswith("/B")]
    assert inserted == [2] or inserted == [3]  # a quarter of 4 layers, inside B's moved layers 2-3


def test_the_swap_takes_each_layer_from_the_parent_whose_weights_moved_more(family, tmp_path):
    build_model(parents(family, method="swap", blend=0.0), tmp_path / "swap")
    plan = json.loads((tmp_path / "swap" / "dus-manifest.json").read_text())["plan"]
    owners = [(layer["model"].rsplit("/", 1)[-1], layer["layer"]) for layer in plan["layers"]]
    assert owners == [("A", 0), ("A", 1), ("B", 2), ("B", 3)]
    build_model(parents(family, method="swap"), tmp_path / "blended")
    blended = json.loads((tmp_path / "blended" / "dus-manifest.json").read_text())["plan"]["layers"]
    assert [bool(layer.get("blend")) for layer in blended] == [False, True, True, False]
    assert blended[1]["blend"]["model"].endswith("/B") and blended[1]["blend"]["layer"] == 1


def test_the_dry_run_reports_how_much_each_fine_tune_moved_each_layer(family, tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(parents(family, method="gated")))
    result = run_cli("build", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.code == 0, result
    text = result.stdout + result.stderr
    assert "change against the base" in text and "more" in text
    assert not (tmp_path / "out").exists()


def gate_heal(family, child, out, **settings):
    cfg = load_config(None, {**FAST, "data.path": str(family / "text.txt"), **settings})
    return heal(child, out, cfg)


def test_a_gates_only_heal_changes_no_weight_and_folds_its_gates(family, tmp_path):
    build_model(parents(family, method="gated", layers=[1, 3]), tmp_path / "gated")
    before_a, before_b = tensors(family / "A"), tensors(family / "B")
    result = gate_heal(family, tmp_path / "gated", tmp_path / "healed", **{"distill.student": "gates"})
    gates = result.record["gates"]
    assert gates["trained_layers"] and all(int(i) in gates["trained_layers"] or True for i in gates["final"])
    opened = [row for i, row in gates["final"].items() if gates["initial"][i]["attention"] == 0.0]
    assert opened and any(v != 0.0 for row in opened for v in row.values())  # the closed gates moved
    # no weight tensor changed: the sources as they were, and every written tensor is a
    # source tensor times its gate (o_proj / down_proj) or the source tensor itself
    assert all(torch.equal(v, tensors(family / "A")[k]) for k, v in before_a.items())
    assert all(torch.equal(v, tensors(family / "B")[k]) for k, v in before_b.items())
    built, healed = tensors(tmp_path / "gated"), tensors(tmp_path / "healed")
    plan = json.loads((tmp_path / "healed" / "dus-manifest.json").read_text())["plan"]
    for index, layer in enumerate(plan["layers"]):
        source = tensors(layer["model"])
        for name, value in healed.items():
            if not name.startswith(f"model.layers.{index}."):
                continue
            rest = name.split(f"model.layers.{index}.", 1)[1]
            original = source[f"model.layers.{layer['layer']}.{rest}"]
            if "o_proj" in rest or "down_proj" in rest:
                branch = "attention" if "o_proj" in rest else "mlp"
                gate = gates["final"].get(str(index), {}).get(branch, 1.0 if layer["model"].endswith("/A") else 0.0)
                assert torch.allclose(value, original * gate, atol=1e-7), name
            else:
                assert torch.equal(value, original), name
    assert built.keys() == healed.keys()
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "learned gates" in card


def test_folded_gates_give_the_in_memory_models_logits(family, tmp_path, monkeypatch):
    """Band + gates: the written checkpoint computes what the trained in-memory model did."""
    import dus.heal.save as save

    kept = {}
    original = save.fold_gates

    def spy(student):
        with torch.no_grad():
            kept["before"] = student.model(IDS).logits.clone()  # gates still as hooks
        original(student)
        with torch.no_grad():
            kept["after"] = student.model(IDS).logits.clone()  # folded in memory

    monkeypatch.setattr(save, "fold_gates", spy)
    build_model(parents(family, method="gated", layers=[1, 3]), tmp_path / "gated")
    result = gate_heal(family, tmp_path / "gated", tmp_path / "healed", **{"gates.train": True})
    assert result.record["gates"]["trained_layers"]
    written = logits_of(tmp_path / "healed", IDS)
    assert torch.allclose(kept["before"], kept["after"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(written, kept["before"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(written, logits_of(family / "A", IDS))  # the heal did something


def test_a_one_model_builds_gates_keep_calibrations_floor(tiny_models, tmp_path):
    model = tiny_models("llama", num_layers=4, seed=5)
    build_model({"solar": {"model": str(model), "trim": 1}}, tmp_path / "solar")
    (tmp_path / "t.txt").write_text("\n\n".join(f"# {i} + {i} = ({2 * i})" for i in range(120)) + "\n")
    cfg = load_config(None, {**FAST, "data.path": str(tmp_path / "t.txt"), "distill.student": "gates",
                             "gates.lr": 50.0, "sft.max_steps": 2})
    result = heal(tmp_path / "solar", tmp_path / "healed", cfg)
    gates = result.record["gates"]
    assert all(v >= 0.5 - 1e-6 for row in gates["final"].values() for v in row.values())
    assert all(f == 0.5 for row in gates["floors"].values() for f in row.values())


@pytest.mark.parametrize("settings, message", [
    ({"gates.train": True, "distill.student": "lora"}, "gates.train works with the band, expand or gates students"),
    ({"gates.lr": -1.0}, "gates.lr must be a positive finite number"),
    ({"gates.lr": float("nan")}, "gates.lr must be a positive finite number"),
    ({"gates.train": "yes"}, "gates.train must be true or false"),
])
def test_bad_gate_settings_are_one_line(settings, message):
    with pytest.raises(DusError, match=message):
        load_config(None, settings)


def test_a_gate_that_is_not_finite_stops_the_run_and_writes_no_model(family, tmp_path):
    build_model(parents(family, method="gated", layers=[1, 3]), tmp_path / "gated")
    with pytest.raises(DusError, match="gate of output layer .* became (nan|inf)"):
        gate_heal(family, tmp_path / "gated", tmp_path / "healed", **{"distill.student": "gates", "gates.lr": 1e38,
                                                                         "sft.learning_rate": 1e38})
    assert not (tmp_path / "healed" / "model.safetensors").exists()


def test_a_recipe_scale_that_is_not_finite_is_refused_before_anything_is_written(family, tmp_path):
    recipe = {"slices": [{"sources": [{"model": str(family / "A"), "layer_range": [0, 4]}],
                          "parameters": {"scale": [{"filter": "o_proj", "value": float("nan")}]}}]}
    with pytest.raises(DusError, match="finite"):
        build_model(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"models": ["{A}"]}, "must list exactly two fine-tunes"),
    ({"models": ["{A}", "{B}", "{A}"]}, "must list exactly two fine-tunes"),
    ({"models": ["{A}", "{A}"]}, "names .* twice"),
    ({"method": "bogus"}, "`parents.method` 'bogus' is unknown"),
    ({"blend": 0.9}, "`parents.blend` must be a number in"),
    ({"base": "{deeper}"}, "has 6 layers, parent .* 4"),
    ({"base": "{vocab}"}, "disagree on vocab_size|has vocab_size"),
    ({"base": "{qwen}"}, "different architectures|is a qwen2"),
    ({"base": "{unrelated}"}, "is not a fine-tune of the base .* differ from the base's by \\d+% of their norm"),
])
def test_a_parents_recipe_that_cannot_be_built_is_one_line(family, tmp_path, change, message):
    from dus.tiny import make_tiny_model

    paths = {"A": family / "A", "B": family / "B",
             "deeper": make_tiny_model(tmp_path / "deeper", "llama", num_layers=6, seed=3),
             "vocab": make_tiny_model(tmp_path / "vocab", "llama", seed=3, vocab_size=300),
             "qwen": make_tiny_model(tmp_path / "qwen", "qwen2", seed=3),
             "unrelated": make_tiny_model(tmp_path / "unrelated", "llama", seed=77)}
    spec = parents(family)["parents"]
    for key, value in change.items():
        spec[key] = [v.format(**paths) for v in value] if isinstance(value, list) else (
            value.format(**paths) if isinstance(value, str) else value)
    with pytest.raises(DusError, match=message):
        build_model({"parents": spec}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scan_base_reports_each_fine_tunes_change_as_a_table_and_a_plot(family, tmp_path, run_cli):
    result = run_cli("scan", family / "A", "--base", family / "base", "--parent", family / "B", "-o", tmp_path / "r")
    assert result.code == 0, result
    changes = json.loads((tmp_path / "r" / "changes.json").read_text())["changes"]
    a, b = changes[str(family / "A")], changes[str(family / "B")]
    assert a[0] > b[0] and a[1] > b[1] and b[2] > a[2] and b[3] > a[3]  # A moved 0-1, B moved 2-3
    assert a[2] == 0.0 and b[0] == 0.0
    assert (tmp_path / "r" / "changes.png").stat().st_size > 1000
    assert "change against the base" in result.stdout
    assert run_cli("scan", family / "A", "--parent", family / "B").code == 2  # --parent needs --base


def test_a_parents_child_is_healed_with_train_parents_yaml_unless_told_otherwise(family, tmp_path, run_cli):
    build_model(parents(family, method="gated", layers=[1, 3]), tmp_path / "gated")
    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    result = run_cli("heal", tmp_path / "gated", "-o", tmp_path / "healed", "--data", family / "text.txt", *fast)
    assert result.code == 0, result
    assert "parents.yaml" in result.stderr and "gates:" in result.stderr and "steps:" in result.stderr
    record = json.loads((tmp_path / "healed" / "dus-manifest.json").read_text())["history"][-1]
    assert record["gates"] and record["teacher_rule"]["rule"] == "ensemble"
    assert len(record["teachers"]) == 2
    plain = run_cli("heal", tmp_path / "gated", "-o", tmp_path / "plain", "-c", "heal", "--data", family / "text.txt", *fast)
    assert plain.code == 0, plain
    assert json.loads((tmp_path / "plain" / "dus-manifest.json").read_text())["history"][-1]["gates"] is None
