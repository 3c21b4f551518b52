"""lm-evaluation-harness tasks as the search's fitness (`dus search --tasks`).

The candidate assembled in memory goes to lm-eval's HFLM as a model object, so no
candidate is written. lm-eval is optional: it is imported (and the task names checked)
when the search's inputs are checked, so a missing install is one line before any model
is loaded, and the task data is fetched once before the sources are loaded."""

from __future__ import annotations

import contextlib
import io
import logging
import random
from pathlib import Path

from dus.compare.lm_eval_hook import INSTALL, first_line, unreachable_message
from dus.errors import DusError


def import_lm_eval():
    """lm_eval, or one line saying why not (missing, or a version that does not import here)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails where transformers moved on)
    except ImportError as error:
        if error.name in ("lm_eval", None) or str(error.name).startswith("lm_eval."):
            raise DusError(f"--tasks: {INSTALL} to score candidates on its tasks") from None
        raise DusError(f"--tasks: lm-eval does not import ({first_line(error, 200)}); install what it names") from None
    except Exception as error:  # e.g. lm-eval 0.4.9 under transformers 5 (AttributeError)
        raise DusError(f"--tasks: lm-eval is installed but does not import ({first_line(error, 200)}); "
                       "upgrade it: `pip install -U lm-eval`") from None
    return lm_eval


@contextlib.contextmanager
def quiet():
    """lm-eval logs and draws progress bars on every call: keep them off the search's bar.
    Exceptions still propagate (and carry their own message)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def own_random_state():
    """simple_evaluate seeds python's, numpy's and torch's global generators on every call
    (which makes its scores repeatable); put them back after, or CMA-ES, which draws from
    numpy's, would sample the same vectors after every evaluation."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def pick_metric(task: str, reported: dict, metric: str) -> str:
    """The key of `metric` in lm-eval's results for one task ("acc" -> "acc,none")."""
    if metric in reported:
        return metric
    keys = [k for k in reported if k.split(",")[0] == metric]
    if len(keys) == 1:
        return keys[0]
    if f"{metric},none" in keys:
        return f"{metric},none"
    if keys:
        raise DusError(f"--tasks-metric {metric}: task {task} reports it under several filters ({', '.join(keys)}); "
                       f"give one, e.g. --tasks-metric {keys[0]}")
    names = sorted({k for k in reported if "," in k and "_stderr" not in k})
    raise DusError(f"--tasks-metric {metric}: task {task} does not report it (it reports {', '.join(names) or 'nothing'})")


def check_include(include: Path | None) -> None:
    """--tasks-include names a directory (of lm-eval task YAML files), or is not given."""
    if include is not None and not Path(include).is_dir():
        raise DusError(f"--tasks-include {include}: not a directory of lm-eval task YAML files")


def task_manager(tasks: list[str], include: Path | None = None):
    """lm-eval's TaskManager with the user's own task directory (`--tasks-include DIR`:
    task YAML files and the local data they name) beside lm-eval's tasks, every task of
    `tasks` checked to be one it knows: `dus search --tasks` and `dus compare --tasks` alike."""
    check_include(include)
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    with quiet():
        manager = TaskManager(include_path=str(Path(include).resolve()) if include is not None else None)
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        where = f" (nor in --tasks-include {include})" if include else "; add your own with --tasks-include DIR"
        raise DusError(f"--tasks: lm-eval has no task {', '.join(unknown)}{where}; `lm-eval ls tasks` lists them")
    return manager


class LmEvalScorer:
    """Mean of one metric over lm-eval tasks; the search minimises, so a metric that is
    better when higher (as lm-eval says it is) is negated. No prefix cache: lm-eval makes
    its own forward calls, and nothing here proves a replay of them exact."""

    name = "lm-eval"

    def __init__(self, tasks: list[str], metric: str = "acc", limit: int | None = None, include: Path | None = None,
                 batch_size: int = 1):
        if not tasks:
            raise DusError("--tasks: name at least one lm-eval task")
        if limit is not None and limit < 1:
            raise DusError(f"--tasks-limit {limit}: give at least 1 document per task")
        if batch_size < 1:
            raise DusError(f"--tasks-batch-size {batch_size}: give at least 1")
        check_include(include)
        self.lm_eval = import_lm_eval()
        self.tasks, self.metric, self.limit, self.batch_size = list(tasks), metric, limit, batch_size
        self.include = str(Path(include).resolve()) if include is not None else None
        self.task_manager = task_manager(self.tasks, include)

    def settings(self) -> dict:
        from importlib.metadata import version

        return {"score": "lm-eval", "tasks": self.tasks, "tasks_metric": self.metric, "tasks_limit": self.limit,
                "tasks_include": self.include, "tasks_batch_size": self.batch_size, "lm_eval": version("lm_eval")}

    def fetch(self) -> None:
        """Load every task's data once, before the models: data that cannot be reached is
        one line now, and later calls read it from the datasets cache."""
        from lm_eval.tasks import get_task_dict

        try:
            with quiet(), own_random_state():
                get_task_dict(self.tasks, self.task_manager)
        except DusError:
            raise
        except Exception as error:
            raise DusError(self._failure(error)) from None

    def _failure(self, error: Exception) -> str:
        return unreachable_message(error) or f"lm-eval failed on tasks {','.join(self.tasks)}: {first_line(error, 300)}"

    def evaluate(self, model, tokenizer, log_samples: bool = False) -> dict:
        """lm-eval's own output for the model object (same seeds on every call)."""
        from lm_eval.models.huggingface import HFLM

        try:
            with quiet(), own_random_state():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
                output = self.lm_eval.simple_evaluate(model=lm, tasks=self.tasks, limit=self.limit,
                                                      task_manager=self.task_manager, log_samples=log_samples)
        except Exception as error:
            raise DusError(self._failure(error)) from None
        if not output or "results" not in output:
            raise DusError("lm-eval returned no results (is this the main process?)")
        return output

    def __call__(self, model, tokenizer) -> tuple[float, dict]:
        output = self.evaluate(model, tokenizer)
        per_task, values, directions = {}, [], set()
        for task in self.tasks:
            reported = output["results"].get(task)
            if reported is None:
                raise DusError(f"--tasks {task}: lm-eval reported no result under that name; give task or group names")
            key = pick_metric(task, reported, self.metric)
            values.append(float(reported[key]))
            directions.add(bool(output.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0], True)))
            per_task[task] = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if len(directions) > 1:
            raise DusError(f"--tasks-metric {self.metric} is better when higher on some tasks and lower on others; "
                           "search them one direction at a time")
        mean = sum(values) / len(values)
        higher = directions.pop()
        return (-mean if higher else mean), {"metric": self.metric, "mean": mean, "higher_is_better": higher, "tasks": per_task}
