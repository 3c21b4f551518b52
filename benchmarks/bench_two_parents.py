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
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "two-parents")
    parser.add_argument("--stage", default="all")
    parser.add_argument("--parent-steps", type=int, default=40)
    parser.add_argument("--parent-lr", type=float, default=1e-4)
    args = parser.parse_args()
    started = time.time()
    if args.stage in ("parents", "all"):
        stage_parents(args.run, args.parent_steps, args.parent_lr)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
