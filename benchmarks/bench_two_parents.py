"""Two parents, one child: does a healed stack of two fine-tunes keep (or beat) both parents?

Stages (each skipped when its output exists, so the script resumes):
  parents   fine-tune SmolLM2-135M-Instruct twice with `dus heal -c full` (plain SFT on text):
            A on Python docstrings, B on narrative prose (KJV passages and the novel), both
            from the bundled training text (data/text/train.jsonl), disjoint kinds
  builds    the stack of A and B (`stack: {models: [A, B], trim: 8}`: A's lower 22 layers,
            B's upper 22) and an interleave of the two
  heals     each child healed on the same tokens (A's and B's training text together) with:
            one teacher (the old behaviour), ensemble (prob / logprob averages), route (each
            file taught by its parent), best (per token), and the winner plus activation matching
  score     held-out perplexity of every model on A's kind (docstrings of modules no training
            file holds), B's kind (KJV books no training file holds), their mixture, and a kind
            neither parent saw (software license texts); the ensemble average is chosen on the
            dev texts, never the held-out ones

    python benchmarks/bench_two_parents.py --stage parents     # ~15 min, two jobs at one thread
    python benchmarks/bench_two_parents.py                      # everything left
Results: benchmarks/results/two-parents.json and docs/two-parents.png.

Constructions that start at a parent (issue 40), on the same parents and the same heal tokens:
  constructions   `parents` preset builds, `method: gated` (A whole, B's run behind closed
                  gates) and `method: swap` (layer swapping), beside the stack; each scored
                  unhealed, after a gates-only heal (distill.student: gates) and after the band
                  heal with gates (gates.train: true), both teachers (ensemble logprob); gated with
                  band + gates (fixed in advance, started first) healed again for --long-factor
                  times the steps; the best on the dev texts is reported

    python benchmarks/bench_two_parents.py --stage constructions --heal-steps 15   # 3 heals at once
Results: benchmarks/results/two-parents-constructions.json and docs/two-parents-constructions.png.
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
PARENT_KINDS = {"A": ("docstrings",), "B": ("bible", "novel")}


def sh(args: list[str], log: Path, threads: int = 1) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(args), f"> {log}", flush=True)
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a child failed: {proc.args}")


def split_training_text(run: Path) -> dict[str, Path]:
    """A's and B's training files, cut from the bundled training text by domain."""
    files = {}
    rows = [json.loads(line) for line in (ROOT / "data/text/train.jsonl").read_text().splitlines() if line.strip()]
    for parent, kinds in PARENT_KINDS.items():
        path = run / "data" / f"{parent}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        chosen = [r for r in rows if r["domain"] in kinds]
        path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in chosen))
        files[parent] = path
    return files


def stage_parents(run: Path, steps: int, lr: float) -> None:
    if not (BASE / "model.safetensors").is_file():
        wait_all([sh([sys.executable, "-m", "dus", "import", "--smollm2", "-o", str(BASE), "--force"],
                     run / "logs" / "import.log", threads=2)])
    files = split_training_text(run)
    procs = []
    for parent, data in files.items():
        out = run / parent
        if (out / "model.safetensors").is_file():
            continue
        procs.append(sh([sys.executable, "-m", "dus", "heal", str(BASE), "-c", "full", "-o", str(out), "--force",
                         "--data", str(data), "--steps", str(steps), "--lr", str(lr), "--report-to", "none",
                         "--set", "sft.packing=true", "--set", "sft.packing_strategy=wrapped",
                         "--set", "sft.max_length=256", "--set", "sft.per_device_train_batch_size=4",
                         "--set", "sft.save_steps=1000", "--set", "calibrate.enabled=false",
                         "--set", "sft.assistant_only_loss=false", "--set", "sft.activation_checkpointing=false",
                         "--set", "sft.warmup_steps=4", "--set", "sft.logging_steps=5"],
                        run / "logs" / f"parent-{parent}.log"))
    wait_all(procs)


HELD_OUT = {  # never trained on, never used for a choice
    "A's kind (docstrings)": ["data/heldout/docstrings.txt"],
    "B's kind (KJV)": ["data/heldout/bible.txt"],
    "mixture": ["data/heldout/docstrings.txt", "data/heldout/bible.txt"],
    "neither (licenses)": ["data/heldout/legal.txt"],
}
DEV = {  # the choices (ensemble average, which rule gets activation matching) are made here
    "dev A (docstrings)": ["data/text/dev/docstrings.txt"],
    "dev B (KJV, novel)": ["data/text/dev/bible.txt", "data/text/dev/novel.txt"],
}
HEALS = {  # name -> extra `dus heal` arguments; every heal reads the same two files
    "one teacher (A)": ["--teacher", "A"],
    "ensemble prob": ["--set", "distill.combine=ensemble", "--set", "distill.average=prob"],
    "ensemble logprob": ["--set", "distill.combine=ensemble", "--set", "distill.average=logprob"],
    "route": ["--set", "distill.combine=route"],
    "best": ["--set", "distill.combine=best"],
}


def heal_args(run: Path, child: Path, out: Path, extra: list[str], steps: int) -> list[str]:
    data = run / "data"
    routed = "distill.combine=route" in extra
    files = [f"{data / 'A.jsonl'}:A", f"{data / 'B.jsonl'}:B"] if routed else [str(data / "A.jsonl"), str(data / "B.jsonl")]
    extra = [str(run / "A") if item == "A" else item for item in extra]
    return [sys.executable, "-m", "dus", "heal", str(child), "-o", str(out), "--force", "--steps", str(steps),
            "--report-to", "none", "--set", "calibrate.enabled=false", "--set", "sft.save_steps=1000",
            *[arg for f in files for arg in ("--data", f)], *extra]


def stage_builds(run: Path) -> None:
    recipes = {
        "stack": {"name": "two-parents-stack", "stack": {"models": [str(run / "A"), str(run / "B")], "trim": 8}},
        "interleave": {"name": "two-parents-interleave",
                       "interleave": {"models": [str(run / "A"), str(run / "B")], "block": 11, "step": 8}},
    }
    for name, recipe in recipes.items():
        if (run / name / "model.safetensors").is_file():
            continue
        path = run / f"{name}.yaml"
        path.write_text(json.dumps(recipe))
        wait_all([sh([sys.executable, "-m", "dus", "build", str(path), "-o", str(run / name), "--force"],
                     run / "logs" / f"build-{name}.log", threads=2)])


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def pending_heals(run: Path, child: str, names: dict[str, list[str]]) -> list[tuple[str, Path, list[str]]]:
    return [(f"{child}-{slug(name)}", run / child, extra) for name, extra in names.items()
            if not (run / f"{child}-{slug(name)}" / "model.safetensors").is_file()]


def run_heals(run: Path, queue: list, steps: int, then=None, parallel: int = 2) -> None:
    """Heals `parallel` at a time, one thread each; `then()` is called once the stack's first heals
    are done and may return more heals to queue (the activation-matching run). A queue item may
    carry its own step count as a fourth element."""
    running: list[tuple[str, subprocess.Popen]] = []
    while queue or running:
        while queue and len(running) < parallel:
            name, child, extra, *own_steps = queue.pop(0)
            count = own_steps[0] if own_steps else steps
            running.append((name, sh(heal_args(run, child, run / name, extra, count), run / "logs" / f"heal-{name}.log")))
        time.sleep(5)
        for item in list(running):
            if item[1].poll() is not None:
                if item[1].returncode != 0:
                    raise SystemExit(f"a heal failed: {item[0]} (see {run / 'logs'})")
                running.remove(item)
        stack_done = not any(name.startswith("stack-") and "hidden" not in name for name, *_ in queue + running)
        if then is not None and stack_done:
            queue += then()
            then = None


def read_texts(paths: list[str], tokenizer, tokens: int):
    """The token stream of a text kind; several files alternate paragraph by paragraph."""
    from dus.measure.text import read_text, tokenize_stream

    parts = [read_text(ROOT / p).split("\n\n") for p in paths]
    mixed = [paragraph for group in zip(*parts) for paragraph in group] if len(parts) > 1 else parts[0]
    return tokenize_stream(tokenizer, "\n\n".join(mixed)[: tokens * 12], tokens)


def score(models: dict[str, Path], texts: dict[str, list[str]], tokens: int, cache: Path) -> dict:
    """Held-out perplexity of every model on every text (cached by model and text)."""
    import torch
    from transformers import AutoTokenizer

    from dus.checkpoint import ModelDir
    from dus.measure.perplexity import evaluate_stream

    torch.set_num_threads(2)
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    streams = {name: read_texts(paths, tokenizer, tokens) for name, paths in texts.items()}
    for label, path in models.items():
        todo = [name for name in texts if f"{name}|{tokens}" not in results.get(label, {})]
        if not todo:
            continue
        model = ModelDir(path).load_model(torch.float32)
        model.eval()
        for name in todo:
            with torch.no_grad():
                result = evaluate_stream(model, streams[name], 512, 384)
            results.setdefault(label, {})[f"{name}|{tokens}"] = result.perplexity
            print(f"  {label:34s} {name:26s} {result.perplexity:8.3f}", flush=True)
            cache.write_text(json.dumps(results, indent=1))
        del model
    return {label: {name: results[label][f"{name}|{tokens}"] for name in texts} for label in models}


def choose_and_match(run: Path, tokens: int) -> list:
    """On dev text only: the best rule of several teachers; it is healed again with activation matching."""
    dev_models = {name: run / f"stack-{slug(name)}" for name in HEALS}
    dev = score(dev_models, DEV, tokens, run / "scores.json")
    mean = {name: sum(math.log(v) for v in row.values()) / len(row) for name, row in dev.items()}
    best = min((n for n in HEALS if n != "one teacher (A)"), key=mean.get)
    print(f"best rule on dev text: {best}", flush=True)
    (run / "choice.json").write_text(json.dumps({"dev": dev, "best": best}, indent=1))
    return pending_heals(run, "stack", {f"{best} + hidden": [*HEALS[best], "--set", "distill.hidden=1.0"]})


CONSTRUCTIONS = {  # name -> the `parents` preset's method (stack: the reference, as built above)
    "gated": "gated",
    "swap": "swap",
    "stack": None,
}
CONSTRUCTION_HEALS = {  # every heal: both parents as teachers (the default ensemble, logprob average)
    "gates only": ["--set", "distill.student=gates"],
    "band + gates": ["--set", "gates.train=true"],
}


GATED_EXTRA = {  # the gated child starts at A: does a per-token teacher choice beat the ensemble there?
    "band + gates, best": ["--set", "gates.train=true", "--set", "distill.combine=best"],
    "band + gates, route": ["--set", "gates.train=true", "--set", "distill.combine=route"],
}


def heals_of(child: str) -> dict[str, list[str]]:
    return {**CONSTRUCTION_HEALS, **(GATED_EXTRA if child == "gated" else {})}


LONG = ("gated", "band + gates")  # healed again for --long-factor times the steps


def stage_constructions(run: Path, steps: int, long_factor: int, tokens: int, parallel: int = 3) -> None:
    """Build the `parents` children, heal each construction two ways, then the dev winner longer."""
    for name, method in CONSTRUCTIONS.items():
        if method is None or (run / name / "model.safetensors").is_file():
            continue
        recipe = {"name": f"two-parents-{name}",
                  "parents": {"models": [str(run / "A"), str(run / "B")], "base": str(BASE), "method": method}}
        path = run / f"{name}.yaml"
        path.write_text(json.dumps(recipe))
        wait_all([sh([sys.executable, "-m", "dus", "build", str(path), "-o", str(run / name), "--force"],
                     run / "logs" / f"build-{name}.log", threads=2)])
    # The long heal is of the construction expected to win (gated, band + gates), fixed before any
    # score and started first, beside the others: it is the longest job. The dev winner is reported;
    # where it differs, the results say so.
    long_child, long_heal = LONG
    long_name = f"{long_child}-{slug(long_heal)}-x{long_factor}"
    queue = []
    if long_factor > 1 and not (run / long_name / "model.safetensors").is_file():
        queue.append((long_name, run / long_child, CONSTRUCTION_HEALS[long_heal], steps * long_factor))
    queue += [item for child in CONSTRUCTIONS for item in pending_heals(run, child, heals_of(child))]
    run_heals(run, queue, steps, parallel=parallel)
    dev_models = {f"{c}, {h}": run / f"{c}-{slug(h)}" for c in CONSTRUCTIONS for h in heals_of(c)}
    dev = score(dev_models, DEV, tokens, run / "scores.json")
    mean = {name: sum(math.log(v) for v in row.values()) / len(row) for name, row in dev.items()}
    best = min(dev, key=mean.get)
    child, heal = best.split(", ", 1)
    print(f"best construction on dev text: {best}", flush=True)
    (run / "constructions-choice.json").write_text(json.dumps({"dev": dev, "best": best}, indent=1))
    report_constructions(run, tokens, best, long_factor, steps)


def report_constructions(run: Path, tokens: int, best: str, long_factor: int, steps: int) -> None:
    child, heal = LONG
    models = {"base": BASE, "A (docstrings)": run / "A", "B (prose)": run / "B"}
    for c in CONSTRUCTIONS:
        models[f"{c} unhealed"] = run / c
        for h in heals_of(c):
            models[f"{c}, {h}"] = run / f"{c}-{slug(h)}"
    long_dir = run / f"{child}-{slug(heal)}-x{long_factor}"
    if long_factor > 1 and long_dir.is_dir():
        models[f"{child}, {heal}, {long_factor}x steps"] = long_dir
    held = score(models, HELD_OUT, tokens, run / "scores.json")
    better_parent = {text: min(held["A (docstrings)"][text], held["B (prose)"][text]) for text in HELD_OUT}
    own = {"A's kind (docstrings)": "A (docstrings)", "B's kind (KJV)": "B (prose)"}
    result = {"tokens_per_text": tokens, "heal_steps": steps, "long_factor": long_factor, "held_out": HELD_OUT,
              "dev_best": best, "long_run": f"{child}, {heal}", "perplexity": held,
              "vs_better_parent": {m: {t: row[t] / better_parent[t] - 1 for t in HELD_OUT} for m, row in held.items()},
              "vs_own_parent": {m: {t: row[t] / held[p][t] - 1 for t, p in own.items()} for m, row in held.items()},
              "vs_base": {m: {t: row[t] / held["base"][t] - 1 for t in HELD_OUT} for m, row in held.items()},
              "gates": gate_records(models)}
    out = ROOT / "benchmarks" / "results" / "two-parents-constructions.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    print(markdown_table(result))
    plot(result, ROOT / "docs" / "two-parents-constructions.png",
         "Constructions that start at a parent: SmolLM2-135M fine-tuned on docstrings (A) and prose (B)")


def gate_records(models: dict[str, Path]) -> dict:
    """The learned gates of each healed child (from its heal record), for the docs."""
    found = {}
    for label, path in models.items():
        manifest = Path(path) / "dus-manifest.json"
        if not manifest.is_file():
            continue
        for record in json.loads(manifest.read_text()).get("history", []):
            if isinstance(record, dict) and record.get("stage") == "heal" and (record.get("record") or record).get("gates"):
                found[label] = (record.get("record") or record)["gates"]["final"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "two-parents")
    parser.add_argument("--stage", default="all", help="parents | builds | heals | score | all")
    parser.add_argument("--parent-steps", type=int, default=40)
    parser.add_argument("--parent-lr", type=float, default=1e-4)
    parser.add_argument("--heal-steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored per text and model")
    parser.add_argument("--interleave", action="store_true", help="also heal the interleave (one teacher, ensemble)")
    parser.add_argument("--parallel", type=int, default=3, help="constructions: heals at once, one thread each")
    parser.add_argument("--long-factor", type=int, default=4, help="constructions: the dev winner healed again this many times longer")
    parser.add_argument("--table", action="store_true", help="print README's table from the results file and stop")
    args = parser.parse_args()
    if args.table:
        name = "two-parents-constructions.json" if args.stage == "constructions" else "two-parents.json"
        print(markdown_table(json.loads((ROOT / "benchmarks" / "results" / name).read_text())))
        return
    started, run = time.time(), args.run
    if args.stage == "constructions":
        stage_parents(run, args.parent_steps, args.parent_lr)
        stage_builds(run)
        stage_constructions(run, args.heal_steps, args.long_factor, args.tokens, args.parallel)
        print(f"done in {time.time() - started:.0f} s")
        return
    if args.stage in ("parents", "all"):
        stage_parents(run, args.parent_steps, args.parent_lr)
    if args.stage in ("builds", "all"):
        stage_builds(run)
    if args.stage in ("heals", "all"):
        queue = pending_heals(run, "stack", HEALS)
        if args.interleave:
            queue += pending_heals(run, "interleave", {k: HEALS[k] for k in ("one teacher (A)", "ensemble prob")})
        run_heals(run, queue, args.heal_steps, then=lambda: choose_and_match(run, args.tokens))
    if args.stage in ("score", "heals", "all"):
        report(run, args.tokens, args.interleave)
    print(f"done in {time.time() - started:.0f} s")


def report(run: Path, tokens: int, interleave: bool) -> None:
    choice = json.loads((run / "choice.json").read_text())
    models = {"base": BASE, "A (docstrings)": run / "A", "B (prose)": run / "B", "stack unhealed": run / "stack"}
    for name in [*HEALS, f"{choice['best']} + hidden"]:
        models[f"stack, {name}"] = run / f"stack-{slug(name)}"
    if interleave:
        models["interleave unhealed"] = run / "interleave"
        for name in ("one teacher (A)", "ensemble prob"):
            models[f"interleave, {name}"] = run / f"interleave-{slug(name)}"
    held = score(models, HELD_OUT, tokens, run / "scores.json")
    better_parent = {text: min(held["A (docstrings)"][text], held["B (prose)"][text]) for text in HELD_OUT}
    result = {"tokens_per_text": tokens, "held_out": HELD_OUT, "dev_choice": choice, "perplexity": held,
              "vs_better_parent": {m: {t: row[t] / better_parent[t] - 1 for t in HELD_OUT} for m, row in held.items()},
              "vs_base": {m: {t: row[t] / held["base"][t] - 1 for t in HELD_OUT} for m, row in held.items()}}
    out = ROOT / "benchmarks" / "results" / "two-parents.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    plot(result, ROOT / "docs" / "two-parents.png")


def markdown_table(result: dict) -> str:
    """README's table: perplexity per held-out text, and the change against the better parent."""
    texts = list(result["held_out"])
    lines = ["| model | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
    for model, row in result["perplexity"].items():
        cells = []
        for text in texts:
            versus = result["vs_better_parent"][model][text]
            cells.append(f"{row[text]:.2f} ({100 * versus:+.1f}%)")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(result["held_out"])
    models = [m for m in result["perplexity"] if m not in ("base",)]
    fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 5), sharey=True)
    for ax, text in zip(axes, texts):
        values = [100 * result["vs_better_parent"][m][text] for m in models]
        colors = ["#888" if m.startswith(("A ", "B ")) else "#c44" if "unhealed" in m else "#37a" for m in models]
        ax.barh(range(len(models)), values, color=colors)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(text, fontsize=10)
        ax.set_xlabel("perplexity vs the better parent (%)")
        ax.set_xlim(min(-15, min(values) - 2), min(max(values) + 5, 80))
    axes[0].set_yticks(range(len(models)), models, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title or "Two parents, one child: SmolLM2-135M fine-tuned on docstrings (A) and prose (B), stacked 44 layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
