"""Which healing recovers what the seam broke, per training token and per CPU second?

Runs `dus heal` candidates (a heal config plus overrides each) on the same unhealed SOLAR
build, each in its own process, and measures perplexity on several text domains before
training (after calibration, when the candidate calibrates) and every `--eval-every`
steps. The source model and the unhealed build are scored in the same run, so every
figure is a recovery `(unhealed - healed) / (unhealed - source)` per domain. Evaluation
time is not counted as training time.

Tuning uses the dev texts (`data/text/dev/`), never the held-out ones: the README's
held-out figures come from `dus compare` on `data/heldout/` after the defaults were fixed.

    python benchmarks/bench_healing.py --candidates distill-band,calibrated-distill-band
    python benchmarks/bench_healing.py --list            # the candidates and what they change
    python benchmarks/bench_healing.py --plot-only       # redraw from results.json
    python benchmarks/bench_healing.py --heldout-kept NAME   # held-out scores of a run kept with --keep

Results accumulate in WORKDIR/results.json (one entry per candidate; rerun one to replace
it), with plots per domain against training tokens and against training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SOURCE = REPO / "models" / "SmolLM2-135M-Instruct"
TEXT = str(REPO / "data" / "text" / "train.jsonl")
CHAT = str(REPO / "data" / "chat" / "train.jsonl")
PACKED = {"sft.packing": True, "sft.packing_strategy": "wrapped"}

# name -> (heal config, overrides). Every candidate shares batch, length, steps and seed.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "heal-default": ("train/heal.yaml", {}),  # exactly what `dus heal MODEL -o OUT` runs
    "lora-chat": ("train/lora-seam.yaml", {"data.path": CHAT, "sft.learning_rate": 1e-3, "seam.radius": 4}),
    "calibrated": ("train/distill.yaml", {"data.path": TEXT, "calibrate.enabled": True, "sft.max_steps": 0, **PACKED}),
    "distill-lora": ("train/distill.yaml", {"data.path": TEXT, "sft.learning_rate": 1e-3, "seam.radius": 4, **PACKED}),
    "distill-band": ("train/distill.yaml", {"data.path": TEXT, "distill.student": "band", "seam.radius": 4,
                                            "sft.learning_rate": 1e-4, **PACKED}),
    "distill-full": ("train/distill.yaml", {"data.path": TEXT, "distill.student": "full", "sft.learning_rate": 1e-4, **PACKED}),
    "cal-distill-band": ("train/distill.yaml", {"data.path": TEXT, "distill.student": "band", "seam.radius": 4,
                                                "calibrate.enabled": True, "sft.learning_rate": 1e-4, **PACKED}),
    "cal-distill-full": ("train/distill.yaml", {"data.path": TEXT, "distill.student": "full", "calibrate.enabled": True,
                                                "sft.learning_rate": 1e-4, **PACKED}),
    "cal-distill-lora": ("train/distill.yaml", {"data.path": TEXT, "calibrate.enabled": True, "seam.radius": 4,
                                                "sft.learning_rate": 1e-3, **PACKED}),
    # Self-distillation data: the source model's own answers (data/selfinstruct), as chats.
    "cal-distill-band-selfinstruct": ("train/distill.yaml", {
        "data.path": str(REPO / "data" / "selfinstruct" / "train.jsonl"), "distill.student": "band", "seam.radius": 4,
        "calibrate.enabled": True, "calibrate.text": str(REPO / "data" / "text" / "train.jsonl"),
        "sft.learning_rate": 1e-4, **PACKED}),
    # The control a DUS user asks about: the base model itself, fine-tuned (cross-entropy,
    # every parameter) on the same text for the same tokens. Runs on the source model.
    "control-base-ce": ("train/full.yaml", {"data.path": TEXT, "sft.learning_rate": 1e-4, "sft.assistant_only_loss": False,
                                            **PACKED, "model": "source"}),
    "cal-ce-band": ("train/full.yaml", {"mode": "band", "data.path": TEXT, "seam.radius": 4, "calibrate.enabled": True,
                                        "sft.assistant_only_loss": False,
                                        "sft.learning_rate": 1e-4, **PACKED}),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--trim", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-healing")
    parser.add_argument("--candidates", default="", help="comma-separated names (see --list)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="extra override for one candidate, e.g. distill-band:sft.learning_rate=3e-4")
    parser.add_argument("--as", dest="alias", default=None, help="store a single candidate under this name")
    parser.add_argument("--eval", default=None,
                        help="name=path,... texts to score (default: every data/text/dev/*.txt)")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored per text per evaluation")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heldout", action="store_true",
                        help="also score each final model on the held-out texts (data/heldout/*.txt and data/heldout.txt); "
                             "for reporting after the defaults are fixed, never for choosing them")
    parser.add_argument("--heldout-tokens", type=int, default=4096)
    parser.add_argument("--heldout-kept", default="", metavar="NAME[,NAME]",
                        help="score candidates already run with --keep (WORKDIR/run-NAME, the same weights --heldout "
                             "scores) on the held-out texts, with no training; after the defaults are fixed")
    parser.add_argument("--keep", action="store_true", help="keep each candidate's healed model in WORKDIR/run-NAME")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def eval_texts(spec: str | None) -> dict[str, str]:
    if spec:
        return dict(item.split("=", 1) for item in spec.split(","))
    found = sorted((REPO / "data" / "text" / "dev").glob("*.txt"))
    if not found:
        raise SystemExit("no dev texts in data/text/dev/; pass --eval name=path,...")
    return {path.stem: str(path) for path in found}


def token_streams(model_dir: str, texts: dict[str, str], tokens: int) -> dict:
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream

    tokenizer = ModelDir(model_dir).tokenizer()
    return {name: tokenize_stream(tokenizer, read_text(path), tokens) for name, path in texts.items()}


def perplexities(model, streams: dict, window: int) -> dict[str, float]:
    from dus.measure.perplexity import evaluate_stream

    was_training = model.training
    model.eval()
    scores = {name: evaluate_stream(model, ids, window, window).perplexity for name, ids in streams.items()}
    model.train(was_training)
    return scores


# --- child: one candidate -----------------------------------------------------------------

def child(spec: dict) -> dict:
    from transformers import TrainerCallback

    from dus.heal.config import load_config
    from dus.heal.run import heal

    streams = token_streams(spec["model"], spec["texts"], spec["eval_tokens"])
    points: list[dict] = []
    started = time.perf_counter()

    class Curve(TrainerCallback):
        """Training time between steps (evaluation excluded); perplexities at eval steps,
        measured from on_log so the token count (logged every step) is current."""

        train_seconds = 0.0
        tokens = 0
        last = None
        setup_seconds = None

        def measure(self, state, model):
            scores = perplexities(model, streams, spec["window"])
            points.append({"step": state.global_step, "tokens": self.tokens,
                           "train_seconds": round(self.train_seconds, 1), "perplexity": scores})
            shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            print(f"[{spec['name']}] step {state.global_step} ({self.tokens} tokens, "
                  f"{self.train_seconds:.0f} s): {shown}", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.setup_seconds = time.perf_counter() - started
            self.measure(state, model)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.train_seconds += time.perf_counter() - self.last
            self.last = time.perf_counter()

        final_model = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.final_model = model

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not logs or "num_tokens" not in logs:
                return
            self.tokens = int(logs["num_tokens"])
            if state.global_step % spec["eval_every"] == 0 or state.global_step == state.max_steps:
                self.measure(state, model)
            self.last = time.perf_counter()

    curve = Curve()

    overrides = {
        **spec["overrides"], "sft.max_steps": spec["steps"], "sft.per_device_train_batch_size": spec["batch_size"],
        "sft.max_length": spec["max_length"], "sft.report_to": "none", "sft.save_strategy": "no",
        "sft.activation_checkpointing": False, "sft.logging_steps": 1, "sft.seed": 0, "merge": spec["keep"],
        "sft.warmup_steps": 4,
    }
    calibration_only = spec["overrides"].get("sft.max_steps") == 0
    if calibration_only:  # heal writes the calibrated model without a training step
        overrides["sft.max_steps"] = 0
    result = heal(spec["model"], spec["out"], load_config(REPO / spec["config"], overrides), callbacks=[curve])
    if calibration_only:
        return calibrated_scores(spec, result, streams, time.perf_counter() - started)
    calibration = result.record.get("calibration")
    heldout = heldout_scores(spec, curve.final_model) if spec.get("heldout") else None
    return {"name": spec["name"], "points": points, "heldout": heldout, "final_loss": result.final_loss,
            "layers": result.record["layers"], "trains": result.record["trains"],
            "calibration": calibration, "setup_seconds": round(curve.setup_seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "config": spec["config"], "overrides": spec["overrides"]}


def heldout_scores(spec: dict, model) -> dict[str, float]:
    """Perplexity of the final model on every held-out text (after training: reporting only)."""
    from dus.compare.run import default_heldout_files, domain_names

    files = default_heldout_files()
    texts = dict(zip(domain_names(files), map(str, files)))
    streams = token_streams(spec["model"], texts, spec["heldout_tokens"])
    scores = perplexities(model, streams, spec["window"])
    print(f"[{spec['name']}] held-out: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    return scores


def calibrated_scores(spec: dict, result, streams, seconds: float) -> dict:
    """Calibration alone (forward passes only): the written model scored like a curve point."""
    from dus.checkpoint import ModelDir

    model = ModelDir(spec["out"]).load_model("float32")
    scores = perplexities(model, streams, spec["window"])
    calibration = result.record["calibration"]
    print(f"[{spec['name']}] calibrated x{calibration['factor']:g}: {scores}", flush=True)
    heldout = heldout_scores(spec, model) if spec.get("heldout") else None
    return {"name": spec["name"], "points": [{"step": 0, "tokens": 0, "train_seconds": 0.0, "perplexity": scores}],
            "heldout": heldout, "calibration": calibration, "setup_seconds": round(seconds, 1), "trains": "nothing",
            "config": spec["config"], "overrides": spec["overrides"]}


# --- parent -------------------------------------------------------------------------------

def references(source: Path, built: Path, streams: dict, window: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in (("source", source), ("unhealed", built)):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        out[name] = perplexities(model, streams, window)
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[name].items()), flush=True)
    return out


def run_candidate(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", "--spec", json.dumps(spec)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("["):
            print("   ", line.rstrip(), flush=True)
    errors = process.stderr.read()
    if process.wait() != 0:
        raise SystemExit(f"{spec['name']} failed:\n{errors[-4000:]}")
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def prepare(args) -> Path:
    from dus.build import build_model

    built = args.workdir / f"solar-trim{args.trim}"
    if not built.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        build_model({"solar": {"model": str(args.source), "trim": args.trim}}, built)
    return built


def recovery(reference: dict, perplexity: dict) -> dict[str, float]:
    return {name: (reference["unhealed"][name] - value) / (reference["unhealed"][name] - reference["source"][name])
            for name, value in perplexity.items() if name in reference["source"]}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(child(json.loads(args.spec))))
        return
    if args.list:
        for name, (config, overrides) in CANDIDATES.items():
            print(f"{name:18s} {config}  {overrides}")
        return
    results_path = args.workdir / "results.json"  # settings and references; candidates in candidates/NAME.json
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.plot_only:
        import torch

        torch.set_num_threads(args.threads)
        built = prepare(args)
        texts = eval_texts(args.eval)
        settings = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                    "eval_tokens": args.eval_tokens, "window": args.window, "texts": texts, "threads": args.threads}
        if results.get("settings", {}).get("texts") != texts or "reference" not in results:
            streams = token_streams(str(built), texts, args.eval_tokens)
            results = {"settings": settings, "reference": references(args.source, built, streams, args.window)}
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        wants_heldout = args.heldout or args.heldout_kept
        if wants_heldout and results.get("heldout_reference", {}).get("tokens") != args.heldout_tokens:
            from dus.compare.run import default_heldout_files, domain_names

            files = default_heldout_files()
            streams = token_streams(str(built), dict(zip(domain_names(files), map(str, files))), args.heldout_tokens)
            results["heldout_reference"] = {"tokens": args.heldout_tokens,
                                            **references(args.source, built, streams, args.window)}
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        for name in [n for n in args.heldout_kept.split(",") if n]:
            stored = args.workdir / "candidates" / f"{name}.json"
            if not (args.workdir / f"run-{name}" / "config.json").is_file() or not stored.is_file():
                raise SystemExit(f"no kept model for {name}: run it with --keep first")
            from dus.checkpoint import ModelDir

            model = ModelDir(str(args.workdir / f"run-{name}")).load_model("float32")
            result = json.loads(stored.read_text())
            spec = {"name": name, "model": str(built), "heldout_tokens": args.heldout_tokens, "window": args.window}
            result["heldout"] = heldout_scores(spec, model)
            stored.write_text(json.dumps(result, indent=2) + "\n")
        extra: dict[str, dict] = {}
        for item in args.set:
            name, assignment = item.split(":", 1)
            key, value = assignment.split("=", 1)
            import yaml

            extra.setdefault(name, {})[key] = yaml.safe_load(value)
        for name in [n for n in args.candidates.split(",") if n]:
            if name not in CANDIDATES:
                raise SystemExit(f"unknown candidate {name}; --list shows them")
            config, overrides = CANDIDATES[name]
            stored = args.alias or name
            out = args.workdir / f"run-{stored}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = {**overrides, **extra.get(name, {})}
            model = args.source if overrides.pop("model", None) == "source" else built
            spec = {"name": stored, "model": str(model), "config": config, "overrides": overrides,
                    "texts": texts, "eval_tokens": args.eval_tokens, "window": args.window, "steps": args.steps,
                    "eval_every": args.eval_every, "batch_size": args.batch_size, "max_length": args.max_length,
                    "out": str(out), "keep": args.keep, "heldout": args.heldout, "heldout_tokens": args.heldout_tokens}
            print(f"== {stored}: {config} {spec['overrides']}", flush=True)
            result = run_candidate(spec, args.threads)
            (args.workdir / "candidates").mkdir(exist_ok=True)
            (args.workdir / "candidates" / f"{stored}.json").write_text(json.dumps(result, indent=2) + "\n")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    # Several invocations may run side by side on one workdir: each writes its own candidate files.
    results["candidates"] = {path.stem: json.loads(path.read_text())
                             for path in sorted((args.workdir / "candidates").glob("*.json"))}
    plot(results, args.workdir)
    (args.workdir / "bench_healing.md").write_text(markdown(results))
    print(markdown(results))


def plot(results: dict, workdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = results["reference"]
    domains = list(reference["source"])
    for axis_key, label in (("tokens", "training tokens"), ("train_seconds", "training seconds (1 CPU thread)")):
        columns = min(4, len(domains))
        rows = -(-len(domains) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
        for axis in axes.flat[len(domains):]:
            axis.axis("off")
        for axis, domain in zip(axes.flat, domains):
            for name, run in results["candidates"].items():
                xs = [p[axis_key] for p in run["points"]]
                ys = [p["perplexity"][domain] for p in run["points"]]
                axis.plot(xs, ys, marker="o" if len(xs) > 1 else "s", label=name)
            axis.axhline(reference["source"][domain], color="black", linestyle="--", linewidth=1, label="source")
            axis.axhline(reference["source"][domain] * 1.10, color="gray", linestyle=":", linewidth=1, label="source +10%")
            axis.axhline(reference["unhealed"][domain], color="red", linestyle="--", linewidth=1, label="unhealed")
            axis.set_title(f"dev text: {domain}")
            axis.set_xlabel(label)
            axis.set_ylabel("perplexity")
            axis.grid(alpha=0.3)
        axes.flat[len(domains) - 1].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(workdir / f"healing_vs_{axis_key}.png", dpi=110)
        plt.close(figure)


def markdown(results: dict) -> str:
    reference = results["reference"]
    domains = list(reference["source"])
    lines = ["# Healing candidates: dev perplexity per domain\n",
             f"settings: {json.dumps(results.get('settings', {}))}\n",
             "| model | " + " | ".join(domains) + " | mean recovery | tokens | train s |",
             "|---|" + "---|" * (len(domains) + 3)]
    for name in ("source", "unhealed"):
        lines.append(f"| {name} | " + " | ".join(f"{reference[name][d]:.2f}" for d in domains) + " | | | |")
    for name, run in results["candidates"].items():
        last = run["points"][-1]
        rec = recovery(reference, last["perplexity"])
        cells = " | ".join(f"{last['perplexity'][d]:.2f} ({100 * rec[d]:.0f}%)" for d in domains)
        lines.append(f"| {name} | {cells} | {100 * sum(rec.values()) / len(rec):.0f}% | {last['tokens']} | "
                     f"{last['train_seconds']:.0f} |")
    lines.append("\nRecovery = (unhealed - healed) / (unhealed - source).\n")
    held = results.get("heldout_reference")
    scored = {name: run["heldout"] for name, run in results["candidates"].items() if run.get("heldout")}
    if held and scored:
        domains = list(held["source"])
        lines += [f"## Held-out texts ({held['tokens']} tokens each; measured after the defaults were fixed)\n",
                  "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for name in ("source", "unhealed"):
            lines.append(f"| {name} | " + " | ".join(f"{held[name][d]:.2f}" for d in domains) + " |")
        for name, values in scored.items():
            rec = recovery(held, values)
            lines.append(f"| {name} | " + " | ".join(f"{values[d]:.2f} ({100 * rec[d]:.0f}%, {values[d] / held['source'][d]:.3f}x)"
                                                     for d in domains) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
