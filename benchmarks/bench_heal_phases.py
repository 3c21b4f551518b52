"""Where a heal step's time goes: seconds (wall, CPU, system) and page faults of each phase
of a training step, in memory and on the previous path, each heal in its own process.

Phases, marked by hooks and Trainer callbacks: the student's layers below the trained
band; the band and the layers above it; the teacher (with the previous path's student
head, which runs inside the student's forward there); the loss; backward (with gradient
clipping); the optimizer. Medians over the steps after the first. Page faults are the
process's minor faults (`getrusage`): each is a 4 KiB page touched for the first time,
what a freshly mapped tensor costs on the CPU.

    python benchmarks/bench_heal_phases.py BUILT_MODEL [--dtype bfloat16 --batch-size 1]

BUILT_MODEL is a `dus build` output with its manifest (e.g. the workdir of
bench_heal_memory.py, whose heal config it shares). The in-memory heal runs with dus's
defaults (glibc's mmap policy unless DUS_PIN_MMAP_THRESHOLD is set), the previous path as it
was (`in_memory: false`, whole logits, DUS_PIN_MMAP_THRESHOLD=0).
Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
PHASES = ["below", "student", "teacher", "loss", "backward", "optimizer"]


def child(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    import dus.heal.distill as distill
    from bench_heal_memory import heal_overrides
    from dus.assemble import decoder
    from dus.checkpoint import ModelDir
    from dus.heal.config import load_config
    from dus.heal.run import heal
    from dus.heal.student import trained_layers

    torch.set_num_threads(spec["threads"])
    marks: list[tuple[str, tuple[float, float, float, int]]] = []

    def mark(label: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((label, (time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_minflt)))

    def marked(function):
        def wrapper(*args, **kwargs):
            mark("teacher")
            result = function(*args, **kwargs)
            mark("loss")
            return result
        return wrapper

    distill.chunked_distillation_loss = marked(distill.chunked_distillation_loss)
    distill.distillation_loss = marked(distill.distillation_loss)
    cfg = load_config(None, heal_overrides(spec))
    model_dir = ModelDir(spec["model"])
    band_start = trained_layers(model_dir.manifest.plan.num_layers, cfg, model_dir.manifest).layers[0]

    class Phases(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from dus.heal.distill import causal_lm

            inner = decoder(causal_lm(model))
            inner.layers[band_start].register_forward_pre_hook(lambda *_: mark("below"))
            inner.norm.register_forward_hook(lambda *_: mark("student"))

        def on_step_begin(self, args, state, control, **kwargs):
            mark("begin")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            mark("backward")

        def on_optimizer_step(self, args, state, control, **kwargs):
            mark("optimizer")

    heal(spec["model"], spec["out"], cfg, force=True, callbacks=[Phases()])
    per_phase: dict[str, list[list[float]]] = defaultdict(list)
    step, previous = -1, None
    for label, values in marks:
        if label == "begin":
            step += 1
        elif previous is not None and step >= 1:  # the first step warms up
            per_phase[label].append([b - a for a, b in zip(previous, values)])
        previous = values
    phases = {label: dict(zip(("wall_s", "cpu_s", "system_s", "page_faults"),
                              (statistics.median(row[i] for row in rows) for i in range(4))))
              for label, rows in per_phase.items() if label in PHASES}
    return {"in_memory": spec["in_memory"], "band_start": band_start, "phases": phases,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="a dus build output (with dus-manifest.json)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calibrate-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-heal-phases")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORKDIR/phases.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.model is None:
        parser.error("BUILT_MODEL is required")
    from bench_heal_memory import run_child

    runs = []
    for in_memory in (True, False):
        spec = {"model": str(args.model.resolve()), "out": str(args.workdir / f"healed-{in_memory}"),
                "in_memory": in_memory, "steps": args.steps, "batch_size": args.batch_size, "dtype": args.dtype,
                "calibrate_tokens": args.calibrate_tokens, "threads": args.threads}
        try:
            runs.append(run_child(spec, args.threads, script=__file__))
        finally:
            shutil.rmtree(spec["out"], ignore_errors=True)  # a healed 1.5B and its checkpoint are 11 GB
    out = args.out or args.workdir / "phases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items() if k != "child"}, "runs": runs},
                              indent=2) + "\n")
    print("| phase | in memory: s, faults | previous (as it was): s, faults |\n|---|---:|---:|")
    for phase in PHASES:
        cells = [f"{run['phases'][phase]['wall_s']:.2f} s, {run['phases'][phase]['page_faults']:,.0f}"
                 if phase in run["phases"] else "-" for run in runs]
        print(f"| {phase} | {cells[0]} | {cells[1]} |")
    print(f"| peak | {runs[0]['peak_rss_mb']:,.0f} MB | {runs[1]['peak_rss_mb']:,.0f} MB |")


if __name__ == "__main__":
    main()
