"""`dus search --heal-steps`: the fitness after a short heal in memory. Successive halving
prunes (most candidates cost only their unhealed score), a candidate's healed score equals
the same candidate built and healed on disk with the same config and steps, the loaded
sources come out of every heal as they went in, a resumed search keeps its rungs, and
settings that cannot run are refused in one line before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dus.errors import DusError

N = 6
HEAL = {  # a short, fast heal of a tiny model (the default heal config otherwise)
    "sft.warmup_steps": 0,
    "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2,
    "sft.max_length": 64,
    "seam.radius": 1,
    "calibrate.tokens": 256,
    "calibrate.window": 64,
}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("search-healed")
    make_tiny_model(root / "source", "llama", num_layers=N, seed=5)
    prose = "\n\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(300))
    (root / "prose.txt").write_text(prose + "\n")
    (root / "score.txt").write_text("A candidate is scored on other text than it heals on. " * 30)
    return root


def options(space, output, **overrides):
    from dus.search.run import SearchOptions

    settings = dict(output=Path(output), data=[space / "score.txt"], depth=(8, 8), segments=3, scale=(0.5, 1.0),
                    evals=9, window=64, max_tokens=256, progress=False, heal_steps=4, heal_rungs=2, halving=2,
                    heal_set={**HEAL, "data.path": str(space / "prose.txt")})
    settings.update(overrides)
    return SearchOptions(**settings)


@pytest.fixture(scope="module")
def searched(space):
    from dus.search.run import search

    out = space / "search"
    return out, search([str(space / "source")], options(space, out))


def test_successive_halving_prunes_and_ranks_longer_heals_first(searched):
    from dus.search import journal

    out, result = searched
    states = [t.state.name for t in journal.study_trials(journal.open_storage(out, None, create=False))]
    assert states.count("PRUNED") >= 3 and states.count("COMPLETE") >= 1, states
    candidates = result["candidates"]
    assert len(candidates) == 9
    reached = [c["rung"] for c in candidates]
    assert reached.count(0) >= 3 and max(reached) == 2  # most stop at the unhealed score; some heal 2, then 4 steps
    for entry in candidates:
        assert len(entry["rungs"]) == entry["rung"] + 1 and entry["value"] == entry["rungs"][-1]
        assert entry["pruned"] == (entry["rung"] < 2)
        assert entry["metrics"].get("heal_steps", 0) == [0, 2, 4][entry["rung"]]
    ranked = result["ranked"]
    assert [r["rung"] for r in ranked] == sorted((r["rung"] for r in ranked), reverse=True)
    assert result["settings"]["healed"]["steps"] == [2, 4]
    assert ranked[0]["rung"] == 2 and "after 4 heal steps" in (out / "rank-1.yaml").read_text().splitlines()[1]


def test_a_healed_score_equals_the_candidate_built_and_healed_on_disk(space, searched, tmp_path):
    """Same config, seed and steps: `dus build` + `dus heal` + load + score give the score the
    search recorded for the candidate at its top rung, exactly."""
    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.heal.config import load_config
    from dus.heal.run import heal
    from dus.measure.text import read_text, tokenize_stream
    from dus.search.fitness import PerplexityScorer
    from dus.search.space import Candidate

    _, result = searched
    best = result["ranked"][0]
    assert best["rung"] == 2
    build_model(Candidate.from_dict(best["candidate"]).recipe(), tmp_path / "built")
    settings = {**HEAL, "data.path": str(space / "prose.txt"), "sft.max_steps": 4, "sft.report_to": "none"}
    heal(tmp_path / "built", tmp_path / "healed", load_config("heal", settings))
    loaded = ModelDir(tmp_path / "healed").load_model(torch.float32, quiet=True).eval()
    ids = tokenize_stream(ModelDir(space / "source").tokenizer(), read_text(space / "score.txt"), 256)
    value, metrics = PerplexityScorer([ids], 64, 64)(loaded, None)
    assert value == pytest.approx(best["value"], rel=1e-6, abs=0)
    assert value != best["rungs"][0]  # the heal changed the score: the comparison is not of two unhealed models


@pytest.mark.parametrize("config", ["heal", "lora-seam"])
def test_the_sources_come_out_of_a_heal_as_they_went_in(space, config):
    """A candidate's unhealed score after another candidate was healed over the same loaded
    sources is bitwise its score before; no source tensor changed."""
    from dus.assemble import load_sources
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, PerplexityScorer
    from dus.search.healed import CandidateHealer, HealSchedule
    from dus.search.space import Segment, canonical

    source = str((space / "source").resolve())
    whole = {"merge_method": "passthrough", "slices": [{"sources": [{"model": source, "layer_range": [0, 1]}]}]}
    sources = load_sources(resolve(load_recipe(whole)).plan, torch.float32)
    before = {name: tensor.clone() for name, tensor in sources[source].state_dict().items()}
    tokenizer = ModelDir(source).tokenizer()
    ids = tokenize_stream(tokenizer, read_text(space / "score.txt"), 256)
    evaluator = Evaluator(sources, tokenizer, PerplexityScorer([ids], 64, 64), prefix_budget=0)
    schedule = HealSchedule(3, 1, 2, config, tuple(sorted({**HEAL, "data.path": str(space / "prose.txt")}.items())))
    healer = CandidateHealer(evaluator, schedule, space / "source")
    solar = canonical([Segment(source, 0, 4), Segment(source, 2, 6)])
    other = canonical([Segment(source, 0, 3), Segment(source, 1, 6, 0.7)])
    first, _ = evaluator(other)
    healed, metrics, _ = healer(solar, 1)
    assert metrics["heal_steps"] == 3 and healed != evaluator(solar)[0].value
    evaluator.cache.clear()
    again, cached = evaluator(other)
    assert not cached and again.value == first.value
    after = sources[source].state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert healer(solar, 1)[0] == healed  # cached per (candidate, rung)


def test_a_resumed_healed_search_keeps_its_rungs(space, tmp_path):
    from dus.search.run import search

    out = tmp_path / "resumed"
    first = search([str(space / "source")], options(space, out, evals=4))
    again = search([str(space / "source")], options(space, out, evals=6))
    assert again["candidates"][:4] == first["candidates"]
    assert len(again["candidates"]) == 6 and all("rungs" in c for c in again["candidates"])


def test_the_cli_runs_a_healed_search(space, tmp_path, run_cli):
    sets = [item for key, value in {**HEAL, "data.path": str(space / "prose.txt")}.items()
            for item in ("--heal-set", f"{key}={value}")]
    out = tmp_path / "cli"
    result = run_cli("search", space / "source", "--data", space / "score.txt", "--depth", "8", "--evals", "4",
                     "--window", "64", "--max-tokens", "128", "--heal-steps", "2", "--halving", "2", *sets, "-o", out)
    assert result.code == 0, result
    data = json.loads((out / "search.json").read_text())
    assert data["settings"]["healed"]["steps"] == [2] and data["ranked"][0]["rung"] == 1
    assert data["note"] is None and "note:" not in result.stdout  # a healed ranking needs no warning
    assert "heal steps" in result.stdout  # the table's column of how long each ranked candidate healed
    assert ("(pruned)" in result.stdout) == any(entry["rung"] == 0 for entry in data["ranked"])


@pytest.mark.parametrize("overrides, message", [
    ({"heal_steps": -3}, "--heal-steps -3: give at least 1 heal step"),
    ({"heal_rungs": 0}, "--heal-rungs 0: give at least 1 healed rung"),
    ({"halving": 1}, "--halving 1: successive halving keeps 1 in FACTOR"),
    ({"heal_steps": 2, "heal_rungs": 3}, "the lowest rung would heal less than 1 step"),
    ({"optimizer": "cma"}, "--heal-steps with --optimizer cma"),
    ({"heal_config": "qlora"}, "cannot run there"),
    ({"heal_config": "full"}, "cannot run there"),
    ({"heal_set": {"sft.learnin_rate": 1}}, "learnin_rate"),
    ({"heal_steps": 0, "heal_set": {"sft.learning_rate": 1e-3}}, "add --heal-steps N to use it"),
    ({"score": "x.py:f"}, "--score and --tasks are not supported with it"),
    ({"heal_set": {"data.path": "/nonexistent/heal.jsonl"}}, "/nonexistent/heal.jsonl"),
    ({"heal_set": {"data.path": "/nonexistent/heal.jsonl"}, "workers": 2}, "/nonexistent/heal.jsonl"),
    ({"heal_set": {"distill.combine": "route"}}, "a search's candidates have no named teachers"),
])
def test_a_healed_fitness_that_cannot_run_is_one_line_and_writes_nothing(space, tmp_path, overrides, message,
                                                                         monkeypatch):
    from dus.search.run import search

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two workers need two GPUs where there are GPUs: the CPU's bound

    out = tmp_path / "refused"
    with pytest.raises(DusError, match=None) as error:
        search([str(space / "source")], options(space, out, **overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("steps, rungs, halving, most", [
    (2, 1000, 3, 1), (2, 3, 2, 2), (8, 3, 3, 2), (10 ** 6, 10 ** 9, 2, 20), (1, 2, 10 ** 40, 1),
])
def test_a_schedule_of_too_many_rungs_is_refused_with_a_readable_bound(steps, rungs, halving, most):
    """However many rungs are asked for (--heal-rungs 1000 once printed a 477-digit step count),
    the refusal names the most rungs the steps allow and stays a short line; that bound is
    exact: one rung more is refused, it itself is accepted."""
    from dus.search.healed import check_schedule

    with pytest.raises(DusError) as error:
        check_schedule(steps, rungs, halving)
    line = str(error.value)
    assert f"give --heal-rungs {most} or fewer" in line and len(line) < 300, line
    check_schedule(steps, most, halving)
    with pytest.raises(DusError):
        check_schedule(steps, most + 1, halving)


def test_two_workers_share_one_healed_search(space, tmp_path, run_cli, monkeypatch):
    """The pruner's rungs live in the study, so two worker processes halve one search: every
    trial recorded once, some pruned, some healed, both workers scoring."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two workers need two GPUs where there are GPUs: on the CPU here
    from collections import Counter

    from dus.search import journal

    sets = [item for key, value in {**HEAL, "data.path": str(space / "prose.txt")}.items()
            for item in ("--heal-set", f"{key}={value}")]
    out = tmp_path / "two"
    result = run_cli("search", space / "source", "--data", space / "score.txt", "--depth", "8", "--evals", "8",
                     "--window", "64", "--max-tokens", "128", "--heal-steps", "2", "--halving", "2", "--workers", "2",
                     "--optimizer", "random", *sets, "-o", out)
    assert result.code == 0, result
    found = journal.study_trials(journal.open_storage(out, None, create=False))
    states = Counter(t.state.name for t in found)
    assert states["COMPLETE"] + states["PRUNED"] in (8, 9, 10) and states["PRUNED"] >= 1 and states["COMPLETE"] >= 1
    assert len({t.user_attrs["dus_worker"]["pid"] for t in found}) == 2
    data = json.loads((out / "search.json").read_text())
    assert len({c["trial"] for c in data["candidates"]}) == len(data["candidates"]) == states["COMPLETE"] + states["PRUNED"]


def test_dry_run_shows_the_heal_schedule(space, tmp_path, run_cli):
    result = run_cli("search", space / "source", "--data", space / "score.txt", "--depth", "8", "--heal-steps", "9",
                     "--heal-rungs", "2", "--dry-run", "-o", tmp_path / "dry")
    assert result.code == 0, result
    assert "healed fitness" in result.stdout and "heal steps 3, 9" in result.stdout
    assert not (tmp_path / "dry").exists()
