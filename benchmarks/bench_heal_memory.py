"""The default heal in memory against the previous path, the heal of the checkpoint as built.

`dus heal` assembles the build plan over one loaded copy of each source (only the trained
band is copied; the teacher is the loaded source and starts from the student's hidden
state below the band; the distillation loss never forms whole logits). The previous path is
`in_memory: false` with `distill.logits: whole`: the built checkpoint loaded whole, a second
copy of the source as teacher, whole-vocabulary logits of both. Both run here in the same script, each in its own
process (so peak memory is its own), alternating, with the same seed and settings:

- peak resident memory (ru_maxrss of the child) and the median time of a training step
  (the first step, warm-up, excluded), as ratios memory / previous;
- whether they train the same model: the largest relative difference of any tensor of the
  two healed checkpoints, and held-out perplexity of both (and of the unhealed build) on
  a bundled held-out text no healing step or test uses.

    python benchmarks/bench_heal_memory.py                      # SmolLM2 SOLAR 30 -> 44 (models/ must have it)
    python benchmarks/bench_heal_memory.py --size 1.5b --steps 3 --batch-size 1 --dtype bfloat16 --calibrate-tokens 256
    python benchmarks/bench_heal_memory.py --tiny               # a quick smoke run
    python benchmarks/bench_heal_memory.py --mmap-thresholds 131072,1048576,4194304,0 --steps 7

`--teachers STACK`: a two-parent stack (benchmarks/bench_two_parents.py builds one) healed in memory
with its first parent alone as teacher, then with both (the default for such a stack), alternating
in pairs: the second teacher's cost in peak memory and step time. Writes
benchmarks/results/heal-memory-teachers.json.

`--mmap-thresholds`: only the in-memory heal, once per glibc mmap threshold
(DUS_PIN_MMAP_THRESHOLD; 0 is glibc's own dynamic policy), peak and step time of each:
the trade between memory given back and page faults. Writes
benchmarks/results/heal-memory-mmap.json.

Writes WORKDIR/results.json (and prints a table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
LOSS_RESULTS = REPO / "benchmarks" / "results" / "heal-memory-loss.json"  # --loss-memory writes, --project reads
HELDOUT = REPO / "data" / "heldout" / "fiction.txt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="source model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--size", default=None, help="a random bf16 Llama of benchmarks/bench_build.py (e.g. 1.5b)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama: a quick smoke run")
    parser.add_argument("--trim", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="dtype the models are loaded in (CPU default float32)")
    parser.add_argument("--student", default="band",
                        help="distill.student: band (the default heal) | lora | qlora (4-bit sources; calibration off "
                             "in both paths, since the previous path cannot calibrate 4-bit weights)")
    parser.add_argument("--calibrate-tokens", type=int, default=2048, help="calibration tokens (the default heal's 2048)")
    parser.add_argument("--pairs", type=int, default=1, help="alternating (memory, previous) pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unpinned-previous", action="store_true",
                        help="kept for the commands of earlier results: the previous path always runs as it was, "
                             "with glibc's own mmap policy (DUS_PIN_MMAP_THRESHOLD=0; the in-memory run takes "
                             "DUS_PIN_MMAP_THRESHOLD from the environment, whose default is the same)")
    parser.add_argument("--mmap-thresholds", default=None,
                        help="comma-separated DUS_PIN_MMAP_THRESHOLD values (bytes; 0: glibc's dynamic policy): "
                             "the in-memory heal once per value")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored (0: skip)")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-heal-memory")
    parser.add_argument("--loss-memory", action="store_true",
                        help="only measure the distillation loss's peak memory per token, whole logits against chunks")
    parser.add_argument("--vocab", type=int, default=49152, help="--loss-memory: vocabulary size")
    parser.add_argument("--hidden", type=int, default=576, help="--loss-memory: hidden size")
    parser.add_argument("--project", action="store_true",
                        help="print the projected memory table (7B -> SOLAR, 70B -> 120B interleave) from the measured "
                             "loss bytes in benchmarks/results/heal-memory-loss.json")
    parser.add_argument("--teachers", type=Path, default=None,
                        help="a two-parent stack: its heal with the first parent alone against both parents")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the child: one heal, measured ---------------------------------------------------

def heal_overrides(spec: dict) -> dict:
    """The heal config of a measured child (also bench_heal_phases.py's): the default heal on
    the bundled training text, `spec["in_memory"]` choosing the path (the previous one with
    whole logits)."""
    student = spec.get("student", "band")
    overrides = {
        "data.path": str(REPO / "data" / "text" / "train.jsonl"),
        "sft.max_steps": spec["steps"],
        "sft.per_device_train_batch_size": spec["batch_size"],
        "sft.max_length": spec.get("max_length", 256),
        "sft.report_to": "none",
        "sft.save_steps": 10**6,
        "sft.model_init_kwargs": {"dtype": spec["dtype"]},
        "in_memory": spec["in_memory"],
        "distill.logits": "chunked" if spec["in_memory"] else "whole",
        "distill.student": student,
        "calibrate.tokens": spec["calibrate_tokens"],
    }
    if student == "qlora":
        overrides.update({"calibrate.enabled": False, "quantization.bnb_4bit_compute_dtype": spec["dtype"]})
    if spec.get("teachers"):  # --teachers: a two-parent stack taught by the listed parents
        overrides.update({"distill.teachers": spec["teachers"], "calibrate.enabled": False})
    return overrides


def child(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from dus.heal.config import load_config
    from dus.heal.run import heal

    torch.set_num_threads(spec["threads"])
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    started = time.perf_counter()
    result = heal(spec["model"], spec["out"], load_config(None, heal_overrides(spec)), force=True,
                  callbacks=[StepClock()])
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "in_memory": result.record["in_memory"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(steps) if steps else None,
        "steps_s": steps,
        "wall_s": time.perf_counter() - started,
        "final_loss": result.final_loss,
        "calibration": (result.record.get("calibration") or {}).get("factor"),
        "layers": result.record["layers"],
    }


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/self/status has no {field}")


def reset_peak_rss_mb() -> float:
    """Reset the process's peak RSS to its current RSS (Linux: 5 > /proc/self/clear_refs), and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def loss_child(spec: dict) -> dict:
    """Peak memory of one distillation loss forward + backward, from last hidden states:
    whole logits (the previous path: both heads applied to the batch) or chunks."""
    import torch

    from dus.heal.distill import chunked_distillation_loss, distillation_loss, head_logits

    torch.manual_seed(0)
    tokens, vocab, hidden = spec["tokens"], spec["vocab"], spec["hidden"]
    weight = torch.randn(vocab, hidden) * 0.02
    teacher_hidden = torch.randn(1, tokens, hidden)
    labels = torch.randint(0, vocab, (1, tokens))
    states = torch.randn(1, tokens, hidden, requires_grad=True)
    before = reset_peak_rss_mb()  # making the inputs peaked higher than a fused chunk does
    if spec["how"] == "whole":
        logits = head_logits(states, weight, None)
        with torch.no_grad():
            teacher = head_logits(teacher_hidden, weight, None)
        loss = distillation_loss(logits, teacher, labels, 1.0, 1.0)[0]
    else:
        loss = chunked_distillation_loss(states, weight, teacher_hidden, weight, labels, 1.0, 1.0)[0]
    loss.backward()
    after = status_mb("VmHWM")
    return {"how": spec["how"], "tokens": tokens, "vocab": vocab, "peak_above_inputs_mb": after - before}


def loss_memory(args) -> None:
    rows = []
    for tokens in (256, 1024):
        for how in ("whole", "chunked"):
            spec = {"how": how, "tokens": tokens, "vocab": args.vocab, "hidden": args.hidden, "loss": True}
            rows.append(run_child(spec, 1))
            print(rows[-1], flush=True)
    per = {how: (r2["peak_above_inputs_mb"] - r1["peak_above_inputs_mb"]) * 2**20 / ((1024 - 256) * args.vocab)
           for how in ("whole", "chunked")
           for r1, r2 in [[r for r in rows if r["how"] == how]]}
    result = {"rows": rows, "bytes_per_token_and_vocab_entry": per}
    LOSS_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


# --- projection to the sizes users build -------------------------------------------------

def layer_params(hidden: int, inter: int, heads: int, kv_heads: int) -> int:
    head = hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv_heads * head + 3 * hidden * inter + 2 * hidden


SHAPES = {  # name -> (hidden, intermediate, heads, kv heads, vocab, layers)
    "Llama-2-7B": (4096, 11008, 32, 32, 32000, 32),
    "Llama-2-70B": (8192, 28672, 64, 8, 32000, 80),
}
BUILDS = [  # (build, source shape, sources, output layers, trained layers of a band student or None)
    ("Llama-2-7B -> SOLAR 48 layers (trim 8)", "Llama-2-7B", 1, 48, 16),
    ("2 x Llama-2-70B -> 137-layer interleave (Goliath)", "Llama-2-70B", 2, 137, None),
]
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights, double-quantized absmax: ~4.1 bits a parameter


def project(args) -> str:
    """The weights, teacher and logits of a distillation heal, in GB, for the old and new path.
    Measured: bytes per logit of the whole-logit loss and of one chunk (loss-memory.json);
    bf16 weights are 2 bytes a parameter by definition; the rest is arithmetic on shapes."""
    from dus.heal.distill import CHUNK_LOGITS, CHUNK_LOGITS_CPU

    measured = json.loads(LOSS_RESULTS.read_text())
    per_logit = measured["bytes_per_token_and_vocab_entry"]["whole"]
    # measured with the CPU's chunks; a GPU's are larger, and a chunk's buffers grow with them
    chunk_bytes = max(r["peak_above_inputs_mb"] for r in measured["rows"] if r["how"] == "chunked") * 2**20
    chunk_bytes *= CHUNK_LOGITS / CHUNK_LOGITS_CPU
    tokens = 4 * 2048
    rows = ["| build | student | weights (old: built + teacher) | weights (new: sources once + copies) | "
            "logits, 4 x 2048 tokens (old / new) | old total | new total |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, shape, count, depth, band in BUILDS:
        hidden, inter, heads, kv, vocab, layers = SHAPES[shape]
        per_layer = layer_params(hidden, inter, heads, kv)
        outside = 2 * vocab * hidden + hidden
        source = layers * per_layer + outside
        built = depth * per_layer + outside
        logits_old, logits_new = tokens * vocab * per_logit, chunk_bytes
        students = [("LoRA", 2.0, 0)] + ([("band", 2.0, band)] if band else []) + [("QLoRA (projected)", NF4_BYTES, 0)]
        for student, bytes_per, copies in students:
            old = built * bytes_per + source * 2.0  # the previous path: a 4-bit built student beside a bf16 teacher
            new = count * source * bytes_per + copies * per_layer * 2.0
            rows.append(f"| {name} | {student} | {old / 1e9:.1f} | {new / 1e9:.1f} | {logits_old / 1e9:.1f} / "
                        f"{logits_new / 1e9:.2f} | {(old + logits_old) / 1e9:.1f} | {(new + logits_new) / 1e9:.1f} |")
    return "\n".join(rows)


# --- the parent ------------------------------------------------------------------------

def source_model(args) -> Path:
    if args.tiny:
        from dus.tiny import make_tiny_model

        path = args.workdir / "tiny-source"
        if not path.exists():
            make_tiny_model(path, "llama", num_layers=8, hidden_size=64, intermediate_size=128)
        return path
    if args.size:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_build import ensure_model

        return ensure_model(args.workdir / f"random-{args.size}", args.size)
    path = args.source or SMOLLM2
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is missing: run `dus import --smollm2 -o {SMOLLM2}` first, or pass --source/--size")
    return path


def run_child(spec: dict, threads: int, threshold: str | None = None, script: str = __file__) -> dict:
    """`script --child SPEC` in its own process (bench_heal_phases.py passes its own script)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if spec.get("in_memory") is False:
        env["DUS_PIN_MMAP_THRESHOLD"] = "0"  # the previous path as it was
    if threshold is not None:
        env["DUS_PIN_MMAP_THRESHOLD"] = threshold
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({spec}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_gap(a_dir: Path, b_dir: Path) -> tuple[float, str]:
    from safetensors.torch import load_file

    def load(directory):
        merged = {}
        for shard in sorted(directory.glob("*.safetensors")):
            merged.update(load_file(shard))
        return merged

    a, b = load(a_dir), load(b_dir)
    worst = (0.0, "")
    for name in a:
        x, y = a[name].float(), b[name].float()
        gap = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
        worst = max(worst, (gap, name))
    return worst


def perplexity(model_dir: Path, tokens: int, dtype: str) -> float:
    import torch

    from dus.checkpoint import ModelDir
    from dus.measure.perplexity import evaluate_stream
    from dus.measure.text import read_text, tokenize_stream

    directory = ModelDir(model_dir)
    ids = tokenize_stream(directory.tokenizer(), read_text(HELDOUT)[: 16 * tokens], tokens)
    model = directory.load_model(getattr(torch, dtype), quiet=True).eval()
    return evaluate_stream(model, ids, 512, 512).perplexity


def heal_spec(args, built: Path, name: str) -> dict:
    """What a heal child runs: `name` is "memory" (the default heal) or "previous"."""
    return {"model": str(built), "out": str(args.workdir / f"healed-{name}"), "in_memory": name == "memory",
            "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "dtype": args.dtype,
            "threads": args.threads, "calibrate_tokens": args.calibrate_tokens, "student": args.student}


def teacher_pairs(args) -> None:
    """One teacher against two on a two-parent stack, each heal in its own process."""
    from dus.manifest import read_manifest

    stack = args.teachers
    plan = read_manifest(stack).plan
    parents = [name for name in plan.models]
    runs = {"one teacher": [], "two teachers": []}
    for pair in range(args.pairs):
        for name, teachers in (("one teacher", parents[:1]), ("two teachers", parents)):
            spec = {**heal_spec(args, stack, name.replace(" ", "-")), "teachers": teachers, "in_memory": True}
            result = run_child(spec, args.threads)
            runs[name].append(result)
            print(f"pair {pair} {name}: peak {result['peak_rss_mb']:.0f} MB, step {result['step_s']:.2f} s", flush=True)
    summary = {name: {"peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                      "step_s": statistics.median(r["step_s"] for r in rs)} for name, rs in runs.items()}
    one, two = summary["one teacher"], summary["two teachers"]
    summary["two_over_one"] = {"peak_rss": two["peak_rss_mb"] / one["peak_rss_mb"], "step_time": two["step_s"] / one["step_s"],
                               "extra_peak_mb": two["peak_rss_mb"] - one["peak_rss_mb"]}
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "stack": str(stack), "parents": parents,
              "runs": runs, "summary": summary}
    out = REPO / "benchmarks" / "results" / "heal-memory-teachers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def mmap_sweep(args, built: Path) -> None:
    rows = []
    for threshold in args.mmap_thresholds.split(","):
        result = run_child(heal_spec(args, built, "memory"), args.threads, threshold=threshold.strip())
        rows.append({"DUS_PIN_MMAP_THRESHOLD": threshold.strip(), "peak_rss_mb": result["peak_rss_mb"],
                     "step_s": result["step_s"], "steps_s": result["steps_s"], "final_loss": result["final_loss"]})
        print(f"threshold {threshold}: peak {result['peak_rss_mb']:.0f} MB, step {result['step_s']:.2f} s", flush=True)
    out = REPO / "benchmarks" / "results" / "heal-memory-mmap.json"
    out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(loss_child(spec) if spec.get("loss") else child(spec)))
        return
    if args.loss_memory:
        loss_memory(args)
        return
    if args.project:
        print(project(args))
        return
    import torch

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.teachers:
        teacher_pairs(args)
        return
    from dus.build import build_model

    source = source_model(args)
    built = args.workdir / f"solar-{source.name}"
    if not (built / "dus-manifest.json").is_file():
        build_model({"solar": {"model": str(source), "trim": args.trim}}, built, force=True)
    if args.mmap_thresholds:
        mmap_sweep(args, built)
        return
    runs = {"memory": [], "previous": []}
    for pair in range(args.pairs):
        for name in ("memory", "previous"):
            result = run_child(heal_spec(args, built, name), args.threads)
            runs[name].append(result)
            print(f"pair {pair} {name}: peak {result['peak_rss_mb']:.0f} MB, step {result['step_s']:.2f} s, "
                  f"final loss {result['final_loss']:.5f}", flush=True)
    summary = {
        name: {"peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
               "step_s": statistics.median(r["step_s"] for r in rs), "final_loss": rs[-1]["final_loss"]}
        for name, rs in runs.items()
    }
    gap, where = largest_gap(args.workdir / "healed-memory", args.workdir / "healed-previous")
    summary["ratios"] = {
        "peak_rss": summary["memory"]["peak_rss_mb"] / summary["previous"]["peak_rss_mb"],
        "step_time": summary["memory"]["step_s"] / summary["previous"]["step_s"],
    }
    summary["largest_relative_tensor_gap"] = {"value": gap, "tensor": where}
    if args.eval_tokens:
        summary["heldout_perplexity"] = {
            "text": str(HELDOUT.relative_to(REPO)), "tokens": args.eval_tokens,
            **{name: perplexity(path, args.eval_tokens, args.dtype) for name, path in (
                ("unhealed", built), ("memory", args.workdir / "healed-memory"),
                ("previous", args.workdir / "healed-previous"))},
        }
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "source": str(source), "runs": runs,
              "summary": summary}
    (args.workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
