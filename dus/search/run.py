"""`dus search` as functions: check every input, load the sources once, run the
optimizer (or the exhaustive graft scan) as one or several workers on the search's
Optuna study (journal.py), write the results from the study."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dus.errors import DusError
from dus.search import journal
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
    workers: int = 1  # worker processes on this machine sharing the study (1: this process)
    storage: str | None = None  # a database URL holding the study; None: a journal file in `output`
    heal_steps: int = 0  # the healed fitness (healed.py): heal steps at the top rung; 0: the unhealed score only
    heal_rungs: int = 1  # healed rungs above the unhealed score
    halving: int = 3  # successive halving's factor: 1 in `halving` trials goes on at each rung
    heal_config: str = "heal"  # the heal config of the healed fitness (dus heal -c)
    heal_set: dict = field(default_factory=dict)  # its overrides (--heal-set KEY=VALUE)


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
    schedule: object = None  # healed.HealSchedule when the fitness is measured after a heal
    healer: object = None  # healed.CandidateHealer (made with the evaluator)


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
        if len(paths) < len(models):
            raise DusError(f"{', '.join(map(str, models))}: a source model is given twice (the same directory); give "
                           "each once (a path may repeat a model's layers by itself)")
        space, grafts = build_space(paths, options), []
        if options.evals < 1:
            raise DusError(f"--evals {options.evals}: give at least 1 evaluation")
        from dus.search.optimizers import check_optimizer

        check_optimizer(options.optimizer, options.workers)
    if options.workers < 1:
        raise DusError(f"--workers {options.workers}: give at least 1 worker process")
    from dus.search.workers import check_count

    if options.graft:
        check_count(options.workers, len(grafts), "grafts to score", paths, options.device)
    else:
        check_count(options.workers, options.evals, "evaluations (--evals)", paths, options.device)
    if options.top < 1:
        raise DusError(f"--top {options.top}: write at least 1 recipe")
    from dus.checkpoint import check_outside_models

    check_outside_models(options.output, paths, "-o")
    check_minutes(options.minutes)
    schedule = heal_schedule(options)
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
    if schedule is not None:
        settings["healed"] = schedule.describe()
    if scorer is not None:
        settings.update(scorer.settings(), maximize=None, data=[], window=None, stride=None, max_tokens=None)
    return Setup(paths, names, space, grafts, settings, scorer=scorer, warnings=warnings,
                 tokenizer_source=paths[0] if warnings else None, schedule=schedule)


def heal_schedule(options: SearchOptions):
    """The healed fitness's schedule (None without --heal-steps), checked in one line each:
    the numbers, an optimizer that cannot take pruned trials, a heal config that cannot run
    over the search's loaded sources."""
    if not options.heal_steps:
        if options.heal_set or options.heal_config != "heal":
            raise DusError("--heal-config and --heal-set set the healed fitness's heal; add --heal-steps N to use it")
        return None
    from dus.search.healed import HealSchedule, check_schedule

    check_schedule(options.heal_steps, options.heal_rungs, options.halving)
    if options.optimizer == "cma" and not options.graft:
        raise DusError("--heal-steps with --optimizer cma: a pruned candidate has only its unhealed score, which CMA-ES "
                       "cannot rank with healed ones; use --optimizer tpe or random")
    if options.score or options.tasks:
        raise DusError("--heal-steps heals candidates and scores perplexity on --data; --score and --tasks are not "
                       "supported with it yet: drop one")
    from dus.search.healed import check_heal_config

    schedule = HealSchedule(options.heal_steps, options.heal_rungs, options.halving, options.heal_config,
                            tuple(sorted(options.heal_set.items())))
    check_heal_config(schedule)
    return schedule


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


def load(setup: Setup, options: SearchOptions, sources: bool = True) -> None:
    """Read the text, load every source once, and make the evaluator. Without `sources`
    (the parent of several workers), only what completes the settings and checks the
    scorer: the text, the window, the dtype, the user's function, lm-eval's task data."""
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
    if not sources:
        if setup.schedule is not None:  # the workers read the heal's data; a bad file is one line here first
            from dus.search.healed import read_heal_inputs

            read_heal_inputs(setup.schedule, tokenizer)
        return
    whole = {"merge_method": "passthrough", "slices": [{"sources": [{"model": p, "layer_range": [0, 1]}]} for p in setup.models]}
    plan = resolve(load_recipe(whole)).plan
    sources = load_sources(plan, dtype, device)
    setup.evaluator = Evaluator(sources, tokenizer, scorer, prefix_budget=options.prefix_cache_mb * 2**20)
    if setup.schedule is not None:
        from dus.search.healed import CandidateHealer

        setup.healer = CandidateHealer(setup.evaluator, setup.schedule, Path(setup.models[0]))


