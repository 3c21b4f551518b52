"""Model-FLOPs utilisation of a heal step: the FLOPs the step must do, counted from the
plan and the model's config, over the measured step time, against this machine's matmul
roofline measured here on the heal's own matmul shapes with the same thread count.

FLOPs of one training step of T = batch x length tokens (S = length), a matmul of
(m x k) by (k x n) counting 2mkn:

- the student's forward: every linear of every layer (2 x params x T), attention's two
  score matmuls per layer (QK^T and PV: 4 x S x T x heads x head_dim), and the head
  (2 x vocab x hidden x T, applied a chunk of tokens at a time by the chunked loss);
- its backward down to the lowest trained layer: the input gradients of every linear from
  the top down to that layer (as many FLOPs as the forward), attention's four backward
  matmuls there (twice its forward), the gradient through the head; the weight gradients of
  the trained layers only (band: every linear of the band; LoRA: the adapters' A and B,
  whose forward is counted too);
- the teacher's forward from its shared prefix on (dus.heal.teacher: the layers below the
  band are the student's, whose hidden state the teacher takes), and its head.

Norms, activations, softmaxes and the optimizer are not counted (they are not matmuls);
the roofline is the time torch takes for exactly these matmuls at exactly these shapes
(the same list, each timed alone with warm operands), so MFU = roofline time / step time.
Both are taken in CPU seconds of the process (one thread: the work done, which other
programs on a shared machine do not inflate) and in wall seconds.

    python benchmarks/bench_heal_mfu.py                     # SmolLM2 SOLAR 30 -> 44: band and LoRA students
    python benchmarks/bench_heal_mfu.py --steps 4 --students band --profile
    python benchmarks/bench_heal_mfu.py --tiny              # a smoke run of the script

Each heal runs in its own process (bench_heal_memory.run_child). Writes
benchmarks/results/heal-mfu.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results" / "heal-mfu.json"


# --- the child: one heal, its steps timed --------------------------------------------

def child(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from bench_heal_memory import heal_overrides
    from dus.checkpoint import ModelDir
    from dus.heal.config import load_config
    from dus.heal.run import heal
    from dus.heal.student import trained_layers
    from dus.heal.teacher import shared_prefix

    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, heal_overrides(spec))
    manifest = ModelDir(spec["model"]).manifest
    plan = manifest.plan
    trained = trained_layers(plan.num_layers, cfg, manifest).layers
    marks: list[float] = []
    cpu_marks: list[float] = []
    shapes: list[list[int]] = []
    profile: dict = {}

    class Clock(TrainerCallback):
        profiler = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def keep(_module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is not None:
                    shapes.append(list(ids.shape))
            model.register_forward_pre_hook(keep, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
            if spec.get("profile") and state.global_step == 2:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                profile.update(summarise_profile(self.profiler))
                self.profiler = None

    heal(spec["model"], spec["out"], cfg, force=True, callbacks=[Clock()])
    steps = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    cpu = [cpu_marks[i + 1] - cpu_marks[i] for i in range(0, len(cpu_marks) - 1, 2)]
    return {
        "student": spec["student"], "step_s": steps, "step_cpu_s": cpu, "tokens_shape": shapes[0] if shapes else None,
        "trained_layers": list(trained), "num_layers": plan.num_layers, "teacher": plan.config_from,
        "shared_prefix": shared_prefix(plan, plan.config_from, set(trained)),
        "teacher_layers": ModelDir(plan.models[plan.config_from]).num_layers,
        "lora_r": cfg.section("lora")["r"], "profile": profile,
    }


CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer", ("_foreach", "adam", "Optimizer")),
    ("softmax/loss", ("softmax", "log_softmax", "exp", "logsumexp", "kl_div", "cross_entropy", "nll")),
)


def summarise_profile(profiler) -> dict:
    """Self CPU time of one step by kind of op, and the costliest ops."""
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    kinds: dict[str, float] = {}
    for event in events:
        kind = next((name for name, words in CATEGORIES if any(w.lower() in event.key.lower() for w in words)),
                    "elementwise/norm/other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {"self_cpu_s": total / 1e6,
            "by_kind": {k: round(v / total, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                        for e in top]}


# --- the FLOPs of a step, as a list of matmuls ----------------------------------------

def step_matmuls(config: dict, run: dict, chunk: int) -> list[dict]:
    """Every matmul of one step: {"part", "batch", "m", "k", "n", "count"} (FLOPs 2 x batch x m x k x n x count)."""
    batch, length = run["tokens_shape"]
    tokens = batch * length
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    layers, trained = run["num_layers"], run["trained_layers"]
    lowest = min(trained)
    backward_layers = layers - lowest
    teacher_layers = run["teacher_layers"] - run["shared_prefix"]
    out: list[dict] = []

    def add(part, m, k, n, count, batch_=1):
        if count:
            out.append({"part": part, "batch": batch_, "m": m, "k": k, "n": n, "count": count})

    for fan_in, fan_out in linears:
        add("student forward", tokens, fan_in, fan_out, layers)
        add("student backward (input gradients)", tokens, fan_out, fan_in, backward_layers)
        add("teacher forward", tokens, fan_in, fan_out, teacher_layers)
        if run["student"] == "band":
            add("weight gradients (trained layers)", fan_out, tokens, fan_in, len(trained))
        elif run["student"] == "lora":
            r = run["lora_r"]
            add("LoRA forward", tokens, fan_in, r, len(trained))
            add("LoRA forward", tokens, r, fan_out, len(trained))
            add("LoRA backward (input gradients)", tokens, fan_out, r, len(trained))
            add("LoRA backward (input gradients)", tokens, r, fan_in, len(trained))
            add("weight gradients (trained layers)", r, tokens, fan_in, len(trained))
            add("weight gradients (trained layers)", fan_out, tokens, r, len(trained))
    # attention scores: QK^T and PV per head (causal masking still multiplies the whole square here)
    attention = batch * heads
    add("student forward", length, head_dim, length, layers, attention)  # QK^T
    add("student forward", length, length, head_dim, layers, attention)  # PV
    add("student backward (input gradients)", length, head_dim, length, backward_layers, attention)  # dP = dO V^T
    add("student backward (input gradients)", length, length, head_dim, 3 * backward_layers, attention)  # dV, dQ, dK
    add("teacher forward", length, head_dim, length, teacher_layers, attention)
    add("teacher forward", length, length, head_dim, teacher_layers, attention)
    # the heads, a chunk of tokens at a time: student and teacher logits, the gradient to the student's hidden state
    full, rest = divmod(tokens, chunk)
    for rows, count in ((chunk, full), (rest, 1 if rest else 0)):
        add("student forward", rows, hidden, vocab, count)
        add("teacher forward", rows, hidden, vocab, count)
        add("student backward (input gradients)", rows, vocab, hidden, count)
    return out


def flops(matmul: dict) -> int:
    return 2 * matmul["batch"] * matmul["m"] * matmul["k"] * matmul["n"] * matmul["count"]


def roofline(matmuls: list[dict], dtype: str, threads: int, seconds: float = 0.3) -> dict:
    """Seconds torch takes for each distinct shape (median of repeats, operands warm, output
    preallocated), and the total for the list: wall seconds, and CPU seconds of this process
    (which a machine shared with other work does not inflate, as it does the wall time)."""
    import torch

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    timed: dict[tuple, float] = {}
    timed_cpu: dict[tuple, float] = {}
    for shape in sorted({(m["batch"], m["m"], m["k"], m["n"]) for m in matmuls}):
        batch, m, k, n = shape
        a = torch.randn(batch, m, k, dtype=torch_dtype)
        b = torch.randn(batch, k, n, dtype=torch_dtype)
        c = torch.empty(batch, m, n, dtype=torch_dtype)
        torch.bmm(a, b, out=c)
        samples, cpu_samples, started = [], [], time.perf_counter()
        while time.perf_counter() - started < seconds or len(samples) < 3:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            torch.bmm(a, b, out=c)
            samples.append(time.perf_counter() - begin)
            cpu_samples.append(time.process_time() - begin_cpu)
        timed[shape] = statistics.median(samples)
        timed_cpu[shape] = statistics.median(cpu_samples)

    def total(table):
        return sum(table[(m["batch"], m["m"], m["k"], m["n"])] * m["count"] for m in matmuls)

    return {"seconds": total(timed), "cpu_seconds": total(timed_cpu),
            "shapes": {"x".join(map(str, shape)): [timed[shape], timed_cpu[shape]] for shape in timed}}


# --- the parent --------------------------------------------------------------------------

def built_model(args) -> Path:
    from bench_heal_memory import source_model
    from dus.build import build_model

    source = source_model(args)
    built = args.workdir / f"solar-{source.name}"
    if not (built / "dus-manifest.json").is_file():
        build_model({"solar": {"model": str(source), "trim": args.trim}}, built, force=True)
    return built


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="source model (default: models/SmolLM2-135M-Instruct)")
    parser.add_argument("--size", default=None, help="a random Llama of benchmarks/bench_build.py")
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama: a smoke run")
    parser.add_argument("--trim", type=int, default=8)
    parser.add_argument("--students", default="band,lora", help="distill.student values to measure, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="heal steps (the first is warm-up, not counted)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calibrate-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler over one step: time by kind of op")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-heal-mfu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from bench_heal_memory import run_child
    from dus.heal.distill import chunk_tokens

    import torch

    built = built_model(args)
    config = json.loads((built / "config.json").read_text())
    chunk = chunk_tokens(config["vocab_size"], torch.device("cpu"))
    results = []
    for student in [s.strip() for s in args.students.split(",") if s.strip()]:
        spec = {"model": str(built.resolve()), "out": str(args.workdir / f"healed-{student}"), "in_memory": True,
                "student": student, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                "dtype": args.dtype, "calibrate_tokens": args.calibrate_tokens, "threads": args.threads,
                "profile": args.profile and student == "band"}
        run = run_child(spec, args.threads, script=__file__)
        matmuls = step_matmuls(config, run, chunk)
        roof = roofline(matmuls, args.dtype, args.threads)
        counted = slice(1, None) if len(run["step_s"]) > 1 else slice(None)
        step = statistics.median(run["step_s"][counted])
        step_cpu = statistics.median(run["step_cpu_s"][counted])
        total = sum(flops(m) for m in matmuls)
        parts: dict[str, int] = {}
        for m in matmuls:
            parts[m["part"]] = parts.get(m["part"], 0) + flops(m)
        results.append({
            "student": student, "step_s": step, "steps_s": run["step_s"], "step_cpu_s": step_cpu,
            "steps_cpu_s": run["step_cpu_s"], "tokens_shape": run["tokens_shape"],
            "trained_layers": run["trained_layers"], "shared_prefix": run["shared_prefix"],
            "flops": total, "flops_by_part": parts, "achieved_gflops": total / step / 1e9,
            "roofline_s": roof["seconds"], "roofline_gflops": total / roof["seconds"] / 1e9,
            "mfu_vs_roofline": roof["seconds"] / step, "roofline_cpu_s": roof["cpu_seconds"],
            "achieved_gflops_cpu": total / step_cpu / 1e9, "roofline_gflops_cpu": total / roof["cpu_seconds"] / 1e9,
            "mfu_vs_roofline_cpu": roof["cpu_seconds"] / step_cpu,
            "roofline_shapes_wall_cpu_s": roof["shapes"], "profile": run["profile"],
        })
        print(f"{student}: step {step:.2f} s wall, {step_cpu:.2f} s CPU, {total / 1e12:.3f} TFLOP; the same matmuls "
              f"alone {roof['seconds']:.2f} s wall, {roof['cpu_seconds']:.2f} s CPU: MFU {roof['cpu_seconds'] / step_cpu:.1%} "
              f"of the roofline in CPU time ({roof['seconds'] / step:.1%} in wall time)", flush=True)
    record = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "child"}, "model": str(built),
        "chunk_tokens": chunk, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| student | step s (CPU s) | TFLOP/step | GFLOP/CPU-s | roofline GFLOP/CPU-s | MFU, CPU time (wall) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['student']} | {r['step_s']:.2f} ({r['step_cpu_s']:.2f}) | {r['flops'] / 1e12:.3f} | "
              f"{r['achieved_gflops_cpu']:.1f} | {r['roofline_gflops_cpu']:.1f} | "
              f"{r['mfu_vs_roofline_cpu']:.1%} ({r['mfu_vs_roofline']:.1%}) |")
    for r in results:
        if r["profile"]:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["profile"]["by_kind"].items())
            print(f"{r['student']}: one step's self CPU time by kind of op: {kinds}")
    print(f"CPU: {record['cpu']}; {args.threads} thread(s); results in {args.out}")


if __name__ == "__main__":
    main()
