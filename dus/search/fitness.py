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
    so no window spans two files), windows as in `dus compare`.

    Windows of the same shape from different streams go through the model together:
    a search scores short windows (its token budget split over the files), and one
    matrix product over 7 x 109 rows runs at twice the rate of seven over 109 in bf16
    on this machine's CPU. The batches are fixed by the streams, so every candidate
    replays the same forward calls (what the prefix cache needs)."""

    name = "perplexity"
    replays_windows = True  # the same forward calls, in the same order, for every candidate
    batch_tokens = 4096  # tokens of one forward call at most (activations)
    batch_logits = 2**26  # logits of one forward call at most (vocabulary x scored positions)

    def __init__(self, streams: list, window: int, stride: int):
        self.streams, self.window, self.stride = streams, window, stride

    def tokens_fed(self) -> int:
        """Tokens of all forward calls together (what one kept hidden state spans)."""
        return sum(window.end - window.begin for batch in self.batches(1) for _, window in batch)

    def batches(self, vocab: int) -> list[list]:
        """[(stream, window), ...] per forward call: same-shape windows together, in stream order."""
        from dus.measure.perplexity import sliding_windows

        groups: dict[tuple, list] = {}
        for stream, ids in enumerate(self.streams):
            for window in sliding_windows(len(ids), self.window, self.stride):
                shape = (window.end - window.begin, window.first - window.begin)
                groups.setdefault(shape, []).append((stream, window))
        calls = []
        for (length, offset), members in groups.items():
            per_call = max(1, min(self.batch_tokens // length, self.batch_logits // max(1, (length - offset + 1) * vocab)))
            calls.extend(members[i : i + per_call] for i in range(0, len(members), per_call))
        return calls

    def __call__(self, model, tokenizer) -> tuple[float, dict]:
        import torch

        from dus.measure.perplexity import PerplexityResult, window_nll

        device = next(model.parameters()).device
        nll, tokens = 0.0, 0
        with torch.inference_mode():
            for batch in self.batches(model.config.vocab_size):
                window = batch[0][1]
                chunk = torch.stack([self.streams[stream][w.begin : w.end] for stream, w in batch]).to(device)
                logits = model(input_ids=chunk, use_cache=False, logits_to_keep=window.end - window.first + 1).logits
                batch_nll, count = window_nll(logits, chunk, window)
                nll, tokens = nll + batch_nll, tokens + count
        total = PerplexityResult(nll, tokens)
        return total.mean_nll, total.to_dict()


class FunctionScorer:
    """A user's `module:function(model, tokenizer) -> number`; `maximize` flips the sign.
    What the function gets wrong is one line: an exception it raises names the user's
    file and line (the traceback's last frame in that file; `--debug` shows the whole
    traceback), and a result that is not a finite number is refused, never ranked."""

    def __init__(self, spec: str, maximize: bool = False):
        self.function = load_function(spec)
        self.name, self.maximize = spec, maximize
        self.files = user_files(self.function)

    def __call__(self, model, tokenizer) -> tuple[float, dict]:
        try:
            raw = self.function(model, tokenizer)
        except (DusError, MemoryError):
            raise
        except Exception as error:
            raise DusError(f"--score {self.name} raised {error_text(error)} at {user_frame(error, self.files)}; "
                           "fix the function (rerun with --debug for the traceback)") from error
        try:
            value = float(raw)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
            raise DusError(f"--score {self.name} returned {type(raw).__name__} {_short(raw)}; it must return a number") from None
        if not math.isfinite(value):
            raise DusError(f"--score {self.name} returned {value}; it must return a finite number to minimise "
                           "(or --maximize): a NaN or infinite score cannot be ranked")
        return (-value if self.maximize else value), {"score": value}


def _short(value) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def error_text(error: BaseException) -> str:
    """`ZeroDivisionError: division by zero` (the first line of the message)."""
    message = error.msg if isinstance(error, SyntaxError) and error.msg else str(error)  # not "(file, line N)" twice
    first = (message.strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def user_files(function) -> set[str]:
    """The files the user's scoring code lives in: the function's and its module's."""
    import inspect

    files = set()
    for get in (lambda: inspect.getsourcefile(function) or inspect.getfile(function),
                lambda: sys.modules[function.__module__].__file__):
        try:
            files.add(str(Path(get()).resolve()))
        except (TypeError, AttributeError, KeyError, OSError):
            pass
    return files


