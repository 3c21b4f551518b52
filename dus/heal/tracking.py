"""W&B for heal runs: online when the user is logged in, offline otherwise, never a prompt.

A training run on a cluster node without a W&B login must not stop at wandb's
interactive login prompt, and must not lose its curves either: it logs offline into the
run directory, and `wandb sync DIR` uploads it later. The run carries the build plan and
the seams as config, so a healing curve can be traced back to the recipe that made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dus.wandb_mode import choose_mode


@dataclass
class WandbRun:
    mode: str  # "online" | "offline" | "disabled"
    directory: Path  # where wandb writes (its `wandb/` folder goes inside)
    run_id: str | None = None
    run_dir: Path | None = None

    def describe(self) -> str:
        where = self.run_dir or self.directory
        if self.mode == "offline":
            return f"W&B offline run in {where} (upload later with: wandb sync {where})"
        return f"W&B {self.mode} run in {where}"


def start_run(
    directory: Path,
    project: str,
    name: str,
    config: dict,
    tags: list[str] | None = None,
    run_id: str | None = None,
) -> WandbRun:
    """Start (or, given `run_id`, resume) the W&B run before the Trainer does, so that
    transformers' WandbCallback adopts it and adds the training arguments to its config."""
    import wandb

    mode = choose_mode()
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_PROJECT"] = project
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(directory)
    run = wandb.init(
        project=project,
        name=name,
        dir=str(directory),
        config=config,
        tags=tags or None,
        mode=mode,
        id=run_id,
        resume="allow" if run_id else None,
    )
    run_dir = Path(run.dir).parent if run is not None and getattr(run, "dir", None) else None
    return WandbRun(mode, directory, run.id if run is not None else None, run_dir)


def finish_run(summary: dict | None = None) -> None:
    import wandb

    if wandb.run is None:
        return
    for key, value in (summary or {}).items():
        wandb.run.summary[key] = value
    wandb.finish()
    # finish() can return before the service has written the run file (seen with offline
    # runs in wandb 0.31); teardown waits for the service, so the run is complete on disk
    # when dus exits and `wandb sync` can follow at once.
    wandb.teardown()
