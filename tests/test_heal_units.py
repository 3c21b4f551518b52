"""`dus heal` pieces that need no training: config parsing, data formats, seam targets,
the distillation loss. Fast; the end-to-end runs are in test_heal.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dus.errors import DusError
from dus.heal.config import DEFAULTS, load_config
from dus.heal.data import detect_format, load_data
from dus.heal.distill import chunked_distillation_loss, distillation_loss, head_logits
from dus.heal.targets import choose_layers, describe_targets, find_layer_stack

REPO = Path(__file__).resolve().parents[1]

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- config ---------------------------------------------------------------------------

def test_builtin_defaults_are_the_shipped_heal_config():
    """No -c means train/heal.yaml: the defaults are read from that file, never restated."""
    assert load_config(None).raw == load_config(REPO / "train" / "heal.yaml").raw == DEFAULTS
    defaults = load_config(None)
    assert (defaults.mode, defaults.trains, defaults.section("calibrate")["enabled"]) == ("distill", "band", True)
    assert defaults.section("data")["path"] == "data/text/train.jsonl"


@pytest.mark.parametrize("name, mode", [
    ("heal", "distill"), ("lora-seam", "lora"), ("full", "full"), ("band", "band"), ("qlora", "qlora"),
    ("expand", "expand"), ("distill", "distill"),
])
def test_every_shipped_config_loads_and_builds_trl_objects(name, mode, tmp_path):
    from trl import SFTConfig

    from dus.heal.config import build_lora_config, build_sft_config

    cfg = load_config(REPO / "train" / f"{name}.yaml")
    assert cfg.mode == mode
    args = build_sft_config(cfg, tmp_path, "run", use_cpu=True)
    assert isinstance(args, SFTConfig) and args.output_dir == str(tmp_path)
    lora = build_lora_config(cfg, ["self_attn.q_proj"], [1, 2], "layers")
    assert lora.layers_to_transform == [1, 2] and lora.r == cfg.section("lora")["r"]


def test_overrides_reach_the_trl_and_peft_objects(tmp_path):
    from dus.heal.config import build_lora_config, build_sft_config

    cfg = load_config("lora-seam", {"sft.learning_rate": 1e-3, "lora.r": 4, "sft.max_steps": 7, "mode": "full"})
    args = build_sft_config(cfg, tmp_path, "run", use_cpu=True)
    assert (args.learning_rate, args.max_steps, cfg.mode) == (1e-3, 7, "full")
    assert build_lora_config(cfg, ["q"], None, "layers").r == 4


@pytest.mark.parametrize("config, message", [
    ({"sft": {"lerning_rate": 1}}, "unknown key 'lerning_rate' in section 'sft' (fields of trl.SFTConfig); did you mean 'learning_rate'?"),
    ({"lora": {"rank": 8}}, "unknown key 'rank' in section 'lora' (fields of peft.LoraConfig)"),
    ({"seam": {"raduis": 1}}, "unknown key 'raduis' in section 'seam'"),
    ({"trainer": {}}, "unknown top-level key 'trainer'"),
    ({"mode": "dora"}, "mode 'dora' is not one of lora, qlora, full, band, expand, distill"),
    ({"sft": {"output_dir": "x"}}, "'sft.output_dir' is set by dus"),
    ({"seam": {"radius": 0}}, "seam.radius must be a whole number >= 1"),
    ({"distill": {"alpha": 2}}, "distill.alpha must be a number in [0, 1]"),
    ({"distill": {"student": "dora"}}, "distill.student 'dora' is not one of lora, qlora, full, band, expand"),
])
def test_bad_config_keys_are_named(config, message):
    with pytest.raises(DusError) as error:
        load_config(config)
    assert message in str(error.value)


def test_bad_sft_value_is_a_clean_error(tmp_path):
    from dus.heal.config import build_sft_config

    cfg = load_config({"sft": {"lr_scheduler_type": "sideways"}})
    with pytest.raises(DusError, match="^sft: "):
        build_sft_config(cfg, tmp_path, "run", use_cpu=True)


def test_missing_config_file_names_the_choices():
    with pytest.raises(DusError, match="lora-seam, full, qlora, expand, distill"):
        load_config("no-such-config")


# --- data formats ---------------------------------------------------------------------

FORMAT_ROWS = {
    "messages": [CHAT],
    "alpaca": [{"instruction": "Add", "input": "2 and 3", "output": "5"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
    "prompt-completion": [{"prompt": "2+3=", "completion": "5"}],
    "text": [{"text": "Plain prose to continue pretraining on."}],
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_converts_to_a_trl_shape(fmt, tmp_path):
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS[fmt] * 3)))
    assert data.format == fmt and data.rows == 3
    row = data.dataset[0]
    if fmt in ("messages", "alpaca", "sharegpt"):
        assert data.shape == "messages"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    if fmt == "alpaca":
        assert row["messages"][0]["content"] == "Add\n\n2 and 3"
        assert row["messages"][1]["content"] == "5"
    if fmt == "sharegpt":
        assert row["messages"][1] == {"role": "assistant", "content": "hello"}
    if fmt == "prompt-completion":
        assert row == {"prompt": "2+3=", "completion": "5"}
    if fmt == "text":
        assert row == {"text": "Plain prose to continue pretraining on."}


def test_other_containers_parquet_csv_json_txt_and_save_to_disk(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(FORMAT_ROWS["alpaca"] * 4)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps(FORMAT_ROWS["alpaca"] * 4))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "disk"))
    for name in ("d.parquet", "d.csv", "d.json", "disk"):
        data = load_data(str(tmp_path / name))
        assert (data.format, data.rows) == ("alpaca", 4), name
    assert load_data(str(tmp_path / "disk"), split="test").rows == 1
    (tmp_path / "d.txt").write_text("First paragraph.\nStill first.\n\nSecond paragraph.\n")
    text = load_data(str(tmp_path / "d.txt"))
    assert text.format == "text" and text.rows == 2


def test_unknown_format_lists_columns_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DusError) as error:
        load_data(str(path))
    message = str(error.value)
    assert "columns found: answer, question" in message
    for fmt in ("messages", "alpaca", "sharegpt", "prompt-completion", "text"):
        assert fmt in message


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "only a question"}]}], "without an assistant turn"),
    ([{"messages": [{"role": "wizard", "content": "x"}]}], "unknown role 'wizard'"),
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "unknown sharegpt speaker 'robot'"),
])
def test_malformed_rows_are_clean_errors(rows, message, tmp_path):
    with pytest.raises(DusError, match=message):
        load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)))


def test_bad_data_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DusError, match="no such file or directory"):
        load_data(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DusError, match="unknown file type '.xlsx'"):
        load_data(str(tmp_path / "d.xlsx"))
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(DusError, match="not one written by datasets' save_to_disk"):
        load_data(str(tmp_path / "plain-dir"))
    with pytest.raises(DusError, match="loading it from the Hugging Face Hub failed"):
        load_data("someone/some-dataset-that-is-not-here")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DusError):
        load_data(str(tmp_path / "empty.jsonl"))


def test_declared_format_must_match(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(DusError, match="data.format is 'alpaca' but the columns"):
        load_data(str(path), fmt="alpaca")


def test_assistant_turns_are_labelled_without_generation_markers():
    import datasets

    from dus.heal.template import label_assistant_turns
    from dus.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "second answer"},
    ]
    row = label_assistant_turns(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer)[0]
    assert len(row["input_ids"]) == len(row["labels"])
    labelled = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert labelled == "first answer<|im_end|>\nsecond answer<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_a_template_that_rewrites_history_is_refused():
    import datasets

    from dus.heal.template import label_assistant_turns
    from dus.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    # Renders the number of messages first: no rendering is a prefix of a longer one.
    tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DusError, match="not prefix-preserving"):
        label_assistant_turns(rows, tokenizer)


def test_detect_format_prefers_messages():
    assert detect_format(["messages", "text"], {}) == "messages"


# --- seam targets ---------------------------------------------------------------------

def manifest_with_seams(num_layers: int, seams: list[int]):
    """A typed manifest whose plan has seams exactly at `seams`."""
    from dus.manifest import Manifest
    from dus.plan import LayerPlan, NonLayerSource, OutputLayer

    layers, source_layer = [], 0
    for index in range(num_layers):
        source_layer -= index in seams  # a seam: not the successor of the layer before
        layers.append(OutputLayer("m", source_layer + 10))
        source_layer += 1
    plan = LayerPlan({"m": "m"}, layers, NonLayerSource("m"), NonLayerSource("m"), "m", "m")
    assert plan.seams == seams
    return Manifest(plan)


def test_layers_around_seams_and_fallbacks():
    manifest = manifest_with_seams(12, [4, 9])
    targets = choose_layers(12, manifest, radius=1)
    assert targets.layers == [3, 4, 8, 9] and targets.seams == [4, 9] and not targets.warnings
    assert choose_layers(12, manifest, radius=2).layers == [2, 3, 4, 5, 7, 8, 9, 10]
    no_manifest = choose_layers(6, None, radius=2)
    assert no_manifest.layers == list(range(6)) and "no dus-manifest.json" in no_manifest.warnings[0]
    assert choose_layers(12, manifest, 2, explicit=[0, 11]).layers == [0, 11]
    with pytest.raises(DusError, match="out of range"):
        choose_layers(12, manifest, 2, explicit=[12])
    with pytest.raises(DusError, match="manifest belongs to another model"):
        choose_layers(10, manifest, 2)


@pytest.mark.parametrize("arch, expected, left_out", [
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], []),
    ("phi3", ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"], []),
    ("mixtral", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
     ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
])
def test_linear_projections_are_discovered(arch, expected, left_out, tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch, num_layers=2))
    assert find_layer_stack(model).path == "model.layers"
    targets = describe_targets(model, choose_layers(2, None, 1))
    assert targets.linear_modules == expected
    for name in left_out:
        assert name in targets.left_out
    if left_out:
        assert any("not covered" in warning for warning in targets.warnings)


# --- distillation loss ----------------------------------------------------------------

def test_distillation_loss_is_kl_on_labelled_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    loss, kl, nll, count = distillation_loss(student, teacher, labels, alpha=1.0, temperature=1.0)
    mask = labels[:, 1:] != -100
    p = torch.softmax(teacher[:, :-1][mask], -1)
    expected = (p * (p.log() - torch.log_softmax(student[:, :-1][mask], -1))).sum()
    assert count == 6 and torch.allclose(loss, expected) and torch.allclose(kl, expected)
    same, *_ = distillation_loss(teacher, teacher, labels, 1.0, 2.0)
    assert same.abs() < 1e-5
    mixed, kl2, nll2, _ = distillation_loss(student, teacher, labels, alpha=0.25, temperature=1.0)
    assert torch.allclose(mixed, 0.25 * kl2 + 0.75 * nll2)
    ce = torch.nn.functional.cross_entropy(student[:, :-1][mask], labels[:, 1:][mask], reduction="sum")
    assert torch.allclose(nll2, ce)
    assert torch.allclose(nll, ce)  # at alpha 1, T 1 the logged NLL is read off the KL's softmax: still the NLL
    hot, kl_t, nll_t, _ = distillation_loss(student, teacher, labels, alpha=1.0, temperature=2.0)
    p_t = torch.softmax(teacher[:, :-1][mask] / 2, -1)
    expected_t = 4 * (p_t * (p_t.log() - torch.log_softmax(student[:, :-1][mask] / 2, -1))).sum()
    assert torch.allclose(hot, expected_t) and torch.allclose(nll_t, ce)


@pytest.mark.parametrize("alpha, temperature, softcap", [(1.0, 1.0, None), (0.25, 2.0, None), (1.0, 1.0, 3.0)])
def test_chunked_loss_equals_the_whole_logits_loss_with_its_gradients(alpha, temperature, softcap):
    """Chunks of 3 tokens (of 8 labelled) give the loss and the gradients of whole logits,
    for the hidden states and for a trained head."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(2, 6, 8), torch.randn(13, 8)
    labels = torch.tensor([[1, 2, 3, -100, -100, 4], [4, 5, 6, 7, 8, 9]])
    whole = distillation_loss(head_logits(hidden, weight, softcap), head_logits(teacher_hidden, teacher_weight, softcap),
                              labels, alpha, temperature)
    whole_grads = torch.autograd.grad(whole[0] * 0.5, (hidden, weight))
    chunked = chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, alpha, temperature,
                                        softcap, softcap, chunk=3)
    chunked_grads = torch.autograd.grad(chunked[0] * 0.5, (hidden, weight))
    assert chunked[3] == whole[3] == 8
    for a, b in zip(chunked[:3], whole[:3]):
        assert torch.allclose(a, b, rtol=1e-5), (a, b)
    for a, b in zip(chunked_grads, whole_grads):
        assert b.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_chunks_of_a_frozen_head_give_the_whole_logits_loss_and_gradient(alpha, dtype):
    """Temperature 1, no softcap, the head frozen (the default heal): chunks computed in three
    reused buffers with the gradient written by hand equal autograd on whole logits."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 7, 8).to(dtype).requires_grad_(True)
    weight, teacher_hidden, teacher_weight = torch.randn(13, 8).to(dtype), torch.randn(2, 7, 8).to(dtype), \
        torch.randn(13, 8).to(dtype)
    labels = torch.tensor([[1, 2, 3, -100, -100, 4, 5], [4, 5, 6, 7, 8, 9, 10]])
    whole = distillation_loss(head_logits(hidden, weight, None), head_logits(teacher_hidden, teacher_weight, None),
                              labels, alpha, 1.0)
    (whole_grad,) = torch.autograd.grad(whole[0] * 0.5, hidden)
    chunked = chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, alpha, 1.0, chunk=3)
    (chunked_grad,) = torch.autograd.grad(chunked[0] * 0.5, hidden)
    assert chunked[3] == whole[3] == 10
    for a, b in zip(chunked[:3], whole[:3]):
        assert torch.allclose(a, b, rtol=1e-5), (a, b)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert whole_grad.abs().sum() > 0 and torch.allclose(chunked_grad.float(), whole_grad.float(), **tolerance)
    with torch.no_grad():  # evaluation: the same values, no gradient computed
        evaluated = chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, alpha, 1.0,
                                              chunk=3)
    assert all(torch.equal(a, b) for a, b in zip(evaluated[:3], chunked[:3]))


# --- launch configs -------------------------------------------------------------------

LAUNCH_CONFIGS = sorted((REPO / "launch").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=[p.name for p in LAUNCH_CONFIGS])
def test_launch_configs_are_valid_accelerate_configs(path):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section, {}):
            assert key in options, f"{path.name}: {section}.{key} is not an accelerate launch option"
    assert config.num_processes >= 1


def test_launch_has_every_setup_and_a_valid_slurm_script():
    import subprocess

    names = {p.name for p in (REPO / "launch").iterdir()}
    assert {"single-gpu.yaml", "ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml", "multi-node.yaml",
            "cpu-2proc.yaml", "slurm.sh", "README.md"} <= names
    subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sh")], check=True)


def test_numbers_yaml_reads_as_strings_are_taken_as_numbers():
    """YAML 1.1 reads 3e-4 (no dot) as a string; for a numeric field it is the number it spells."""
    from dus.heal.config import parse_set_option

    key, value = parse_set_option("sft.learning_rate=3e-4")
    cfg = load_config(None, {key: value})
    assert cfg.section("sft")["learning_rate"] == pytest.approx(3e-4)
    with pytest.raises(DusError, match="sft.learning_rate must be a float, got 'fast'"):
        load_config(None, {"sft.learning_rate": "fast"})


@pytest.mark.parametrize("found, message", [
    (None, "qlora loads the model in 4 bits with bitsandbytes"),
    ("0.45.5", "needs bitsandbytes 0.48 or later (its CPU kernels), found 0.45.5"),
])
def test_qlora_without_usable_bitsandbytes_is_refused_in_one_line(found, message, monkeypatch):
    import importlib.metadata
    import importlib.util

    import torch

    from dus.heal.student import quantization_config

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (None if found is None else object()) if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found)
    with pytest.raises(DusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantization_config(load_config(None, {"mode": "qlora"}))


def test_the_mmap_threshold_pin_is_opt_in(monkeypatch):
    import sys as _sys

    from dus.host_memory import keep_large_blocks_returnable, pinned_threshold

    monkeypatch.delenv("DUS_PIN_MMAP_THRESHOLD", raising=False)
    assert pinned_threshold() is None and keep_large_blocks_returnable() is False
    monkeypatch.setenv("DUS_PIN_MMAP_THRESHOLD", "0")
    assert keep_large_blocks_returnable() is False
    # asked for, it takes effect: in a child process, so this one keeps glibc's policy
    import subprocess

    monkeypatch.setenv("DUS_PIN_MMAP_THRESHOLD", "1")
    done = subprocess.run([_sys.executable, "-c", "from dus.host_memory import keep_large_blocks_returnable as k; "
                           "print(k())"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == str(_sys.platform.startswith("linux"))


def test_the_mmap_threshold_pin_takes_a_size_and_refuses_anything_else(monkeypatch):
    from dus.errors import DusError
    from dus.host_memory import MMAP_THRESHOLD, pinned_threshold

    for value, expected in (("1", MMAP_THRESHOLD), ("0", None), ("4194304", 4194304), (" 2097152 ", 2097152)):
        monkeypatch.setenv("DUS_PIN_MMAP_THRESHOLD", value)
        assert pinned_threshold() == expected
    for value in ("yes", "-1", "1.5"):
        monkeypatch.setenv("DUS_PIN_MMAP_THRESHOLD", value)
        with pytest.raises(DusError, match="DUS_PIN_MMAP_THRESHOLD"):
            pinned_threshold()
