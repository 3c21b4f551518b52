"""One heal run, start to finish: model, data, targets, TRL trainer, healed model.

Everything here is plumbing between objects TRL, PEFT and transformers already provide:
the choices (which layers, which loss, which format) are made in the sibling modules, and
this file wires them into an SFTTrainer and writes what comes out. It runs the same way
in one process and under `accelerate launch` (every rank runs it; only rank 0 writes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from transformers import TrainerCallback

from dus.checkpoint import ModelDir, accelerator_type, read_json
from dus.errors import DusError
from dus.heal.config import HealConfig, build_lora_config, build_sft_config
from dus.heal.data import LoadedData, load_data
from dus.heal.distributed import (
    check_supported,
    describe,
    describe_briefly,
    enable_fsdp_on_cpu,
    holds_shards,
    launched_as,
    needs_cpu_fsdp,
    plain_loading,
    whole_weights,
)
from dus.heal.merge import weights_digest, write_healed_model
from dus.heal.record import heal_record
from dus.heal.template import fit_data_to_template
from dus.heal.targets import (
    HealTargets,
    choose_layers,
    describe_targets,
    find_layer_stack,
    manifest_new_layers,
)
from dus.manifest import Manifest
from dus.resources import local_or_shipped

RUN_MARKER = "dus-heal-run.json"  # marks OUT as a heal output; holds the W&B run id for --resume
CHECKPOINTS = "checkpoints"
DEFAULT_CALIBRATION_TEXT = "data/text/train.jsonl"  # broad plain text shipped with dus


@dataclass
class HealResult:
    output: Path
    mode: str
    steps: int
    final_loss: float | None
    record: dict
    targets: HealTargets | None = None
    wandb_description: str | None = None
    notes: list[str] = field(default_factory=list)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(message)


def prepare_output(out: Path, model_dir: Path, resume: bool, force: bool) -> dict | None:
    """Check OUT before anything runs; returns the previous run's marker when resuming."""
    if out.resolve() == model_dir.resolve():
        raise DusError(f"-o {out} is the input model directory; write the healed model elsewhere")
    marker = out / RUN_MARKER
    previous = read_json(marker, "the heal run marker", f"delete {out} to start afresh") if marker.is_file() else None
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoints = out / CHECKPOINTS
        if not checkpoints.is_dir() or get_last_checkpoint(str(checkpoints)) is None:
            raise DusError(f"--resume: no checkpoint in {checkpoints}; run without --resume to start afresh")
        return previous
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DusError(
                f"{out} exists and is not empty; use --resume to continue its run, --force to replace it, "
                "or choose another -o"
            )
        if previous is None:
            raise DusError(f"--force: {out} is not a dus heal output (no {RUN_MARKER}); refusing to delete it")
    return None


def load_model(model_dir: ModelDir, cfg: HealConfig, use_cpu: bool):
    """The student, with `sft.model_init_kwargs`; float32 on a CPU, the checkpoint's dtype elsewhere."""
    kwargs = dict(cfg.section("sft").get("model_init_kwargs") or {})
    if kwargs.pop("trust_remote_code", False):
        raise DusError("sft.model_init_kwargs.trust_remote_code: dus never runs a model's remote code")
    dtype = kwargs.pop("dtype", "float32" if use_cpu else "auto")
    if cfg.mode == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg)
        kwargs.setdefault("device_map", {"": int(os.environ.get("LOCAL_RANK", "0"))})
    return model_dir.load_model(dtype, **kwargs)


def quantization_config(cfg: HealConfig):
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise DusError("mode qlora loads the model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                       "none is visible here: use mode lora (train/lora-seam.yaml) instead")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DusError("mode qlora needs bitsandbytes: pip install bitsandbytes (or dus[gpu])")
    kwargs = dict(cfg.section("quantization"))
    if isinstance(kwargs.get("bnb_4bit_compute_dtype"), str):
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kwargs)