def record_for(x, candidate: Candidate, metrics: dict, seconds: float, cached: bool, missing: list[int]) -> dict:
    """What a trial's `dus` attribute records about its evaluation (the score is the trial's value)."""
    return {"x": x, "key": candidate.key(), "candidate": candidate.to_dict(), "metrics": metrics,
            "seconds": round(seconds, 4), "cached": cached, "feasible": not missing, "missing": missing}


def climb(worker: "Worker", trial, candidate: Candidate, score, record: dict) -> tuple[float, bool]:
    """The healed fitness's rungs (healed.py): report the unhealed score, then heal and
    report each rung while the pruner lets the trial go on. Returns (value, pruned); the
    record gains every rung's value and metrics."""
    schedule, healer = worker.setup.schedule, worker.setup.healer
    rungs, metrics = [score.value], [score.metrics]
    trial.report(score.value, schedule.resource(0))
    pruned = False
    for rung in range(1, schedule.rungs + 1):
        if trial.should_prune():
            pruned = True
            break
        value, rung_metrics, seconds = healer(candidate, rung)
        rungs.append(value)
        metrics.append(rung_metrics)
        record["seconds"] = round(record["seconds"] + seconds, 4)
        trial.report(value, schedule.resource(rung))
    record.update(rungs=rungs, rung_metrics=metrics, metrics=metrics[-1])
    return rungs[-1], pruned


