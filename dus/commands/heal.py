"""`dus heal`: fine-tune an assembled model on instruction data (or distil its source)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def heal(
    model: Path = typer.Argument(..., help="Model directory to heal (usually a `dus build` output)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory: healed model, checkpoints, W&B run."),
    config: Optional[str] = typer.Option(
        None, "-c", "--config", help="Heal YAML, or a name in train/ (heal, band, lora-seam, full, qlora, expand, "
        "distill). Default: train/heal.yaml (calibrate, then distil the source into the seam band, in memory)."
    ),
    mode: Optional[str] = typer.Option(None, "--mode", help="distill | band | lora | qlora | full | expand (default: distill)."),
    data: List[str] = typer.Option([], "--data", help="Training data: file, save_to_disk dir or hub name; repeat "
                                   "for several files; FILE:TEACHER routes a file to one teacher (distill.combine "
                                   "route). Default: data/text/train.jsonl (data.path)."),
    data_format: Optional[str] = typer.Option(
        None, "--format", help="auto | messages | alpaca | sharegpt | prompt-completion | text (default: auto)."
    ),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out data evaluated during training."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", "--steps", help="Training steps (sft.max_steps; default: 60)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Train for epochs instead of steps."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", "--learning-rate", help="Learning rate (sft.learning_rate; default: 5.0e-4)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per step and device (sft.per_device_train_batch_size; default: 4)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per sequence (sft.max_length; default: 256)."),
    rank: Optional[int] = typer.Option(None, "--lora-r", "--rank", help="LoRA rank (lora.r; default: 16)."),
    radius: Optional[int] = typer.Option(None, "--radius", help="Seam band: layers within this many of a seam (seam.radius; default: 8, 16 layers)."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="wandb | none | tensorboard ... (sft.report_to; default: wandb, offline unless logged in)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the heal (sft.seed; default: 42)."),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N steps (sft.save_steps; default: 100)."),
    teacher: List[str] = typer.Option([], "--teacher", help="Distill: a teacher (model directory or a source "
                                      "name of the build); repeat for several. Default: auto, every source of the "
                                      "build that tokenizes as the model (distill.teachers)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Write a standalone model with LoRA "
                                         "merged in (default: true)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in OUT."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier heal output in OUT."),
    settings: List[str] = typer.Option([], "--set", help="Any config key: --set sft.warmup_steps=0 (repeatable)."),
) -> None:
    """Heal the seam: calibrate, then distil the source into the layers around it.

    Example: dus heal out/solar -o out/solar-healed

    TRL + PEFT on the build plan executed in memory. Every default is in train/heal.yaml
    (train/parents.yaml for a parents build; -c picks another config from train/); any key can be
    set with --set section.key=value. Guide: docs/heal.md.
    """
    from dus.heal.config import load_config, parse_set_option
    from dus.heal.run import heal as run_heal
    from dus.heal.run import is_main_process

    from dus.errors import DusError

    if max_steps is not None and max_steps < 0:
        raise DusError(f"--steps {max_steps}: give a number of training steps >= 1 (0 only calibrates); to train "
                       "whole epochs use --epochs N")
    if epochs is not None and not epochs > 0:
        raise DusError(f"--epochs {epochs}: give a positive number of epochs")
    overrides: dict = {}
    flags = {
        "mode": mode,
        "data.path": (data[0] if len(data) == 1 else list(data)) if data else None,
        "data.format": data_format,
        "data.eval_path": eval_data,
        "sft.learning_rate": learning_rate,
        "sft.per_device_train_batch_size": batch_size,
        "sft.max_length": max_length,
        "lora.r": rank,
        "seam.radius": radius,
        "sft.report_to": report_to,
        "sft.seed": seed,
        "sft.save_steps": save_steps,
        "merge": merge,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if max_steps is not None:
        overrides["sft.max_steps"] = max_steps
    if epochs is not None:
        overrides["sft.num_train_epochs"] = epochs
        overrides["sft.max_steps"] = max_steps if max_steps is not None else -1
    # where each override came from, for an error about its value (never the shipped defaults)
    options = {"mode": "--mode", "data.path": "--data", "data.format": "--format", "data.eval_path": "--eval-data",
               "sft.learning_rate": "--lr", "sft.per_device_train_batch_size": "--batch-size",
               "sft.max_length": "--max-length", "lora.r": "--lora-r", "seam.radius": "--radius",
               "sft.report_to": "--report-to", "sft.seed": "--seed", "sft.save_steps": "--save-steps",
               "merge": "--merge/--no-merge", "sft.max_steps": "--steps", "sft.num_train_epochs": "--epochs"}
    origins = {key: options[key] for key in overrides if key in options}
    for item in settings:
        key, value = parse_set_option(item)
        overrides[key] = value
        origins[key] = f"--set {item.strip()}"
    if config is None:
        from dus.heal.config import default_config_for

        config = default_config_for(model)
    cfg = load_config(config, overrides, origins)
    result = run_heal(model, output, cfg, resume=resume, force=force, teacher=list(teacher) or None)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    if is_main_process():
        print(f"healed: {result.output} ({result.mode}, {result.steps} steps, final loss {loss})")


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)