def select_trainable(model, cfg: HealConfig, manifest: Manifest | None):
    """Targets and PEFT config for LoRA modes; requires_grad flags for full/expand."""
    num_layers = model.config.get_text_config().num_hidden_layers
    trains = cfg.trains
    if trains == "lora":
        seam = cfg.section("seam")
        targets = choose_layers(num_layers, manifest, seam["radius"], seam["layers"])
        targets = describe_targets(model, targets)
        stack = find_layer_stack(model)
        lora = build_lora_config(cfg, targets.linear_modules, targets.layers, stack.pattern)
        if lora.layers_to_transform is not None:
            explicit = lora.layers_to_transform
            targets.layers = [explicit] if isinstance(explicit, int) else list(explicit)
        return targets, lora
    if trains == "band":
        seam = cfg.section("seam")
        targets = choose_layers(num_layers, manifest, seam["radius"], seam["layers"])
        train_only_layers(model, targets.layers)
        targets.reason += " (all their parameters)"
        return targets, None
    if trains == "expand":
        new = manifest_new_layers(manifest)
        if not new:
            raise DusError(
                "mode expand trains the new blocks of an expand build, but "
                + ("the model has no dus-manifest.json" if manifest is None else "its manifest lists no new layers")
                + "; use mode lora or full"
            )
        train_only_layers(model, new)
        return HealTargets(new, [], "new blocks of the expand build (all their parameters)"), None
    model.requires_grad_(True)
    return HealTargets(list(range(num_layers)), [], "full fine-tuning: every parameter"), None


def train_only_layers(model, layers: list[int]) -> None:
    """Every parameter of the given decoder layers trains, nothing else."""
    stack = model.get_submodule(find_layer_stack(model).path)
    model.requires_grad_(False)
    for index in layers:
        stack[index].requires_grad_(True)


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process actually ran (a resumed run runs only the rest)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def run_name(cfg: HealConfig, model_dir: Path, manifest: Manifest | None) -> str:
    if cfg.section("wandb")["name"]:
        return cfg.section("wandb")["name"]
    recipe = (manifest.recipe if manifest else None) or {}
    base = recipe.get("name") if isinstance(recipe, dict) else None
    return f"heal-{base or model_dir.name}-{cfg.mode}"


@dataclass
class Inputs:
    """Everything read before training: tokenizer, data (in TRL's shape) and what changed."""

    tokenizer: object
    train_data: LoadedData
    train_set: object
    eval_data: LoadedData | None
    eval_set: object
    assistant_only_loss: bool
    notes: list[str]

    @cached_property
    def data_sha256(self) -> str | None:
        """The training data file's sha256 (None for a hub name or a directory), read once."""
        from dus.heal.merge import file_sha256

        return file_sha256(Path(self.train_data.source))


def read_inputs(model_dir: ModelDir, cfg: HealConfig) -> Inputs:
    """Tokenizer and data first: they decide assistant_only_loss before TRL sees it."""
    tokenizer = model_dir.tokenizer()
    data_cfg, wanted = cfg.section("data"), bool(cfg.section("sft").get("assistant_only_loss", False))
    notes: list[str] = []
    train_data = load_data(str(local_or_shipped(data_cfg["path"])), data_cfg["format"], data_cfg["split"],
                           data_cfg["max_samples"])
    train_set, assistant_only = fit_data_to_template(train_data, tokenizer, wanted, notes)
    eval_data, eval_set = None, None
    if data_cfg["eval_path"]:
        split = data_cfg["eval_split"] or data_cfg["split"]
        eval_data = load_data(str(local_or_shipped(data_cfg["eval_path"])), data_cfg["format"], split,
                              data_cfg["eval_max_samples"])
        eval_set, _ = fit_data_to_template(eval_data, tokenizer, wanted, [])
    return Inputs(tokenizer, train_data, train_set, eval_data, eval_set, assistant_only, notes)


def load_teacher(model_dir: ModelDir, cfg: HealConfig, teacher: str | None, dtype):
    from dus.heal.distill import teacher_path

    teacher_dir = teacher_path(model_dir.path, model_dir.manifest, teacher or cfg.section("distill")["teacher"])
    return teacher_dir, ModelDir(teacher_dir).load_model(dtype)