class Worker:
    """One process's part of a search: it asks the study for trials, scores them and tells
    the scores; it fails the running trials of workers that are gone (and queues tpe's and
    random's again), and keeps every completed score for its evaluator's cache."""

    def __init__(self, setup: Setup, options: SearchOptions, study, where: str, total: int, on_entry=None):
        self.setup, self.options, self.study, self.where, self.total = setup, options, study, where, total
        self.on_entry = on_entry
        self.deadline = time.monotonic() + 60 * options.minutes if options.minutes else None
        self.retry = setup.space is not None and options.optimizer != "cma"
        self.shown: set[int] = set()
        self.dropped = 0  # scores told too late: another worker had failed the trial (no beat for too long)

    def sync(self) -> list:
        """The study's trials, once the trials of gone workers are failed; completed trials
        not seen before are shown and their scores kept."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        now = time.time()
        gone = [t for t in trials if t.state == TrialState.RUNNING and journal.stale(t, now)]
        for trial in gone:
            journal.fail_trial(self.study, trial, self.retry, "its worker is gone (killed, or no beat for "
                               f"{journal.GRACE_SECONDS:g} s)")
        if gone:
            trials = self.study.get_trials(deepcopy=False)
        for entry in journal.entries(trials, self.where):
            if entry["trial"] in self.shown:
                continue
            self.shown.add(entry["trial"])
            if entry["feasible"] and not entry["cached"] and self.setup.evaluator is not None:
                self.keep_scores(entry)
            if self.on_entry:
                self.on_entry(entry)
        return trials

    def keep_scores(self, entry: dict) -> None:
        """An evaluation of the study (this worker's or another's) is not run again here:
        its unhealed score, and each healed rung's, are kept for a repeat of its candidate."""
        from dus.search.fitness import Score

        rungs = entry.get("rungs")
        if rungs is None:
            self.setup.evaluator.cache.setdefault(entry["key"], Score(entry["value"], entry["metrics"], entry["seconds"]))
            return
        metrics = entry.get("rung_metrics") or [entry["metrics"]] * len(rungs)
        self.setup.evaluator.cache.setdefault(entry["key"], Score(rungs[0], metrics[0], entry["seconds"]))
        if self.setup.healer is not None:
            for rung in range(1, len(rungs)):
                self.setup.healer.cache.setdefault((entry["key"], rung), (rungs[rung], metrics[rung], 0.0))

    def out_of_time(self, completed: int) -> bool:
        """Past --minutes, once the study holds at least one evaluation (a search never ends
        with nothing to rank because of --minutes alone)."""
        return completed >= 1 and self.deadline is not None and time.monotonic() > self.deadline

    def evaluate(self, trial, candidate: Candidate, x) -> float:
        """Score `trial`'s candidate and tell the study; the trial is failed (and queued again
        where the optimizer allows) if anything, an interrupt included, stops it."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            trial.set_user_attr("dus_worker", journal.me())
            missing = self.setup.space.missing(candidate) if self.setup.space else []
            pruned = False
            if missing:
                value, record = INFEASIBLE + len(missing), record_for(x, candidate, {}, 0.0, False, missing)
                if self.setup.schedule is not None:  # never healed; below every healed trial for the sampler too
                    trial.report(value, self.setup.schedule.resource(0))
                    record["rungs"], pruned = [value], True
            else:
                with journal.heartbeat(trial):
                    score, cached = self.setup.evaluator(candidate)
                    value = score.value
                    record = record_for(x, candidate, score.metrics, 0.0 if cached else score.seconds, cached, [])
                    if self.setup.schedule is not None:
                        value, pruned = climb(self, trial, candidate, score, record)
            try:
                trial.set_user_attr("path", candidate.describe(self.setup.names))
                trial.set_user_attr("dus", record)
                if pruned:
                    from optuna.trial import TrialState

                    self.study.tell(trial, state=TrialState.PRUNED)
                else:
                    self.study.tell(trial, value)
            except UpdateFinishedTrialError:
                self.dropped += 1  # failed by another worker meanwhile, and queued again there
        except BaseException:
            journal.fail_trial(self.study, trial, self.retry, "its worker stopped scoring it (an error or an interrupt)")
            raise
        return value

    def wait(self) -> None:
        """Other workers hold the last trials: wait for them to finish (or to be found gone)."""
        time.sleep(1.0)


def _counts(trials) -> tuple[int, int, int]:
    from optuna.trial import TrialState

    states = [t.state for t in trials]
    done = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)  # a pruned trial is an evaluation too
    return done, states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def run_sampled(worker: Worker) -> None:
    """tpe and random: ask the study until it holds the budget (or --minutes pass)."""
    from optuna.distributions import FloatDistribution

    space = worker.setup.space
    distributions = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(space.dimension)}
    while True:
        complete, running, _ = _counts(worker.sync())
        if complete >= worker.total or worker.out_of_time(complete):
            return
        if complete + running >= worker.total:
            worker.wait()
            continue
        trial = worker.study.ask(distributions)
        x = [trial.params[f"g{i}"] for i in range(space.dimension)]
        worker.evaluate(trial, space.decode(x), x)


def run_cma(worker: Worker) -> None:
    """CMA-ES in this process: the study's completed trials are replayed through it (each
    vector checked against what it asks), then each new vector is a trial with fixed
    parameters. A partial generation is never told: a resumed search asks it again."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from dus.search.optimizers import CmaOptimizer

    setup, study, where = worker.setup, worker.study, worker.where
    space = setup.space
    trials = worker.sync()
    others = [t for t in trials if t.state == TrialState.RUNNING]
    if others:
        owner = others[0].user_attrs.get("dus_worker") or {}
        raise DusError(f"{where}: another worker ({owner.get('host', '?')} pid {owner.get('pid', '?')}) is searching this "
                       "study, and --optimizer cma runs in one worker; wait for it to finish, or stop it")
    for trial in trials:
        if trial.state == TrialState.WAITING:  # queued by a cma worker killed before it asked it: asked again below
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    replay = journal.entries(trials, where)
    distributions = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(space.dimension)}
    optimizer = CmaOptimizer(space.centre(), worker.options.seed, worker.options.population)
    done = 0
    while True:
        xs = optimizer.ask()
        values = []
        for x in xs:
            candidate = space.decode(x)
            if done < len(replay):
                entry = replay[done]
                if entry["x"] != x or entry["key"] != candidate.key():
                    raise DusError(f"{where}: trial {entry['trial']} does not match this search's candidate {done}; it was "
                                   "written by another version or settings: choose a new -o directory")
                values.append(entry["value"])
            else:
                if done >= worker.total or worker.out_of_time(done):
                    return
                study.enqueue_trial({f"g{i}": min(1.0, max(0.0, v)) for i, v in enumerate(x)}, user_attrs={"dus_queued": "cma"})
                values.append(worker.evaluate(study.ask(distributions), candidate, x))
                worker.sync()
            done += 1
        optimizer.tell(xs, values)


