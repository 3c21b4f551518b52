"""Benchmark `dus compare` against a bare transformers loop scoring the same windows.

Each contender is a whole process, timed from start to exit (imports, model loading,
scoring, and for dus the layer statistics, plots, metrics.json and report.md); the two
alternate, so a busy machine slows both alike. The bare loop is the least a user would
write: load the model, tokenize the text, run the same non-overlapping windows, sum the
cross-entropy. Reported: wall time of each, and the throughput ratio bare / dus per pair
(1.0 = dus as fast as the bare loop; the aim is >= 0.95).

    python benchmarks/bench_compare.py                          # SmolLM2 in models/, data/heldout.txt
    python benchmarks/bench_compare.py --model DIR --tokens 8192 --pairs 3

Writes benchmarks/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BARE = r'''
import math, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, text_path, window, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"  # benchmarks/gpu runs this loop on cuda
tokenizer = AutoTokenizer.from_pretrained(model_dir)
placed = {"device_map": device} if device != "cpu" else {}  # load straight onto the GPU
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **placed).eval()
ids = tokenizer(open(text_path).read(), return_tensors="pt").input_ids[0][:tokens]
nll, count = 0.0, 0
with torch.inference_mode():
    for begin in range(0, len(ids) - 1, window):
        chunk = ids[begin:begin + window].unsqueeze(0).to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits[0, :-1].float()
        nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
print(math.exp(nll / count), count)
'''


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "heldout.txt")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's choice)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "compare.json")
    return parser.parse_args(argv)


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main(argv=None):
    args = parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="dus-bench-compare-") as tmp:
        bare_cmd = [sys.executable, "-c", BARE, str(args.model), str(args.data), str(args.window), str(args.tokens)]
        dus_cmd = [sys.executable, "-m", "dus", "compare", str(args.model), "--data", str(args.data), "--window",
                   str(args.window), "--stride", str(args.window), "--max-tokens", str(args.tokens), "--no-generate",
                   "-o", str(Path(tmp) / "report"), "--force"]
        timed(bare_cmd, env)  # warm the page cache and bytecode caches; not counted
        for index in range(args.pairs):
            order = ["bare", "dus"] if index % 2 == 0 else ["dus", "bare"]
            pair = {}
            for kind in order:
                seconds, out = timed(bare_cmd if kind == "bare" else dus_cmd, env)
                pair[kind] = seconds
                if kind == "bare":
                    pair["bare_perplexity"] = float(out.split()[0])
            metrics = json.loads((Path(tmp) / "report" / "metrics.json").read_text())
            pair["dus_perplexity"] = metrics["models"][0]["perplexity"]["perplexity"]
            pair["ratio"] = pair["bare"] / pair["dus"]
            pairs.append(pair)
            print(f"pair {index + 1}: bare {pair['bare']:.2f} s, dus compare {pair['dus']:.2f} s, "
                  f"throughput ratio {pair['ratio']:.3f} (perplexity {pair['bare_perplexity']:.3f} vs "
                  f"{pair['dus_perplexity']:.3f})", flush=True)
    ratios = [p["ratio"] for p in pairs]
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "pairs": pairs,
              "ratio_median": statistics.median(ratios)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median throughput ratio bare/dus: {result['ratio_median']:.3f} (aim >= 0.95)")


if __name__ == "__main__":
    main()
