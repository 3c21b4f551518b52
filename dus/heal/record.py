"""The heal record: what a heal run did, appended to the model's manifest history.

A healed checkpoint should say how it was made without anyone keeping notes: which
layers trained and why, on what data (with its hash), for how many steps, to what loss,
with which exact config, on how many processes of which kind (accelerate's distributed
type, FSDP version or ZeRO stage, global batch), and whether those processes agreed.
"""

from __future__ import annotations

import time

from dus.heal.distributed import describe
from dus.heal.routes import data_digest

CURVE_KEYS = ("step", "loss", "eval_loss", "distill_kl", "nll", "hidden_mse", "num_tokens")


def _maybe_float(value) -> float | None:
    return float(value) if value is not None else None


def heal_record(cfg, targets, train_data, eval_data, teacher_dir, trainer, result, extra: dict) -> dict:
    """The record of a finished run; `extra` adds run facts (digests, resume, timing, notes)."""
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    digests = extra.get("rank_digests")
    return {
        "stage": "heal",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": cfg.mode,
        "trains": cfg.trains,
        "layers": targets.layers,
        "reason": targets.reason,
        "seams": targets.seams,
        "lora_modules": targets.linear_modules,
        "not_covered": targets.left_out,
        "teacher": str(teacher_dir) if teacher_dir else None,
        "data": {
            "path": train_data.source,
            "format": train_data.format,
            "rows": train_data.rows,
            "sha256": data_digest(train_data),
        },
        "eval_data": eval_data.source if eval_data else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens": getattr(trainer, "_total_train_tokens", None),
        "final_loss": float(losses[-1]) if losses else _maybe_float(result.training_loss),
        "train_loss": _maybe_float(result.training_loss),
        "final_eval_loss": float(evals[-1]) if evals else None,
        "loss_curve": [
            {key: entry[key] for key in CURVE_KEYS if key in entry}
            for entry in history
            if "loss" in entry or "eval_loss" in entry
        ],
        # what ran, as the trainer's accelerator says (not what the launch config asked for)
        **describe(trainer.accelerator, trainer.args),
        "ranks_agree": len(set(digests)) == 1 if digests else None,
        **extra,
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "overrides": cfg.overrides,
    }


def calibration_record(cfg, targets, inputs, calibration, world_size: int) -> dict:
    """The heal record of a calibration-only run (no training step)."""
    data = inputs.train_data
    return {
        "stage": "heal", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": cfg.mode, "trains": "nothing",
        "layers": [], "reason": "calibration only (sft.max_steps 0)", "seams": targets.seams,
        "data": {"path": data.source, "format": data.format, "rows": data.rows, "sha256": inputs.data_sha256},
        "steps": 0, "tokens": 0, "final_loss": None, "world_size": world_size,
        "calibration": calibration.to_dict() if calibration else None,
        "config": cfg.to_dict(), "config_file": cfg.source, "overrides": cfg.overrides,
    }