def run_grafts(worker: Worker) -> None:
    """Every graft once: each is a queued trial with its index, taken by whichever worker
    asks first; a graft whose trial failed is queued again."""
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    setup, study = worker.setup, worker.study
    distributions = {"graft": IntDistribution(0, len(setup.grafts) - 1)}
    warmed = False
    while True:
        trials = worker.sync()
        complete, running, waiting = _counts(trials)
        if worker.out_of_time(complete):
            return
        held = {t.system_attrs.get("fixed_params", t.params).get("graft") for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)}
        missing = [i for i in range(len(setup.grafts)) if i not in held]
        for index in missing:
            study.enqueue_trial({"graft": index}, user_attrs={"dus_queued": "graft"})
        if not waiting and not missing:
            if not running:
                return
            worker.wait()
            continue
        if not warmed:  # the base's own path first: each graft then runs from its start on
            base = setup.grafts[0].segments[-1]
            setup.evaluator.warm(canonical([Segment(base.model, 0, base.end)]))
            warmed = True
        trial = study.ask(distributions)
        if trial.user_attrs.get("dus_queued") != "graft":  # another worker took the last queued graft first
            journal.fail_trial(study, trial, False, "sampled after the queue of grafts emptied; not a graft")
            continue
        worker.evaluate(trial, setup.grafts[trial.params["graft"]], None)


def start_trials(setup: Setup, options: SearchOptions) -> list:
    """What a new study queues first: the centre of the space for tpe and random."""
    if setup.space is None or options.optimizer == "cma":
        return []
    return [({f"g{i}": v for i, v in enumerate(setup.space.centre())}, {"dus_queued": "start"})]


def work(setup: Setup, options: SearchOptions, storage, where: str, total: int, on_entry=None) -> Worker:
    """Be one worker of the search: make or join its study and search until it is done."""
    from dus.search.optimizers import make_sampler

    sampler = make_sampler(options.optimizer if setup.space is not None else "graft", options.seed)
    pruner = setup.schedule.pruner() if setup.schedule is not None else None
    study, _ = journal.open_study(storage, setup.settings, where, sampler, start_trials(setup, options), pruner)
    worker = Worker(setup, options, study, where, total, on_entry)
    if options.graft:
        run_grafts(worker)
    elif options.optimizer == "cma":
        run_cma(worker)
    else:
        run_sampled(worker)
    return worker


def work_alone(models: list, options: SearchOptions) -> None:
    """A worker process of `--workers N`: check, load, join the study, search; leave this
    process's prefix-cache counts on the study for the results."""
    setup = prepare(models, options)
    load(setup, options)
    storage = journal.open_storage(options.output, options.storage, create=True)
    where = journal.describe_storage(options.output, options.storage)
    total = len(setup.grafts) if options.graft else options.evals
    worker = work(setup, options, storage, where, total)
    prefix = getattr(setup.evaluator, "prefix", None)
    host, pid = journal.me().values()
    worker.study.set_user_attr(f"dus_prefix_cache:{host}:{pid}", prefix.stats() if prefix else None)


def search(models: list, options: SearchOptions, console=None) -> dict | None:
    """Run (or continue, or join) a search; returns the result written to search.json, or
    None for --dry-run."""
    from rich.console import Console

    from dus.search import report

    console = console or Console(stderr=True)
    setup = prepare(models, options)
    if setup.warnings:
        from rich.markup import escape

        for warning in setup.warnings:
            console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)  # one line, as build prints it
    # refuse a directory that is not a search's before loading anything; a dry run refuses what the run would
    journal.check_output(options.output, options.storage)
    if options.dry_run:
        report.print_space(Console(), setup)
        return None
    where = journal.describe_storage(options.output, options.storage)
    storage = journal.open_storage(options.output, options.storage, create=False)
    several = options.workers > 1
    load(setup, options, sources=not several)
    if options.storage is not None:
        journal.check_results(options.output, setup.settings)
    total = len(setup.grafts) if options.graft else options.evals
    done = 0
    if storage is not None and journal.stored_settings(storage, where, setup.settings):  # the settings are complete now
        done = len(journal.entries(journal.study_trials(storage), where))
    if done >= total:
        console.print(f"{where}: the study already holds {done} evaluations; writing the results")
    else:
        journal.clear_results(options.output)
    made = journal.made_by_now(options.output, options.storage)
    storage = journal.open_storage(options.output, options.storage, create=True) if options.storage is None else storage
    prefix = None
    if done < total:
        try:
            with report.progress(console, total, options.progress) as tick:
                if several:
                    from dus.search import workers

                    prefix = workers.run(models, options, storage, where, total, tick, console)
                else:
                    work(setup, options, storage, where, total, tick)
                    prefix = setup.evaluator.prefix.stats() if setup.evaluator.prefix else None
        except DusError:
            made.undo(storage)  # an error before the first evaluation leaves nothing behind, as bad input does
            raise
    history = journal.entries(journal.study_trials(storage), where)
    result = report.result(setup, options, history, prefix)
    if options.wandb:
        result["wandb"] = report.log_wandb(options.output, setup, result)
    report.write(options.output, setup, result, options.top)
    report.print_best(Console(), setup, result, options.top)
    return result
