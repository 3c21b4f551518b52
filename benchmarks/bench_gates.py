"""Learned gates against grid calibration on the main job (SmolLM2-135M SOLAR 30 -> 44).

Four heals of the same build, from the same data (train/heal.yaml's bundled broad text):
  grid              calibration only (`--steps 0`): today's grid of factors, forward passes
  gates             gates only (`distill.student: gates`, no grid first): a gate per band layer
                    and branch from 1, trained by the default distillation loss for --gate-steps steps
  band              the default heal (grid, then the band) for as many steps: the reference for
                    the gates-only heal's peak memory and step time
  default heal      today's default: grid calibration, then the band distilled --heal-steps steps
  band + gates      the band and its gates distilled --heal-steps steps, no grid first
Scored on the seven dev texts (the choice is made there) and the five held-out texts (the
aim: gates at least as good as the grid on every held-out text). Each heal runs in its own
process at one thread, two at a time; its peak RSS (wait4) and step time (the heal record)
are reported, so the gates-only heal's memory and step time stand beside the band heal's.

    python benchmarks/bench_gates.py                   # grid against gates only
    python benchmarks/bench_gates.py --heal-steps 60   # and the two full heals
Results: benchmarks/results/gates-vs-grid.json, docs/gates-vs-grid.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "SmolLM2-135M-Instruct"
DEV = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "data" / "text" / "dev").glob("*.txt"))
HELD_OUT = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "data" / "heldout").glob("*.txt"))


def heals(gate_steps: int, heal_steps: int | None) -> dict[str, list[str]]:
    """The runs; the two full heals only with --heal-steps (they cost most of the benchmark)."""
    runs = {
        "grid": ["--steps", "0"],
        "gates": ["--steps", str(gate_steps), "--set", "distill.student=gates", "--set", "calibrate.enabled=false"],
        # the default heal for as many steps: the band's step time and peak memory beside the gates'
        "band": ["--steps", str(gate_steps)],
    }
    if heal_steps:
        runs["default heal"] = ["--steps", str(heal_steps)]
        runs["band + gates"] = ["--steps", str(heal_steps), "--set", "gates.train=true", "--set", "calibrate.enabled=false"]
    return runs


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(args), f"> {log}", flush=True)
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_two_at_a_time(jobs: list[tuple[str, list[str], Path]]) -> dict[str, int]:
    """Run the jobs two at a time; name -> peak RSS in bytes (from wait4)."""
    peaks, running = {}, {}
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < 2:
            name, args, log = queue.pop(0)
            proc = launch(args, log)
            running[proc.pid] = (name, proc)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, proc = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{name} failed: see its log")
        peaks[name] = usage.ru_maxrss * 1024
    return peaks


def score(models: dict[str, Path], texts: list[str], tokens: int, cache: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from dus.checkpoint import ModelDir
    from dus.measure.perplexity import evaluate_stream
    from dus.measure.text import read_text, tokenize_stream

    torch.set_num_threads(2)
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    streams = {t: tokenize_stream(tokenizer, read_text(ROOT / t)[: tokens * 12], tokens) for t in texts}
    for label, path in models.items():
        todo = [t for t in texts if f"{t}|{tokens}" not in results.get(label, {})]
        if not todo:
            continue
        model = ModelDir(path).load_model(torch.float32).eval()
        for text in todo:
            with torch.no_grad():
                results.setdefault(label, {})[f"{text}|{tokens}"] = evaluate_stream(model, streams[text], 512, 384).perplexity
            print(f"  {label:14s} {text:34s} {results[label][f'{text}|{tokens}']:8.3f}", flush=True)
            cache.write_text(json.dumps(results, indent=1))
        del model
    return {label: {t: results[label][f"{t}|{tokens}"] for t in texts} for label in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "gates")
    parser.add_argument("--gate-steps", type=int, default=20)
    parser.add_argument("--heal-steps", type=int, default=0, help="also the default heal against band + gates, this many steps (60: the default heal's)")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    started, run = time.time(), args.run
    dus = [sys.executable, "-m", "dus"]
    if not (BASE / "model.safetensors").is_file():
        run_two_at_a_time([("import", [*dus, "import", "--smollm2", "-o", str(BASE), "--force"], run / "logs" / "import.log")])
    solar = run / "solar"
    if not (solar / "model.safetensors").is_file():
        run_two_at_a_time([("build", [*dus, "build", "recipes/solar.yaml", "-o", str(solar), "--force"], run / "logs" / "build.log")])
    jobs = [(name, [*dus, "heal", str(solar), "-o", str(run / slug(name)), "--force", "--report-to", "none",
                    "--set", "sft.save_steps=1000", *extra], run / "logs" / f"{slug(name)}.log")
            for name, extra in heals(args.gate_steps, args.heal_steps).items()
            if not (run / slug(name) / "model.safetensors").is_file()]
    peaks_file = run / "peaks.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.is_file() else {}
    peaks.update(run_two_at_a_time(jobs))
    peaks_file.write_text(json.dumps(peaks, indent=1))
    models = {"base": BASE, "unhealed": solar, **{name: run / slug(name) for name in heals(1, args.heal_steps)}}
    dev = score(models, DEV, args.tokens, run / "scores.json")
    held = score(models, HELD_OUT, args.tokens, run / "scores.json")
    records = {name: last_heal(run / slug(name)) for name in heals(1, args.heal_steps)}
    result = {
        "tokens_per_text": args.tokens, "gate_steps": args.gate_steps, "heal_steps": args.heal_steps,
        "cpu": cpu_name(), "dev": dev, "held_out": held,
        "recovery": {split: {m: {t: recovery(table, m, t) for t in table[m]} for m in table if m not in ("base", "unhealed")}
                     for split, table in (("dev", dev), ("held_out", held))},
        "peak_rss_mb": {k: round(v / 2**20) for k, v in peaks.items()},
        "seconds_per_step": {name: seconds_per_step(r) for name, r in records.items()},
        "gates": {name: ((r or {}).get("gates") or {}).get("final") for name, r in records.items()},
        "calibration": {name: ((r or {}).get("calibration") or {}).get("factor") for name, r in records.items()},
    }
    result["aims"] = {"gates at least as good as the grid on every held-out text":
                      all(held["gates"][t] <= held["grid"][t] for t in HELD_OUT)}
    if args.heal_steps:
        result["aims"]["band + gates at least as good as the default heal on every held-out text"] = all(
            held["band + gates"][t] <= held["default heal"][t] for t in HELD_OUT)
    out = ROOT / "benchmarks" / "results" / "gates-vs-grid.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    plot(result, ROOT / "docs" / "gates-vs-grid.png")
    print(f"wrote {out}; done in {time.time() - started:.0f} s")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def last_heal(path: Path) -> dict | None:
    manifest = path / "dus-manifest.json"
    if not manifest.is_file():
        return None
    heals_ = [r for r in json.loads(manifest.read_text()).get("history", []) if isinstance(r, dict) and r.get("stage") == "heal"]
    return heals_[-1] if heals_ else None


def seconds_per_step(record: dict | None) -> float | None:
    if not record or not record.get("steps") or not record.get("seconds"):
        return None
    return round(record["seconds"] / record["steps"], 2)


def recovery(table: dict, model: str, text: str) -> float:
    """Share of the seam's perplexity cost won back: (unhealed - model) / (unhealed - base), in log space."""
    base, unhealed, value = (math.log(table[m][text]) for m in ("base", "unhealed", model))
    return (unhealed - value) / (unhealed - base) if unhealed != base else float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(result: dict) -> str:
    lines = []
    for split in ("dev", "held_out"):
        data = result[split]
        texts = list(next(iter(data.values())))
        lines += [f"\n{split}:", "| model | " + " | ".join(Path(t).stem for t in texts) + " |",
                  "|---|" + "---:|" * len(texts)]
        for model, row in data.items():
            lines.append(f"| {model} | " + " | ".join(f"{row[t]:.2f}" for t in texts) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, split in zip(axes, ("dev", "held_out")):
        rec = result["recovery"][split]
        texts = list(next(iter(rec.values())))
        width = 0.8 / len(rec)
        for k, (model, row) in enumerate(rec.items()):
            ax.bar([i + k * width for i in range(len(texts))], [100 * row[t] for t in texts], width, label=model)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(texts))], [Path(t).stem for t in texts], rotation=30, fontsize=8)
        ax.set_title(f"{split.replace('_', '-')} texts")
        ax.set_ylabel("seam cost won back (%)")
        ax.axhline(0, color="k", lw=0.6)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M SOLAR 30 -> 44: learned gates against grid calibration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
