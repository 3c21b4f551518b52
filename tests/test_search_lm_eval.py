"""dus search --tasks: lm-eval's score of a candidate in memory equals its score of the
built recipe loaded from disk; a search on tasks records each task's metrics and is
repeatable; without lm-eval, or without the task data, the refusal is one line before any
model is loaded. Offline: the task is a local JSONL loaded with --tasks-include."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dus.errors import DusError
from dus.search.space import Segment, canonical

N = 6
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


def _lm_eval_imports() -> bool:
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except Exception:
        return False
    return True


needs_lm_eval = pytest.mark.skipif(not _lm_eval_imports(), reason="lm-eval is not importable here: `pip install 'dus[test]'` (lm-eval>=0.4.13 under transformers 5)")


@pytest.fixture
def task_dir(tmp_path):
    """A three-way multiple-choice lm-eval task on a local JSONL (no hub)."""
    root = tmp_path / "tasks"
    root.mkdir()
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in ROWS))
    (root / "dus_tiny.yaml").write_text(
        "task: dus_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root


def options(output, tasks_dir, **overrides):
    from dus.search.run import SearchOptions

    settings = dict(output=Path(output), depth=(7, 9), segments=3, scale=(0.5, 1.0), evals=6, progress=False, population=3,
                    tasks=["dus_tiny"], tasks_include=tasks_dir)
    settings.update(overrides)
    return SearchOptions(**settings)


@needs_lm_eval
def test_lm_eval_scores_a_candidate_in_memory_as_the_built_recipe_loaded(tiny_models, task_dir, tmp_path):
    import lm_eval
    import numpy as np

    from dus.assemble import load_sources
    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator
    from dus.search.lm_eval_score import LmEvalScorer

    model = str(tiny_models("llama", num_layers=N).resolve())
    tokenizer = ModelDir(model).tokenizer()
    scorer = LmEvalScorer(["dus_tiny"], include=task_dir)
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    evaluator = Evaluator(load_sources(plan, torch.float32), tokenizer, scorer)
    assert evaluator.prefix is None  # lm-eval's calls are its own: no prefix cache
    candidate = canonical([Segment(model, 0, 4, 0.85), Segment(model, 1, 5, 0.55), Segment(model, 3, 6)])
    state = np.random.get_state()[1].copy()
    score, cached = evaluator(candidate)
    assert not cached and evaluator(candidate) == (score, True)
    assert (np.random.get_state()[1] == state).all()  # lm-eval's seeding does not leak into the optimizer's draws
    assert score.value == -score.metrics["mean"] == -score.metrics["tasks"]["dus_tiny"]["acc,none"]
    assert score.metrics["tasks"]["dus_tiny"]["sample_len"] == len(ROWS)

    build_model(candidate.recipe(), tmp_path / "built")
    from_disk = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'built'},dtype=float32", device="cpu",
                                        batch_size=1, tasks=["dus_tiny"], task_manager=scorer.task_manager)
    reported = {k: v for k, v in from_disk["results"]["dus_tiny"].items() if isinstance(v, float)}
    assert reported == {k: v for k, v in score.metrics["tasks"]["dus_tiny"].items() if k in reported}  # exactly, float32

    def loglikelihoods(output):
        return [s["filtered_resps"] for s in output["samples"]["dus_tiny"]]

    in_memory = evaluator.model(candidate)
    evaluator.scaled.apply(in_memory)
    assert loglikelihoods(scorer.evaluate(in_memory, tokenizer, log_samples=True)) == loglikelihoods(from_disk)
    unscaled = evaluator.model(canonical([Segment(model, 0, 4), Segment(model, 1, 5), Segment(model, 3, 6)]))
    assert loglikelihoods(scorer.evaluate(unscaled, tokenizer, log_samples=True)) != loglikelihoods(from_disk)


@needs_lm_eval
def test_a_search_on_lm_eval_tasks_records_each_task_and_repeats(tiny_models, task_dir, tmp_path, run_cli):
    from dus.search.run import search

    model = tiny_models("llama", num_layers=N)
    out = tmp_path / "search"
    result = run_cli("search", model, "--depth", "7:9", "--scale", "0.5:1", "--evals", "6", "--population", "3",
                     "--optimizer", "cma", "--tasks", "dus_tiny", "--tasks-include", task_dir, "--tasks-metric", "acc_norm",
                     "--tasks-limit", "6", "--top", "2", "-o", out)
    assert result.code == 0, result
    data = json.loads((out / "search.json").read_text())
    settings = data["settings"]
    assert settings["score"] == "lm-eval" and settings["tasks"] == ["dus_tiny"] and settings["tasks_metric"] == "acc_norm"
    assert settings["tasks_limit"] == 6 and settings["lm_eval"]
    assert len(data["candidates"]) == 6
    for entry in data["candidates"]:
        task = entry["metrics"]["tasks"]["dus_tiny"]
        assert task["sample_len"] == 6 and "acc,none" in task and "acc_norm,none" in task
        assert entry["value"] == -entry["metrics"]["mean"] == -task["acc_norm,none"]  # maximised
    best = data["ranked"][0]["metrics"]["mean"]
    assert best == max(c["metrics"]["mean"] for c in data["candidates"])
    assert "mean acc_norm" in (out / "rank-1.yaml").read_text()

    again = search([str(model)], options(tmp_path / "again", task_dir, optimizer="cma", tasks_metric="acc_norm", tasks_limit=6))
    trail = lambda result: [(c["candidate"], c["x"], c["value"]) for c in result["candidates"]]
    assert trail(again) == trail(data)  # the same seed, the same search


@needs_lm_eval
def test_lm_eval_bad_tasks_and_unreachable_data_get_one_line_before_loading(tiny_models, task_dir, tmp_path, run_cli, monkeypatch):
    import dus.assemble

    monkeypatch.setattr(dus.assemble, "load_sources", lambda *a, **k: pytest.fail("sources loaded before the refusal"))
    (task_dir / "dus_far.yaml").write_text(
        "task: dus_far\ndataset_path: dus-tests/never-cached\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n'
    )
    model = tiny_models("llama", num_layers=N)
    base = ["search", model, "--depth", "8", "--tasks-include", task_dir, "-o", tmp_path / "out"]
    for extra, message in [
        (["--tasks", "dus_nowhere"], "lm-eval has no task dus_nowhere"),
        (["--tasks", "dus_far"], "could not reach its task datasets"),
        (["--tasks", "dus_tiny", "--score", "dus.errors:DusError"], "two fitnesses"),
        (["--tasks", "dus_tiny", "--tasks-limit", "0"], "at least 1 document"),
    ]:
        result = run_cli(*base, *extra)
        lines = result.stderr.strip().splitlines()
        assert result.code == 2 and len(lines) == 1 and message in lines[0], result
        assert not (tmp_path / "out").exists()


def test_without_lm_eval_tasks_are_refused_in_one_line_before_loading(tiny_models, tmp_path, run_cli, monkeypatch):
    import dus.assemble

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(dus.assemble, "load_sources", lambda *a, **k: pytest.fail("sources loaded before the refusal"))
    result = run_cli("search", tiny_models("llama", num_layers=N), "--depth", "8", "--tasks", "hellaswag", "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result
    assert lines[0].startswith("dus: error: --tasks: lm-evaluation-harness is not installed: `pip install 'dus[eval]'`"), result
    assert not (tmp_path / "out").exists()
    with pytest.raises(DusError, match="not installed"):
        from dus.search.lm_eval_score import import_lm_eval

        import_lm_eval()
