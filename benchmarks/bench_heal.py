"""Benchmark `dus heal`.

1. Overhead: `dus heal` against a plain TRL SFTTrainer script on the same model, data,
   LoRA targets and SFTConfig, in the same run. Each training runs in its own process
   (so peak memory is its own), the two alternate, and the figures are ratios
   dus / TRL: training tokens per second (measured between the first and last logged
   step, so model loading and the warm-up step do not count) and peak resident memory.
   Aim: dus at >= 0.95x TRL's throughput.
2. Healing: held-out perplexity against training steps for `lora-seam`, `full` and
   `distill` on the same budget (steps x batch x length), from the same unhealed SOLAR
   build, with the source model's perplexity as the line to reach.

    python benchmarks/bench_heal.py                       # SmolLM2 SOLAR 30->44 if models/ has it
    python benchmarks/bench_heal.py --source DIR --trim 8 # any source model
    python benchmarks/bench_heal.py --tiny                # a random tiny Llama: quick smoke run

Writes WORKDIR/results.json, WORKDIR/bench_heal.md and WORKDIR/ppl_vs_steps.png.
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

DEFAULT_SOURCE = REPO / "models" / "SmolLM2-135M-Instruct"
MODES = {"lora-seam": "train/lora-seam.yaml", "full": "train/full.yaml", "distill": "train/distill.yaml"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="Source model directory (SOLAR-built here).")
    parser.add_argument("--tiny", action="store_true", help="Use a random tiny Llama (8 layers) instead.")
    parser.add_argument("--trim", type=int, default=None, help="SOLAR trim (default: a quarter of the layers).")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-heal")
    parser.add_argument("--data", default=str(REPO / "data" / "chat" / "train.jsonl"))
    parser.add_argument("--eval-text", default=str(REPO / "data" / "heldout.txt"))
    parser.add_argument("--eval-tokens", type=int, default=4096, help="Held-out tokens scored per evaluation.")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="dus/TRL pairs for the overhead ratio.")
    parser.add_argument("--curve-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training process (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-curves", action="store_true")
    parser.add_argument("--child", choices=["dus", "trl", "curve"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- shared pieces (used by the child processes) ---------------------------------------

def sft_fields(spec: dict) -> dict:
    """The SFTConfig fields both throughput contenders share."""
    return {
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "max_length": spec["max_length"],
        "packing": False,
        "assistant_only_loss": False,
        "activation_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "use_cpu": True,
        "bf16": False,
        "dataloader_num_workers": 0,
    }


def make_meter():
    """A TrainerCallback recording (time, cumulative training tokens) at every log."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "loss" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

        def tokens_per_second(self) -> float:
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]  # from the end of step 1 to the last step
            return (n1 - n0) / (t1 - t0)

    return Meter()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_dus(spec: dict) -> dict:
    from dus.heal.config import load_config
    from dus.heal.run import heal

    meter = make_meter()
    overrides = {f"sft.{k}": v for k, v in sft_fields(spec).items()}
    overrides.update({"data.path": spec["data"], "merge": False, "lora.r": 16, "lora.lora_alpha": 32,
                      "lora.lora_dropout": 0.05, "seam.radius": 2})
    result = heal(spec["model"], spec["out"], load_config("lora-seam", overrides), callbacks=[meter])
    return {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
            "layers": result.record["layers"], "lora_modules": result.record["lora_modules"],
            "final_loss": result.final_loss}


