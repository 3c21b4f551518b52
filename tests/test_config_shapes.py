"""A config.json that contradicts the weights' shapes (issue 34): every size the config
implies (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
head_dim, vocab_size, num_local_experts) is checked against the safetensors headers when
a model is opened (dus.sources.load_source), so build, export, compare, scan, heal and
search refuse it in one line naming the field, its value, the tensor and its shape,
before any output exists, instead of writing a model that does not load or ending in a
transformers traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dus.errors import DusError
from dus.tiny import ARCHITECTURES

SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "head_dim", "num_local_experts")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("config-shapes")
    return {arch: make_tiny_model(root / arch, arch, num_layers=2) for arch in ARCHITECTURES}


def _with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_every_family_as_saved_passes(families):
    from dus.sources import load_source

    for arch, path in families.items():
        load_source(arch, str(path))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("factor", [2, 0.5])
def test_every_size_the_config_states_is_checked(arch, factor, families, tmp_path):
    """Each size field the family's config holds, made larger and smaller: one line naming
    the field and its value, a tensor and its shape, and the fix."""
    from dus.sources import load_source

    config = json.loads((families[arch] / "config.json").read_text())
    fields = [key for key in SIZE_FIELDS if isinstance(config.get(key), int)]
    assert {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"} <= set(fields)
    for key in fields:
        value = max(1, int(config[key] * factor))
        if value == config[key]:
            value += 1
        model = _with_config(families[arch], tmp_path / f"{key}-{value}", **{key: value})
        with pytest.raises(DusError) as error:
            load_source("m", str(model))
        message = str(error.value)
        assert "\n" not in message
        assert f"{key} {value}" in message, (arch, key, message)
        assert "has shape [" in message and f"fix {model / 'config.json'}" in message, message


@pytest.mark.parametrize("changes, fragment", [
    ({"num_key_value_heads": None}, "num_key_value_heads 4 x head_dim 8 = 32, but model.layers.0.self_attn.k_proj.weight "
                                    "has shape [16, 32]"),  # transformers' default: as many as the heads
    ({"hidden_size": None}, "config.json: no hidden_size, which the weights need"),
    ({"intermediate_size": "64"}, 'intermediate_size is "64"; it must be a whole number of at least 1'),
    ({"vocab_size": 0}, "vocab_size is 0; it must be a whole number"),
    ({"head_dim": True}, "head_dim is true; it must be a whole number"),
])
def test_absent_or_malformed_sizes_are_one_line(changes, fragment, families, tmp_path):
    from dus.sources import load_source

    model = _with_config(families["llama"], tmp_path / "m", **changes)
    with pytest.raises(DusError) as error:
        load_source("m", str(model))
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("A config that contradicts its weights is refused before anything is written. " * 40)
    return path


FAST_HEAL = ["--steps", "2", "--batch-size", "1", "--max-length", "32", "--report-to", "none",
             "--set", "calibrate.enabled=false"]
COMMANDS = {
    "build": lambda model, text, out: ["build", "--solar", model, "--trim", "1", "-o", out],
    "export": lambda model, text, out: ["export", model, "-o", out],
    "compare": lambda model, text, out: ["compare", model, "--data", text, "-o", out, "--no-generate"],
    "scan": lambda model, text, out: ["scan", model, "--data", text, "-o", out],
    "heal": lambda model, text, out: ["heal", model, "--data", text, "-o", out, *FAST_HEAL],
    "search": lambda model, text, out: ["search", model, "--data", text, "--depth", "3", "--evals", "2", "-o", out],
}


@pytest.fixture
def nothing_is_loaded(monkeypatch):
    """No model is loaded or measured: the refusal comes from the headers, before."""
    from dus.checkpoint import ModelDir

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(ModelDir, "load_model", loaded)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", loaded)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("key, value", [("intermediate_size", 96), ("num_key_value_heads", 1), ("vocab_size", 300)])
def test_every_command_refuses_before_any_output(command, key, value, families, tmp_path, run_cli, nothing_is_loaded):
    model = _with_config(families["llama"], tmp_path / "model", **{key: value})
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = tmp_path / ("out.gguf" if command == "export" else "out")
    result = run_cli(*COMMANDS[command](model, _text(tmp_path), out))
    assert result.code == 2, result
    assert result.stderr.count("\n") == 1 and f"config.json says {key} {value}" in result.stderr, result.stderr
    assert not out.exists() and {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "text.txt"]
