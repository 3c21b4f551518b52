"""One heal run, start to finish: model, data, targets, TRL trainer, healed model.

Everything here is plumbing between objects TRL, PEFT and transformers already provide:
the choices (which layers, which loss, which format) are made in the sibling modules, and
this file wires them into an SFTTrainer and writes what comes out. It runs the same way
in one process and under `accelerate launch` (every rank runs it; only rank 0 writes).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from transformers import TrainerCallback

from dus.checkpoint import ModelDir, accelerator_type
from dus.errors import DusError
from dus.heal.config import HealConfig, build_sft_config
from dus.heal.data import LoadedData
from dus.heal.distributed import (
    check_supported,
    describe,
    describe_briefly,
    enable_fsdp_on_cpu,
    holds_shards,
    launched_as,
    needs_cpu_fsdp,
    sharded_launch,
)
from dus.heal.merge import weights_digest
from dus.heal.output import CHECKPOINTS, check_checkpoint_files, last_complete_checkpoint, open_output, prepare_output, write_marker
from dus.heal.record import calibration_record, heal_record
from dus.heal.student import Student, in_memory_obstacle, load_student, quantization_config
from dus.heal.targets import HealTargets
from dus.heal.template import check_some_example_fits, fit_data_to_template
from dus.host_memory import keep_large_blocks_returnable
from dus.manifest import Manifest
from dus.resources import local_or_shipped


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


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process actually ran (a resumed run runs only the rest)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class StopWhenNotFinite(TrainerCallback):
    """A loss that became NaN or infinite heals nothing any more: stop with one line (the
    healed model is never written)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "train_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise DusError(f"the training loss became {value} at step {state.global_step}; no model was written: "
                               "lower the learning rate (--lr), check the distill temperature, and check the model's "
                               "weights are finite")


def check_finite_weights(model) -> None:
    """Refuse to write a model whose trained weights are NaN or infinite."""
    import torch

    bad = [name for name, param in model.named_parameters() if param.requires_grad and not torch.isfinite(param).all()]
    if bad:
        raise DusError(f"training left {len(bad)} weights non-finite (first: {bad[0]}); no model was written: lower the "
                       "learning rate (--lr)")


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
        """The training data's sha256 (one over each file's for several files; None for a hub
        name or a directory), read once."""
        from dus.heal.routes import data_digest

        return data_digest(self.train_data)


def read_inputs(model_dir: ModelDir, cfg: HealConfig, teachers=None, mix=None) -> Inputs:
    """Tokenizer and data first: they decide assistant_only_loss before TRL sees it."""
    from dus.heal.routes import load_training_data

    tokenizer = model_dir.tokenizer()
    data_cfg, wanted = cfg.section("data"), bool(cfg.section("sft").get("assistant_only_loss", False))
    notes: list[str] = []
    train_data = load_training_data(data_cfg, teachers or [], mix, cfg.section("distill")["route_field"])
    train_set, assistant_only = fit_data_to_template(train_data, tokenizer, wanted, notes)
    eval_data, eval_set = None, None
    if data_cfg["eval_path"]:
        split = data_cfg["eval_split"] or data_cfg["split"]
        # routed like the training data: each evaluation example is scored against its own teacher
        eval_cfg = {"path": data_cfg["eval_path"], "format": data_cfg["format"], "split": split,
                    "max_samples": data_cfg["eval_max_samples"]}
        eval_data = load_training_data(eval_cfg, teachers or [], mix, cfg.section("distill")["route_field"])
        eval_set, _ = fit_data_to_template(eval_data, tokenizer, wanted, [])
    return Inputs(tokenizer, train_data, train_set, eval_data, eval_set, assistant_only, notes)


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
    sft = cfg.section("sft")
    say(f"  steps: {sft.get('max_steps')} of {sft.get('per_device_train_batch_size')} x {sft.get('max_length')} tokens "
        f"per process, lr {sft.get('learning_rate')}" + (f", gates lr {cfg.section('gates')['lr']}" if cfg.gates_train else ""))
    if targets.linear_modules:
        say(f"  LoRA r={student.peft_config.r} on: {', '.join(targets.linear_modules)}")
    if student.teacher_dir:
        distill = cfg.section("distill")
        for note in run.teacher_notes:
            say(f"[cyan]note:[/] {note}")
        names = ", ".join(f"{t.name} ({t.path})" if t.name != str(t.path) else t.name for t in run.teachers)
        rule = f"; {describe_mix(run.mix)}" if run.mix else ""
        say(f"  teachers: {names} (alpha {distill['alpha']}, temperature {distill['temperature']}{rule})")
        if distill["hidden"]:
            say(f"  activation matching: weight {distill['hidden']} at (layer, teacher depth) "
                f"{student.hidden_points}")
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


