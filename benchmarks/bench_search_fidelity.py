"""Does the unhealed score predict the healed one? Candidates of `dus search`'s space on
SmolLM2 (30 -> 44 layers, 3 anchored segments, scales 0.5..1), each scored unhealed and
after the healed fitness's short heal (the same in-memory heal `dus search --heal-steps`
runs), on the search's own dev tokens (the first --tokens of data/text/dev/*.txt, as
bench_search.py scores them). The candidates: SOLAR trim 8, the two searched winners of
the README, and --random draws of the space (optuna's random sampler, --seed).

    OMP_NUM_THREADS=1 python benchmarks/bench_search_fidelity.py --random 7 --heal-steps 10

Writes benchmarks/results/search-fidelity.json (every candidate's two scores, Spearman's
and Kendall's rank correlations) and docs/search-fidelity.png (healed against unhealed).
With --search DIR (a `dus search --heal-steps` run on the same tokens and heal), the
candidates that search healed are added as a second set with their own correlation: the
question there is whether the unhealed score orders the promising candidates, the ones a
pruner lets heal. --replot redoes the file and plot from the results already written.

    python benchmarks/bench_search_fidelity.py --replot --search runs/healed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"


def rank_correlations(xs: list[float], ys: list[float]) -> dict:
    from scipy import stats

    return {"spearman": float(stats.spearmanr(xs, ys).statistic), "kendall": float(stats.kendalltau(xs, ys).statistic)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--random", type=int, default=7, help="random draws of the space besides the three named paths")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heal-steps", type=int, default=10)
    parser.add_argument("--heal-set", action="append", default=[], help="KEY=VALUE over the default heal config")
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS / "search-fidelity.json")
    parser.add_argument("--search", type=Path, help="a `dus search --heal-steps` output directory (or its search.json) to add")
    parser.add_argument("--replot", action="store_true", help="no measuring: rewrite from --out's rows")
    args = parser.parse_args(argv)
    if args.replot:
        old = json.loads(args.out.read_text())
        args.heal_steps, args.heal_set = old["heal"]["steps"], [f"{k}={v}" for k, v in old["heal"]["overrides"].items()]
        print(json.dumps(write(args, old["rows"])["correlation"]))
        return

    import optuna
    import torch

    from bench_search import dev_streams, solar
    from bench_search_healed import TPE_120, TPE_WINNER, parse_path
    from dus.assemble import load_sources
    from dus.checkpoint import ModelDir
    from dus.heal.config import parse_set_option
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, PerplexityScorer
    from dus.search.healed import CandidateHealer, HealSchedule
    from dus.search.space import SearchSpace

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir = ModelDir(args.model)
    model = str(model_dir.path.resolve())
    tokenizer = model_dir.tokenizer()
    _, streams = dev_streams(tokenizer, args.tokens, "data/text/dev")
    whole = {"merge_method": "passthrough", "slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]}
    sources = load_sources(resolve(load_recipe(whole)).plan, torch.float32)
    evaluator = Evaluator(sources, tokenizer, PerplexityScorer(streams, args.window, args.window))
    overrides = tuple(sorted(parse_set_option(item) for item in args.heal_set))
    schedule = HealSchedule(args.heal_steps, 1, 3, "heal", overrides)
    healer = CandidateHealer(evaluator, schedule, model_dir.path)

    layers = model_dir.num_layers
    space = SearchSpace((model,), (layers,), 44, 44, 3, 0.5, 1.0, frozenset(), True)
    candidates = {"solar trim 8": solar(model, layers, 8), "tpe 120 evaluations": parse_path(TPE_120, model),
                  "tpe 20 minutes": parse_path(TPE_WINNER, model)}
    sampler = optuna.samplers.RandomSampler(seed=args.seed)
    study = optuna.create_study(sampler=sampler)
    distributions = {f"g{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(space.dimension)}
    while len(candidates) < 3 + args.random:
        trial = study.ask(distributions)
        candidate = space.decode([trial.params[f"g{i}"] for i in range(space.dimension)])
        study.tell(trial, 0.0)
        if candidate.key() not in {c.key() for c in candidates.values()}:
            candidates[f"random {len(candidates) - 2}"] = candidate

    rows = []
    for name, candidate in candidates.items():
        started = time.perf_counter()
        unhealed, _ = evaluator(candidate)
        value, metrics, seconds = healer(candidate, 1)
        rows.append({"name": name, "path": candidate.describe({model: "S"}), "unhealed": unhealed.value,
                     "unhealed_perplexity": unhealed.metrics["perplexity"], "healed": value,
                     "healed_perplexity": metrics["perplexity"], "calibration": metrics["calibration"],
                     "final_loss": metrics["final_loss"], "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
        write(args, rows)
    print(json.dumps(write(args, rows)["correlation"]))


def searched_rows(directory: Path, args) -> list[dict]:
    """The candidates a healed-fitness search healed (rung 1), as rows: only a search of the
    same heal (steps and overrides) on the same tokens measures the same thing."""
    data = json.loads((directory if directory.is_file() else directory / "search.json").read_text())
    healed = data["settings"].get("healed") or {}
    wanted = heal_overrides(args)
    if healed.get("steps", [None])[-1] != args.heal_steps or dict(healed.get("overrides") or {}) != wanted \
            or data["settings"]["max_tokens"] != args.tokens:
        raise SystemExit(f"{directory}: its heal ({healed}) or tokens differ from this benchmark's; add a search of the same ones")
    rows = []
    for entry in data["candidates"]:
        if len(entry.get("rungs") or []) > 1:
            unhealed, value = entry["rungs"][0], entry["rungs"][1]
            rows.append({"name": f"searched {entry['i']}", "unhealed": unhealed, "unhealed_perplexity": math.exp(unhealed),
                         "healed": value, "healed_perplexity": math.exp(value)})
    return rows


def write(args, rows: list[dict]) -> dict:
    result = {"model": str(args.model.name), "tokens": args.tokens, "window": args.window, "text": "data/text/dev/*.txt",
              "heal": {"steps": args.heal_steps, "config": "heal (the default)",
                       "overrides": heal_overrides(args)}, "rows": rows}
    searched = searched_rows(args.search, args) if args.search else []
    if searched:
        result["searched"] = {"search": str(args.search.resolve().relative_to(REPO)) if args.search.resolve().is_relative_to(REPO)
                              else str(args.search), "rows": searched,
                              "correlation": rank_correlations([r["unhealed"] for r in searched],
                                                               [r["healed"] for r in searched])}
    if len(rows) >= 3:
        result["correlation"] = rank_correlations([r["unhealed"] for r in rows], [r["healed"] for r in rows])
        plot(rows, result["correlation"], args.heal_steps, result.get("searched"))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def heal_overrides(args) -> dict:
    """--heal-set as `dus search --heal-set` reads it (values as YAML)."""
    from dus.heal.config import parse_set_option

    return dict(parse_set_option(item) for item in args.heal_set)


def plot(rows: list[dict], correlation: dict, steps: int, searched: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2 if searched else 1, figsize=(11 if searched else 6, 4.5), squeeze=False)
    axes = panels[0][0]
    for row in rows:
        colour = "C3" if row["name"].startswith("solar") else ("C1" if row["name"].startswith("tpe") else "C0")
        axes.scatter(row["unhealed_perplexity"], row["healed_perplexity"], color=colour, s=22)
        axes.annotate(row["name"].replace("random ", "r").replace(" evaluations", ""),
                      (row["unhealed_perplexity"], row["healed_perplexity"]),
                      fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("unhealed perplexity (dev tokens)")
    axes.set_ylabel(f"perplexity after {steps} heal steps")
    axes.set_title(f"named and random paths: Spearman {correlation['spearman']:.2f}, Kendall {correlation['kendall']:.2f}",
                   fontsize=10)
    axes.grid(alpha=0.3)
    if searched:
        zoom = panels[0][1]
        points = searched["rows"]
        zoom.scatter([r["unhealed_perplexity"] for r in points], [r["healed_perplexity"] for r in points], color="C2", s=22,
                     label="healed by the search (its top third)")
        for row in points:
            zoom.annotate(row["name"].replace("searched ", "#"), (row["unhealed_perplexity"], row["healed_perplexity"]),
                          fontsize=7, xytext=(3, 3), textcoords="offset points")
        zoom.set_xlabel("unhealed perplexity (dev tokens)")
        zoom.set_ylabel(f"perplexity after {steps} heal steps")
        found = searched["correlation"]
        zoom.set_title(f"the candidates a --heal-steps search healed: Spearman {found['spearman']:.2f}", fontsize=10)
        zoom.grid(alpha=0.3)
    figure.suptitle("SmolLM2 30 -> 44: does the unhealed score predict the healed one?", fontsize=11)
    figure.tight_layout()
    figure.savefig(REPO / "docs" / "search-fidelity.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
