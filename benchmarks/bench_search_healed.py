"""Does the searched path still win once healed? SOLAR trim 8 against `dus search`'s TPE
winner on SmolLM2 (30 -> 44 layers), each built by `dus build` and healed by the default
heal (`dus heal MODEL -o OUT`, nothing changed), then scored on the held-out texts that
`bench_search.py heldout` uses: the first --tokens of every data/heldout/*.txt, windows of
--window, which no search, heal or test reads.

    python benchmarks/bench_search_healed.py                  # both recipes, one thread each heal
    python benchmarks/bench_search_healed.py --steps 10       # a quicker, shorter heal

Writes benchmarks/results/search-healed.json: per recipe, unhealed and healed perplexity,
the seam cost (perplexity / the source's - 1) before and after, and the heal's record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
# `dus search` (TPE on data/text/dev/*), rank-1 paths of benchmarks/results/search-heldout.json
TPE_WINNER = "S[0:15)x0.95 S[2:17)x0.5 S[16:30)x0.9"  # the 20-minute search (345 evaluations)
TPE_120 = "S[0:14)x0.95 S[5:19)x0.5 S[14:30)x0.75"  # the first search (120 evaluations)


def parse_path(text: str, model: str):
    """`S[0:14)x0.95 S[5:19)x0.5 ...` (Candidate.describe with S for the model) -> Candidate."""
    from dus.search.space import Segment, canonical

    segments = []
    for start, end, scale in re.findall(r"S\[(\d+):(\d+)\)(?:x([0-9.]+))?", text):
        segments.append(Segment(model, int(start), int(end), float(scale) if scale else 1.0))
    return canonical(segments)


def heal(built: Path, out: Path, steps: int | None, threads: int, seed: int | None = None) -> dict:
    """The default heal as a user runs it, in its own process (its own memory, one thread)."""
    command = [sys.executable, "-m", "dus", "heal", str(built), "-o", str(out), "--force", "--report-to", "none"]
    if steps:
        command += ["--steps", str(steps)]
    if seed is not None:  # the trainer's seed: the order of the heal's batches
        command += ["--set", f"sft.seed={seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    record = json.loads((out / "dus-manifest.json").read_text())["history"][-1]
    return {"seconds": time.perf_counter() - started, "final_loss": record.get("final_loss"),
            "steps": record.get("steps"), "calibration": (record.get("calibration") or {}).get("factor"),
            "layers": record.get("layers")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--winner", default=TPE_WINNER, help="the searched path, as search-heldout.json writes it")
    parser.add_argument("--name", default="search tpe best (20 minutes)", help="the winner's row name")
    parser.add_argument("--skip-solar", action="store_true", help="keep SOLAR's row from the results file")
    parser.add_argument("--skip-winner", action="store_true", help="keep the winner's row from the results file")
    parser.add_argument("--steps", type=int, default=None, help="heal steps (default: the default heal's)")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens per file (bench_search heldout's)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None,
                        help="the heal's seed (sft.seed; default the config's): rows are named NAME (seed N), "
                             "to measure how much a heal's batch order alone moves the result")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-search-healed")
    parser.add_argument("--out", type=Path, default=RESULTS / "search-healed.json", help="the results file (rows kept)")
    args = parser.parse_args(argv)

    import torch

    from bench_search import dev_streams, solar
    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.search.fitness import PerplexityScorer

    torch.set_num_threads(args.threads)
    model_dir = ModelDir(args.model)
    model = str(model_dir.path.resolve())
    tokenizer = model_dir.tokenizer()
    files, streams = dev_streams(tokenizer, args.tokens * len(list((REPO / "data" / "heldout").glob("*.txt"))),
                                 "data/heldout")
    scorer = PerplexityScorer(streams, args.window, args.window)

    def perplexity(path: Path) -> float:
        loaded = ModelDir(path).load_model(torch.float32, quiet=True).eval()
        return scorer(loaded, tokenizer)[1]["perplexity"]

    base = perplexity(model_dir.path)
    recipes = {"solar trim 8": solar(model, model_dir.num_layers, 8), args.name: parse_path(args.winner, model)}
    kept = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    if args.skip_solar:
        recipes.pop("solar trim 8")
    if args.skip_winner:
        recipes.pop(args.name)
    if args.seed is not None:
        recipes = {f"{name} (seed {args.seed})": candidate for name, candidate in recipes.items()}
    rows = [row for row in kept if row["model"] not in recipes]
    for name, candidate in recipes.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name)
        built, healed = args.workdir / f"{slug}-built", args.workdir / f"{slug}-healed"
        build_model(candidate.recipe(), built, force=True)
        record = heal(built, healed, args.steps, args.threads, args.seed)
        unhealed_ppl, healed_ppl = perplexity(built), perplexity(healed)
        rows.append({"model": name, "path": candidate.describe({model: "S"}), "unhealed": unhealed_ppl,
                     "healed": healed_ppl, "seam_cost_unhealed": unhealed_ppl / base - 1,
                     "seam_cost_healed": healed_ppl / base - 1, "heal": record})
        print(json.dumps(rows[-1]), flush=True)
    result = {"text": [str(f.relative_to(REPO)) for f in files], "tokens_per_file": args.tokens,
              "window": args.window, "heal": "the default (dus heal MODEL -o OUT)" + (f", --steps {args.steps}" if args.steps else ""),
              "source_perplexity": base, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':18s} {'path':40s} {'unhealed':>9s} {'healed':>9s}  seam cost before -> after")
    for row in rows:
        print(f"{row['model']:18s} {row['path']:40s} {row['unhealed']:9.3f} {row['healed']:9.3f}  "
              f"{100 * row['seam_cost_unhealed']:+.1f}% -> {100 * row['seam_cost_healed']:+.1f}%")


if __name__ == "__main__":
    main()