def make_trainer(cfg, student: Student, args, inputs: Inputs, callbacks, mix=None):
    kwargs = dict(
        model=student.model,
        args=args,
        train_dataset=inputs.train_set,
        eval_dataset=inputs.eval_set,
        processing_class=inputs.tokenizer,
        peft_config=student.peft_config,
        callbacks=list(callbacks or []),
    )
    if student.teacher_model is None:
        from trl import SFTTrainer

        return SFTTrainer(**kwargs)
    from dus.heal.distill import DistillSFTTrainer
    from dus.heal.routes import RoutedCollator

    distill = cfg.section("distill")
    trainer = DistillSFTTrainer(
        teacher_model=student.teacher_models, alpha=distill["alpha"], temperature=distill["temperature"],
        shared=student.shareds, chunked=distill["logits"] == "chunked", mix=mix,
        hidden_match=student.hidden_match, **kwargs
    )
    trainer.data_collator = RoutedCollator(trainer.data_collator)
    return trainer


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
    teachers: list = field(default_factory=list)  # distill: dus.heal.teachers.Teacher, checked to tokenize alike
    mix: object | None = None  # several teachers: dus.heal.mix.TeacherMix
    teacher_notes: list = field(default_factory=list)  # sources left out as teachers, and why

    @property
    def teacher_dir(self) -> Path | None:
        return self.teachers[0].path if self.teachers else None

    @property
    def manifest(self) -> Manifest | None:
        return self.model_dir.manifest

    @property
    def state(self):
        return self.args.distributed_state


def heal(
    model_dir: str | Path,
    output: str | Path,
    cfg: HealConfig,
    resume: bool = False,
    force: bool = False,
    teacher: str | list[str] | None = None,
    callbacks: list | None = None,
) -> HealResult:
    """Fine-tune the model in `model_dir` as `cfg` says and write the healed model to `output`.

    `callbacks` (transformers TrainerCallbacks) are handed to the trainer as they are, for
    library users who want to watch or steer the run (the benchmark measures with them).
    With `sft.max_steps: 0` and calibration on, the calibrated model is written untrained."""
    keep_large_blocks_returnable()
    run = prepare(ModelDir(model_dir), Path(output), cfg, resume, force, teacher)
    student = load_student(run, say)
    announce(run, student)
    wandb_run = open_output(run, student.targets, start_tracking)
    if run.args.max_steps == 0:
        record = calibration_record(cfg, student.targets, run.inputs, student.calibration, run.args.world_size)
        if run.state.is_main_process:
            from dus.heal.save import write_model

            write_model(run, student, student.model, record)
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


def prepare(model_dir: ModelDir, out: Path, cfg: HealConfig, resume: bool, force: bool,
            teacher: str | list[str] | None = None) -> HealRun:
    """Check OUT and the options, read the data, build the SFTConfig: all before any output."""
    model_dir.check_weights()  # config against weights: transformers would fill or drop layers and only warn
    teachers, teacher_notes, mix = check_teachers(model_dir, cfg, teacher)
    for one in teachers:
        ModelDir(one.path).check_weights()
    check_hidden(model_dir, cfg, teachers)
    previous = prepare_output(out, model_dir.path, resume, force, paths_read(model_dir, cfg, teachers))
    if resume and (out / CHECKPOINTS).is_dir():
        checkpoint = last_complete_checkpoint(out / CHECKPOINTS)
        if checkpoint is not None:
            check_checkpoint_files(checkpoint)  # a damaged file named now, not deep inside the trainer
    max_steps = cfg.section("sft").get("max_steps", -1)
    if max_steps == 0 and not cfg.section("calibrate")["enabled"]:
        raise DusError("sft.max_steps 0 trains nothing and calibration is off; give --steps N >= 1 "
                       "(or enable calibrate for a calibration-only run)")
    if max_steps == 0:
        check_something_to_calibrate(model_dir, cfg)
    if resume and previous and previous.get("finished") and isinstance(max_steps, int) \
            and 0 <= max_steps <= (previous.get("steps") or 0):
        raise DusError(f"--resume: the run in {out} already finished its {previous.get('steps')} steps; "
                       "raise --steps to train further, or start afresh with --force")
    accelerator = accelerator_type()
    use_cpu = accelerator is None
    check_supported(cfg.trains, accelerator)
    if cfg.quantized:
        quantization_config(cfg)  # fail before the data is read
        calibrates = cfg.section("calibrate")["enabled"] and model_dir.manifest and model_dir.manifest.plan
        if calibrates and in_memory_obstacle(model_dir, cfg) is not None:
            raise DusError("calibration of a checkpoint as built scales the output projections' weights, which "
                           "4-bit (qlora) weights cannot take: heal in memory (in_memory: true, from a dus build), "
                           "or --set calibrate.enabled=false, or calibrate first (--steps 0) and QLoRA the result")
    inputs = read_inputs(model_dir, cfg, teachers, mix)
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
    check_some_example_fits(inputs.train_set, inputs.tokenizer, inputs.assistant_only_loss, args.max_length,
                            args.packing, args.truncation_mode, f"data {inputs.train_data.source}",
                            getattr(args, "packing_strategy", "bfd"))
    if needs_cpu_fsdp(accelerator):
        say("  FSDP launch without a GPU: dus runs FSDP on the CPU over gloo (accelerate alone would fall back to DDP)")
    return HealRun(model_dir, out, cfg, resume, force, previous, inputs, args, name, use_cpu, teachers, mix,
                   teacher_notes)


