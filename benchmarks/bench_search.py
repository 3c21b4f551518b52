"""Benchmark `dus search`: what one candidate costs in memory against the classic loop,
and what a search finds against SOLAR's hand-picked trim on text it never scored.

    python benchmarks/bench_search.py cost                 # SmolLM2 in models/, 44 layers
    python benchmarks/bench_search.py search --optimizer cma --evals 200 -o /tmp/dus-bench-search/cma
    python benchmarks/bench_search.py heldout /tmp/dus-bench-search/cma /tmp/dus-bench-search/tpe
    python benchmarks/bench_search.py verify /tmp/dus-bench-search/tpe
    python benchmarks/bench_search.py curves /tmp/dus-bench-search/cma /tmp/dus-bench-search/tpe

`cost`: for a few 44-layer paths of SmolLM2-135M (SOLAR's trim 8, a three-segment path,
a scaled one) on the same tokens, (a) dus: recipe -> plan -> model assembled over the
sources loaded once -> score, timed per candidate; (b) the classic loop: the same recipe
as mergekit YAML, `mergekit-yaml` into a temporary directory, `from_pretrained`, the same
score, timed per candidate with the bytes it wrote. Wall and CPU seconds (this process
plus its children: a fair measure on a busy machine) are both kept. The two scores are printed side by
side (they should agree). Writes benchmarks/results/search-cost.json.

`--dtype bfloat16` loads and scores in both loops in bf16 (SmolLM2's released dtype;
mergekit writes bf16, `from_pretrained` loads it so): matrix products run on this
machine's AMX units. Writes benchmarks/results/search-cost-bfloat16.json.

Then (--in-search N) the cost per candidate inside a real search: `dus search`'s default
optimizer on the same text and tokens for N evaluations, once with the prefix cache (a
candidate runs only its layers after the longest prefix it shares with one scored before)
and once without; CPU seconds of the whole loop per model run, and the two value lists
(they must be equal).

`search`: `dus search` on data/text/dev/* (never data/heldout/*), 44 layers, 3 segments,
scales 0.5..1 on the output projections, a fixed number of evaluations.

`heldout`: unhealed perplexity on every data/heldout/*.txt (the first --tokens of each) of
the source model, SOLAR trim 8, `dus scan --rank`'s pick (duplicate [5, 19)) and each
search's best path; the seam's cost is
perplexity / the source's - 1. Writes benchmarks/results/search-heldout.json.

`verify`: `dus build` each search's rank-1.yaml and score it on the search's tokens:
the value must equal the one the search recorded.

`curves`: best-so-far perplexity against evaluations of several searches, one PNG.
Run long jobs with OMP_NUM_THREADS=1 on a shared machine.
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
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
RESULTS = REPO / "benchmarks" / "results"


def solar(model: str, layers: int, trim: int):
    from dus.search.space import Segment, canonical

    return canonical([Segment(model, 0, layers - trim), Segment(model, trim, layers)])


def cost_candidates(model: str, layers: int):
    from dus.search.space import Segment, canonical

    return {
        "solar trim 8": solar(model, layers, 8),
        "3 segments": canonical([Segment(model, 0, 16), Segment(model, 6, 20), Segment(model, 16, 30)]),
        "3 segments, scaled 0.7": canonical([Segment(model, 0, 16), Segment(model, 6, 20, 0.7), Segment(model, 16, 30)]),
    }


def dev_streams(tokenizer, tokens: int, directory: str):
    from dus.measure.text import read_text, tokenize_stream

    files = sorted(Path(REPO / directory).glob("*.txt"))
    return files, [tokenize_stream(tokenizer, read_text(f), max(2, tokens // len(files))) for f in files]


def cost(args) -> None:
    import statistics

    import torch

    from dus.assemble import load_sources
    from dus.checkpoint import ModelDir
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, PerplexityScorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir = ModelDir(args.model)
    model = str(model_dir.path.resolve())
    tokenizer = model_dir.tokenizer()
    files, streams = dev_streams(tokenizer, args.tokens, "data/text/dev")
    scorer = PerplexityScorer(streams, args.window, args.window)
    started = time.perf_counter()
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    dtype = getattr(torch, args.dtype)
    sources = load_sources(plan, dtype)
    load_seconds = time.perf_counter() - started
    mergekit = shutil.which("mergekit-yaml")
    rows = []
    for name, candidate in cost_candidates(model, model_dir.num_layers).items():
        for round_ in range(args.repeat):
            evaluator = Evaluator(sources, tokenizer, scorer)  # cold: nothing kept from another candidate
            cpu = time.process_time()
            score, _ = evaluator(candidate)
            row = {"candidate": name, "round": round_, "dus_seconds": score.seconds, "dus_cpu_seconds": time.process_time() - cpu,
                   "dus_perplexity": score.metrics["perplexity"], "dus_bytes_written": 0}
            if mergekit:
                row.update(classic(candidate, mergekit, scorer, tokenizer, args.dtype))
            rows.append(row)
            print(json.dumps(row), flush=True)
    evaluator = Evaluator(sources, tokenizer, scorer)  # the floor: a path scored again with its every layer kept
    candidate = cost_candidates(model, model_dir.num_layers)["solar trim 8"]
    evaluator(candidate)
    evaluator.cache.clear()
    cpu = time.process_time()
    evaluator(candidate)
    whole_path_cached_cpu = time.process_time() - cpu
    summary = {
        "model": model, "depth": 44, "tokens_scored_per_candidate": sum(len(s) - 1 for s in streams),
        "dus_cpu_seconds_whole_path_cached": whole_path_cached_cpu,
        "text": [str(f.relative_to(REPO)) for f in files], "window": args.window, "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "dus_source_load_seconds_once": load_seconds, "rows": rows,
    }
    if mergekit:
        summary["median_dus_seconds"] = statistics.median(r["dus_seconds"] for r in rows)
        summary["median_dus_cpu_seconds"] = statistics.median(r["dus_cpu_seconds"] for r in rows)
        summary["median_classic_seconds"] = statistics.median(r["classic_seconds"] for r in rows)
        summary["median_classic_cpu_seconds"] = statistics.median(r["classic_cpu_seconds"] for r in rows)
        summary["median_ratio_classic_over_dus"] = statistics.median(r["classic_seconds"] / r["dus_seconds"] for r in rows)
        summary["median_cpu_ratio_classic_over_dus"] = statistics.median(r["classic_cpu_seconds"] / r["dus_cpu_seconds"] for r in rows)
        summary["median_classic_bytes_written"] = statistics.median(r["classic_bytes_written"] for r in rows)
    if args.in_search:
        summary["in_search"] = in_search(args, sources, tokenizer, files, summary.get("median_classic_cpu_seconds"))
    out = RESULTS / ("search-cost.json" if args.dtype == "float32" else f"search-cost-{args.dtype}.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))


def _search_over(model: str, sources, options) -> dict:
    """`dus search` over sources loaded already (the load is not a per-candidate cost)."""
    import dus.assemble
    from dus.search.run import search as run_search

    original = dus.assemble.load_sources
    dus.assemble.load_sources = lambda *args, **kwargs: sources
    try:
        return run_search([model], options)
    finally:
        dus.assemble.load_sources = original


def in_search(args, sources, tokenizer, files, classic_cpu: float | None) -> dict:
    """Cost per candidate inside a real search (`dus search`'s default optimizer, the
    bench's settings, --in-search evaluations), with the prefix cache and without: CPU
    seconds of the whole loop (optimizer included) per model run."""
    from dus.search import run as search_run

    runs = {}
    for label, megabytes in (("prefix cache 512 MB", 512), ("no prefix cache", 0)):
        with tempfile.TemporaryDirectory(prefix="dus-bench-in-search-") as tmp:
            options = search_run.SearchOptions(
                output=Path(tmp), data=files, depth=(44, 44), segments=3, scale=(0.5, 1.0), evals=args.in_search,
                window=args.window, max_tokens=args.tokens, top=1, progress=False, prefix_cache_mb=megabytes,
                dtype=args.dtype,
            )
            cpu, wall = time.process_time(), time.perf_counter()
            result = _search_over(args.model, sources, options)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        runs[label] = {
            "optimizer": result["settings"]["optimizer"], "evaluations": result["evaluations"], "model_runs": result["model_runs"],
            "cpu_seconds_per_model_run": cpu / result["model_runs"], "wall_seconds_per_model_run": wall / result["model_runs"],
            "prefix_cache": result["prefix_cache"], "best_value": result["ranked"][0]["value"],
            "values": [c["value"] for c in result["candidates"]],
        }
        print(label, json.dumps({k: v for k, v in runs[label].items() if k != "values"}), flush=True)
    cached, plain = runs["prefix cache 512 MB"], runs["no prefix cache"]
    summary = {"runs": runs, "same_values": cached["values"] == plain["values"],
               "speedup_of_prefix_cache": plain["cpu_seconds_per_model_run"] / cached["cpu_seconds_per_model_run"]}
    if classic_cpu:
        summary["cpu_ratio_classic_over_dus"] = classic_cpu / cached["cpu_seconds_per_model_run"]
    return summary


def classic(candidate, mergekit: str, scorer, tokenizer, dtype: str) -> dict:
    """mergekit-yaml into a temporary directory (written in the scoring dtype),
    from_pretrained, the same score."""
    import yaml

    from dus.checkpoint import ModelDir

    with tempfile.TemporaryDirectory(prefix="dus-bench-classic-") as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({**candidate.recipe(), "dtype": dtype}, sort_keys=False))
        out = Path(tmp) / "out"
        started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        subprocess.run([mergekit, str(recipe), str(out), "--copy-tokenizer", "--quiet"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        built_seconds = time.perf_counter() - started
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        import torch

        model = ModelDir(out).load_model(getattr(torch, dtype), quiet=True).eval()
        _, metrics = scorer(model, tokenizer)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu + _children_cpu() - children
    return {"classic_seconds": seconds, "classic_cpu_seconds": cpu_seconds, "classic_build_seconds": built_seconds, "classic_perplexity": metrics["perplexity"],
            "classic_bytes_written": written}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def search(args) -> None:
    from dus.search.run import SearchOptions
    from dus.search.run import search as run_search

    files = sorted((REPO / "data" / "text" / "dev").glob("*.txt"))
    options = SearchOptions(
        output=Path(args.output), data=files, depth=(44, 44), segments=3, scale=(0.5, 1.0), optimizer=args.optimizer,
        evals=args.evals, seed=args.seed, window=args.window, max_tokens=args.tokens, top=3,
    )
    started = time.perf_counter()
    result = run_search([args.model], options)
    print(f"search of {result['evaluations']} evaluations ({result['model_runs']} model runs) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def heldout(args) -> None:
    """Rows already in the results file (same texts and tokens) are kept, not measured again,
    so the fixed contenders can be measured while the searches still run."""
    import torch

    from dus.assemble import assemble, load_sources
    from dus.checkpoint import ModelDir
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import PerplexityScorer
    from dus.search.space import Candidate, Segment, canonical

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir = ModelDir(args.model)
    model = str(model_dir.path.resolve())
    tokenizer = model_dir.tokenizer()
    files = sorted((REPO / "data" / "heldout").glob("*.txt"))
    _, streams = dev_streams(tokenizer, args.tokens * len(files), "data/heldout")
    scorer = PerplexityScorer(streams, args.window, args.window)
    out = RESULTS / "search-heldout.json"
    setting = {"text": [str(f.relative_to(REPO)) for f in files], "tokens_per_file": args.tokens, "window": args.window}
    previous = json.loads(out.read_text()) if out.is_file() else {}
    done = {row["model"]: row for row in previous.get("rows", [])} if all(previous.get(k) == v for k, v in setting.items()) else {}
    contenders = {
        "solar trim 8": solar(model, model_dir.num_layers, 8),
        # `dus scan --rank 3`'s first pick on SmolLM2 (README, "dus compare and dus scan"): duplicate [5, 19)
        "scan --rank best": canonical([Segment(model, 0, 19), Segment(model, 5, model_dir.num_layers)]),
    }
    for directory in args.searches:
        data = json.loads((Path(directory) / "search.json").read_text())
        contenders[f"search {data['settings']['optimizer']} best ({data['evaluations']} evaluations)"] = Candidate.from_dict(data["ranked"][0]["candidate"])
    rows = []
    if "source (30 layers)" in done:
        rows.append(done["source (30 layers)"])
    else:
        base = model_dir.load_model(torch.float32, quiet=True).eval()
        rows.append({"model": "source (30 layers)", "perplexity": scorer(base, tokenizer)[1]["perplexity"], "seam_cost": 0.0})
        del base
    base_ppl = rows[0]["perplexity"]
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    sources = load_sources(plan, torch.float32)
    for name, candidate in contenders.items():
        path = candidate.describe({model: "S"})
        if name in done and done[name].get("path") == path:
            rows.append(done[name])
            continue
        built = assemble(resolve(load_recipe(candidate.recipe())).plan, sources).eval()
        ppl = scorer(built, tokenizer)[1]["perplexity"]
        rows.append({"model": name, "path": path, "perplexity": ppl, "seam_cost": ppl / base_ppl - 1})
        print(json.dumps(rows[-1]), flush=True)
    rows += [row for name, row in done.items() if name not in {r["model"] for r in rows}]
    out.write_text(json.dumps({**setting, "rows": rows}, indent=1) + "\n")
    for row in rows:
        print(f"{row['model']:44s} {row.get('path', ''):40s} ppl {row['perplexity']:.3f}  seam cost {100 * row['seam_cost']:+.1f}%")


def verify(args) -> None:
    """`dus build` a search's rank-1.yaml and score it on the search's own tokens: the
    value must equal the one the search recorded for it."""
    import torch

    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.recipe import load_recipe
    from dus.search.fitness import PerplexityScorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for directory in args.searches:
        data = json.loads((Path(directory) / "search.json").read_text())
        settings = data["settings"]
        with tempfile.TemporaryDirectory(prefix="dus-bench-verify-") as tmp:
            build_model(load_recipe(Path(directory) / "rank-1.yaml"), Path(tmp) / "built")
            model = ModelDir(Path(tmp) / "built")
            tokenizer = model.tokenizer()
            share = settings["max_tokens"] // len(settings["data"])
            streams = [tokenize_stream(tokenizer, read_text(f), share) for f in settings["data"]]
            value, metrics = PerplexityScorer(streams, settings["window"], settings["stride"])(
                model.load_model(torch.float32, quiet=True).eval(), tokenizer)
        recorded = data["ranked"][0]["value"]
        print(json.dumps({"search": directory, "built_value": value, "recorded_value": recorded, "equal": value == recorded,
                          "perplexity": metrics["perplexity"]}))


def curves(args) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for directory in args.searches:
        data = json.loads((Path(directory) / "search.json").read_text())
        values = [(i + 1, math.exp(v)) for i, v in enumerate(data["best_so_far"]) if v is not None]
        label = f"{data['settings']['optimizer']} ({data['model_runs']} model runs)"
        axis.step([i for i, _ in values], [v for _, v in values], where="post", label=label)
    axis.set_yscale("log")
    axis.set_xlabel("evaluations")
    axis.set_ylabel("best perplexity so far (dev text)")
    axis.set_title("SmolLM2-135M, 44 layers, 3 segments + scales")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("cost", "search", "heldout", "verify", "curves"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=str(MODEL))
        p.add_argument("--tokens", type=int, default=1024, help="tokens scored per candidate (shared by the files)")
        p.add_argument("--window", type=int, default=1024)
        if name == "cost":
            p.add_argument("--repeat", type=int, default=2)
            p.add_argument("--in-search", type=int, default=40, help="evaluations of a real search timed per model run (0: skip)")
            p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                           help="what both loops load and score in (bfloat16: SmolLM2's released dtype; fast on CPUs with AMX); "
                                "results in search-cost.json, or search-cost-bfloat16.json")
        if name == "search":
            p.add_argument("--optimizer", default="cma")
            p.add_argument("--evals", type=int, default=200)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("-o", "--output", required=True)
        if name == "heldout":
            p.add_argument("searches", nargs="*")
        if name in ("verify", "curves"):
            p.add_argument("searches", nargs="+")
        if name == "curves":
            p.add_argument("-o", "--output", default=str(REPO / "docs" / "search-optimizers.png"))
    args = parser.parse_args()
    {"cost": cost, "search": search, "heldout": heldout, "verify": verify, "curves": curves}[args.mode](args)


if __name__ == "__main__":
    main()
