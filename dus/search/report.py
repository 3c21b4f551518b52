"""What a search shows and leaves behind: a progress bar, the space (--dry-run), the
ranked recipes as `dus build` YAML, search.json, and a plot (best score against
evaluations; the best path as a layer map)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import yaml

from dus.search.space import Candidate


@contextmanager
def progress(console, total: int, enabled: bool = True):
    """A rich bar with the best score so far and an ETA; yields the per-entry callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("search", total=total)
        best = [(0, math.inf), {}]

        def tick(entry: dict) -> None:
            if entry["feasible"] and order(entry) < best[0]:
                best[:] = [order(entry), entry["metrics"]]
            shown = best_text(best[0][1], best[1])
            bar.update(task, advance=1, description=f"search (best {shown})")

        try:
            yield tick
        except BaseException:
            bar.live.transient = True  # an error is one line: the bar is taken away, not left above it
            raise


def best_text(value: float, metrics: dict) -> str:
    if math.isinf(value):
        return "-"
    if "perplexity" in metrics:
        return f"ppl {math.exp(value):.3f}"
    if "tasks" in metrics:  # lm-eval: the metric itself, not its negation
        return f"{metrics['metric']} {metrics['mean']:.4f}"
    return f"{value:.4g}"


def order(entry: dict) -> tuple:
    """How two evaluations compare: with the healed fitness, one that reached a higher rung
    (a longer heal) comes first, as successive halving ranks them; then the score."""
    return (-entry.get("rung", 0), entry["value"])


def ranking(history: list[dict]) -> list[dict]:
    """Distinct feasible candidates, best first (ties: the first evaluated)."""
    seen, ranked = set(), []
    for entry in sorted((e for e in history if e["feasible"]), key=lambda e: (*order(e), e["i"])):
        if entry["key"] not in seen:
            seen.add(entry["key"])
            ranked.append(entry)
    return ranked


def best_so_far(history: list[dict]) -> list[float | None]:
    """The best score after each evaluation (with the healed fitness: at the highest rung
    reached so far, so the curve can step up when the first longer heal lands)."""
    best, curve = (0, math.inf), []
    for entry in history:
        if entry["feasible"]:
            best = min(best, order(entry))
        curve.append(None if math.isinf(best[1]) else best[1])
    return curve


# What a ranking of unhealed scores says about healed models, measured (docs/search.md#healed-fitness)
UNHEALED_NOTE = ("ranked by the unhealed score, which does not predict the healed one among good candidates "
                 "(SmolLM2 30 -> 44: {measured}); for a model you will heal, the cheapest sensible recipe healed did as "
                 "well, or search with --heal-steps N")
UNHEALED_MEASURED = ("Spearman 0.90 between unhealed and 10-step-healed perplexity over 10 paths scoring 50 to 3,122, "
                     "but -0.04 over the 7 best of 27 that a --heal-steps search healed; after the default heal "
                     "SOLAR's trim and three searched paths ended within 0.8% of one another, about as far as a heal's seed moves one (0.6-1.0%): "
                     "docs/search.md#healed-fitness")


def ranking_note(setup) -> str | None:
    """The warning a ranking of unhealed perplexities carries (None with the healed fitness,
    or a score of the user's, which dus cannot speak for)."""
    if setup.schedule is not None or setup.settings.get("score") != "perplexity":
        return None
    return UNHEALED_NOTE.format(measured=UNHEALED_MEASURED)


def result(setup, options, history: list[dict], prefix_cache: dict | None = None) -> dict:
    """search.json: `prefix_cache` is the counts of the prefix cache of this command's
    worker(s), summed."""
    ranked = ranking(history)
    return {
        "note": ranking_note(setup),
        "settings": setup.settings,
        "seed": options.seed,
        "evaluations": len(history),
        "distinct_candidates": len({e["key"] for e in history}),
        "model_runs": sum(1 for e in history if e["feasible"] and not e["cached"]),
        "seconds_scoring": round(sum(e["seconds"] for e in history), 2),
        "prefix_cache": prefix_cache,
        "best_so_far": best_so_far(history),
        "ranked": [{"rank": i + 1, "file": f"rank-{i + 1}.yaml" if i < options.top else None, **_public(e)}
                   for i, e in enumerate(ranked)],
        "candidates": [_public(e) for e in history],
    }