def announce(run: "HealRun", student: "Student") -> None:
    cfg, inputs, targets = run.cfg, run.inputs, student.targets
    for warning in targets.warnings:
        say(f"[yellow]warning:[/] {warning}")
    for note in inputs.notes:
        say(f"[cyan]note:[/] {note}")
    say(f"[bold]dus heal[/] {run.model_dir} -> {run.out}  (mode {cfg.mode}, config {cfg.source})")
    evaluation = f"; eval: {inputs.eval_data.describe()}" if inputs.eval_data else ""
    say(f"  data: {inputs.train_data.describe()}{evaluation}")
    say(f"  layers trained: {targets.layers}  ({targets.reason})")
    if targets.linear_modules:
        say(f"  LoRA r={student.peft_config.r} on: {', '.join(targets.linear_modules)}")
    if student.teacher_dir:
        distill = cfg.section("distill")
        say(f"  teacher: {student.teacher_dir} (alpha {distill['alpha']}, temperature {distill['temperature']})")
    state = run.state
    kind = "single process" if run.args.world_size == 1 else launched_as(state.distributed_type.value)
    say(f"  processes: {run.args.world_size} ({kind}), device {run.args.device}")


def start_tracking(run: "HealRun", targets: HealTargets):
    """The W&B run (rank 0, when report_to has wandb), with the build plan as its config."""
    args, cfg, manifest = run.args, run.cfg, run.manifest
    if "wandb" not in (args.report_to or []) or not args.distributed_state.is_main_process:
        return None
    from dus.heal.tracking import start_run

    config = {
        "dus": {
            "heal_config": cfg.to_dict(),
            "config_file": cfg.source,
            "overrides": cfg.overrides,
            "model": str(run.model_dir),
            "layers": targets.layers,
            "reason": targets.reason,
            "seams": targets.seams,
            "plan": manifest.plan.to_dict() if manifest and manifest.plan else None,
            "recipe": manifest.recipe if manifest else None,
            "data": run.inputs.train_data.describe(),
        }
    }
    wandb_cfg = cfg.section("wandb")
    wandb_run = start_run(
        Path(wandb_cfg["dir"]) if wandb_cfg["dir"] else run.out,
        wandb_cfg["project"],
        run.name,
        config,
        wandb_cfg["tags"],
        run_id=(run.previous or {}).get("wandb_run_id") if run.resume else None,
    )
    say(f"  {wandb_run.describe()}")
    return wandb_run


def make_trainer(cfg, model, args, inputs: Inputs, peft_config, teacher_model, callbacks):
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=inputs.train_set,
        eval_dataset=inputs.eval_set,
        processing_class=inputs.tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks or []),
    )
    if teacher_model is None:
        from trl import SFTTrainer

        return SFTTrainer(**kwargs)
    from dus.heal.distill import DistillSFTTrainer

    distill = cfg.section("distill")
    return DistillSFTTrainer(
        teacher_model=teacher_model, alpha=distill["alpha"], temperature=distill["temperature"], **kwargs
    )


def write_marker(out: Path, **fields) -> None:
    path = out / RUN_MARKER
    marker = read_json(path, "the heal run marker", f"delete {out} to start afresh") if path.is_file() else {}
    marker.update(fields)
    path.write_text(json.dumps(marker, indent=2) + "\n")


@dataclass
class HealRun:
    """What a run has read and decided before it writes anything."""

    model_dir: ModelDir
    out: Path
    cfg: HealConfig
    resume: bool
    force: bool
    previous: dict | None  # the run marker of the run being resumed
    inputs: Inputs
    args: object  # trl.SFTConfig
    name: str
    use_cpu: bool

    @property
    def manifest(self) -> Manifest | None:
        return self.model_dir.manifest

    @property
    def state(self):
        return self.args.distributed_state


@dataclass
class Student:
    """The model to train, what in it trains, and its teacher."""

    model: object
    targets: HealTargets
    peft_config: object | None
    saved_dtype: str
    calibration: object | None = None
    teacher_dir: Path | None = None
    teacher_model: object | None = None


