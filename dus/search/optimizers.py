"""The optimizers, all deterministic for a seed, over the search's Optuna study.

tpe and random are Optuna samplers: every worker asks the shared study for a trial, so
any number of workers on any number of machines search one study. Each trial's sampler
is made afresh, seeded by the seed and the trial's slot (its number less the failed
trials before it), and reads everything else from the study: one worker's search,
killed and resumed, asks what an uninterrupted one asks.

cma is CMA-ES from the `cma` package, whose state lives in the process: one worker asks
a generation, each vector becomes a trial with fixed parameters, and a resumed search
replays the study's completed trials through it (the same scores in the same order give
the same state). Optuna's own CmaEsSampler would let several workers share CMA-ES, but it
needs the `cmaes` package, which is not a dependency, and it is another implementation
under the same name; so `--optimizer cma` keeps the `cma` package and one worker, and
`--workers N` with cma is refused in one line (docs/search.md).
"""

from __future__ import annotations

from functools import lru_cache

from dus.errors import DusError

OPTIMIZERS = ("cma", "tpe", "random")


def check_optimizer(name: str, workers: int = 1) -> None:
    """A known optimizer whose library is installed, or one line saying what to do."""
    if name not in OPTIMIZERS:
        raise DusError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    _need("optuna")  # the study lives in an Optuna storage, whatever the optimizer
    if name in LIBRARIES:
        _need(LIBRARIES[name])
    if name == "cma" and workers > 1:
        raise DusError(f"--optimizer cma runs in one worker (the cma package's CMA-ES is told each generation in order); "
                       f"use --workers 1, or --optimizer tpe or random for --workers {workers}")


LIBRARIES = {"cma": "cma", "tpe": "optuna"}


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DusError(f"`dus search` needs the {module} package: pip install 'dus[search]' (or pip install {module})") from None


class CmaOptimizer:
    """CMA-ES (the `cma` package) in the unit box, starting from its centre."""

    def __init__(self, start: list[float], seed: int, population: int | None):
        cma = _need("cma")
        options = {"bounds": [0, 1], "seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if population:
            options["popsize"] = population
        # cma treats seed 0 as "seed from the clock": +1 keeps every seed deterministic
        self.es = cma.CMAEvolutionStrategy(list(start), 0.3, options)

    def ask(self) -> list[list[float]]:
        self.asked = self.es.ask()
        return [list(map(float, x)) for x in self.asked]

    def tell(self, xs, values) -> None:
        # the very arrays ask() gave: cma recognises its injected (mean-shift) solutions by them
        self.es.tell(self.asked, values)


def make_sampler(name: str, seed: int):
    """The Optuna sampler of the study: tpe's or random's, slot-seeded; for cma and graft
    mode, whose trials all have fixed parameters, a plain one that is never consulted."""
    optuna = _need("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "tpe":
        return _slot_seeded()(lambda s: optuna.samplers.TPESampler(seed=s), seed)
    if name == "random":
        return _slot_seeded()(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return optuna.samplers.RandomSampler(seed=seed)


def slot_seed(seed: int, slot: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, slot]).generate_state(1)[0])


@lru_cache(maxsize=None)
def _slot_seeded():
    optuna = _need("optuna")
    from optuna.trial import TrialState

    class SlotSeededSampler(optuna.samplers.BaseSampler):
        """A sampler made afresh for each trial, seeded by (seed, slot): a trial's parameters
        depend on the seed, its slot and the study's trials, never on what this process
        asked before. Workers asking at once get distinct trial numbers, so distinct slots
        (unless a trial numbered below both fails in between: then two may share a slot,
        and still see different running trials through TPE's constant liar)."""

        def __init__(self, make, seed: int):
            self._make, self._seed = make, seed
            self._inner = make(seed)

        def before_trial(self, study, trial) -> None:
            failed = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number < trial.number)
            self._inner = self._make(slot_seed(self._seed, trial.number - failed))
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self._inner.reseed_rng()

    return SlotSeededSampler