def _public(entry: dict) -> dict:
    keys = ("i", "trial", "value", "metrics", "candidate", "feasible", "missing", "cached", "seconds", "x",
            "rungs", "rung", "rung_metrics", "pruned")
    return {k: entry[k] for k in keys if k in entry}


def write(output: Path, setup, result_data: dict, top: int) -> None:
    """Ranked recipes first, search.json last (its presence marks a finished write)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for entry in result_data["ranked"][:top]:
        candidate = Candidate.from_dict(entry["candidate"])
        header = (f"# dus search rank {entry['rank']}: {candidate.describe(setup.names)}\n"
                  f"# score {entry['value']:.6g} ({_metrics_text(entry['metrics'])}); candidate {entry['i']} of search.json\n")
        body = {"name": f"search-rank-{entry['rank']}", "description": f"found by dus search: {candidate.describe(setup.names)}",
                **candidate.recipe()}
        if getattr(setup, "tokenizer_source", None):  # the sources tokenize differently: build tokenizes as scored
            body["tokenizer_source"] = setup.tokenizer_source
        (output / entry["file"]).write_text(header + yaml.safe_dump(body, sort_keys=False))
    if result_data["ranked"]:
        plot(output / "search.png", setup, result_data)
    (output / "search.json").write_text(json.dumps(result_data, indent=1) + "\n")


def log_wandb(output: Path, setup, result_data: dict) -> str:
    """One W&B run per search (the mode policy of dus.wandb_mode): every candidate as a
    table, the best score in the summary, the plot; returns the run's URL or directory."""
    from dus.compare.wandb_log import log_run

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in result_data["candidates"]:
        candidate = Candidate.from_dict(entry["candidate"])
        rows.append([entry["i"], candidate.describe(setup.names), candidate.depth, entry["value"],
                     entry["metrics"].get("perplexity"), entry["feasible"], entry["cached"]])
    summary = {"evaluations": result_data["evaluations"], "model_runs": result_data["model_runs"]}
    plots = {}
    if result_data["ranked"]:
        best = result_data["ranked"][0]
        summary.update({"best/value": best["value"], "best/path": Candidate.from_dict(best["candidate"]).describe(setup.names)})
        if "perplexity" in best["metrics"]:
            summary["best/perplexity"] = best["metrics"]["perplexity"]
        if "tasks" in best["metrics"]:
            summary[f"best/{best['metrics']['metric']}"] = best["metrics"]["mean"]
        plot(output / "search.png", setup, result_data)
        plots["search"] = output / "search.png"
    columns = ["i", "path", "depth", "value", "perplexity", "feasible", "cached"]
    return log_run("search", output.name, {"settings": setup.settings}, plots, {"candidates": (columns, rows)}, summary, output)


def _metrics_text(metrics: dict) -> str:
    if "perplexity" in metrics:
        healed = f", after {metrics['heal_steps']} heal steps" if metrics.get("heal_steps") else ""
        return f"perplexity {metrics['perplexity']:.4f} on {metrics['tokens_scored']} tokens{healed}"
    if "tasks" in metrics:
        each = ", ".join(f"{task} {metrics['metric']} {_task_value(values, metrics['metric']):.4f}" for task, values in metrics["tasks"].items())
        return f"mean {metrics['metric']} {metrics['mean']:.4f} over lm-eval tasks: {each}"
    return ", ".join(f"{k} {v:.6g}" for k, v in metrics.items())


def _task_value(values: dict, metric: str) -> float:
    from dus.search.lm_eval_score import pick_metric

    return values[pick_metric("", values, metric)]


