"""One search worker against two on this machine: candidates per minute, and whether two
workers search what one searches. `dus search` as a user runs it (its own processes),
SmolLM2 30 -> 44 on the dev tokens bench_search.py scores (the first --tokens of
data/text/dev/*.txt), one CPU thread per worker, the same seed; one worker first, then
two, each on a fresh study, --repeat times alternating.

    python benchmarks/bench_search_workers.py --evals 40 --optimizer random
    python benchmarks/bench_search_workers.py --evals 40 --optimizer tpe

With random, every trial's parameters depend only on the seed and its slot, so the two
searches must hold the same candidates with the same scores; with tpe, two workers ask
while the other's trial runs (Optuna's constant liar), so they search other candidates:
the best score of each is reported. Writes benchmarks/results/search-workers-OPTIMIZER.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_search(model: Path, out: Path, workers: int, args) -> dict:
    command = [sys.executable, "-m", "dus", "search", str(model), "--depth", "44", "--scale", "0.5:1",
               "--evals", str(args.evals), "--max-tokens", str(args.tokens), "--optimizer", args.optimizer,
               "--seed", str(args.seed), "--workers", str(workers), "-o", str(out)]
    for text in sorted((REPO / "data" / "text" / "dev").glob("*.txt")):
        command += ["--data", str(text)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    data = json.loads((out / "search.json").read_text())
    scored = sorted((json.dumps(c["candidate"], sort_keys=True), c["value"]) for c in data["candidates"])
    return {"workers": workers, "seconds": round(seconds, 2), "evaluations": data["evaluations"],
            "per_minute": round(60 * data["evaluations"] / seconds, 2), "best": data["ranked"][0]["value"],
            "best_perplexity": data["ranked"][0]["metrics"]["perplexity"], "scored": scored}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--evals", type=int, default=40)
    parser.add_argument("--optimizer", default="random", choices=["random", "tpe"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)

    rounds = []
    folder = Path(tempfile.mkdtemp(prefix="dus-bench-workers-"))
    try:
        for round_index in range(args.repeat):
            one = run_search(args.model, folder / f"one-{round_index}", 1, args)
            two = run_search(args.model, folder / f"two-{round_index}", 2, args)
            same = one["scored"] == two["scored"]
            rounds.append({"one": {k: v for k, v in one.items() if k != "scored"},
                           "two": {k: v for k, v in two.items() if k != "scored"},
                           "speedup": round(one["seconds"] / two["seconds"], 3), "same_candidates_and_scores": same})
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"model": args.model.name, "evals": args.evals, "optimizer": args.optimizer, "seed": args.seed,
              "tokens": args.tokens, "cores": os.cpu_count(), "threads_per_worker": 1, "rounds": rounds}
    (RESULTS / f"search-workers-{args.optimizer}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
