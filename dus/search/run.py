"""`dus search` as functions: check every input, load the sources once, run the
optimizer (or the exhaustive graft scan) against the journal, write the results."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dus.errors import DusError
from dus.search.journal import Journal, read_journal
from dus.search.space import Candidate, SearchSpace, Segment, canonical

INFEASIBLE = 1e9  # a path that drops a kept layer: never run, ranked below every real score
DEFAULT_SEARCH_TOKENS = 2048


@dataclass
class SearchOptions:
    output: Path
    data: list[Path] = field(default_factory=list)
    depth: tuple[int, int] | None = None
    segments: int = 3
    anchored: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    keep: frozenset[int] = frozenset()
    max_params: int | None = None
    optimizer: str = "tpe"
    population: int | None = None
    evals: int = 100
    minutes: float | None = None
    seed: int = 0
    window: int | None = None
    stride: int | None = None
    max_tokens: int | None = DEFAULT_SEARCH_TOKENS
    score: str | None = None
    maximize: bool = False
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks as the fitness (mean of tasks_metric)
    tasks_metric: str = "acc"
    tasks_limit: int | None = None
    tasks_include: Path | None = None
    tasks_batch_size: int = 1
    top: int = 5
    dry_run: bool = False
    dtype: str = "auto"
    device: str = "auto"
    graft: tuple[str, str, int] | None = None  # (base, donor, size)
    prefix_cache_mb: int = 512  # hidden states after shared path prefixes (exact; 0: off)
    progress: bool = True
    wandb: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Setup:
    """Everything checked and loaded: what a search needs to run."""

    models: list[str]
    names: dict[str, str]  # model path -> short label for tables and plots
    space: SearchSpace | None
    grafts: list[Candidate]
    settings: dict
    evaluator: object = None
    scorer: object = None  # made while checking the inputs when it has its own checks (lm-eval's tasks)
    warnings: list[str] = field(default_factory=list)
    tokenizer_source: str | None = None  # named in the written recipes when the sources tokenize differently


def model_paths(models: list) -> list[str]:
    from dus.checkpoint import ModelDir

    paths = []
    for model in models:
        path = str(ModelDir(model).path.resolve())
        if path not in paths:
            paths.append(path)
    return paths


def source_facts(paths: list[str]):
    """Headers of the sources (family and shapes checked): depths, parameters per layer
    and outside the layers."""
    from dus.sources import check_compatible, load_source

    sources = [load_source(path, path) for path in paths]
    check_compatible(sources)
    count = lambda infos: sum(math.prod(info.shape) for info in infos.values())
    per_layer = count(sources[0].layer(0))
    return [s.num_layers for s in sources], per_layer, count(sources[0].non_layer)


def build_space(paths: list[str], options: SearchOptions) -> SearchSpace:
    depths, per_layer, outside = source_facts(paths)
    if options.depth is None:
        raise DusError("give the output depth: --depth N, or a range --depth MIN:MAX")
    low, high = options.depth
    if options.max_params is not None:
        allowed = (options.max_params - outside) // per_layer
        if allowed < low:
            raise DusError(f"--max-params {options.max_params:,} allows at most {max(allowed, 0)} layers "
                           f"({per_layer:,} parameters each, {outside:,} outside the layers), below --depth {low}; "
                           "raise the budget or lower the depth")
        high = min(high, allowed)
    return SearchSpace(tuple(paths), tuple(depths), low, high, options.segments, options.scale[0], options.scale[1], options.keep, options.anchored)


def graft_candidates(base: str, donor: str, size: int) -> list[Candidate]:
    """Every range of `size` donor layers in the same positions of the base."""
    depths, _, _ = source_facts([base, donor])
    if base == donor:
        raise DusError("--graft and --donor are the same model; give the donor whose layers go into the base")
    if depths[0] != depths[1]:
        raise DusError(f"--graft has {depths[0]} layers and --donor {depths[1]}; a graft in place needs equal depths")
    if not 1 <= size < depths[0]:
        raise DusError(f"--size {size}: graft between 1 and {depths[0] - 1} donor layers")
    grafts = []
    for start in range(depths[0] - size + 1):
        parts = [Segment(base, 0, start), Segment(donor, start, start + size), Segment(base, start + size, depths[0])]
        grafts.append(canonical([p for p in parts if p.length]))
    return grafts


def prepare(models: list, options: SearchOptions) -> Setup:
    """Check the inputs in the order that costs least; nothing is written or loaded yet."""
    if options.graft:
        base, donor, size = options.graft
        paths = model_paths([base, donor])
        grafts, space = graft_candidates(paths[0], paths[-1], size), None
    else:
        if not models:
            raise DusError("name the model(s) to search over, or use --graft BASE --donor DONOR --size N")
        paths = model_paths(models)
        space, grafts = build_space(paths, options), []
        if options.evals < 1:
            raise DusError(f"--evals {options.evals}: give at least 1 evaluation")
        from dus.search.optimizers import check_optimizer

        check_optimizer(options.optimizer)
    if options.top < 1:
        raise DusError(f"--top {options.top}: write at least 1 recipe")
    check_minutes(options.minutes)
    from dus.measure.text import check_max_tokens

    check_max_tokens(options.max_tokens)
    scorer = tasks_scorer(options)
    if options.score is None and not options.data and scorer is None:
        raise DusError("give the text to score on with --data FILE, a scoring function with --score MODULE:FUNCTION, "
                       "or lm-eval tasks with --tasks TASK[,TASK]")
    names = short_names(paths)
    warnings = tokenizer_warnings(paths)
    settings = {
        "mode": "graft" if options.graft else "search",
        "models": paths,
        "space": space.describe() if space else None,
        "graft": {"base": paths[0], "donor": paths[-1], "size": options.graft[2]} if options.graft else None,
        "optimizer": None if options.graft else options.optimizer,
        "population": options.population,
        "seed": options.seed,
        "score": options.score or "perplexity",
        "maximize": options.maximize,
        "data": [str(path) for path in options.data],
        "window": options.window, "stride": options.stride, "max_tokens": options.max_tokens,
        "dtype": options.dtype,
    }
    if scorer is not None:
        settings.update(scorer.settings(), maximize=None, data=[], window=None, stride=None, max_tokens=None)
    return Setup(paths, names, space, grafts, settings, scorer=scorer, warnings=warnings,
                 tokenizer_source=paths[0] if warnings else None)


def tokenizer_warnings(paths: list[str]) -> list[str]:
    """Build's warning, for sources whose tokenizers differ from the first's (the one the
    search tokenizes with): a warning, not a refusal, as in `dus build`.

    Why consistent with build and not a refusal (as compare's perplexity check and heal's
    teacher check are): every candidate a search scores is a recipe `dus build` builds with
    this same warning, because the user may know the difference does not matter (added
    tokens the text never uses, a few swapped ids); and the search's scores stay
    comparable with one another, since every candidate is scored on the same token ids
    from one tokenizer (compare refuses because it ranks perplexities of different
    tokenizations). So that a ranked recipe builds into what was scored, the written
    recipes then name the first model as `tokenizer_source` (else a path starting in
    another model would take that model's tokenizer). vocab_size itself is a shape,
    checked with the others (`check_compatible`)."""
    from dus.tokenizer_check import first_tokenizer_difference

    warnings = []
    first = paths[0]
    for other in paths[1:]:
        difference = first_tokenizer_difference(Path(first), Path(other))
        if difference:
            warnings.append(
                f"tokenizers of {first!r} and {other!r} differ ({difference}); the search scores with {first!r}'s "
                f"tokenizer and its recipes name it as tokenizer_source, so {other!r}'s layers see token ids they "
                "were not trained on")
    return warnings


def check_minutes(minutes: float | None) -> None:
    """`--minutes` is a positive, finite time limit (None: no limit). Zero, a negative
    number or NaN would stop the search before it starts or never."""
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise DusError(f"--minutes {minutes:g}: give a positive number of minutes, or leave --minutes out for no time limit")


def tasks_scorer(options: SearchOptions):
    """The lm-eval scorer for --tasks (lm-eval imported, task names checked), or None."""
    if not options.tasks:
        return None
    if options.score:
        raise DusError("--tasks and --score are two fitnesses: give one")
    if options.data:
        raise DusError("--data is the text perplexity is scored on; with --tasks the tasks are the score: drop --data")
    from dus.search.lm_eval_score import LmEvalScorer

    return LmEvalScorer(options.tasks, options.tasks_metric, options.tasks_limit, options.tasks_include, options.tasks_batch_size)


def short_names(paths: list[str]) -> dict[str, str]:
    names = {}
    for index, path in enumerate(paths):
        name = Path(path).name
        names[path] = name if name not in names.values() else f"{name}#{index}"
    return names


def load(setup: Setup, options: SearchOptions) -> None:
    """Read the text, load every source once, and make the evaluator."""
    from dus.assemble import load_sources
    from dus.checkpoint import ModelDir, resolve_device, resolve_dtype
    from dus.compare.run import choose_window
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, FunctionScorer, PerplexityScorer, add_user_path

    first = ModelDir(setup.models[0])
    tokenizer = first.tokenizer()
    if setup.scorer is not None:
        setup.scorer.fetch()  # task data unreachable: one line before the sources are loaded
        scorer = setup.scorer
    elif options.score:
        add_user_path()
        scorer = FunctionScorer(options.score, options.maximize)
    else:
        from dus.measure.text import read_text, tokenize_stream

        texts = [read_text(path) for path in options.data]
        window, _ = choose_window([ModelDir(p) for p in setup.models], options.window, None)
        window, stride = choose_window([ModelDir(p) for p in setup.models], window, options.stride or window)
        share = None if options.max_tokens is None else max(2, options.max_tokens // len(texts))
        streams = [tokenize_stream(tokenizer, text, share) for text in texts]
        scorer = PerplexityScorer(streams, window, stride)
        digest = hashlib.sha256(b"".join(ids.numpy().tobytes() for ids in streams)).hexdigest()[:16]
        setup.settings.update(window=window, stride=stride, tokens=sum(len(ids) for ids in streams), tokens_sha256=digest)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, first, device)
    setup.settings["dtype"] = str(dtype).removeprefix("torch.")
    whole = {"merge_method": "passthrough", "slices": [{"sources": [{"model": p, "layer_range": [0, 1]}]} for p in setup.models]}
    plan = resolve(load_recipe(whole)).plan
    sources = load_sources(plan, dtype, device)
    setup.evaluator = Evaluator(sources, tokenizer, scorer, prefix_budget=options.prefix_cache_mb * 2**20)


def entry_for(index: int, x, candidate: Candidate, value: float, metrics: dict, seconds: float, cached: bool, missing: list[int]) -> dict:
    return {
        "i": index, "x": x, "key": candidate.key(), "candidate": candidate.to_dict(), "value": value,
        "metrics": metrics, "seconds": round(seconds, 4), "cached": cached, "feasible": not missing, "missing": missing,
    }


class Loop:
    """Evaluates candidates in order, replaying journalled ones (checking they are the
    same) and appending new ones; stops at the evaluation budget or the deadline."""

    def __init__(self, setup: Setup, journal: Journal, replay: list[dict], evals: int, minutes: float | None, on_entry=None):
        self.setup, self.journal, self.replay = setup, journal, replay
        self.evals, self.on_entry = evals, on_entry
        self.deadline = time.monotonic() + 60 * minutes if minutes else None
        self.history: list[dict] = []

    @property
    def out_of_time(self) -> bool:
        """Past the deadline, once the journal is replayed and at least one candidate was
        evaluated (a search never ends with nothing to rank because of --minutes alone)."""
        index = len(self.history)
        return index >= max(1, len(self.replay)) and self.deadline is not None and time.monotonic() > self.deadline

    @property
    def done(self) -> bool:
        return len(self.history) >= self.evals or self.out_of_time

    def evaluate(self, candidate: Candidate, x=None) -> float:
        from dus.search.fitness import Score

        index = len(self.history)
        if index < len(self.replay):
            entry = self.replay[index]
            if entry.get("x") != x or entry.get("key") != candidate.key():
                raise DusError(f"{self.journal.path}:{index + 2}: the journal does not match this search's candidate "
                               f"{index}; it was written by another version or settings: choose a new -o directory")
            if entry["feasible"] and not entry["cached"]:
                self.setup.evaluator.cache[entry["key"]] = Score(entry["value"], entry["metrics"], entry["seconds"])
        else:
            missing = self.setup.space.missing(candidate) if self.setup.space else []
            if missing:
                entry = entry_for(index, x, candidate, INFEASIBLE + len(missing), {}, 0.0, False, missing)
            else:
                score, cached = self.setup.evaluator(candidate)
                entry = entry_for(index, x, candidate, score.value, score.metrics, 0.0 if cached else score.seconds, cached, [])
            self.journal.append(entry)
        self.history.append(entry)
        if self.on_entry:
            self.on_entry(entry)
        return entry["value"]


def run_optimizer(setup: Setup, options: SearchOptions, loop: Loop) -> None:
    from dus.search.optimizers import make_optimizer

    optimizer = make_optimizer(options.optimizer, setup.space.centre(), options.seed, options.population)
    while not loop.done:
        xs = optimizer.ask()
        values = []
        for x in xs:
            if loop.done:
                return  # a partial generation is never told: a resumed search asks it again
            values.append(loop.evaluate(setup.space.decode(x), x))
        optimizer.tell(xs, values)


def run_grafts(setup: Setup, loop: Loop) -> None:
    if len(loop.replay) < len(setup.grafts):  # the base's own path first: each graft then runs from its start on
        base = setup.grafts[0].segments[-1]
        setup.evaluator.warm(canonical([Segment(base.model, 0, base.end)]))
    for candidate in setup.grafts:
        if loop.out_of_time:
            return
        loop.evaluate(candidate)


def search(models: list, options: SearchOptions, console=None) -> dict | None:
    """Run (or continue) a search; returns the result written to search.json, or None for --dry-run."""
    from rich.console import Console

    from dus.search import report

    console = console or Console(stderr=True)
    setup = prepare(models, options)
    if setup.warnings:
        from rich.markup import escape

        for warning in setup.warnings:
            console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)  # one line, as build prints it
    if options.dry_run:
        report.print_space(Console(), setup)
        return None
    read_journal(options.output, None)  # refuse a directory that is not a search's before loading anything
    load(setup, options)
    replay = read_journal(options.output, setup.settings)  # the settings are complete now (tokens, window)
    journal = Journal(options.output, setup.settings, replay)
    total = len(setup.grafts) if options.graft else options.evals
    if replay and len(replay) >= total and not options.graft:
        console.print(f"{options.output}: the journal already holds {len(replay)} evaluations; writing the results")
    with report.progress(console, total, options.progress) as tick:
        loop = Loop(setup, journal, replay, total, options.minutes, tick)
        try:
            if options.graft:
                run_grafts(setup, loop)
            else:
                run_optimizer(setup, options, loop)
        finally:
            journal.close()
    result = report.result(setup, options, loop.history)
    if options.wandb:
        result["wandb"] = report.log_wandb(options.output, setup, result)
    report.write(options.output, setup, result, options.top)
    report.print_best(Console(), setup, result, options.top)
    return result