def plot(path: Path, setup, result_data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result_data["ranked"][0]
    candidate = Candidate.from_dict(best["candidate"])
    figure, (curve, layers) = plt.subplots(1, 2, figsize=(11, 4))
    values = result_data["best_so_far"]
    lm_eval = "tasks" in best["metrics"]
    sign = -1 if lm_eval and best["metrics"]["higher_is_better"] else 1
    shown = [(i + 1, math.exp(v) if "perplexity" in best["metrics"] else sign * v) for i, v in enumerate(values) if v is not None]
    curve.step([i for i, _ in shown], [v for _, v in shown], where="post")
    curve.set_xlabel("evaluations")
    if lm_eval:
        curve.set_ylabel(f"best mean {best['metrics']['metric']} so far (lm-eval)")
    else:
        curve.set_ylabel("best perplexity so far" if "perplexity" in best["metrics"] else "best score so far (minimised)")
    curve.set_title("best so far" if setup.schedule is None else f"best so far, after {setup.schedule.steps} heal steps")
    curve.grid(alpha=0.3)
    colours = {model: f"C{i}" for i, model in enumerate(setup.models)}
    for model in setup.models:
        points = [(i, layer) for i, (m, layer) in enumerate(candidate.layers()) if m == model]
        if points:
            layers.scatter([p[0] for p in points], [p[1] for p in points], s=14, color=colours[model], label=setup.names[model])
    position = 0
    for segment in candidate.segments:
        if segment.scale != 1.0:
            layers.annotate(f"x{segment.scale:g}", (position, segment.start), fontsize=8, xytext=(0, 6), textcoords="offset points")
        position += segment.length
    layers.set_xlabel("output layer")
    layers.set_ylabel("source layer")
    layers.set_title(f"best path: {candidate.depth} layers")
    layers.grid(alpha=0.3)
    if len(setup.models) > 1:
        layers.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_space(console, setup) -> None:
    """--dry-run: the space, its size, and what one evaluation does."""
    from rich.table import Table

    if setup.space is None:
        console.print(f"graft search: {len(setup.grafts)} candidates (every range of {setup.settings['graft']['size']} donor "
                      f"layers in place), each scored in memory:")
        for candidate in setup.grafts:
            console.print(f"  {candidate.describe(setup.names)}", soft_wrap=True)
        return
    space = setup.space
    table = Table(title="dus search space")
    table.add_column("setting")
    table.add_column("value")
    for i, model in enumerate(space.models):
        table.add_row(f"model {i}", f"{setup.names[model]} ({space.depths[i]} layers)")
    table.add_row("output depth", f"{space.depth_min}" if space.depth_min == space.depth_max else f"{space.depth_min}..{space.depth_max}")
    table.add_row("segments", str(space.segments))
    table.add_row("scale on o_proj/down_proj", ", ".join(f"{v:g}" for v in space.scale_levels()))
    table.add_row("kept source layers", ", ".join(map(str, sorted(space.keep))) or "-")
    table.add_row("genes", f"{space.dimension}: " + ", ".join(space.gene_names()))
    table.add_row("candidates", f"at most {space.size():,}")
    table.add_row("optimizer", f"{setup.settings['optimizer']} (seed {setup.settings['seed']})")
    if setup.schedule is not None:
        steps = ", ".join(str(setup.schedule.heal_steps(k)) for k in range(1, setup.schedule.rungs + 1))
        table.add_row("healed fitness", f"heal steps {steps} ({setup.schedule.config}); 1 in {setup.schedule.factor} "
                                        "trials goes on at each rung (successive halving)")
    console.print(table)


def print_best(console, setup, result_data: dict, top: int) -> None:
    from rich.table import Table

    several = len(setup.models) > 1
    letters = {model: chr(ord("A") + i) if several else "" for i, model in enumerate(setup.models)}
    if several:
        legend = "; ".join(f"{letters[m]} = {setup.names[m]}" for m in setup.models)
    else:
        legend = f"of {setup.names[setup.models[0]]}"
    console.print(f"paths as [start:end) source layers ({legend}); xS: o_proj/down_proj scaled by S", soft_wrap=True)
    table = Table(title=f"dus search: best of {result_data['distinct_candidates']} candidates ({result_data['evaluations']} evaluations)")
    healed = any("rungs" in entry for entry in result_data["ranked"])
    columns = (("rank", "right"), ("path", "left"), ("layers", "right"), ("score", "right"))
    for name, justify in (*columns, *((("heal steps", "right"),) if healed else ()), ("file", "left")):
        table.add_column(name, justify=justify)
    for entry in result_data["ranked"][:top]:
        candidate = Candidate.from_dict(entry["candidate"])
        if "perplexity" in entry["metrics"]:
            score = f"ppl {entry['metrics']['perplexity']:.4f}"
        elif "tasks" in entry["metrics"]:
            score = best_text(entry["value"], entry["metrics"])
        else:
            score = f"{entry['value']:.6g}"
        steps = (str(entry["metrics"].get("heal_steps") or "0 (pruned)"),) if healed else ()
        table.add_row(str(entry["rank"]), candidate.describe(letters), str(candidate.depth), score, *steps, entry["file"] or "")
    console.print(table)
    if result_data.get("note"):
        console.print(f"note: {result_data['note']}", soft_wrap=True, highlight=False)
