"""Ask/tell wrappers over the optimizer libraries, all deterministic for a seed.

The search loop asks for vectors in [0, 1]^n and tells their scores back. Because a
library's next proposal depends only on its seed and what it was told, replaying a
journal's scores through the same calls restores its state exactly (resume).
"""

from __future__ import annotations

from dus.errors import DusError

OPTIMIZERS = ("cma", "tpe", "random")


def check_optimizer(name: str) -> None:
    """A known optimizer whose library is installed, or one line saying what to do."""
    if name not in OPTIMIZERS:
        raise DusError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    if name in LIBRARIES:
        _need(LIBRARIES[name])


LIBRARIES = {"cma": "cma", "tpe": "optuna"}


def make_optimizer(name: str, start: list[float], seed: int, population: int | None = None):
    """`start` is the space's centre: CMA-ES's initial mean, the first point of the others."""
    if name == "cma":
        return CmaOptimizer(start, seed, population)
    if name == "tpe":
        return TpeOptimizer(start, seed, population)
    if name == "random":
        return RandomOptimizer(start, seed, population)
    raise DusError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


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


class TpeOptimizer:
    """Optuna's TPE sampler, one gene per float parameter, asked in batches."""

    def __init__(self, start: list[float], seed: int, population: int | None):
        optuna = _need("optuna")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
        self.dimension, self.batch = len(start), population or 1
        self.study.enqueue_trial({f"g{i}": v for i, v in enumerate(start)})
        self.pending = []

    def ask(self) -> list[list[float]]:
        distribution = self.optuna.distributions.FloatDistribution(0.0, 1.0)
        self.pending = [self.study.ask({f"g{i}": distribution for i in range(self.dimension)}) for _ in range(self.batch)]
        return [[trial.params[f"g{i}"] for i in range(self.dimension)] for trial in self.pending]

    def tell(self, xs, values) -> None:
        for trial, value in zip(self.pending, values):
            self.study.tell(trial, value)


class RandomOptimizer:
    """Uniform random vectors: the baseline an optimizer has to beat."""

    def __init__(self, start: list[float], seed: int, population: int | None):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.start, self.dimension, self.batch = list(start), len(start), population or 1

    def ask(self) -> list[list[float]]:
        if self.start is not None:
            first, self.start = self.start, None
            return [first]
        return [list(map(float, self.rng.random(self.dimension))) for _ in range(self.batch)]

    def tell(self, xs, values) -> None:
        pass
