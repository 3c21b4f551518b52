"""Scoring a candidate without writing it: recipe -> plan -> model assembled over the
sources loaded once -> a number to minimise. Scores are cached by the canonical recipe."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dus.errors import DusError
from dus.search.space import Candidate


@dataclass
class Score:
    value: float  # what the optimizer minimises
    metrics: dict  # what is reported (perplexity, tokens scored, the raw user score)
    seconds: float


class PerplexityScorer:
    """Mean NLL per token (log perplexity) over fixed token streams (one per text file,
    so no window spans two files), windows as in `dus compare`."""

    name = "perplexity"

    def __init__(self, streams: list, window: int, stride: int):
        self.streams, self.window, self.stride = streams, window, stride

    def __call__(self, model, tokenizer) -> tuple[float, dict]:
        from dus.measure.perplexity import PerplexityResult, evaluate_stream

        nll, tokens = 0.0, 0
        for ids in self.streams:
            result = evaluate_stream(model, ids, self.window, self.stride)
            nll, tokens = nll + result.nll_sum, tokens + result.tokens
        total = PerplexityResult(nll, tokens)
        return total.mean_nll, total.to_dict()


class FunctionScorer:
    """A user's `module:function(model, tokenizer) -> number`; `maximize` flips the sign."""

    def __init__(self, spec: str, maximize: bool = False):
        self.function = load_function(spec)
        self.name, self.maximize = spec, maximize

    def __call__(self, model, tokenizer) -> tuple[float, dict]:
        raw = self.function(model, tokenizer)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise DusError(f"--score {self.name} returned {type(raw).__name__} {raw!r}; it must return a number") from None
        if math.isnan(value):
            raise DusError(f"--score {self.name} returned NaN; it must return a number to minimise (or --maximize)")
        return (-value if self.maximize else value), {"score": value}


def load_function(spec: str):
    """`package.module:function` or `path/to/file.py:function`."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise DusError(f"--score {spec!r}: give MODULE:FUNCTION (or FILE.py:FUNCTION)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DusError(f"--score {spec!r}: {path} is not a file")
            loader_spec = importlib.util.spec_from_file_location(f"dus_user_score_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise DusError(f"--score {spec!r}: cannot import {module_name} ({error}); check PYTHONPATH or give FILE.py:FUNCTION") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DusError(f"--score {spec!r}: {module_name} has no function {function_name!r}")
    return function


class Evaluator:
    """Scores candidates over one loaded copy of each source; remembers every score."""

    def __init__(self, sources, tokenizer, scorer):
        self.sources, self.tokenizer, self.scorer = sources, tokenizer, scorer
        self.cache: dict[str, Score] = {}

    def plan(self, candidate: Candidate):
        from dus.recipe import load_recipe
        from dus.resolve import resolve

        return resolve(load_recipe(candidate.recipe())).plan

    def model(self, candidate: Candidate):
        from dus.assemble import assemble

        return assemble(self.plan(candidate), self.sources).eval()

    def __call__(self, candidate: Candidate) -> tuple[Score, bool]:
        """(score, whether it came from the cache)."""
        key = candidate.key()
        if key in self.cache:
            return self.cache[key], True
        started = time.perf_counter()
        model = self.model(candidate)
        value, metrics = self.scorer(model, self.tokenizer)
        del model
        score = Score(value, metrics, time.perf_counter() - started)
        self.cache[key] = score
        return score, False


def add_user_path() -> None:
    """Let `--score mymodule:fn` find modules in the working directory, as `python -m` would."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
