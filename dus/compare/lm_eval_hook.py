"""Optional benchmark scores from lm-evaluation-harness (`--tasks`).

dus does not depend on lm-eval (it pins its own torch and datasets and downloads its
task data from the Hugging Face hub); when it is missing, or its data cannot be reached,
the comparison carries on and the report says why the scores are absent.
"""

from __future__ import annotations

INSTALL = "lm-evaluation-harness is not installed: `pip install 'dus[eval]'` (or `pip install lm-eval`)"
INSTALL_HINT = f"{INSTALL} to add --tasks scores"
NETWORK_WORDS = ("connection", "offline", "resolve", "network", "timed out", "timeout", "couldn't reach", "could not reach", "hub", "404", "max retries", "name or service")


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def first_line(error: BaseException, width: int) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return (text.splitlines() or [""])[0][:width]


def unreachable_message(error: BaseException) -> str | None:
    """The one line for task data that could not be downloaded, or None for other errors
    (lm-eval and datasets word these in many ways; the words below cover those seen)."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, (ConnectionError, TimeoutError)) or any(word in text.lower() for word in NETWORK_WORDS):
        return (
            f"lm-eval could not reach its task datasets ({first_line(error, 200)}); they download from the "
            "Hugging Face hub: run where the hub is reachable, or pre-cache the datasets and set HF_DATASETS_OFFLINE=1"
        )
    return None


def parse_tasks(tasks: str | None) -> list[str]:
    return [task.strip() for task in (tasks or "").split(",") if task.strip()]


def run_tasks(model_dir: str, tasks: list[str], device: str, dtype: str, limit: int | None = None, batch_size: int = 1,
              task_manager=None) -> dict:
    """{"status": "ok", "results": {task: {metric: value}}, "scores": {task: {metric: {"value": v,
    "stderr": s}}}} or {"status": ..., "message": ...}. `task_manager`: lm-eval's, with the
    user's own tasks (dus.search.lm_eval_score.task_manager, as `dus search --tasks` uses)."""
    try:
        import lm_eval
    except ImportError:
        return {"status": "not-installed", "message": INSTALL_HINT}
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype={dtype},trust_remote_code=False",
            tasks=tasks,
            device=device,
            batch_size=batch_size,
            limit=limit,
            task_manager=task_manager,
        )
    except Exception as error:  # lm-eval raises many kinds; none of them should sink the comparison
        message = unreachable_message(error)
        if message:
            return {"status": "unreachable", "message": message}
        return {"status": "failed", "message": f"lm-eval failed on tasks {','.join(tasks)}: {first_line(error, 300)}"}
    if not output or "results" not in output:
        return {"status": "failed", "message": "lm-eval returned no results (is this the main process?)"}
    results = {}
    for task, metrics in output["results"].items():
        results[task] = {
            key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return {"status": "ok", "results": results, "scores": {task: with_stderr(metrics) for task, metrics in results.items()}}


def with_stderr(metrics: dict) -> dict:
    """lm-eval's flat metrics ("acc,none", "acc_stderr,none") as {"acc,none": {"value": v,
    "stderr": s}}; stderr None where the harness gives none (it writes "N/A")."""
    paired = {}
    for key, value in metrics.items():
        name, comma, rest = key.partition(",")
        if name.endswith("_stderr"):
            continue
        stderr = metrics.get(f"{name}_stderr{comma}{rest}")
        paired[key] = {"value": value, "stderr": stderr}
    return paired