def check_something_to_calibrate(model_dir: ModelDir, cfg: HealConfig) -> None:
    """A calibration-only run (`--steps 0`) is refused when calibration would change
    nothing (an unchanged copy is no heal): a model without a dus build plan, or a plan in
    which no layer repeats (a graft, an interleave of distinct layers, an expansion)."""
    from dus.heal.calibrate import repeated_layers

    plan = model_dir.manifest.plan if model_dir.manifest is not None else None
    if plan is None:
        raise DusError(f"--steps 0 only calibrates, and {model_dir.path} has no build plan (dus-manifest.json) "
                       "naming repeated layers: nothing to do; give --steps N >= 1 to train it")
    copies = cfg.section("calibrate").get("copies", "later")
    if not repeated_layers(plan, copies):
        raise DusError(f"--steps 0 only calibrates repeated layers, and no layer of {model_dir.path} repeats "
                       f"(its plan is a {plan.recipe_kind}): nothing to do; give --steps N >= 1 to train it")


def check_teachers(model_dir: ModelDir, cfg: HealConfig, teacher):
    """The distillation teachers (dus.heal.teachers), each refused in one line unless it
    tokenizes as the model does (distillation compares token distributions id by id), and
    the rule that combines several. Nothing when the run does not distil."""
    from dus.heal.routes import data_specs

    distill = cfg.section("distill")
    routed = any(spec.teacher for spec in data_specs(cfg.section("data")["path"]))
    if cfg.mode != "distill" or cfg.section("sft").get("max_steps") == 0:
        if routed or distill["combine"] == "route":
            raise DusError("routing data to teachers (--data FILE:TEACHER, distill.combine: route) needs mode distill; "
                           "drop the :TEACHER suffixes or heal with -c heal")
        return [], [], None
    from dus.heal.teachers import resolve_teachers, teacher_mix
    from dus.tokenizer_check import first_tokenizer_difference

    named = [teacher] if isinstance(teacher, str) else list(teacher or [])
    teachers, notes = resolve_teachers(model_dir.path, model_dir.manifest, distill, named,
                                       lambda path: first_tokenizer_difference(model_dir.path, path))
    if routed and distill["combine"] != "route":
        raise DusError(f"--data FILE:TEACHER routes data to teachers, but distill.combine is {distill['combine']}; "
                       "add --set distill.combine=route")
    return teachers, notes, teacher_mix(distill, teachers)


def check_hidden(model_dir: ModelDir, cfg: HealConfig, teachers) -> None:
    """Activation matching needs the plan (which teacher layer each layer corresponds to)."""
    if cfg.mode != "distill" or not teachers or not cfg.section("distill")["hidden"]:
        return
    from dus.heal.hidden import check_hidden_sizes, hidden_points

    plan = model_dir.manifest.plan if model_dir.manifest else None
    points = hidden_points(plan, cfg.section("distill")["hidden_layers"], len(plan.layers) if plan else 0)
    check_hidden_sizes(model_dir.path, teachers, points)
    if cfg.section("distill")["logits"] != "chunked":
        raise DusError("distill.hidden (activation matching) works with distill.logits: chunked; drop one of them")


