"""Step time of each CPU launch path (DDP, FSDP2, DeepSpeed ZeRO-2, ZeRO-3) on the same tiny
`dus heal` run, as seconds per optimizer step and as a ratio to DDP measured in the same run.

Each path is a real `accelerate launch --config_file launch/cpu-<path>.yaml` of two gloo
processes running `dus.heal.run.heal` with a callback that timestamps every optimizer step
on rank 0; a run's step time is the median interval between consecutive step ends after the
first `--skip` steps (so loading, sharding and DeepSpeed's engine set-up do not count). The
paths alternate over `--rounds` rounds and each figure is the median over rounds, so a busy
machine slows every path alike. What this measures is the overhead of each path's
communication and bookkeeping on a model far too small to need sharding: on a CPU sharding
only costs; what it saves (memory per GPU) shows only on GPUs.

    python benchmarks/bench_distributed.py                 # full fine-tuning, 20 steps, 2 rounds
    python benchmarks/bench_distributed.py --mode lora     # LoRA on the seam band
    python benchmarks/bench_distributed.py --hidden 256 --layers 8 --steps 30 --rounds 3

Writes benchmarks/results/distributed.json (one entry per mode and model size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = {"ddp": "cpu-2proc.yaml", "fsdp": "cpu-fsdp.yaml", "zero2": "cpu-zero2.yaml", "zero3": "cpu-zero3.yaml"}
# what the heal record must say each path ran: (distributed_type, fsdp_version, zero_stage)
EXPECTED = {"ddp": ("MULTI_CPU", None, None), "fsdp": ("FSDP", 2, None), "zero2": ("DEEPSPEED", None, 2),
            "zero3": ("DEEPSPEED", None, 3)}
CONFIGS = {"full": ("full", 1e-4), "lora": ("lora-seam", 1e-3)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the step time")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tiny source (SOLAR trim 1 adds 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-distributed")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "distributed.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- child: one training run under accelerate launch ------------------------------------

def child(spec: dict) -> None:
    from transformers import TrainerCallback

    from dus.heal.config import load_config
    from dus.heal.run import heal

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    overrides = {
        "data.path": spec["data"], "sft.max_steps": spec["steps"], "sft.learning_rate": spec["lr"],
        "sft.per_device_train_batch_size": spec["batch_size"], "sft.max_length": spec["max_length"],
        "sft.report_to": "none", "sft.logging_steps": 1, "sft.warmup_steps": 0, "sft.save_steps": 10_000,
        "sft.activation_checkpointing": False, "calibrate.enabled": False,
    }
    result = heal(spec["model"], spec["out"], load_config(spec["config"], overrides), force=True, callbacks=[clock])
    if int(os.environ.get("RANK", "0")) == 0:
        intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:])][max(spec["skip"] - 1, 0):]
        facts = {key: result.record.get(key) for key in
                 ("distributed_type", "fsdp_version", "zero_stage", "world_size", "global_batch", "final_loss")}
        Path(spec["report"]).write_text(json.dumps({"intervals": intervals, **facts}) + "\n")


# --- parent ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_workspace(args) -> Path:
    from dus.build import build_model
    from dus.tiny import make_tiny_model

    root = args.workdir / f"h{args.hidden}-l{args.layers}"
    if (root / "built" / "config.json").is_file() and (root / "chat.jsonl").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    heads = max(4, args.hidden // 32)
    source = make_tiny_model(root / "source", "llama", num_layers=args.layers, seed=1, hidden_size=args.hidden,
                             intermediate_size=2 * args.hidden, num_heads=heads, num_kv_heads=heads // 2)
    build_model({"solar": {"model": str(source), "trim": 1}}, root / "built", force=True)
    rng = random.Random(0)
    rows = []
    for _ in range(512):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_path(path: str, args, root: Path, round_index: int) -> dict:
    config, lr = CONFIGS[args.mode]
    report = root / f"report-{path}-{args.mode}.json"
    report.unlink(missing_ok=True)
    spec = {"model": str(root / "built"), "out": str(root / f"out-{path}-{args.mode}"), "data": str(root / "chat.jsonl"),
            "config": config, "lr": lr, "steps": args.steps, "skip": args.skip, "batch_size": args.batch_size,
            "max_length": args.max_length, "report": str(report)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / PATHS[path]),
               "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--child", "--spec",
               json.dumps(spec)]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
    facts = json.loads(report.read_text())
    intervals = facts.pop("intervals")
    ran = (facts["distributed_type"], facts["fsdp_version"], facts["zero_stage"])
    if ran != EXPECTED[path] or facts["world_size"] != 2:
        raise SystemExit(f"{path}: the record says it ran {ran} on {facts['world_size']} processes, not {EXPECTED[path]}")
    return {"path": path, "round": round_index, "wall_seconds": round(time.time() - started, 1),
            "step_seconds": statistics.median(intervals), "steps_timed": len(intervals), **facts}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.spec))
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or "ddp" not in paths:
        raise SystemExit(f"--paths: give ddp (the reference) and any of {', '.join(PATHS)}; unknown: {unknown}")
    root = make_workspace(args)
    runs = []
    for round_index in range(args.rounds):
        order = paths if round_index % 2 == 0 else list(reversed(paths))
        for path in order:
            run = run_path(path, args, root, round_index)
            runs.append(run)
            print(f"round {round_index + 1}: {path:6s} {run['distributed_type']:10s} "
                  f"{run['step_seconds'] * 1000:8.1f} ms/step  ({run['wall_seconds']} s wall)", flush=True)
    summary = {}
    for path in paths:
        summary[path] = {"step_seconds": statistics.median(r["step_seconds"] for r in runs if r["path"] == path)}
    for path in paths:
        summary[path]["ratio_to_ddp"] = round(summary[path]["step_seconds"] / summary["ddp"]["step_seconds"], 2)
        summary[path]["step_seconds"] = round(summary[path]["step_seconds"], 4)
    print(f"\n{'path':8s} {'what ran':22s} {'s/step':>8s} {'x DDP':>6s}")
    for path in paths:
        last = next(r for r in reversed(runs) if r["path"] == path)
        kind = last["distributed_type"] + (f" FSDP{last['fsdp_version']}" if last["fsdp_version"] else "") + \
            (f" ZeRO-{last['zero_stage']}" if last["zero_stage"] is not None else "")
        print(f"{path:8s} {kind:22s} {summary[path]['step_seconds']:8.4f} {summary[path]['ratio_to_ddp']:6.2f}")
    key = f"{args.mode}-h{args.hidden}-l{args.layers}"
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results[key] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("child", "spec", "workdir", "results")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg(),
                    **versions()},
        "summary": summary,
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.results}")


if __name__ == "__main__":
    main()