def user_frame(error: BaseException, files: set[str]) -> str:
    """`FILE:LINE` of the traceback's last frame in one of the user's `files` (else its
    last frame that is not Python's import machinery)."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen ")]
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        return f"{error.filename}:{error.lineno}"
    mine = [f for f in frames if str(Path(f.filename).resolve()) in files] if files else []
    frame = (mine or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else "an unknown line"


def load_function(spec: str):
    """`package.module:function` or `path/to/file.py:function`; a module that fails to
    import is one line naming its file and line."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise DusError(f"--score {spec!r}: give MODULE:FUNCTION (or FILE.py:FUNCTION)")
    files: set[str] = set()
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DusError(f"--score {spec!r}: {path} is not a file")
            files.add(str(path.resolve()))
            loader_spec = importlib.util.spec_from_file_location(f"dus_user_score_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise DusError(f"--score {spec!r}: cannot import {module_name} ({error}); check PYTHONPATH or give FILE.py:FUNCTION") from None
    except (DusError, MemoryError):
        raise
    except Exception as error:
        raise DusError(f"--score {spec!r}: importing {module_name} raised {error_text(error)} at {user_frame(error, files)}; "
                       "fix that file (rerun with --debug for the traceback)") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DusError(f"--score {spec!r}: {module_name} has no function {function_name!r}")
    return function


class Evaluator:
    """Scores candidates over one loaded copy of each source; remembers every score.

    What does not depend on the candidate is done once: the sources' headers are opened
    (and checked together) here, not per candidate. Perplexity scoring keeps hidden states
    after shared path prefixes (`prefix.py`) and scaled projections (`scaled.py`); both
    leave every score bitwise what the plain assembled model gives."""

    def __init__(self, sources, tokenizer, scorer, prefix_budget: int | None = None, scaled_budget: int | None = None):
        from dus.search.prefix import DEFAULT_BUDGET as PREFIX_BUDGET
        from dus.search.prefix import PrefixCache
        from dus.search.scaled import DEFAULT_BUDGET as SCALED_BUDGET
        from dus.search.scaled import ScaledWeights
        from dus.sources import check_compatible, load_source

        self.sources, self.tokenizer, self.scorer = sources, tokenizer, scorer
        self.cache: dict[str, Score] = {}
        self.headers = {name: load_source(name, str(path)) for name, path in sources.paths.items()}
        check_compatible(list(self.headers.values()))
        prefix_budget = PREFIX_BUDGET if prefix_budget is None else prefix_budget
        cacheable = getattr(scorer, "replays_windows", False) and prefix_budget > 0
        self.prefix = PrefixCache(prefix_budget) if cacheable else None
        scaled_budget = SCALED_BUDGET if scaled_budget is None else scaled_budget
        self.scaled = ScaledWeights(scaled_budget) if scaled_budget > 0 else None  # 0: the product on every call

    def plan(self, candidate: Candidate):
        from dus.recipe import load_recipe
        from dus.resolve import resolve

        return resolve(load_recipe(candidate.recipe()), self.headers).plan

    def config(self, plan) -> dict:
        """The output config.json of the plan, from the headers opened once."""
        from dus.config_rewrite import output_config

        return output_config(plan, self.headers)[0]

    def model(self, candidate: Candidate, plan=None, config: dict | None = None):
        from dus.assemble import assemble

        plan = plan or self.plan(candidate)
        config = config or self.config(plan)
        config_class = type(self.sources[plan.config_from].config)
        return assemble(plan, self.sources, config=config_class.from_dict(config)).eval()

    def __call__(self, candidate: Candidate, stride: int | None = None) -> tuple[Score, bool]:
        """(score, whether it came from the cache); `stride`: keep the hidden state after
        every `stride`-th layer (and at segment boundaries) for later candidates."""
        key = candidate.key()
        if key in self.cache:
            return self.cache[key], True
        started = time.perf_counter()
        plan = self.plan(candidate)
        config = self.config(plan)
        model = self.model(candidate, plan, config)
        if self.scaled is not None:
            self.scaled.apply(model)
        if self.prefix is None:
            value, metrics = self.scorer(model, self.tokenizer)
        else:
            value, metrics = self._score_from_prefix(candidate, model, config, plan, stride)
        del model
        check_finite(value, candidate, getattr(self.scorer, "name", "the score"))
        score = Score(value, metrics, time.perf_counter() - started)
        self.cache[key] = score
        return score, False

    def warm(self, candidate: Candidate) -> None:
        """Score `candidate` keeping the state after each of its layers: before the grafts
        of one base, its whole path makes every graft run only from the graft on."""
        if self.prefix is not None:
            self(candidate, stride=1)

    def _score_from_prefix(self, candidate: Candidate, model, config: dict, plan, stride: int | None):
        """Run only the layers after the longest kept prefix; keep this path's states."""
        from dus.assemble import decoder
        from dus.search.prefix import STRIDE, NotCacheable, prefix_keys, run_from, store_points

        path = [(s.model, layer, s.scale) for s in candidate.segments for layer in range(s.start, s.end)]
        keys = prefix_keys(path, config, self.headers[plan.config_from].adapter)
        skip, states = self.prefix.longest(keys)
        capture = store_points(path, skip, stride or STRIDE)
        point = self.scorer.tokens_fed() * model.config.hidden_size * next(model.parameters()).element_size()
        capture = capture[max(0, len(capture) - self.prefix.budget // 2 // max(point, 1)):]  # the shallowest that fit
        layers = decoder(model).layers
        try:
            with run_from(layers, skip, states, capture) as captured:
                value, metrics = self.scorer(model, self.tokenizer)
        except NotCacheable:  # a family whose layers do not pass one tensor on: score plainly
            self.prefix = None
            return self.scorer(model, self.tokenizer)
        self.prefix.hits += skip > 0
        self.prefix.misses += skip == 0
        self.prefix.layers_skipped += skip
        self.prefix.layers_run += len(path) - skip
        for q in capture:  # deepest first: the shallow ones end most recently used
            self.prefix.put(keys[q - 1], captured[q])
        return value, metrics


def check_finite(value: float, candidate: Candidate, scorer: str) -> None:
    """A NaN or infinite score stops the search in one line: it cannot be ranked (NaN
    compares false with everything) and would be journalled as if it were a result."""
    if not math.isfinite(value):
        names = {s.model: Path(s.model).name for s in candidate.segments}
        raise DusError(f"candidate {candidate.describe(names)} scored {value} ({scorer}), not a finite number; check the "
                       "sources for NaN or infinite weights, or score in float32 (--dtype float32)")


def add_user_path() -> None:
    """Let `--score mymodule:fn` find modules in the working directory, as `python -m` would."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