def describe_mix(mix) -> str:
    if mix.rule == "ensemble":
        weights = f", weights {list(mix.weights)}" if mix.weights else ""
        return f"ensemble of the teachers' {'probabilities' if mix.average == 'prob' else 'log-probabilities'}{weights}"
    return {"route": "each data file or example taught by the teacher it names",
            "best": "each token taught by the teacher that gives its label the higher probability"}[mix.rule]


def paths_read(model_dir: ModelDir, cfg: HealConfig, teachers) -> list[Path]:
    """What the run reads besides the model: data, evaluation data, calibration text, the
    config file, the teachers and the build plan's sources."""
    from dus.heal.routes import data_specs

    found: list[Path] = []
    candidates = [spec.path for spec in data_specs(cfg.section("data")["path"])]
    candidates += [cfg.section("data")["eval_path"], cfg.section("calibrate")["text"], cfg.source]
    for text in candidates:
        if text and text != "auto":
            path = local_or_shipped(str(text))
            if path.exists():
                found.append(path)
    found += [teacher.path for teacher in teachers or []]
    manifest = model_dir.manifest
    if manifest is not None and manifest.plan is not None:
        found += [Path(path) for path in manifest.plan.models.values() if Path(path).exists()]
    return found


def train_and_save(run: HealRun, student: Student, callbacks) -> dict:
    """Train, gather the weights, write the healed model (or the adapter); returns the record."""
    cfg, out, inputs = run.cfg, run.out, run.inputs
    trainer = make_trainer(cfg, student, run.args, inputs, callbacks, run.mix)
    sharded = sharded_launch()
    say(f"  distributed: {describe_briefly(describe(trainer.accelerator, trainer.args))}")
    trainable = sum(parameter_count(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in trainer.model.parameters())
    say(f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    resumed_from = str(last_complete_checkpoint(out / CHECKPOINTS, say)) if run.resume else None
    if resumed_from:
        say(f"  resuming from {resumed_from}")
    if student.in_memory and not sharded and student.peft_config is None:  # PEFT saves its adapter alone
        from dus.heal.gates import has_aliased_tensors, save_only_what_trains

        if student.gates is not None or has_aliased_tensors(student.model):
            save_only_what_trains(trainer)
    if student.gates is not None:
        from dus.heal.gates import BoundGates, GateGroup

        GateGroup.add(trainer, student.gates, float(cfg.section("gates")["lr"]))
        trainer.add_callback(BoundGates(student.gates))
    counter = StepCounter()
    trainer.add_callback(counter)
    trainer.add_callback(StopWhenNotFinite())
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resumed_from)
    seconds = time.time() - started
    if hasattr(trainer, "restore_head"):
        trainer.restore_head()

    # Under FSDP / DeepSpeed the Trainer gathers the full weights into files (a collective:
    # every rank takes part), and the healed model is rebuilt from those on rank 0.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not sharded:
        check_finite_weights(unwrapped)
    trained_dir = out / ("adapter" if student.peft_config is not None else ".trained")
    if sharded:
        trainer.save_model(str(trained_dir))
    digests = rank_digests(trainer, unwrapped)
    record = heal_record(cfg, student.targets, inputs.train_data, inputs.eval_data, student.teacher_dir, trainer, result, {
        "teachers": [{"name": t.name, "path": str(t.path)} for t in run.teachers] or None,
        "teacher_rule": (run.mix.to_dict() if run.mix else ({"rule": "single"} if run.teachers else None)),
        "activation_matching": ({"weight": cfg.section("distill")["hidden"], "points": student.hidden_points}
                                if student.hidden_match is not None else None),
        "steps_this_run": counter.steps,
        "rank_digests": digests,
        "resumed_from": resumed_from,
        "seconds": round(seconds, 1),
        "notes": inputs.notes,
        "calibration": student.calibration.to_dict() if student.calibration else None,
        "gates": ({**student.gates.record(), "lr": float(cfg.section("gates")["lr"])}
                  if student.gates is not None else None),
        "in_memory": student.in_memory,
        "built_because": student.built_because,
        "logits": ("chunked" if getattr(trainer, "chunked", False) else "whole") if student.teacher_model else None,
    })
    if record["ranks_agree"] is False:
        say(f"[red]warning:[/] the {len(digests)} ranks ended with different weights: {digests}")
    if run.state.is_main_process:
        from dus.heal.save import save_outputs

        save_outputs(run, student, unwrapped, trained_dir, sharded, record, say)
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


__all__ = ["heal", "HealResult"]