def child_trl(spec: dict) -> dict:
    """What a user would write with TRL alone, given the same layers and settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    meter = make_meter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=spec["lora_modules"], layers_to_transform=spec["layers"], layers_pattern="layers",
    )
    args = SFTConfig(output_dir=spec["out"], **sft_fields(spec))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[meter])
    trainer.train()
    trainer.save_model(spec["out"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
            "final_loss": losses[-1] if losses else None}


def heldout_ids(model_dir: str, path: str, tokens: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(Path(path).read_text(), return_tensors="pt").input_ids[0]
    return ids[:tokens]


def perplexity(model, ids, window: int) -> float:
    from dus.measure.perplexity import evaluate_stream

    was_training = model.training
    model.eval()
    result = evaluate_stream(model, ids, window=window, stride=window)
    model.train(was_training)
    return result.perplexity


def child_curve(spec: dict) -> dict:
    """One healing mode, with held-out perplexity measured every `eval_every` steps."""
    from transformers import TrainerCallback

    from dus.heal.config import load_config
    from dus.heal.run import heal

    ids = heldout_ids(spec["model"], spec["eval_text"], spec["eval_tokens"])
    points: list[dict] = []

    class Curve(TrainerCallback):
        train_seconds = 0.0
        last = None

        def measure(self, state, model):
            points.append({"step": state.global_step, "perplexity": perplexity(model, ids, spec["window"]),
                           "train_seconds": round(self.train_seconds, 1)})
            print(f"[{spec['mode']}] step {state.global_step}: ppl {points[-1]['perplexity']:.3f}", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.measure(state, model)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.train_seconds += time.perf_counter() - self.last
            if state.global_step % spec["eval_every"] == 0 or state.global_step == state.max_steps:
                self.measure(state, model)
            self.last = time.perf_counter()

    overrides = {
        "data.path": spec["data"], "sft.max_steps": spec["steps"], "sft.per_device_train_batch_size": spec["batch_size"],
        "sft.max_length": spec["max_length"], "sft.report_to": "none", "sft.save_strategy": "no",
        "sft.activation_checkpointing": False, "sft.logging_steps": 5, "sft.seed": 0, "merge": False,
    }
    result = heal(spec["model"], spec["out"], load_config(REPO / MODES[spec["mode"]], overrides), callbacks=[Curve()])
    return {"mode": spec["mode"], "points": points, "final_loss": result.final_loss,
            "layers": result.record["layers"], "peak_rss_mb": peak_rss_mb(),
            "learning_rate": result.record["config"]["sft"]["learning_rate"]}


def source_perplexity(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = heldout_ids(spec["model"], spec["eval_text"], spec["eval_tokens"])
    out = {}
    for name in ("source", "unhealed"):
        model = AutoModelForCausalLM.from_pretrained(spec[name], dtype=torch.float32)
        out[name] = perplexity(model, ids, spec["window"])
    return out


# --- the parent: prepare, run children, report ------------------------------------------

def run_child(kind: str, spec: dict, threads: int | None = None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("[") and "ppl" in line:
            print("   ", line, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_models(args) -> tuple[Path, Path]:
    from dus.build import build_model

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from dus.tiny import make_tiny_model

        source = work / "tiny-source"
        if not source.exists():
            make_tiny_model(source, "llama", num_layers=8, hidden_size=64, intermediate_size=128)
    else:
        source = (args.source or DEFAULT_SOURCE).resolve()
        if not (source / "config.json").is_file():
            raise SystemExit(f"no source model at {source}: run `dus import --smollm2 -o {DEFAULT_SOURCE}` or use --tiny")
    depth = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    trim = args.trim or depth // 4
    built = work / f"solar-{depth}-trim{trim}"
    if not built.exists():
        build_model({"solar": {"model": str(source), "trim": trim}}, built)
    return source, built


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.spec)
        if os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        result = {"dus": child_dus, "trl": child_trl, "curve": child_curve}[args.child](spec)
        print(json.dumps(result))
        return

    import shutil

    source, built = prepare_models(args)
    base = {"model": str(built), "data": args.data, "batch_size": args.batch_size, "max_length": args.max_length}
    # A run that skips a part keeps that part's earlier results (same workdir, same build).
    previous = args.workdir / "results.json"
    results: dict = json.loads(previous.read_text()) if previous.is_file() else {}
    if results.get("built") != str(built):
        results = {}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.update({"source": str(source), "built": str(built), "settings": settings})
    print(f"source {source.name}, SOLAR build {built.name}", flush=True)

    if not args.skip_throughput:
        pairs = []
        layers = modules = None
        for repeat in range(args.repeats):
            order = ["dus", "trl"] if repeat % 2 == 0 else ["trl", "dus"]
            pair = {}
            for kind in order:
                out = args.workdir / f"throughput-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                spec = {**base, "steps": args.throughput_steps, "out": str(out)}
                if kind == "trl":  # dus chose the targets in the first run; TRL gets the same ones
                    spec.update(layers=layers, lora_modules=modules)
                pair[kind] = run_child(kind, spec, args.threads)
                if kind == "dus":
                    layers, modules = pair[kind]["layers"], pair[kind]["lora_modules"]
                print(f"  run {repeat + 1} {kind}: {pair[kind]['tokens_per_second']:.1f} tokens/s, "
                      f"peak {pair[kind]['peak_rss_mb']:.0f} MB", flush=True)
            pairs.append(pair)
        speed = [p["dus"]["tokens_per_second"] / p["trl"]["tokens_per_second"] for p in pairs]
        memory = [p["dus"]["peak_rss_mb"] / p["trl"]["peak_rss_mb"] for p in pairs]
        results["throughput"] = {
            "runs": pairs, "speed_ratios": speed, "memory_ratios": memory,
            "speed_ratio_median": statistics.median(speed), "memory_ratio_median": statistics.median(memory),
            "layers": layers,
        }
        print(f"dus/TRL tokens/s: median {statistics.median(speed):.3f} ({', '.join(f'{r:.3f}' for r in speed)}); "
              f"peak memory: median {statistics.median(memory):.3f}", flush=True)

    if not args.skip_curves:
        spec = {**base, "eval_text": args.eval_text, "eval_tokens": args.eval_tokens, "window": args.window,
                "source": str(source), "unhealed": str(built)}
        results["reference_perplexity"] = source_perplexity(spec)
        print(f"perplexity: source {results['reference_perplexity']['source']:.3f}, "
              f"unhealed {results['reference_perplexity']['unhealed']:.3f}", flush=True)
        results["curves"] = {}
        for mode in args.modes.split(","):
            out = args.workdir / f"curve-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            results["curves"][mode] = run_child("curve", {
                **spec, "mode": mode, "steps": args.curve_steps, "eval_every": args.eval_every, "out": str(out)},
                args.threads)
            results["curves"][mode]["wall_seconds"] = round(time.perf_counter() - started, 1)
        plot_curves(results, args.workdir / "ppl_vs_steps.png")

    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.workdir / "bench_heal.md").write_text(markdown(results))
    print(markdown(results))


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode, curve in results["curves"].items():
        steps = [p["step"] for p in curve["points"]]
        axis.plot(steps, [p["perplexity"] for p in curve["points"]], marker="o", label=mode)
    reference = results["reference_perplexity"]
    axis.axhline(reference["source"], color="black", linestyle="--", linewidth=1, label="source model")
    axis.set_xlabel("training step (same batch and length for every mode)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title(f"Healing {Path(results['built']).name}: held-out perplexity vs steps")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict) -> str:
    lines = [f"# dus heal benchmark\n\nsource `{Path(results['source']).name}`, SOLAR build "
             f"`{Path(results['built']).name}`; settings: {json.dumps(results['settings'])}\n"]
    if "throughput" in results:
        t = results["throughput"]
        lines.append("## dus heal vs a plain TRL SFTTrainer script (same model, data, LoRA targets, SFTConfig)\n")
        lines.append("| run | dus tokens/s | TRL tokens/s | ratio | dus peak MB | TRL peak MB | ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for i, pair in enumerate(t["runs"]):
            d, r = pair["dus"], pair["trl"]
            lines.append(f"| {i + 1} | {d['tokens_per_second']:.1f} | {r['tokens_per_second']:.1f} | "
                         f"{t['speed_ratios'][i]:.3f} | {d['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{t['memory_ratios'][i]:.3f} |")
        lines.append(f"\nmedian throughput ratio dus/TRL **{t['speed_ratio_median']:.3f}**, "
                     f"median peak-memory ratio **{t['memory_ratio_median']:.3f}** (LoRA on layers {t['layers']})\n")
    if "curves" in results:
        reference = results["reference_perplexity"]
        lines.append("## Held-out perplexity vs steps (same budget per mode)\n")
        lines.append(f"source model {reference['source']:.3f}; unhealed build {reference['unhealed']:.3f}\n")
        steps = sorted({p["step"] for c in results["curves"].values() for p in c["points"]})
        lines.append("| mode | lr | " + " | ".join(f"step {s}" for s in steps) + " | train s | peak MB |")
        lines.append("|---|---|" + "---|" * len(steps) + "---|---|")
        for mode, curve in results["curves"].items():
            by_step = {p["step"]: p["perplexity"] for p in curve["points"]}
            cells = " | ".join(f"{by_step[s]:.3f}" if s in by_step else "" for s in steps)
            seconds = curve["points"][-1]["train_seconds"]
            lines.append(f"| {mode} | {curve['learning_rate']:g} | {cells} | {seconds:.0f} | "
                         f"{curve['peak_rss_mb']:.0f} |")
        lines.append("\n![perplexity vs steps](ppl_vs_steps.png)\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
