"""`dus heal` end to end on tiny models: real TRL/PEFT training runs of a few steps, a real
W&B offline run, a real 2-process accelerate launch, resume, merge and the bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import changed_layers, tensors, write_addition_chats

from dus.build import build_model
from dus.heal.config import load_config
from dus.heal.run import heal

REPO = Path(__file__).resolve().parents[1]
SEAM_LAYERS = [1, 2, 3, 4]  # SOLAR of a 4-layer model with trim 1: 6 layers, seam at 3, radius 2
FAST = {
    "sft.report_to": "none",
    "sft.activation_checkpointing": False,
    "sft.warmup_steps": 0,
    "sft.logging_steps": 1,
    "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 4,
    "sft.max_length": 64,
}




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    from dus.tiny import make_tiny_model

    source = make_tiny_model(root / "source", "llama", num_layers=4, seed=1)
    build_model({"solar": {"model": str(source), "trim": 1}}, root / "built")
    build_model({"expand": {"model": str(source), "every": 2}}, root / "expanded")
    write_addition_chats(root / "chat.jsonl")
    prose = "\n\n".join(f"The number {i} comes after {i - 1} and before {i + 1}." for i in range(1, 40))
    (root / "prose.txt").write_text(prose + "\n")
    return root


def run(workspace, out, steps=4, **overrides):
    settings = {**FAST, "data.path": str(workspace / "chat.jsonl"), "sft.max_steps": steps, **overrides}
    model = settings.pop("model", workspace / "built")
    resume = settings.pop("resume", False)
    teacher = settings.pop("teacher", None)
    return heal(model, out, load_config(settings.pop("config", "lora-seam"), settings), resume=resume, teacher=teacher)


def mean(values):
    return sum(values) / len(values)


def test_lora_seam_heal_end_to_end(workspace, tmp_path, run_cli, monkeypatch):
    # Not logged in to W&B and no WANDB_MODE: dus must choose offline by itself.
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "dus")
    out = tmp_path / "healed"
    result = run_cli(
        "heal", workspace / "built", "-c", "lora-seam", "-o", out, "--data", workspace / "chat.jsonl", "--steps", 12,
        "--lr", 1e-2, "--batch-size", 4, "--max-length", 64, "--lora-r", 8, "--seed", 3,
        "--set", "sft.warmup_steps=0", "--set", "sft.logging_steps=1", "--set", "sft.activation_checkpointing=false",
    )
    assert result.code == 0, result
    assert "layers trained: [1, 2, 3, 4]" in result.stderr
    assert "W&B offline run in" in result.stderr

    record = json.loads((out / "dus-manifest.json").read_text())["history"][-1]
    assert record["stage"] == "heal" and record["mode"] == "lora" and record["steps"] == 12
    assert record["layers"] == SEAM_LAYERS and record["seams"] == [3]
    assert record["data"]["rows"] == 48 and record["data"]["sha256"]
    assert record["config"]["lora"]["r"] == 8 and record["config"]["sft"]["seed"] == 3
    losses = [entry["loss"] for entry in record["loss_curve"] if "loss" in entry]
    assert len(losses) == 12 and mean(losses[-3:]) < mean(losses[:3]) - 0.05, losses
    assert record["final_loss"] == losses[-1]

    # Only the seam band carries LoRA weights, on every linear projection.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in adapter}
    assert layers == set(SEAM_LAYERS)
    assert {name.split(".layers.")[1].split(".", 1)[1].rsplit(".lora_", 1)[0] for name in adapter} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }

    # A W&B offline run directory, with the seams and the losses inside.
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"layers within 2 of seams" in data and b"train/loss" in data

    # The merged model loads, and differs from its input only in the seam band.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    changed = changed_layers(workspace / "built", out)
    assert set(changed) == {str(i) for i in SEAM_LAYERS}
    assert all(not any("norm" in name for name in names) for names in changed.values())
    assert not list(out.glob(".tmp-*"))


def test_resume_continues_the_step_count(workspace, tmp_path):
    out = tmp_path / "resumable"
    first = run(workspace, out, steps=4, **{"sft.save_steps": 2})
    assert first.steps == 4 and (out / "checkpoints" / "checkpoint-4").is_dir()
    second = run(workspace, out, steps=6, resume=True, **{"sft.save_steps": 2})
    assert second.record["resumed_from"].endswith("checkpoint-4")
    assert second.steps == 6 and second.record["steps_this_run"] == 2
    assert (out / "checkpoints" / "checkpoint-6").is_dir()
    history = json.loads((out / "dus-manifest.json").read_text())["history"]
    assert history[-1]["steps"] == 6


def test_two_processes_train_with_world_size_2_and_agree(workspace, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu-2proc.yaml"),
        "-m", "dus", "heal", str(workspace / "built"), "-c", "lora-seam", "-o", str(out), "--data", str(workspace / "chat.jsonl"),
        "--steps", "4", "--report-to", "none", "--max-length", "64",
        "--set", "sft.activation_checkpointing=false", "--set", "sft.logging_steps=1",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2 (multi-cpu)" in done.stderr
    record = json.loads((out / "dus-manifest.json").read_text())["history"][-1]
    assert record["world_size"] == 2
    assert len(record["rank_digests"]) == 2 and record["ranks_agree"]
    # Each rank saw half of every global batch: 4 steps x 2 ranks x 4 rows.
    assert record["steps"] == 4 and record["epochs"] == pytest.approx(4 * 2 * 4 / 48, abs=0.01)


def kl_to_teacher(teacher: Path, student: Path, text: str) -> float:
    """Mean token KL(teacher || student) on `text`: what distillation should shrink."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(teacher)(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        p = torch.log_softmax(AutoModelForCausalLM.from_pretrained(teacher)(ids).logits, -1)
        q = torch.log_softmax(AutoModelForCausalLM.from_pretrained(student)(ids).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_distill_on_plain_text_from_the_manifest_teacher(workspace, tmp_path):
    out = tmp_path / "distilled"
    result = run(workspace, out, steps=8, config="distill",
                 **{"data.path": str(workspace / "prose.txt"), "sft.learning_rate": 1e-3})
    record = result.record
    assert record["mode"] == "distill" and record["data"]["format"] == "text"
    assert Path(record["teacher"]).name == "source"
    kl = [entry["distill_kl"] for entry in record["loss_curve"] if "distill_kl" in entry]
    assert len(kl) == 8 and all(value >= 0 for value in kl)
    # alpha 1: the loss is the KL itself, not the NLL
    first = record["loss_curve"][0]
    assert first["loss"] == pytest.approx(first["distill_kl"], rel=1e-3) and first["nll"] > 1
    # The healed student is much closer to its teacher than the unhealed build was.
    prose = (workspace / "prose.txt").read_text()
    before = kl_to_teacher(workspace / "source", workspace / "built", prose)
    after = kl_to_teacher(workspace / "source", out, prose)
    assert after < before / 2, (before, after)
    assert set(changed_layers(workspace / "built", out)) == {str(i) for i in SEAM_LAYERS}


def test_expand_trains_only_the_new_blocks(workspace, tmp_path):
    out = tmp_path / "expand-healed"
    result = run(workspace, out, steps=3, model=workspace / "expanded", config="expand",
                 **{"sft.learning_rate": 1e-3})
    assert result.record["layers"] == [2, 5]
    changed = changed_layers(workspace / "expanded", out)
    assert set(changed) == {"2", "5"}
    assert any("o_proj" in name for name in changed["2"])  # the zero-init projections moved


def test_full_fine_tuning_moves_everything(workspace, tmp_path):
    out = tmp_path / "full"
    result = run(workspace, out, steps=2, config="full", **{"sft.learning_rate": 1e-3})
    assert result.record["layers"] == list(range(6)) and not (out / "adapter").exists()
    changed = changed_layers(workspace / "built", out)
    assert {"-", "0", "5"} <= set(changed)


def test_model_without_manifest_trains_all_layers_and_no_merge_keeps_the_adapter(
    workspace, tmp_path, run_cli
):
    out = tmp_path / "plain"
    result = run_cli(
        "heal", workspace / "source", "-c", "lora-seam", "-o", out, "--data", workspace / "chat.jsonl", "--steps", 1,
        "--report-to", "none", "--no-merge", "--set", "sft.activation_checkpointing=false",
    )
    assert result.code == 0, result
    assert "no dus-manifest.json" in result.stderr
    record = json.loads((out / "dus-heal-record.json").read_text())
    assert record["layers"] == [0, 1, 2, 3]
    assert not (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_chat_template_fallbacks(workspace, tmp_path):
    from dus.heal.data import load_data
    from dus.heal.template import FALLBACK_CHAT_TEMPLATE, fit_data_to_template
    from dus.tiny import tiny_tokenizer

    data = load_data(str(workspace / "chat.jsonl"))
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    notes: list[str] = []
    dataset, assistant_only = fit_data_to_template(data, tokenizer, True, notes)
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE and assistant_only and "fallback" in notes[0]
    rendered = tokenizer.apply_chat_template(dataset[0]["messages"], tokenize=False)
    assert rendered.startswith("### User:\nadd") and "### Assistant:\n" in rendered

    # A template without {% generation %} that TRL cannot patch: dus labels the turns itself.
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    notes = []
    dataset, assistant_only = fit_data_to_template(data, tokenizer, True, notes)
    assert not assistant_only and set(dataset.column_names) == {"input_ids", "labels"}
    assert "labels those tokens" in notes[0]
    answer = data.dataset[0]["messages"][1]["content"]
    assert tokenizer.decode([t for t in dataset[0]["labels"] if t != -100]) == answer + "<|im_end|>\n"


def test_healing_with_a_template_trl_cannot_patch_still_trains(workspace, tmp_path):
    model = tmp_path / "no-markers"
    shutil.copytree(workspace / "built", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    template_file = model / "chat_template.jinja"
    if template_file.exists():
        template_file.write_text(
            template_file.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", "")
        )
    else:
        config["chat_template"] = config["chat_template"].replace("{% generation %}", "").replace(
            "{% endgeneration %}", "")
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = run(workspace, tmp_path / "out", steps=2, model=model)
    assert any("labels those tokens" in note for note in result.notes)
    assert result.steps == 2 and result.final_loss is not None


@pytest.mark.skipif(not (REPO / "data" / "chat" / "train.jsonl").exists(), reason="bundled data not present")
def test_bundled_text_and_calibrated_band_distillation_are_the_default(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    settings = {**FAST, "sft.max_steps": 2, "data.max_samples": 16, "calibrate.tokens": 128, "calibrate.window": 64}
    result = heal(workspace / "built", tmp_path / "out", load_config(None, settings))
    record = result.record
    assert record["data"]["path"] == "data/text/train.jsonl"
    assert record["data"]["format"] == "text" and result.steps == 2
    assert (record["mode"], record["trains"], Path(record["teacher"]).name) == ("distill", "band", "source")
    assert record["calibration"]["layers"] == [3, 4]


# --- bad inputs: one clean line each --------------------------------------------------

def pickled_model(workspace, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(workspace / "source", model)
    for shard in model.glob("*.safetensors"):
        shard.rename(shard.with_name("pytorch_model.bin"))
    return model


def occupied(tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


BAD_INPUTS = {
    "pickled weights": (lambda ws, tmp: ["heal", pickled_model(ws, tmp), "-o", tmp / "o"], "weights are pickled"),
    "not a model": (lambda ws, tmp: ["heal", tmp, "-o", tmp / "o"], "not a Hugging Face model directory"),
    "output exists": (
        lambda ws, tmp: ["heal", ws / "built", "-o", occupied(tmp)], "exists and is not empty; use --resume"),
    "force on foreign dir": (
        lambda ws, tmp: ["heal", ws / "built", "-o", occupied(tmp), "--force"], "not a dus heal output"),
    "resume without checkpoint": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--resume"], "no checkpoint in"),
    "qlora calibrating weights as built": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "-c", "qlora", "--set", "calibrate.enabled=true",
                         "--set", "in_memory=false"],
        "4-bit (qlora) weights cannot take"),
    "expand without new blocks": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--mode", "expand"], "lists no new layers"),
    "distill without teacher": (
        lambda ws, tmp: ["heal", ws / "source", "-o", tmp / "o", "--mode", "distill"], "pass --teacher PATH"),
    "unknown data format": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--data", bad_rows(tmp)], "columns found: a, q"),
    "missing data": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--data", tmp / "nope.jsonl"],
        "no such file or directory"),
    "typo in --set": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--set", "sft.max_step=3"],
        "unknown key 'max_step' in section 'sft'"),
    "zero steps, no calibration": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--steps", 0, "--set", "calibrate.enabled=false"],
        "trains nothing"),
    "bad --set value": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--set", "sft.learning_rate=fast"], "learning_rate"),
    "negative batch": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--batch-size", -2], "per_device_train_batch_size"),
    "chat opened by the assistant": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--data", assistant_first(tmp)], "starts with an assistant turn"),
    "unwritable output": (
        lambda ws, tmp: ["heal", ws / "built", "-o", a_file(tmp) / "o"], "a_file"),
    "teacher not a model": (
        lambda ws, tmp: ["heal", ws / "built", "-o", tmp / "o", "--mode", "distill", "--teacher", tmp],
        "not a model directory"),
}


def assistant_first(tmp_path):
    path = tmp_path / "assistant-first.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hi!"},
                                             {"role": "user", "content": "Hello"}]}) + "\n")
    return path


