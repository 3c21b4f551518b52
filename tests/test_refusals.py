"""Non-finite settings and training, and paths with `..`: refused in one line (exit 2),
nothing loadable left behind (issue: nothing lost, nothing random, nothing hangs)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_with_two_token_ids_swapped

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
    (["--steps", "-1"], "--steps -1: give a number of training steps >= 1"),
    (["--steps", "-7"], "--steps -7: give a number of training steps >= 1"),
    (["--epochs", "-1"], "--epochs -1.0: give a positive number of epochs"),
    (["--epochs", "0"], "--epochs 0.0: give a positive number of epochs"),
    (["--lora-r", "0"], "lora.r (the LoRA rank) must be a whole number >= 1"),
    (["--lora-r", "-4"], "lora.r (the LoRA rank) must be a whole number >= 1"),
    (["--set", "lora.lora_alpha=-16"], "lora.lora_alpha must be a positive number"),
    (["--set", "lora.lora_dropout=1.5"], "lora.lora_dropout must be a number in [0, 1)"),
    (["--batch-size", "-2"], "sft.per_device_train_batch_size must be positive"),
    (["--max-length", "-5"], "sft.max_length must be positive"),
    (["--radius", "-1"], "seam.radius must be a whole number >= 1"),
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


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("A report is written only where dus may write it. " * 40)
    return path


@pytest.fixture
def no_measuring(monkeypatch):
    """Any model measured fails the test: these refusals come before the first one."""
    import dus.compare.run
    import dus.scan.measure

    def measured(*args, **kwargs):
        raise AssertionError("a model was measured before the refusal")

    monkeypatch.setattr(dus.compare.run, "measure_model", measured)
    monkeypatch.setattr(dus.scan.measure, "measure_model", measured)


def _one_line(result, fragment):
    assert result.code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, result


def test_compare_writes_only_into_an_empty_directory_or_its_own_report(tiny_models, tmp_path, run_cli, monkeypatch):
    model, text, out = tiny_models("llama", 4), _text(tmp_path), tmp_path / "R"
    compare = ["compare", model, "--data", text, "-o", out, "--no-generate", "--window", 32]
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    _one_line(run_cli(*compare), "holds files dus did not write (report.md)")
    _one_line(run_cli(*compare, "--force"), "holds files dus did not write")
    assert (out / "report.md").read_text() == "my own notes"

    (out / "report.md").unlink()
    assert run_cli(*compare).code == 0  # an empty directory is fine
    assert "report.md" in json.loads((out / "dus-report.json").read_text())["files"]
    _one_line(run_cli(*compare), "holds a previous dus compare report; add --force")
    assert run_cli(*compare, "--force").code == 0
    (out / "dus-report.json").unlink()  # a report of a dus from before the marker: known by its files
    _one_line(run_cli(*compare), "holds a previous dus compare report; add --force")
    assert run_cli(*compare, "--force").code == 0 and (out / "dus-report.json").is_file()
    (out / "mine.txt").write_text("mine")
    _one_line(run_cli(*compare, "--force"), f"--force: {out} holds mine.txt, which dus did not write")
    assert (out / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("inside", ["", "reports", "reports/../../x", "link"])
def test_compare_never_writes_into_a_model_it_reads(inside, tiny_models, tmp_path, run_cli, no_measuring):
    import shutil

    model = tmp_path / "x"
    shutil.copytree(tiny_models("llama", 4), model)
    (tmp_path / "link").symlink_to(model)
    before = sorted(p.name for p in model.iterdir())
    out = tmp_path / "link" if inside == "link" else model / inside if inside else model
    for force in ([], ["--force"]):
        result = run_cli("compare", model, "--data", _text(tmp_path), "-o", out, "--no-generate", *force)
        _one_line(result, "which this command reads")
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
    (["--max-tokens", "-1", "--no-generate"], "--max-tokens -1: give at least 2"),
    (["--base", "nobody", "--no-generate"], "--base nobody: no model has that label"),
    (["--unhealed", "nobody", "--no-generate"], "--unhealed nobody: no model has that label"),
    (["-o", "a_file/out", "--no-generate"], "a_file is a file, not a directory"),
])
def test_compare_refuses_before_measuring(args, fragment, tiny_models, tmp_path, run_cli, no_measuring, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("in the way")
    model = tiny_models("llama", 4)
    output = [] if "-o" in args else ["-o", tmp_path / "out"]
    _one_line(run_cli("compare", model, model, "--label", "a", "--label", "b", "--data", _text(tmp_path), *output,
                      *args), fragment)
    assert not (tmp_path / "out").exists()


def test_scan_never_overwrites_recipes_or_reports_it_did_not_write(tiny_models, tmp_path, run_cli):
    model, text = tiny_models("llama", 4), _text(tmp_path)
    recipes, out = tmp_path / "recipes", tmp_path / "scan"
    scan = ["scan", model, "--data", text, "--window", 32, "--max-tokens", 200, "--write-recipes", recipes, "-o", out]
    recipes.mkdir()
    (recipes / "solar-trim1.yaml").write_text("solar: {model: mine, trim: 1}\n")
    (recipes / "other.yaml").write_text("mine: true\n")
    _one_line(run_cli(*scan), "already holds recipes a proposal may replace (solar-trim1.yaml); add --force")
    _one_line(run_cli(*scan, "--force"), "solar-trim1.yaml was not written by dus scan")
    assert (recipes / "solar-trim1.yaml").read_text() == "solar: {model: mine, trim: 1}\n"
    assert not out.exists()

    (recipes / "solar-trim1.yaml").unlink()
    assert run_cli(*scan).code == 0
    assert (recipes / "solar-trim1.yaml").read_text().startswith("# Proposed by `dus scan`")
    assert (recipes / "other.yaml").read_text() == "mine: true\n"
    _one_line(run_cli(*scan), "add --force")
    assert run_cli(*scan, "--force").code == 0  # its own proposals and its own report
    (out / "notes.md").write_text("mine")
    _one_line(run_cli(*scan, "--force"), "holds notes.md, which dus did not write")
    _one_line(run_cli("scan", model, "--data", text, "--write-recipes", model, "--force"), "which this command reads")


@pytest.mark.parametrize("command", [
    lambda model, text, tmp: ["scan", model, "--data", text, "--max-tokens", "-1"],
    lambda model, text, tmp: ["search", model, "--data", text, "--max-tokens", "-1", "--depth", 5, "--evals", 1, "-o", tmp / "s"],
])
def test_max_tokens_below_two_is_refused(command, tiny_models, tmp_path, run_cli, no_measuring):
    _one_line(run_cli(*command(tiny_models("llama", 4), _text(tmp_path), tmp_path)), "--max-tokens -1: give at least 2")


@pytest.mark.parametrize("size", ["0GB", "infGB", "nanMB", "-1GB", "1e400B"])
def test_impossible_shard_sizes_are_refused(size, tiny_models, tmp_path, run_cli):
    result = run_cli("build", "--solar", tiny_models("llama", 4), "--trim", 1, "-o", tmp_path / "out", "--shard-size", size)
    _one_line(result, f"--shard-size: shard size {size!r}")
    assert not (tmp_path / "out").exists()


def _with_config(source, target, **changes):
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("value, fragment", [
    ("four", 'num_hidden_layers is "four"; it must be a whole number'),
    (None, "no num_hidden_layers"),
    (0, "num_hidden_layers is 0; it must be a whole number"),
    (2.5, "num_hidden_layers is 2.5; it must be a whole number"),
])
def test_a_source_config_without_a_layer_count_is_one_line(value, fragment, tiny_models, tmp_path, run_cli):
    source = _with_config(tiny_models("llama", 4), tmp_path / "source", num_hidden_layers=value)
    _one_line(run_cli("build", "--solar", source, "--trim", 1, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers", [3, 5])
@pytest.mark.parametrize("command", [
    lambda model, text, tmp: ["compare", model, "--data", text, "-o", tmp / "out", "--no-generate"],
    lambda model, text, tmp: ["scan", model, "--data", text, "-o", tmp / "out"],
    lambda model, text, tmp: ["heal", model, "--data", text, "-o", tmp / "out", *FAST],
])
def test_a_config_that_disagrees_with_the_weights_is_refused(command, layers, tiny_models, tmp_path, run_cli,
                                                               no_measuring):
    model = _with_config(tiny_models("llama", 4), tmp_path / "mislabelled", num_hidden_layers=layers)
    result = run_cli(*command(model, _text(tmp_path), tmp_path))
    _one_line(result, f"config.json says {layers} layers but the weights hold layers 0..3 (4 layers)")
    assert not (tmp_path / "out").exists()


def test_load_model_checks_the_weights_too(tiny_models, tmp_path):
    from dus.checkpoint import ModelDir
    from dus.errors import DusError

    model = _with_config(tiny_models("llama", 4), tmp_path / "mislabelled", num_hidden_layers=5)
    with pytest.raises(DusError, match="says 5 layers"):
        ModelDir(model).load_model("float32")


@pytest.mark.parametrize("value", [5, 2.5, True, ["a list"], {"a": "dict"}])
def test_text_rows_that_are_not_strings_are_named_as_training_data(value, space, tmp_path, run_cli):
    data = tmp_path / "numbers.jsonl"
    data.write_text(json.dumps({"text": "a fine row"}) + "\n" + json.dumps({"text": value}) + "\n")
    result = run_cli("heal", space / "built", "-o", tmp_path / "out", *FAST, "--data", data)
    _one_line(result, "data row 1: `text` must be a string")
    assert "held-out" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["heal", "band", "lora-seam"])
def test_a_chat_whose_assistant_turn_lies_beyond_max_length_is_refused_where_it_would_be_cut(config, space, tmp_path,
                                                                                             run_cli):
    """Unpacked data and best-fit packing cut each example at --max-length; wrapped packing (the
    default heal and band configs) cuts nothing away, so there the chat still trains."""
    data = tmp_path / "late.jsonl"
    row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    data.write_text((json.dumps(row) + "\n") * 8)
    only = ["--set", "sft.assistant_only_loss=true"]
    for packing in (["--set", "sft.packing=false"], ["--set", "sft.packing=true", "--set", "sft.packing_strategy=bfd"]):
        result = run_cli("heal", space / "built", "-o", tmp_path / "out", *FAST, "-c", config, "--data", data, *only,
                         *packing)
        _one_line(result, "no example has a token to learn from within --max-length 32")
        assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_on_resume_is_named(space, tmp_path, run_cli):
    out = tmp_path / "out"
    args = ["heal", space / "built", "-o", out, "--data", space / "text.txt", *FAST, "--set", "sft.save_steps=1",
            "-c", "band"]
    assert run_cli(*args).code == 0
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run_cli(*[a if a != "2" else "3" for a in args], "--resume")
    _one_line(result, f"--resume: {weights} is damaged")
    optimizer = checkpoint / "optimizer.pt"
    if optimizer.is_file():
        weights.unlink()
        optimizer.write_bytes(optimizer.read_bytes()[:-500])
        result = run_cli(*[a if a != "2" else "3" for a in args], "--resume")
        _one_line(result, f"--resume: {optimizer} is damaged")


def test_a_sharegpt_turn_that_is_null_is_one_line(space, tmp_path, run_cli):
    data = tmp_path / "sharegpt.jsonl"
    row = {"conversations": [{"from": "human", "value": "hi"}, None, {"from": "gpt", "value": "hello"}]}
    data.write_text(json.dumps(row) + "\n")
    result = run_cli("heal", space / "built", "-o", tmp_path / "out", *FAST, "--data", data)
    _one_line(result, "data row 0: each sharegpt turn needs `from` and `value`, got None")
    assert not (tmp_path / "out").exists()


def test_chats_all_longer_than_max_length_are_refused_before_the_output_exists(space, tmp_path, run_cli):
    data = tmp_path / "long.jsonl"
    row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "reply " * 20}]}
    data.write_text((json.dumps(row) + "\n") * 8)
    result = run_cli("heal", space / "built", "-o", tmp_path / "out", *FAST, "-c", "lora-seam", "--data", data)
    _one_line(result, "no example has a token to learn from within --max-length 32")
    assert not (tmp_path / "out").exists()
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "reply " * 20}]}
    data.write_text((json.dumps(row) + "\n") * 8 + json.dumps(short) + "\n")  # one example fits: it trains
    assert run_cli("heal", space / "built", "-o", tmp_path / "out", *FAST, "-c", "lora-seam", "--data", data).code == 0


@pytest.mark.parametrize("damage, fragment", [
    (lambda text: text[: len(text) // 2], "tokenizer definition is not valid JSON"),
    (lambda text: "\udcff", "not UTF-8 text"),
    (lambda text: "[1, 2]", "not a tokenizer definition"),
    (lambda text: json.dumps({**json.loads(text), "model": {"type": "BPE"}}), "the tokenizer does not load"),
])
def test_export_of_a_corrupt_tokenizer_json_is_one_line(damage, fragment, tiny_models, tmp_path, run_cli):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama", 4), model)
    path = model / "tokenizer.json"
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape"))
    _one_line(run_cli("export", model, "-o", tmp_path / "m.gguf"), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _disk_full(*args, **kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["kernel copy fails", "kernel copy takes nothing", "every write fails"])
def test_a_full_disk_during_build_names_the_output_not_the_source(how, space, tmp_path, run_cli, monkeypatch):
    import os

    if how == "kernel copy fails":  # both kernel copies: copy_file_range and splice
        monkeypatch.setattr(os, "copy_file_range", _disk_full, raising=False)
        monkeypatch.setattr(os, "splice", _disk_full, raising=False)
    else:  # a full destination may answer a kernel copy with 0 bytes, as the end of the source does
        monkeypatch.setattr(os, "copy_file_range", lambda *args: 0, raising=False)
        monkeypatch.setattr(os, "splice", lambda *args, **kwargs: 0, raising=False)
        monkeypatch.setattr(os, "pwrite", _disk_full)
    out = tmp_path / "models" / "B"
    out.parent.mkdir()
    result = run_cli("build", "--solar", space / "source", "--trim", 1, "-o", out)
    _one_line(result, f"{out}: no space left on its disk")
    assert str(space / "source") not in result.stderr and "truncated" not in result.stderr
    assert list(out.parent.iterdir()) == []  # nothing at the output, no temporary beside it


@pytest.mark.parametrize("error, fragment", [
    (OSError(28, "No space left on device"), "no space left on its disk"),
    (OSError("2048 requested and 1064 written"), "2048 bytes requested, 1064 written: no space left on its disk?"),
])
def test_a_full_disk_during_export_names_the_output(error, fragment, tiny_models, tmp_path, run_cli, monkeypatch):
    import gguf

    def write_tensor_data(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    out = tmp_path / "exports" / "m.gguf"
    out.parent.mkdir()
    result = run_cli("export", tiny_models("llama", 4), "-o", out)
    _one_line(result, f"{out}: ")
    assert fragment in result.stderr and "requested and" not in result.stderr.replace(fragment, ""), result
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("name, damage, fragment", [
    ("tokenizer.json", lambda text: text[: len(text) // 2], "tokenizer.json is not valid JSON"),
    ("tokenizer.json", lambda text: "[1, 2]", "tokenizer.json is not a JSON object"),
    ("tokenizer_config.json", lambda text: text + "}", "tokenizer_config.json is not valid JSON"),
])
def test_build_refuses_a_corrupt_tokenizer_before_writing(name, damage, fragment, tiny_models, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama", 4), model)
    path = model / name
    path.write_text(damage(path.read_text()))
    result = run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "out")
    _one_line(result, f"{path}: the tokenizer file {fragment}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_tokenizer_json_damaged_after_a_build_is_refused_by_the_next(tiny_models, tmp_path, run_cli, monkeypatch):
    """The parse of an unchanged tokenizer.json is remembered (by size and mtime, beside
    the sha256 cache); a file changed since is parsed again."""
    monkeypatch.setenv("DUS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama", 4), model)
    assert run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "first").code == 0
    assert "tokenizer-json|" in (tmp_path / "cache" / "sha256.json").read_text()
    assert run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "second").code == 0
    path = model / "tokenizer.json"
    path.write_text(path.read_text()[:-2])
    result = run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "out")
    _one_line(result, f"{path}: the tokenizer file tokenizer.json is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_build_copies_a_remote_code_tokenizer_with_a_one_line_warning(tiny_models, tmp_path, run_cli, monkeypatch):
    import importlib

    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama", 4), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "tokenization_evil.py").write_text("raise SystemExit('remote code ran')\n")
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (
        pytest.fail("remote code imported") if "evil" in name else real_import(name, *a)))
    result = run_cli("build", "--solar", model, "--trim", 1, "-o", tmp_path / "out")
    assert result.code == 0, result
    warnings = [line for line in result.stdout.splitlines() if "tokenization_evil.EvilTokenizer" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "never runs that code" in warnings[0], result
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["auto_map"] == config["auto_map"]
    assert not (tmp_path / "out" / "tokenization_evil.py").exists()


@pytest.mark.parametrize("value, fragment", [
    (float("nan"), "model.layers.1.mlp.up_proj.weight (GGUF blk.1.ffn_up.weight) holds 2 NaN or infinite values, "
                   "and 1 more tensor too, written as they are"),
    (1e6, "model.layers.1.mlp.up_proj.weight (GGUF blk.1.ffn_up.weight): 2 values beyond float16's range became "
          "infinite, and 1 more tensor too; export with --type bf16 or f32"),
])
def test_export_warns_in_one_line_about_non_finite_weights(value, fragment, tiny_models, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama", 4), model)
    weights = load_file(model / "model.safetensors")
    assert weights["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    weights["model.layers.1.mlp.up_proj.weight"][0, :2] = value
    weights["model.layers.3.self_attn.o_proj.weight"][1, 1] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("export", model, "-o", tmp_path / "m.gguf")
    assert result.code == 0 and (tmp_path / "m.gguf").is_file(), result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and fragment in warnings[0], result
    assert "NaN" not in run_cli("export", tiny_models("llama", 4), "-o", tmp_path / "clean.gguf").stderr


@pytest.mark.parametrize("kind", ["no manifest", "graft"])
def test_steps_zero_with_nothing_to_calibrate_is_refused_before_the_output(kind, space, tmp_path, run_cli):
    from dus.tiny import make_tiny_model

    if kind == "no manifest":
        model, fragment = space / "source", "has no build plan (dus-manifest.json)"
    else:
        donor = make_tiny_model(tmp_path / "donor", "llama", num_layers=4, seed=4)
        model, fragment = tmp_path / "grafted", "no layer of"
        build_model({"graft": {"base": str(space / "source"), "donor": str(donor), "layers": [1, 3]}}, model)
    result = run_cli("heal", model, "-o", tmp_path / "out", "--data", space / "text.txt", *FAST[2:], "--steps", 0,
                     "--set", "calibrate.enabled=true")
    _one_line(result, fragment)
    assert "nothing to do; give --steps N >= 1" in result.stderr and not (tmp_path / "out").exists()


def test_compare_build_and_heal_share_one_vocabulary_comparison(tiny_models, tmp_path, run_cli, no_measuring):
    """Two ids swapped: compare refuses, naming the same first difference build warns about."""
    model = tiny_models("llama", 4)
    swapped, first, second = copy_with_two_token_ids_swapped(model, tmp_path / "swapped", first_id=70)
    result = run_cli("compare", model, swapped, "--data", _text(tmp_path), "-o", tmp_path / "R", "--no-generate")
    _one_line(result, f"(token id 70 is {first!r} vs {second!r}); perplexity is only comparable")
    from dus.tokenizer_check import first_tokenizer_difference

    assert first_tokenizer_difference(model, swapped) == f"token id 70 is {first!r} vs {second!r}"
