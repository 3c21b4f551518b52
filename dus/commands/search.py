"""`dus search MODEL [MODEL ...] --data FILE --depth N -o DIR`: find the layer recipe by
scoring candidates assembled in memory; `--graft BASE --donor DONOR --size N` scores
every in-place graft range."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("search")(search)


def search(
    models: list[Path] = typer.Argument(None, help="Source model directories (one family and shape)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the ranked recipes, search.json, the study's journal and the plot; a search started again on it continues."),
    data: list[Path] = typer.Option([], "--data", help="Text to score on, one file per domain (repeat --data; .txt, or .jsonl with a 'text' field): perplexity over all is minimised."),
    depth: Optional[str] = typer.Option(None, "--depth", help="Output depth N, or a range MIN:MAX."),
    segments: int = typer.Option(3, "--segments", help="Contiguous source ranges in a path (SOLAR's trim is 2, a duplicated range 3)."),
    anchored: bool = typer.Option(True, "--anchored/--free", help="Paths start at source layer 0 and end at the top layer (as every DUS recipe does), or anywhere."),
    scale: Optional[str] = typer.Option(None, "--scale", help="Scale on each segment's o_proj/down_proj: a range MIN:MAX to search (MIN >= 0.5) or one factor; default 1."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Source layers every path must contain, e.g. 0,1,28:30."),
    max_params: Optional[str] = typer.Option(None, "--max-params", help="Parameter budget of the output model, e.g. 200M."),
    optimizer: str = typer.Option("tpe", "--optimizer", help="tpe (optuna's TPE; ahead of CMA-ES on a 120-evaluation budget, see docs/search.md) | cma (CMA-ES) | random."),
    population: Optional[int] = typer.Option(None, "--population", help="CMA-ES's candidates per generation (cma only; default 4 + 3 ln genes). tpe and random ask one trial at a time per worker."),
    evals: int = typer.Option(100, "--evals", help="Evaluations to run (cached repeats count)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Also stop after this many minutes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the optimizer: the same seed gives the same search."),
    window: Optional[int] = typer.Option(None, help="Window length in tokens (default: 1024 or the model's context length)."),
    stride: Optional[int] = typer.Option(None, help="Tokens the window advances (default: the window, no overlap)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Tokens to score in all, shared evenly by the --data files (the first tokens of each)."),
    score: Optional[str] = typer.Option(None, "--score", help="MODULE:FUNCTION (or FILE.py:FUNCTION) taking (model, tokenizer) and returning a number to minimise."),
    maximize: bool = typer.Option(False, "--maximize", help="The --score function's number is better when higher."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks (comma-separated) as the score: the mean of --tasks-metric over them, maximised (needs lm-eval)."),
    tasks_metric: str = typer.Option("acc", "--tasks-metric", help="The lm-eval metric to average over --tasks (acc, acc_norm, exact_match, or METRIC,FILTER)."),
    tasks_limit: Optional[int] = typer.Option(None, "--tasks-limit", help="Score only the first N documents of each task."),
    tasks_include: Optional[Path] = typer.Option(None, "--tasks-include", help="A directory of your own lm-eval task YAML files."),
    tasks_batch_size: int = typer.Option(1, "--tasks-batch-size", help="lm-eval's batch size."),
    top: int = typer.Option(5, "--top", help="Ranked recipes to write."),
    graft: Optional[Path] = typer.Option(None, "--graft", help="Graft mode: the base model."),
    donor: Optional[Path] = typer.Option(None, "--donor", help="Graft mode: the model whose layers go in."),
    size: Optional[int] = typer.Option(None, "--size", help="Graft mode: donor layers per graft."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log every candidate, the best and the plot to a W&B run (offline unless logged in)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the search space and its size; load and write nothing."),
    prefix_cache: int = typer.Option(512, "--prefix-cache", help="MB of hidden states kept after shared path prefixes, so a candidate runs only its layers after them (scores unchanged, bit for bit); 0: off."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this machine sharing the search's study, each with its share of the CPU threads and its own GPU where there are GPUs (tpe and random; cma runs in one). At most the evaluations, the CPU cores (or the GPUs) and what memory holds; they end with the search, however it ends."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Database URL holding the search's study (sqlite:///search.db, postgresql://user@host/db): the same command on other machines joins it. Default: a journal file in -o."),
    heal_steps: int = typer.Option(0, "--heal-steps", help="Healed fitness: score promising candidates again after a heal of this many steps in memory (successive halving decides which; 0: the unhealed score only)."),
    heal_rungs: int = typer.Option(1, "--heal-rungs", help="Healed rungs above the unhealed score: rung k heals --heal-steps / halving^(rungs-k) steps."),
    halving: int = typer.Option(3, "--halving", help="Successive halving's factor: 1 in this many trials goes on to the next rung."),
    heal_config: str = typer.Option("heal", "--heal-config", help="The heal config of the healed fitness (as dus heal -c; its max_steps is the rung's)."),
    heal_set: list[str] = typer.Option([], "--heal-set", help="KEY=VALUE over the heal config (as dus heal --set), repeatable."),
) -> None:
    """Find the recipe: score candidate layer paths in memory, write the best.

    Example: dus search MODEL --data my.txt --depth 44 -o runs/search

    Paths over the sources' layers (depth, order, repeats, other models' layers, output scales),
    scored without writing a model; -o gets rank-1.yaml ... for dus build. Guide: docs/search.md.
    """
    from dus.compare.lm_eval_hook import parse_tasks
    from dus.errors import DusError
    from dus.heal.config import parse_set_option
    from dus.search.run import SearchOptions
    from dus.search.run import search as run_search
    from dus.search.space import parse_count, parse_depth, parse_keep, parse_scale

    graft_spec = None
    if graft or donor or size is not None:
        if not (graft and donor and size is not None):
            raise DusError("graft mode needs all of --graft BASE --donor DONOR --size N")
        if models:
            raise DusError("graft mode takes its models from --graft and --donor; drop the positional models")
        graft_spec = (str(graft), str(donor), size)
    depth_range = parse_depth(depth, 0) if depth is not None else None
    options = SearchOptions(
        output=output, data=list(data), depth=depth_range, segments=segments, anchored=anchored, scale=parse_scale(scale),
        keep=parse_keep(keep), max_params=parse_count(max_params), optimizer=optimizer, population=population,
        evals=evals, minutes=minutes, seed=seed, window=window, stride=stride, max_tokens=max_tokens, score=score,
        maximize=maximize, top=top, dry_run=dry_run, wandb=wandb, dtype=dtype, device=device, graft=graft_spec,
        prefix_cache_mb=prefix_cache, tasks=parse_tasks(tasks), tasks_metric=tasks_metric, tasks_limit=tasks_limit,
        tasks_include=tasks_include, tasks_batch_size=tasks_batch_size, workers=workers, storage=storage,
        heal_steps=heal_steps, heal_rungs=heal_rungs, halving=halving, heal_config=heal_config,
        heal_set=dict(parse_set_option(item) for item in heal_set),
    )
    run_search(list(models or []), options)