def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


def bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clean_line(case, workspace, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_args, message = BAD_INPUTS[case]
    args = make_args(workspace, tmp_path) + ["--report-to", "none"]
    if "--data" not in args:
        args += ["--data", str(workspace / "chat.jsonl")]
    result = run_cli(*args)
    assert result.code == 2, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("dus: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()
    if case.startswith(("output exists", "force")):
        assert (tmp_path / "occupied" / "precious.txt").read_text() == "keep me"


def test_band_distillation_trains_only_the_seam_band_and_lowers_the_kl(workspace, tmp_path):
    """distill.student band: every parameter of the seam band trains, nothing else moves,
    and the student ends closer to its teacher than the build started."""
    out = tmp_path / "band"
    result = run(workspace, out, steps=6, config="distill",
                 **{"data.path": str(workspace / "prose.txt"), "distill.student": "band", "sft.learning_rate": 1e-3})
    assert result.record["trains"] == "band" and result.record["layers"] == SEAM_LAYERS
    changed = changed_layers(workspace / "built", out)
    assert set(changed) == {str(i) for i in SEAM_LAYERS}
    # full parameters, not an adapter: the norms and every projection of a band layer moved
    assert any("layernorm" in name for name in changed["3"]) and any("q_proj" in name for name in changed["3"])
    prose = (workspace / "prose.txt").read_text()
    assert kl_to_teacher(workspace / "source", out, prose) < kl_to_teacher(workspace / "source", workspace / "built", prose)


def test_calibration_scales_repeated_layers_within_the_floor(workspace, tmp_path):
    """Calibration scores each factor with forward passes, applies the best to the repeated
    layers' output projections only, keeps every one at >= half its source norm, and is
    recorded in the manifest history; without training the rest of the model is unchanged."""
    from dus.heal.calibrate import MIN_FACTOR
    from dus.manifest import read_manifest

    out = tmp_path / "calibrated"
    result = run(workspace, out, steps=1, config="distill",
                 **{"data.path": str(workspace / "prose.txt"), "calibrate.enabled": True, "calibrate.tokens": 256,
                    "calibrate.window": 64, "sft.learning_rate": 1e-12, "distill.student": "band"})
    calibration = result.record["calibration"]
    # SOLAR of 4 layers, trim 1: output layers 0,1,2 | 1,2,3 -> the second copies of 1 and 2 repeat
    assert calibration["layers"] == [3, 4]
    assert set(calibration["scores"]) == {"1", "0.9", "0.8", "0.7", "0.6", "0.5"}
    assert calibration["scores"][f"{calibration['factor']:g}"] == min(calibration["scores"].values())
    assert read_manifest(out).calibration == calibration
    source, healed = tensors(workspace / "source"), tensors(out)
    for out_index, source_index in ((3, 1), (4, 2)):
        for part in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            ratio = healed[f"model.layers.{out_index}.{part}"].norm() / source[f"model.layers.{source_index}.{part}"].norm()
            assert ratio >= MIN_FACTOR - 1e-6
            assert ratio == pytest.approx(calibration["factor"], rel=1e-3)  # lr 1e-12: the scale alone
    built = tensors(workspace / "built")
    for index in (0, 1, 2, 5):  # not repeated: unscaled (1 and 2 train, at lr 1e-12)
        name = f"model.layers.{index}.mlp.down_proj.weight"
        assert torch.allclose(healed[name], built[name], rtol=0, atol=1e-6)


def test_calibration_floor_is_part_of_the_config():
    from dus.errors import DusError

    with pytest.raises(DusError, match=r"calibrate.factors .* \[0.5, 1\]"):
        load_config(None, {"calibrate.factors": [1.0, 0.3]})


def test_calibration_floor_accounts_for_a_recipe_scale():
    """A layer the recipe already scaled by 0.8 may only go down to 0.5 / 0.8 of the build."""
    from dus.heal.calibrate import factors_for, repeated_layers
    from dus.plan import LayerPlan, NonLayerSource, OutputLayer, ScaleRule

    layers = [OutputLayer("m", 0), OutputLayer("m", 1), OutputLayer("m", 0, scale=(ScaleRule(0.8),)),
              OutputLayer("m", 1), OutputLayer("m", 1, zero_output=True)]
    plan = LayerPlan({"m": "m"}, layers, NonLayerSource("m"), NonLayerSource("m"), "m", "m")
    assert repeated_layers(plan) == [2, 3]  # the zero-init copy adds nothing: not calibrated
    assert factors_for(plan, [2, 3], 0.5) == {2: pytest.approx(0.625), 3: 0.5}


def test_resume_refuses_a_finished_run_and_other_data(workspace, tmp_path):
    """--resume continues a run, not a finished one (unless asked for more steps), and only
    on the data it started with."""
    from dus.errors import DusError

    out = tmp_path / "finished"
    run(workspace, out, steps=2, **{"sft.save_steps": 1})
    with pytest.raises(DusError, match="already finished its 2 steps"):
        run(workspace, out, steps=2, resume=True, **{"sft.save_steps": 1})
    with pytest.raises(DusError, match="not what the run .* started with"):
        run(workspace, out, steps=4, resume=True, **{"sft.save_steps": 1, "data.path": str(workspace / "prose.txt")})
    assert run(workspace, out, steps=3, resume=True, **{"sft.save_steps": 1}).steps == 3


def test_zero_steps_with_calibration_writes_the_calibrated_model(workspace, tmp_path):
    out = tmp_path / "calibrated-only"
    result = run(workspace, out, steps=0, config="distill",
                 **{"data.path": str(workspace / "prose.txt"), "calibrate.enabled": True, "calibrate.tokens": 256,
                    "calibrate.window": 64})
    assert result.steps == 0 and result.record["trains"] == "nothing"
    assert set(changed_layers(workspace / "built", out)) == {"3", "4"}  # only the repeated layers, scaled