def heal(
    model_dir: str | Path,
    output: str | Path,
    cfg: HealConfig,
    resume: bool = False,
    force: bool = False,
    teacher: str | None = None,
    callbacks: list | None = None,
) -> HealResult:
    """Fine-tune the model in `model_dir` as `cfg` says and write the healed model to `output`.

    `callbacks` (transformers TrainerCallbacks) are handed to the trainer as they are, for
    library users who want to watch or steer the run (the benchmark measures with them).
    With `sft.max_steps: 0` and calibration on, the calibrated model is written untrained."""
    run = prepare(ModelDir(model_dir), Path(output), cfg, resume, force)
    student = load_student(run, teacher)
    announce(run, student)
    wandb_run = open_output(run, student)
    if run.args.max_steps == 0:
        record = calibration_record(run, student)
        if run.state.is_main_process:
            write_healed_model(student.model, run.inputs.tokenizer, run.model_dir.path, run.out, run.manifest, record,
                               dtype=student.saved_dtype)
            write_marker(run.out, finished=True, steps=0, final_loss=None)
            say(f"[green]calibrated model written to {run.out}[/] (no training: sft.max_steps is 0)")
    else:
        record = train_and_save(run, student, callbacks)
    if wandb_run is not None:
        from dus.heal.tracking import finish_run

        finish_run({"dus/final_loss": record["final_loss"], "dus/steps": record["steps"]})
    run.state.wait_for_everyone()
    return HealResult(
        run.out, cfg.mode, record["steps"], record["final_loss"], record, student.targets,
        wandb_run.describe() if wandb_run else None, run.inputs.notes,
    )


def prepare(model_dir: ModelDir, out: Path, cfg: HealConfig, resume: bool, force: bool) -> HealRun:
    """Check OUT and the options, read the data, build the SFTConfig: all before any output."""
    previous = prepare_output(out, model_dir.path, resume, force)
    max_steps = cfg.section("sft").get("max_steps", -1)
    if max_steps == 0 and not cfg.section("calibrate")["enabled"]:
        raise DusError("sft.max_steps 0 trains nothing and calibration is off; give --steps N >= 1 "
                       "(or enable calibrate for a calibration-only run)")
    if resume and previous and previous.get("finished") and isinstance(max_steps, int) \
            and 0 <= max_steps <= (previous.get("steps") or 0):
        raise DusError(f"--resume: the run in {out} already finished its {previous.get('steps')} steps; "
                       "raise --steps to train further, or start afresh with --force")
    accelerator = accelerator_type()
    use_cpu = accelerator is None
    check_supported(cfg.trains, accelerator)
    if cfg.mode == "qlora":
        quantization_config(cfg)  # fail before the data is read
    inputs = read_inputs(model_dir, cfg)
    if resume and previous and previous.get("data_sha256") not in (None, inputs.data_sha256):
        raise DusError(f"--resume: the data ({inputs.train_data.source}) is not what the run in {out} started with; "
                       "resume with the same data, or start afresh with --force")
    extra = {"assistant_only_loss": inputs.assistant_only_loss}
    sft = cfg.section("sft")
    if inputs.eval_set is not None and sft.get("eval_strategy", "no") == "no":
        extra.update(eval_strategy="steps", eval_steps=sft.get("eval_steps") or sft.get("save_steps", 100))
    name = run_name(cfg, model_dir, model_dir.manifest)
    if needs_cpu_fsdp(accelerator):
        enable_fsdp_on_cpu()
        extra.update(use_cpu=False, ddp_backend="gloo")
    args = build_sft_config(cfg, out / CHECKPOINTS, name, use_cpu, extra=extra)  # distributed state starts
    if needs_cpu_fsdp(accelerator):
        say("  FSDP launch without a GPU: dus runs FSDP on the CPU over gloo (accelerate alone would fall back to DDP)")
    return HealRun(model_dir, out, cfg, resume, force, previous, inputs, args, name, use_cpu)


def load_student(run: HealRun, teacher: str | None) -> Student:
    """The student (calibrated when asked), its trainable set, and the teacher for distill."""
    cfg = run.cfg
    model = load_model(run.model_dir, cfg, run.use_cpu)
    saved_dtype = run.model_dir.stored_dtype or str(model.dtype).replace("torch.", "")
    calibration = None
    if cfg.section("calibrate")["enabled"]:
        with whole_weights(model, modify=True):  # ZeRO-3 loads partitioned weights; every rank calibrates
            calibration = calibrate_model(model, run.manifest, cfg, run.inputs)
    targets, peft_config = select_trainable(model, cfg, run.manifest)
    if cfg.trains in ("expand", "band") and run.args.gradient_checkpointing:
        model.enable_input_require_grads()
    student = Student(model, targets, peft_config, saved_dtype, calibration)
    if cfg.mode == "distill" and run.args.max_steps != 0:
        student.teacher_dir, student.teacher_model = load_teacher(run.model_dir, cfg, teacher, model.dtype)
    return student


