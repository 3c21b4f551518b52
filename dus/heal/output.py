"""Where a heal writes: checking OUT before anything runs, creating it, the run marker.

OUT is a heal run's directory: the healed model's files at its top, `checkpoints/`,
`wandb/` and the run marker (`dus-heal-run.json`, which also holds the W&B run id for
`--resume`). `--force` replaces only a previous heal output, never the model being
healed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dus.checkpoint import read_json
from dus.errors import DusError

RUN_MARKER = "dus-heal-run.json"  # marks OUT as a heal output; holds the W&B run id for --resume
CHECKPOINTS = "checkpoints"


def prepare_output(out: Path, model_dir: Path, resume: bool, force: bool, reads=()) -> dict | None:
    """Check OUT before anything runs; returns the previous run's marker when resuming.

    `reads` are the other paths the run reads (data, config, teacher, the plan's sources):
    `--force` never deletes an OUT that is one of them or holds one, checked with `..` and
    symbolic links resolved, before anything is deleted."""
    resolved = out.resolve()
    model = model_dir.resolve()
    if model == resolved or resolved in model.parents:
        raise DusError(f"-o {out} {'is' if model == resolved else 'holds'} the input model {model_dir}; "
                       "write the healed model elsewhere")
    marker = out / RUN_MARKER
    previous = read_json(marker, "the heal run marker", f"delete {out} to start afresh") if marker.is_file() else None
    if resume:
        checkpoints = out / CHECKPOINTS
        if last_complete_checkpoint(checkpoints) is None:
            raise DusError(f"--resume: no checkpoint in {checkpoints} that was saved to the end; run without --resume "
                           "to start afresh")
        _check_outside_models(out, model_dir, reads)
        return previous
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DusError(
                f"{out} exists and is not empty; use --resume to continue its run, --force to replace it, "
                "or choose another -o"
            )
        if previous is None:
            raise DusError(f"--force: {out} is not a dus heal output (no {RUN_MARKER}); refusing to delete it")
        for path in reads:
            read = Path(path).resolve()
            if read == resolved or resolved in read.parents:
                raise DusError(f"--force: {out} holds {path}, which this run reads; move it out of {out} "
                               "or choose another -o")
    _check_outside_models(out, model_dir, reads)
    return None


def _check_outside_models(out: Path, model_dir: Path, reads) -> None:
    """OUT inside the model, a teacher or a build source (a model directory the run reads),
    as every command refuses it (after the checks above, which name --force's cases)."""
    from dus.checkpoint import check_outside_models

    check_outside_models(out, [model_dir, *(path for path in reads if (Path(path) / "config.json").is_file())], "-o")


def last_complete_checkpoint(checkpoints: Path, say=None) -> Path | None:
    """The newest `checkpoint-N` that was saved to the end (its trainer_state.json is
    written last); newer ones cut short by a kill are skipped, saying so."""
    found = sorted((int(p.name.split("-")[1]), p) for p in checkpoints.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit()) if checkpoints.is_dir() else []
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
        if say is not None:
            say(f"  skipping {path.name}: incomplete (no trainer_state.json; its save was interrupted)")
    return None


def check_checkpoint_files(checkpoint: Path) -> None:
    """Refuse to resume from a checkpoint whose files are damaged (a copy cut short, a full
    disk), naming the file, before the trainer fails deep inside torch or safetensors:
    safetensors files by their header and length, torch's .pt/.bin files (zip archives) by
    their archive's own checksums."""
    import zipfile

    from dus.safetensors_io import read_header

    for path in sorted(checkpoint.rglob("*")):
        problem = None
        if path.suffix == ".safetensors":
            try:
                read_header(path)
            except (ValueError, OSError) as error:
                problem = str(error)
        elif path.suffix in (".pt", ".bin", ".pth"):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                problem = f"its member {bad} fails its checksum" if bad else None
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                problem = f"not a complete torch archive ({error})"
        if problem:
            raise DusError(f"--resume: {path} is damaged ({problem}); delete {checkpoint} to resume from the "
                           "checkpoint before it, or start afresh with --force")


def write_marker(out: Path, **fields) -> None:
    path = out / RUN_MARKER
    marker = read_json(path, "the heal run marker", f"delete {out} to start afresh") if path.is_file() else {}
    marker.update(fields)
    path.write_text(json.dumps(marker, indent=2) + "\n")


def open_output(run, targets, start_tracking):
    """Create (or, with --force, replace) OUT on rank 0 once every rank has checked
    everything, then start W&B (`start_tracking(run, targets)`) and write the run
    marker. Returns the W&B run or None."""
    state, out = run.state, run.out
    state.wait_for_everyone()  # a slow rank's check of OUT must not see what rank 0 writes next
    if state.is_main_process:
        if run.force and out.exists() and not run.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    wandb_run = start_tracking(run, targets)
    if state.is_main_process:
        write_marker(out, model=str(run.model_dir), config=run.cfg.to_dict(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     wandb_run_id=wandb_run.run_id if wandb_run else None, data_sha256=run.inputs.data_sha256,
                     finished=False)
    return wandb_run


