"""dus compare --tasks with the user's own lm-eval tasks (--tasks-include DIR, as dus search
takes it): a real lm-eval run on a tiny local multiple-choice task; each model's scores,
with the harness's standard error, in metrics.json and the report beside perplexity, equal
to lm-eval's own run of the same task on the same model; a task the directory does not
define, or a directory that is not one, is one line before any model is measured."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


def _lm_eval_imports() -> bool:
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except Exception:
        return False
    return True


needs_lm_eval = pytest.mark.skipif(not _lm_eval_imports(), reason="lm-eval is not importable here: `pip install 'dus[eval]'`")

ROWS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Fire feels", ["cold", "hot", "square"], 1),
    ("Ice is made of frozen", ["sand", "light", "water"], 2),
    ("A week has seven", ["days", "wheels", "colours"], 0),
    ("Snow is usually", ["black", "white", "sweet"], 1),
    ("Cats like to chase", ["clouds", "taxes", "mice"], 2),
    ("At night the sky is", ["dark", "bright", "wet"], 0),
    ("Bread is baked in an", ["river", "oven", "envelope"], 1),
]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def task_dir(tmp_path):
    """docs/compare.md's example: a JSONL of questions, a YAML that names it."""
    root = tmp_path / "my-tasks"
    root.mkdir()
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ROWS))
    (root / "facts.yaml").write_text(
        "task: my_facts\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


@needs_lm_eval
def test_compare_scores_each_model_on_the_users_task_with_its_stderr(tiny_models, task_dir, heldout, tmp_path, run_cli):
    import lm_eval
    from lm_eval.tasks import TaskManager

    models = [tiny_models("llama", 4, seed=0), tiny_models("llama", 4, seed=1)]
    out = tmp_path / "out"
    result = run_cli("compare", *models, "--data", heldout, "-o", out, "--no-generate", "--window", 64,
                     "--dtype", "float32", "--device", "cpu", "--tasks", "my_facts", "--tasks-include", task_dir)
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["tasks_include"] == str(task_dir.resolve())
    report = (out / "report.md").read_text()
    manager = TaskManager(include_path=str(task_dir))
    for model, measured in zip(models, metrics["models"]):
        assert measured["perplexity"]["perplexity"] > 0  # beside perplexity
        assert measured["lm_eval"]["status"] == "ok", measured["lm_eval"]
        score = measured["lm_eval"]["scores"]["my_facts"]["acc,none"]
        # lm-eval's own run of the same task on the same model gives the same score and error
        own = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=["my_facts"],
                                      device="cpu", batch_size=1, task_manager=manager)
        assert score["value"] == pytest.approx(own["results"]["my_facts"]["acc,none"])
        assert score["stderr"] == pytest.approx(own["results"]["my_facts"]["acc_stderr,none"])
        # the harness's standard error of a mean of 0/1 over n documents
        n = len(ROWS)
        assert score["stderr"] == pytest.approx(math.sqrt(score["value"] * (1 - score["value"]) / (n - 1)))
        assert f"{score['value']:.4f} ± {score['stderr']:.4f}" in report
    assert "my_facts acc,none" in report


@needs_lm_eval
def test_a_task_the_directory_does_not_define_is_one_line_before_any_model(tiny_models, task_dir, heldout, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", out, "--no-generate",
                     "--tasks", "my_factz", "--tasks-include", task_dir)
    assert result.code == 2
    assert result.stderr.strip().splitlines() == [
        f"dus: error: --tasks: lm-eval has no task my_factz (nor in --tasks-include {task_dir}); `lm-eval ls tasks` lists them"]
    assert not out.exists()


def test_tasks_include_must_be_a_directory_and_needs_tasks(tiny_models, heldout, tmp_path, run_cli):
    from dus.errors import DusError
    from dus.search.lm_eval_score import LmEvalScorer

    missing = tmp_path / "nowhere"
    compare = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", tmp_path / "out", "--no-generate",
                      "--tasks", "my_facts", "--tasks-include", missing)
    assert compare.code == 2
    with pytest.raises(DusError) as search:  # the search's own refusal, word for word
        LmEvalScorer(["my_facts"], include=missing)
    assert compare.stderr.strip() == f"dus: error: {search.value}"
    alone = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", tmp_path / "out", "--no-generate",
                    "--tasks-include", tmp_path)
    assert alone.code == 2 and "name the tasks to run with --tasks" in alone.stderr
    limit = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", tmp_path / "out", "--no-generate",
                    "--tasks", "my_facts", "--tasks-limit", 0)
    assert limit.code == 2 and "--tasks-limit 0: give at least 1 document per task" in limit.stderr
    assert not (tmp_path / "out").exists()