def open_output(run: HealRun, student: Student):
    """Create (or, with --force, replace) OUT on rank 0 once every rank has checked
    everything, then start W&B and write the run marker. Returns the W&B run or None."""
    state, out = run.state, run.out
    state.wait_for_everyone()  # a slow rank's check of OUT must not see what rank 0 writes next
    if state.is_main_process:
        if run.force and out.exists() and not run.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    wandb_run = start_tracking(run, student.targets)
    if state.is_main_process:
        write_marker(out, model=str(run.model_dir), config=run.cfg.to_dict(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     wandb_run_id=wandb_run.run_id if wandb_run else None, data_sha256=run.inputs.data_sha256,
                     finished=False)
    return wandb_run


def train_and_save(run: HealRun, student: Student, callbacks) -> dict:
    """Train, gather the weights, write the healed model (or the adapter); returns the record."""
    from transformers.trainer_utils import get_last_checkpoint

    cfg, out, inputs = run.cfg, run.out, run.inputs
    trainer = make_trainer(cfg, student.model, run.args, inputs, student.peft_config, student.teacher_model, callbacks)
    sharded = bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    say(f"  distributed: {describe_briefly(describe(trainer.accelerator, trainer.args))}")
    trainable = sum(parameter_count(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in trainer.model.parameters())
    say(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    resumed_from = get_last_checkpoint(str(out / CHECKPOINTS)) if run.resume else None
    if resumed_from:
        say(f"  resuming from {resumed_from}")
    counter = StepCounter()
    trainer.add_callback(counter)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resumed_from)
    seconds = time.time() - started

    # Under FSDP / DeepSpeed the Trainer gathers the full weights into files (a collective:
    # every rank takes part), and the healed model is rebuilt from those on rank 0.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    trained_dir = out / ("adapter" if student.peft_config is not None else ".trained")
    if sharded:
        trainer.save_model(str(trained_dir))
    digests = rank_digests(trainer, unwrapped)
    record = heal_record(cfg, student.targets, inputs.train_data, inputs.eval_data, student.teacher_dir, trainer, result, {
        "steps_this_run": counter.steps,
        "rank_digests": digests,
        "resumed_from": resumed_from,
        "seconds": round(seconds, 1),
        "notes": inputs.notes,
        "calibration": student.calibration.to_dict() if student.calibration else None,
    })
    if record["ranks_agree"] is False:
        say(f"[red]warning:[/] the {len(digests)} ranks ended with different weights: {digests}")
    if run.state.is_main_process:
        save_outputs(run, student, unwrapped, trained_dir, sharded, record)
    return record


def parameter_count(param) -> int:
    """Elements of a parameter; a ZeRO-3 partition counts as the whole tensor it is part of."""
    return getattr(param, "ds_numel", None) or param.numel()


def rank_digests(trainer, unwrapped) -> list[str] | None:
    """Every rank's hash of its trainable weights (they must agree), where each rank holds
    whole weights (DDP, ZeRO-1/2); None where ranks hold shards (FSDP, ZeRO-3): there the
    gathered weights are hashed on rank 0 instead (see save_outputs)."""
    from accelerate.utils import gather_object

    if holds_shards(trainer.accelerator):
        return None
    return gather_object([weights_digest(unwrapped)])


def save_outputs(run: HealRun, student: Student, unwrapped, trained_dir: Path, sharded: bool, record: dict) -> None:
    """Rank 0: the merged standalone model (or, with --no-merge, the adapter and the record).

    Nothing here may touch sharded parameters or start a collective: the other ranks are
    already waiting at the final barrier."""
    out, tokenizer, is_adapter = run.out, run.inputs.tokenizer, student.peft_config is not None
    if is_adapter:
        if not sharded:
            unwrapped.save_pretrained(str(trained_dir))
        tokenizer.save_pretrained(str(trained_dir))
    if run.cfg.merge or not is_adapter:
        final = reload_trained(run.model_dir, trained_dir, is_adapter, student.calibration) if sharded else unwrapped
        if record["rank_digests"] is None:
            record["gathered_digest"] = weights_digest(final, trainable_only=False)
        write_healed_model(final, tokenizer, run.model_dir.path, out, run.manifest, record, dtype=student.saved_dtype)
        if trained_dir.name == ".trained":
            shutil.rmtree(trained_dir, ignore_errors=True)
        say(f"[green]healed model written to {out}[/] (loads with from_pretrained)")
    else:
        (out / "dus-heal-record.json").write_text(json.dumps(record, indent=2) + "\n")
        say(f"[green]LoRA adapter written to {out / 'adapter'}[/] (--no-merge)")
    write_marker(out, finished=True, steps=record["steps"], final_loss=record["final_loss"])


def calibration_record(run: HealRun, student: Student) -> dict:
    """The heal record of a calibration-only run (no training step)."""
    data = run.inputs.train_data
    return {
        "stage": "heal", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": run.cfg.mode, "trains": "nothing",
        "layers": [], "reason": "calibration only (sft.max_steps 0)", "seams": student.targets.seams,
        "data": {"path": data.source, "format": data.format, "rows": data.rows, "sha256": run.inputs.data_sha256},
        "steps": 0, "tokens": 0, "final_loss": None, "world_size": run.args.world_size,
        "calibration": student.calibration.to_dict() if student.calibration else None,
        "config": run.cfg.to_dict(), "config_file": run.cfg.source, "overrides": run.cfg.overrides,
    }


def calibrate_model(model, manifest: Manifest | None, cfg: HealConfig, inputs: Inputs):
    """Scale the repeated layers' output projections by the factor that scores best on
    calibration text (dus.heal.calibrate), before training starts."""
    from dus.measure.text import read_text, tokenize_stream
    from dus.heal.calibrate import calibrate
    section = cfg.section("calibrate")
    if manifest is None or manifest.plan is None:
        say("[yellow]warning:[/] calibration skipped: the model has no build plan (dus-manifest.json) naming "
            "repeated layers")
        return None
    if section["text"] == "auto" and inputs.train_data.shape == "text":
        source, text = inputs.train_data.source, "\n\n".join(inputs.train_data.dataset["text"])
    else:  # chat data calibrates on the bundled broad text, unless calibrate.text names a file
        source = section["text"] if section["text"] != "auto" else DEFAULT_CALIBRATION_TEXT
        text = read_text(local_or_shipped(source))
    ids = tokenize_stream(inputs.tokenizer, text[: 16 * section["tokens"]], section["tokens"])  # no token is 16+ chars
    say(f"  calibrating repeated layers on {len(ids)} tokens of {source}")
    result = calibrate(model, manifest.plan, ids, section["factors"], section["window"],
                       on_factor=lambda f, ppl: say(f"    factor {f:g}: perplexity {ppl:.3f}"), copies=section["copies"])
    if result.layers:
        say(f"  calibration: output projections of layers {result.layers} scaled by {result.factor:g}")
    else:
        say("  calibration: the plan repeats no layer; nothing to scale")
    return result


def reload_trained(model_dir: ModelDir, trained_dir: Path, is_adapter: bool, calibration=None):
    """The trained model rebuilt from the files the Trainer gathered (sharded runs), on
    rank 0 alone: loaded as a plain model even under ZeRO-3 (a partitioned load would
    wait for the other ranks). An adapter goes onto the input model with the calibration
    the run applied before training (it is not in the adapter)."""
    with plain_loading():
        if not is_adapter:
            return ModelDir(trained_dir).load_model("auto")
        from peft import PeftModel

        from dus.heal.calibrate import scale_layers

        base = model_dir.load_model("auto")
        if calibration is not None and calibration.per_layer:
            scale_layers(base, calibration.per_layer)
        return PeftModel.from_pretrained(base, str(trained_dir))


__all__ = ["heal", "HealResult"]
