"""dus search: a candidate scored in memory scores exactly as its built recipe does; a
seed fixes the search; a killed search resumes to the same end; constraints hold; bad
input gets one line and writes nothing; the found recipe builds into what was scored."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from conftest import copy_with_two_token_ids_swapped

from dus.errors import DusError
from dus.search.space import Candidate, SearchSpace, Segment, apportion, canonical

TEXT = (
    "A search over layer paths scores each candidate on ordinary text. The best path keeps "
    "the early layers, repeats a middle block, and ends with the last layers of the source. "
) * 8
N = 6


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def options(output, data, **overrides):
    from dus.search.run import SearchOptions

    settings = dict(output=Path(output), data=[Path(data)] if data else [], depth=(8, 8), segments=3, scale=(0.5, 1.0), evals=14,
                    window=64, max_tokens=256, progress=False, population=4)
    settings.update(overrides)
    return SearchOptions(**settings)


def run(models, opts):
    from dus.search.run import search

    return search([str(m) for m in models], opts)


def trail(result: dict) -> list[tuple[str, float]]:
    return [(json.dumps(c["candidate"], sort_keys=True), c["value"]) for c in result["candidates"]]


def trial_states(output) -> dict[str, int]:
    """How many of the study's trials (in `output`'s journal) are in each state."""
    from collections import Counter

    from dus.search import journal

    return dict(Counter(t.state.name for t in journal.study_trials(journal.open_storage(output, None, create=False))))


def journal_line(lines: list[bytes], trial: int, what: bytes) -> int:
    """The index of the journal line recording `what` (b'"values"', b'"dus"') of trial `trial`."""
    return next(i for i, line in enumerate(lines) if f'"trial_id":{trial},'.encode() in line and what in line)


# --- the encoding -------------------------------------------------------------------


def test_decoding_is_deterministic_and_stays_inside_the_constraints():
    rng = random.Random(0)
    space = SearchSpace(("a", "b"), (30, 30), 40, 48, segments=4, scale_min=0.5, scale_max=1.0, anchored=True)
    for _ in range(300):
        x = [rng.uniform(-0.2, 1.2) for _ in range(space.dimension)]
        candidate = space.decode(x)
        assert candidate == space.decode(list(x))
        assert 40 <= candidate.depth <= 48
        assert candidate.segments[0].start == 0 and candidate.segments[-1].end == 30
        for segment in candidate.segments:
            assert 0 <= segment.start < segment.end <= 30 and 0.5 <= segment.scale <= 1.0
            assert segment.scale in space.scale_levels()
    free = SearchSpace(("a",), (30,), 44, 44, segments=3, anchored=False)
    starts = {free.decode([rng.random() for _ in range(free.dimension)]).segments[0].start for _ in range(50)}
    assert starts != {0}  # free paths may start above layer 0


def test_solar_is_in_the_space_and_neighbours_merge():
    space = SearchSpace(("m",), (30,), 44, 44, segments=2)
    candidates = {space.decode([a / 20, b / 20]) for a in range(21) for b in range(21)}
    solar = canonical([Segment("m", 0, 22), Segment("m", 8, 30)])
    assert solar in candidates
    assert all(c.segments[0].start == 0 and c.segments[-1].end == 30 for c in candidates)
    assert canonical([Segment("m", 0, 4), Segment("m", 4, 9)]) == Candidate((Segment("m", 0, 9),))
    assert canonical([Segment("m", 0, 4), Segment("m", 4, 9, 0.7)]).depth == 9
    assert len(canonical([Segment("m", 0, 4), Segment("m", 4, 9, 0.7)]).segments) == 2


def test_apportion_sums_to_the_depth_within_the_cap():
    rng = random.Random(1)
    for _ in range(200):
        k, cap = rng.randint(1, 5), rng.randint(1, 12)
        total = rng.randint(k, k * cap)
        lengths = apportion(total, [rng.uniform(0.05, 1) for _ in range(k)], cap)
        assert sum(lengths) == total and all(1 <= n <= cap for n in lengths)


def test_the_recipe_scales_only_output_projections_never_below_half():
    candidate = canonical([Segment("m", 0, 5), Segment("m", 2, 6, 0.65)])
    recipe = candidate.recipe()
    assert "parameters" not in recipe["slices"][0]
    assert recipe["slices"][1]["parameters"]["scale"] == [{"filter": "o_proj", "value": 0.65}, {"filter": "down_proj", "value": 0.65}]
    with pytest.raises(DusError, match="0.5"):
        SearchSpace(("m",), (6,), 8, 8, scale_min=0.4, scale_max=1.0)


# --- scores ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_in_memory_score_equals_the_built_recipe_loaded(arch, tiny_models, text, tmp_path):
    from dus.assemble import load_sources
    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, PerplexityScorer

    model = str(tiny_models(arch, num_layers=N).resolve())
    tokenizer = ModelDir(model).tokenizer()
    ids = tokenize_stream(tokenizer, read_text(text), 200)
    scorer = PerplexityScorer([ids], 64, 64)
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    evaluator = Evaluator(load_sources(plan, torch.float32), tokenizer, scorer)
    candidate = canonical([Segment(model, 0, 4, 0.85), Segment(model, 1, 5, 0.55), Segment(model, 3, 6)])
    score, cached = evaluator(candidate)
    assert not cached and evaluator(candidate) == (score, True)

    build_model(candidate.recipe(), tmp_path / "built")
    built = ModelDir(tmp_path / "built").load_model(torch.float32, quiet=True).eval()
    value, metrics = scorer(built, tokenizer)
    assert built.config.num_hidden_layers == candidate.depth == 11
    assert value == score.value and metrics == score.metrics  # exactly, float32
    plain, _ = evaluator(canonical([Segment(model, 0, 4), Segment(model, 1, 5), Segment(model, 3, 6)]))
    assert plain.value != score.value  # the scales are really applied


def test_same_shape_windows_of_several_streams_are_scored_in_one_forward_call(tiny_models, text):
    """The scorer batches windows of one shape across streams; the score is what the windows
    scored one at a time (`dus compare`'s evaluate_stream) give, to float32 rounding."""
    from dus.checkpoint import ModelDir
    from dus.measure.perplexity import PerplexityResult, evaluate_stream
    from dus.measure.text import read_text, tokenize_stream
    from dus.search.fitness import PerplexityScorer

    directory = ModelDir(tiny_models("llama", num_layers=N))
    model, tokenizer = directory.load_model(torch.float32, quiet=True).eval(), directory.tokenizer()
    ids = tokenize_stream(tokenizer, read_text(text), 400)
    streams = [ids[:100], ids[100:200], ids[200:300], ids[300:]]
    scorer = PerplexityScorer(streams, 64, 48)
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    value, metrics = scorer(model, tokenizer)
    handle.remove()
    windows = [evaluate_stream(model, stream, 64, 48) for stream in streams]
    one_at_a_time = PerplexityResult(sum(w.nll_sum for w in windows), sum(w.tokens for w in windows))
    assert metrics["tokens_scored"] == one_at_a_time.tokens
    assert value == pytest.approx(one_at_a_time.mean_nll, rel=1e-6)
    assert len(calls) == 2 and sorted(shape[0] for shape in calls) == [4, 4]  # 8 windows, two shapes
    assert scorer.tokens_fed() == sum(shape[0] * shape[1] for shape in calls)
    scorer.batch_tokens = 64  # a window a call: the same windows, one at a time
    assert scorer(model, tokenizer)[0] == pytest.approx(value, rel=1e-6) and len(scorer.batches(1)) == 8


def _evaluators(model: str, text, **budgets):
    """A plain evaluator (no prefix cache, per-call scale products) and one with the given budgets."""
    from dus.assemble import load_sources
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator, PerplexityScorer

    tokenizer = ModelDir(model).tokenizer()
    ids = tokenize_stream(tokenizer, read_text(text), 200)
    scorer = PerplexityScorer([ids[:90], ids[90:]], 64, 48)  # two streams, overlapping windows: several calls
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    sources = load_sources(plan, torch.float32)
    plain = Evaluator(sources, tokenizer, scorer, prefix_budget=0, scaled_budget=0)
    return plain, Evaluator(sources, tokenizer, scorer, **budgets), scorer, tokenizer


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral"])
def test_the_prefix_cache_scores_exactly_as_without_it_and_as_built(arch, tiny_models, text, tmp_path):
    from dus.build import build_model
    from dus.checkpoint import ModelDir

    model = str(tiny_models(arch, num_layers=N).resolve())
    plain, cached, scorer, tokenizer = _evaluators(model, text)
    assert plain.prefix is None and plain.scaled is None and cached.prefix is not None and cached.scaled is not None
    S = lambda start, end, scale=1.0: Segment(model, start, end, scale)
    base = canonical([S(0, N)])
    # (candidate, layers the cache lets it skip): prefixes shared at a segment boundary (4, 8),
    # at an even length inside a segment (4 of [0, 5)), the whole base (6), none (other scales)
    trail_ = [
        (base, 0),
        (canonical([S(0, 4), S(1, 5), S(3, 6)]), 4),
        (canonical([S(0, 4), S(1, 6)]), 8),
        (canonical([S(0, 4), S(2, 6)]), 4),
        (canonical([S(0, 4), S(1, 5), S(2, 6)]), 8),
        (canonical([S(0, 5), S(2, 6, 0.7)]), 4),
        (canonical([S(0, N), S(3, N)]), N),
        (canonical([S(0, 3, 0.5), S(2, N, 0.75)]), 0),
        (canonical([S(0, 3, 0.5), S(2, 4, 0.75), S(1, 5)]), 4),
    ]
    for candidate, skip in trail_:
        before = cached.prefix.layers_skipped
        got, _ = cached(candidate)
        assert cached.prefix.layers_skipped - before == skip, candidate.describe()
        want, _ = plain(candidate)
        assert got.value == want.value and got.metrics == want.metrics, candidate.describe()  # bitwise, float32
    assert cached.scaled.entries  # x0.7 and x0.75 (not powers of two) were read from kept products
    cached.cache.clear()  # the base again: every layer a stand-in, only the norm and head run
    before = cached.prefix.layers_skipped
    again, _ = cached(base)
    assert cached.prefix.layers_skipped - before == N and again.value == plain(base)[0].value

    candidate = trail_[3][0]
    build_model(candidate.recipe(), tmp_path / "built")
    built = ModelDir(tmp_path / "built").load_model(torch.float32, quiet=True).eval()
    value, metrics = scorer(built, tokenizer)
    assert value == cached(candidate)[0].value and metrics == cached(candidate)[0].metrics


def test_the_prefix_cache_keeps_to_its_budget_and_drops_the_least_recently_used():
    from dus.search.prefix import PrefixCache

    state = torch.zeros(10, dtype=torch.float32)  # 40 bytes
    cache = PrefixCache(budget=100)
    keys = [(("m", i, 1.0),) for i in range(3)]
    cache.put(keys[0], [state])
    cache.put(keys[1], [state])
    assert cache.longest(keys[:1]) == (1, [state])  # key 0 is now the most recent
    cache.put(keys[2], [state])
    assert list(cache.entries) == [keys[0], keys[2]] and cache.bytes == 80
    cache.put((("big", 0, 1.0),), [torch.zeros(30)])  # larger than the budget: not kept
    assert cache.bytes == 80


def test_the_kept_states_and_scale_products_stay_within_their_budgets(tiny_models, text):
    from dus.assemble import ScaledLinear

    model = str(tiny_models("llama", num_layers=N).resolve())
    _, small, scorer, _ = _evaluators(model, text, scaled_budget=1)
    point = scorer.tokens_fed() * 32 * 4  # one kept state: every token fed x hidden size 32 x float32
    small.prefix.budget = 2 * point  # what a candidate keeps is held to half the budget: one state
    candidate = canonical([Segment(model, 0, 4, 0.7), Segment(model, 1, 6, 0.8)])
    assembled = small.model(candidate)
    assert small.scaled.apply(assembled) == 0 and any(isinstance(m, ScaledLinear) for m in assembled.modules())
    small(candidate)
    assert len(small.prefix.entries) == 1 and small.prefix.bytes == point


def test_a_user_function_is_scored_without_the_prefix_cache(tiny_models, text):
    from dus.assemble import load_sources
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator

    model = str(tiny_models("llama", num_layers=N).resolve())
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    calls = []
    evaluator = Evaluator(load_sources(plan, torch.float32), None, lambda m, t: (calls.append(m) or 1.0, {}))
    evaluator(canonical([Segment(model, 0, N)]))
    assert evaluator.prefix is None and len(calls) == 1 and len(calls[0].model.layers) == N


# --- the search -----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["cma", "tpe", "random"])
def test_the_same_seed_gives_the_same_search(optimizer, tiny_models, text, tmp_path):
    model = tiny_models("llama", num_layers=N)
    first = run([model], options(tmp_path / "a", text, optimizer=optimizer))
    again = run([model], options(tmp_path / "b", text, optimizer=optimizer))
    other = run([model], options(tmp_path / "c", text, optimizer=optimizer, seed=5))
    assert trail(first) == trail(again)
    assert trail(first) != trail(other)
    assert (tmp_path / "a" / "rank-1.yaml").read_text() == (tmp_path / "b" / "rank-1.yaml").read_text()
    assert first["evaluations"] == 14 and first["model_runs"] <= 14


def test_a_killed_search_resumes_and_ends_as_an_uninterrupted_one(tiny_models, text, tmp_path, monkeypatch):
    from dus.search import fitness

    model = tiny_models("llama", num_layers=N)
    whole = run([model], options(tmp_path / "whole", text, evals=20))

    calls = {"n": 0}
    real = fitness.Evaluator.__call__

    def dies_after_seven(self, candidate):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(self, candidate)

    monkeypatch.setattr(fitness.Evaluator, "__call__", dies_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run([model], options(tmp_path / "cut", text, evals=20))
    # the interrupted trial failed (never a score) and is queued again
    assert trial_states(tmp_path / "cut") == {"COMPLETE": 7, "FAIL": 1, "WAITING": 1}
    assert not (tmp_path / "cut" / "search.json").exists() and not list((tmp_path / "cut").glob("rank-*.yaml"))
    journal = tmp_path / "cut" / "optuna-journal.log"
    with journal.open("a") as handle:
        handle.write('{"op_code":6,"worker_id":"x","trial_id":8,"st')  # a line torn by a kill

    monkeypatch.setattr(fitness.Evaluator, "__call__", real)
    runs = {"n": 0}

    def counted(self, candidate):
        runs["n"] += 1
        return real(self, candidate)

    monkeypatch.setattr(fitness.Evaluator, "__call__", counted)
    resumed = run([model], options(tmp_path / "cut", text, evals=20))
    assert trail(resumed) == trail(whole)
    assert runs["n"] == 20 - 7  # the journalled evaluations are replayed, not run again
    assert (tmp_path / "cut" / "rank-1.yaml").read_text() == (tmp_path / "whole" / "rank-1.yaml").read_text()
    assert trial_states(tmp_path / "cut") == {"COMPLETE": 20, "FAIL": 1}


def test_constraints_are_honoured(tiny_models, text, tmp_path):
    model = tiny_models("llama", num_layers=N)
    result = run([model], options(tmp_path / "out", text, depth=(5, 9), keep=frozenset({0, 5}), anchored=False, evals=30))
    feasible = [c for c in result["candidates"] if c["feasible"]]
    infeasible = [c for c in result["candidates"] if not c["feasible"]]
    assert feasible and infeasible  # free paths that drop a kept layer happen, and are never run
    for entry in result["candidates"]:
        candidate = Candidate.from_dict(entry["candidate"])
        assert 5 <= candidate.depth <= 9
        layers = {layer for _, layer in candidate.layers()}
        assert entry["feasible"] == ({0, 5} <= layers)
        assert entry["missing"] == sorted({0, 5} - layers)
    assert all(r["feasible"] for r in result["ranked"])
    assert [r["value"] for r in result["ranked"]] == sorted(r["value"] for r in result["ranked"])


def test_a_parameter_budget_caps_the_depth(tiny_models, text, tmp_path):
    from dus.search.run import source_facts

    model = tiny_models("llama", num_layers=N)
    _, per_layer, outside = source_facts([str(Path(model).resolve())])
    budget = outside + 7 * per_layer + per_layer // 2
    result = run([model], options(tmp_path / "out", text, depth=(5, 10), max_params=budget, evals=16))
    assert result["settings"]["space"]["depth"] == [5, 7]
    assert max(Candidate.from_dict(c["candidate"]).depth for c in result["candidates"]) <= 7
    with pytest.raises(DusError, match="allows at most 4 layers"):
        run([model], options(tmp_path / "out2", text, depth=(5, 10), max_params=outside + 4 * per_layer))
    assert not (tmp_path / "out2").exists()


def test_graft_mode_scores_every_range_in_place(tiny_models, text, tmp_path):
    base, donor = tiny_models("llama", num_layers=N, seed=0), tiny_models("llama", num_layers=N, seed=1)
    result = run([], options(tmp_path / "out", text, graft=(str(base), str(donor), 2)))
    base, donor = str(Path(base).resolve()), str(Path(donor).resolve())
    grafted = []
    for entry in result["candidates"]:
        layers = Candidate.from_dict(entry["candidate"]).layers()
        assert len(layers) == N and [layer for _, layer in layers] == list(range(N))
        grafted.append([i for i, (model, _) in enumerate(layers) if model == donor])
    assert grafted == [[s, s + 1] for s in range(N - 1)]
    assert result["model_runs"] == N - 1 and len(result["ranked"]) == N - 1
    # the base's path is run first, so the graft at s runs only from layer s on; the same scores
    assert result["prefix_cache"]["layers_skipped"] == sum(range(N - 1))
    plain = run([], options(tmp_path / "plain", text, graft=(base, donor, 2), prefix_cache_mb=0))
    assert plain["prefix_cache"] is None and trail(plain) == trail(result)


def test_a_user_scoring_function_is_minimised_or_maximised(tiny_models, text, tmp_path):
    scorer = tmp_path / "myscore.py"
    scorer.write_text("def depth(model, tokenizer):\n    return model.config.num_hidden_layers\n")
    model = tiny_models("llama", num_layers=N)
    low = run([model], options(tmp_path / "low", None, depth=(4, 9), score=f"{scorer}:depth", evals=16))
    high = run([model], options(tmp_path / "high", None, depth=(4, 9), score=f"{scorer}:depth", maximize=True, evals=16))
    assert low["ranked"][0]["metrics"]["score"] == min(c["metrics"]["score"] for c in low["candidates"])
    assert high["ranked"][0]["metrics"]["score"] == max(c["metrics"]["score"] for c in high["candidates"])
    assert high["ranked"][0]["metrics"]["score"] > low["ranked"][0]["metrics"]["score"]


# --- the CLI: outputs, the found recipe builds, bad input -------------------------------


def test_a_bf16_search_scores_what_the_found_recipe_scores_built_and_loaded_in_bf16(tiny_models, text, tmp_path, run_cli):
    """`--dtype bfloat16` loads the sources in bf16; without scales, the in-memory path holds
    the same bf16 weights as the built recipe loaded in bf16, so the scores are equal."""
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.search.fitness import PerplexityScorer

    model = tiny_models("llama", num_layers=N)
    out = tmp_path / "search"
    result = run_cli("search", model, "--data", text, "--depth", "7:9", "--evals", "6", "--dtype", "bfloat16",
                     "--window", "64", "--max-tokens", "256", "-o", out)
    assert result.code == 0, result
    data = json.loads((out / "search.json").read_text())
    assert data["settings"]["dtype"] == "bfloat16"
    built = run_cli("build", out / "rank-1.yaml", "-o", tmp_path / "built")
    assert built.code == 0, built
    loaded = ModelDir(tmp_path / "built").load_model(torch.bfloat16, quiet=True).eval()
    ids = tokenize_stream(ModelDir(model).tokenizer(), read_text(text), 256)
    value, _ = PerplexityScorer([ids], 64, 64)(loaded, None)
    assert value == data["ranked"][0]["value"]
    as_float32, _ = PerplexityScorer([ids], 64, 64)(ModelDir(tmp_path / "built").load_model(torch.float32, quiet=True).eval(), None)
    assert as_float32 != value  # the search really scored in bf16


def test_the_found_recipe_builds_into_the_model_the_search_scored(tiny_models, text, tmp_path, run_cli):
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.search.fitness import PerplexityScorer

    model = tiny_models("llama", num_layers=N)
    out = tmp_path / "search"
    result = run_cli("search", model, "--data", text, "--depth", "7:9", "--scale", "0.5:1", "--evals", "12",
                     "--window", "64", "--max-tokens", "256", "--top", "2", "-o", out)
    assert result.code == 0, result
    assert sorted(p.name for p in out.iterdir()) == ["optuna-journal.log", "rank-1.yaml", "rank-2.yaml", "search.json", "search.png"]
    data = json.loads((out / "search.json").read_text())
    assert data["seed"] == 0 and data["settings"]["optimizer"] == "tpe" and len(data["candidates"]) == 12
    # an unhealed ranking says it does not predict the healed one, with the measured numbers, on screen and in the file
    assert "--heal-steps" in data["note"] and "MEASURED" not in data["note"]
    assert "note: ranked by the unhealed score" in result.stdout
    best = data["ranked"][0]
    built = run_cli("build", out / "rank-1.yaml", "-o", tmp_path / "built")
    assert built.code == 0, built
    loaded = ModelDir(tmp_path / "built").load_model(torch.float32, quiet=True).eval()
    ids = tokenize_stream(ModelDir(model).tokenizer(), read_text(text), 256)
    value, metrics = PerplexityScorer([ids], 64, 64)(loaded, None)
    assert value == best["value"] and metrics["perplexity"] == best["metrics"]["perplexity"]
    assert loaded.config.num_hidden_layers == best["candidate"]["depth"]

    again = run_cli("search", model, "--data", text, "--depth", "7:9", "--scale", "0.5:1", "--evals", "12",
                    "--window", "64", "--max-tokens", "256", "--top", "2", "-o", out)
    assert again.code == 0 and json.loads((out / "search.json").read_text())["candidates"] == data["candidates"]
    other = run_cli("search", model, "--data", text, "--depth", "8", "--evals", "12", "--window", "64", "--max-tokens", "256", "-o", out)
    assert other.code == 2 and "other settings (space.depth, " in other.stderr, other


def test_wandb_logs_the_search_offline(tiny_models, text, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    result = run_cli("search", tiny_models("llama", num_layers=N), "--data", text, "--depth", "8", "--evals", "4",
                     "--window", "64", "--max-tokens", "128", "-o", out, "--wandb")
    assert result.code == 0, result
    data = json.loads((out / "search.json").read_text())
    assert data["wandb"].startswith(str(out / "wandb" / "offline-run-"))
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_dry_run_prints_the_space_and_writes_nothing(tiny_models, text, tmp_path, run_cli):
    model = tiny_models("llama", num_layers=N)
    result = run_cli("search", model, "--data", text, "--depth", "8", "--scale", "0.5:1", "--dry-run", "-o", tmp_path / "out")
    assert result.code == 0, result
    assert "at most" in result.stdout and "s1.start" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("families", "different architectures"),
    ("shapes", "disagree on hidden_size"),
    ("keep-above-depth", "keep fewer layers"),
    ("depth-below-segments", "below --segments"),
    ("depth-too-deep", "--segments 4 or more"),
    ("keep-outside", "no such source layer"),
    ("scale-floor", "0.5 <= MIN"),
    ("no-depth", "--depth N"),
    ("empty-text", "the text is empty"),
    ("no-data", "--data FILE"),
    ("optimizer", "use one of cma, tpe, random"),
    ("graft-depths", "needs equal depths"),
    ("graft-partial", "needs all of --graft"),
    ("not-a-search-dir", "not a dus search directory"),
    ("bad-score", "has no function"),
    ("binary-text", "not a UTF-8 text file"),
    ("blocked-output", "is a file, not a directory"),
    ("scale-nan", "--scale 'nan': a scale must be a finite number"),
    ("scale-inf", "--scale '0.5:inf': a scale must be a finite number"),
    ("minutes-zero", "--minutes 0: give a positive number of minutes"),
    ("minutes-negative", "--minutes -2: give a positive number of minutes"),
    ("minutes-nan", "--minutes nan: give a positive number of minutes"),
    ("keep-reversed", "--keep '0,3:1': the range 3:1 holds no layer"),
    ("keep-empty-range", "--keep '2:2': the range 2:2 holds no layer"),
    ("keep-malformed", "--keep '1:2:3': give source layers like 0,1,28:30"),
    ("keep-empty", "--keep '': give source layers like 0,1,28:30"),
    ("score-nan", "returned nan; it must return a finite number"),
    ("score-inf", "returned -inf; it must return a finite number"),
    ("score-raises", "raised JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1) at {scorer}:7;"),
    ("score-import-raises", "importing {broken} raised KeyError: 'missing' at {broken}:2;"),
])
def test_bad_input_gets_one_line_and_writes_nothing(case, message, tiny_models, text, tmp_path, run_cli):
    llama = tiny_models("llama", num_layers=N)
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    scorer = tmp_path / "myscore.py"
    scorer.write_text("import json\ndef nan(model, tokenizer):\n    return float('nan')\n"
                      "def fails(model, tokenizer):\n    return helper(model)\n"
                      "def helper(model):\n    return json.loads('{')\n"  # line 7: the last frame in this file, not json's
                      "def minus_inf(model, tokenizer):\n    return float('-inf')\n")
    scorer = scorer.resolve()
    broken = (tmp_path / "broken.py").resolve()
    broken.write_text("TABLE = {}\nWEIGHT = TABLE['missing']\ndef score(model, tokenizer):\n    return 1.0\n")
    message = message.format(scorer=scorer, broken=broken)
    base = ["search", llama, "--data", text, "--depth", "8", "--evals", "3", "-o", out]
    user = ["search", llama, "--depth", "8", "--evals", "3", "-o", out, "--score"]
    args = {
        "families": ["search", llama, tiny_models("qwen2", num_layers=N), "--data", text, "--depth", "8", "-o", out],
        "shapes": ["search", llama, tiny_models("llama", num_layers=N, hidden_size=48), "--data", text, "--depth", "8", "-o", out],
        "keep-above-depth": [*base, "--keep", "0:6", "--depth", "5"],
        "depth-below-segments": [*base, "--depth", "2"],
        "depth-too-deep": [*base, "--depth", "19"],
        "keep-outside": [*base, "--keep", "6"],
        "scale-floor": [*base, "--scale", "0.3:1"],
        "no-depth": ["search", llama, "--data", text, "-o", out],
        "empty-text": ["search", llama, "--data", empty, "--depth", "8", "-o", out],
        "no-data": ["search", llama, "--depth", "8", "-o", out],
        "optimizer": [*base, "--optimizer", "bayes"],
        "graft-depths": ["search", "--graft", llama, "--donor", tiny_models("llama", num_layers=N + 2), "--size", "2", "--data", text, "-o", out],
        "graft-partial": ["search", "--graft", llama, "--size", "2", "--data", text, "-o", out],
        "not-a-search-dir": base,
        "bad-score": ["search", llama, "--depth", "8", "--score", "dus.errors:nothing", "-o", out],
        "binary-text": ["search", llama, "--data", binary, "--depth", "8", "-o", out],
        "blocked-output": [*base[:-1], blocker / "out"],
        "scale-nan": [*base, "--scale", "nan"],
        "scale-inf": [*base, "--scale", "0.5:inf"],
        "minutes-zero": [*base, "--minutes", "0"],
        "minutes-negative": [*base, "--minutes", "-2"],
        "minutes-nan": [*base, "--minutes", "nan"],
        "keep-reversed": [*base, "--keep", "0,3:1"],
        "keep-empty-range": [*base, "--keep", "2:2"],
        "keep-malformed": [*base, "--keep", "1:2:3"],
        "keep-empty": [*base, "--keep", ""],
        "score-nan": [*user, f"{scorer}:nan"],
        "score-inf": [*user, f"{scorer}:minus_inf", "--maximize"],
        "score-raises": [*user, f"{scorer}:fails"],
        "score-import-raises": [*user, f"{broken}:score"],
    }[case]
    if case == "not-a-search-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    result = run_cli(*args)
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: ") and message in lines[0], result
    if case == "not-a-search-dir":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_a_study_that_does_not_match_the_search_is_refused_in_one_line(tiny_models, text, tmp_path):
    """cma replays the study's completed trials through the `cma` package: a recorded vector
    that is not what it asks at that point is refused, as is a journal line that is not JSON."""
    model = tiny_models("llama", num_layers=N)
    run([model], options(tmp_path / "out", text, evals=6, optimizer="cma"))
    journal = tmp_path / "out" / "optuna-journal.log"
    lines = journal.read_bytes().split(b"\n")
    at = journal_line(lines, 2, b'"user_attr":{"dus":')
    record = json.loads(lines[at])
    record["user_attr"]["dus"]["x"] = [0.123] * len(record["user_attr"]["dus"]["x"])  # not what cma asks there
    journal.write_bytes(b"\n".join(lines[:at] + [json.dumps(record).encode()] + lines[at + 1:]))
    with pytest.raises(DusError, match=r"optuna-journal.log: trial 2 does not match this search's candidate 2"):
        run([model], options(tmp_path / "out", text, evals=8, optimizer="cma"))
    journal.write_bytes(b"\n".join(lines[:2] + [b"{not json"] + lines[3:]))
    with pytest.raises(DusError, match=r"optuna-journal.log:3: damaged journal line"):
        run([model], options(tmp_path / "out", text, evals=8, optimizer="cma"))


@pytest.mark.parametrize("damage, message", [
    ("nan", r"optuna-journal.log: trial 2's recorded score is nan, not a finite number"),
    ("infinity", r"optuna-journal.log: trial 2's recorded score is inf, not a finite number"),
    ("minus-infinity", r"optuna-journal.log: trial 2's recorded score is -inf, not a finite number"),
    ("not-utf8", r"optuna-journal.log:3: byte 0xff is not UTF-8 text"),
    ("not-utf8-header", r"optuna-journal.log:1: byte 0xe9 is not UTF-8 text"),
    ("not-a-record", r"optuna-journal.log:{line}: damaged journal line \(not a record of Optuna's journal\)"),
    ("not-dus-record", r"optuna-journal.log: trial 2 is not an evaluation dus search recorded"),
    ("string-score", r"optuna-journal.log: trial 2: damaged record \(its score is not a number\)"),
    ("damaged-last-line", r"optuna-journal.log:{last}: damaged journal line"),
])
def test_a_damaged_or_non_finite_study_is_refused_in_one_line_never_ranked(damage, message, tiny_models, text, tmp_path, run_cli):
    """What a resumed search reads back is checked like any input: a NaN or infinite score
    (json reads NaN and Infinity) is refused, never ranked; bytes that are not UTF-8 and
    lines that are not records of Optuna's journal are one line naming the line, and a
    trial dus did not record is refused. Only a last line a kill left without its newline
    is dropped (and its evaluation made again)."""
    model = tiny_models("llama", num_layers=N)
    out = tmp_path / "out"
    args = lambda evals: ["search", model, "--data", text, "--depth", "8", "--scale", "0.5:1", "--evals", evals,
                          "--window", "64", "--max-tokens", "256", "--population", "4", "-o", out]
    assert run_cli(*args(6)).code == 0
    journal = out / "optuna-journal.log"
    lines = journal.read_bytes().split(b"\n")[:-1]
    told = journal_line(lines, 2, b'"values":[')
    record = json.loads(lines[told])
    if damage in ("nan", "infinity", "minus-infinity"):
        record["values"] = [{"nan": math.nan, "infinity": math.inf, "minus-infinity": -math.inf}[damage]]
        lines[told] = json.dumps(record).encode()
    elif damage == "not-utf8":
        lines[2] = lines[2][:20] + b"\xff" + lines[2][20:]
    elif damage == "not-utf8-header":
        lines[0] = lines[0].replace(b'"study_name"', b'"study_n\xe9me"')
    elif damage == "not-a-record":
        lines[told] = b"[1, 2]"
    elif damage == "not-dus-record":
        at = journal_line(lines, 2, b'"user_attr":{"dus":')
        lines[at] = lines[at].replace(b'"user_attr":{"dus":', b'"user_attr":{"mine":')
    elif damage == "string-score":
        record["values"] = ["2.5"]
        lines[told] = json.dumps(record).encode()
    else:
        lines[-1] = lines[-1][: len(lines[-1]) // 2]  # cut, but with its newline: not a torn tail
    journal.write_bytes(b"\n".join(lines) + b"\n")
    message = message.format(line=told + 1, last=len(lines))
    before = sorted(p.name for p in out.iterdir())
    result = run_cli(*args(8))
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: ") and re.search(message, lines[0]), result
    assert sorted(p.name for p in out.iterdir()) == before  # nothing replaced


def test_a_complete_last_line_without_its_newline_is_evaluated_again(tiny_models, text, tmp_path):
    """What the reader drops, the writer cuts: a last line with no newline, even when it
    parses (a kill between the line and its newline); here the last trial's score, so that
    trial is found running with no worker, failed, and its candidate evaluated again."""
    model = tiny_models("llama", num_layers=N)
    whole = run([model], options(tmp_path / "whole", text, evals=8))
    run([model], options(tmp_path / "cut", text, evals=8))
    journal = tmp_path / "cut" / "optuna-journal.log"
    assert b'"values":[' in journal.read_bytes().split(b"\n")[-2]
    journal.write_bytes(journal.read_bytes()[:-1])  # the last evaluation's score loses its newline
    resumed = run([model], options(tmp_path / "cut", text, evals=10))
    again = run([model], options(tmp_path / "cut", text, evals=10))  # the study it left resumes too
    assert trail(resumed)[:8] == trail(whole) and trail(again) == trail(resumed)
    assert trial_states(tmp_path / "cut") == {"COMPLETE": 10, "FAIL": 1}


def test_a_non_finite_score_stops_the_search_in_one_line(tiny_models):
    """Whatever the scorer (perplexity of a model that overflows, lm-eval, a function), a NaN
    or infinite score is never cached, journalled or ranked."""
    from dus.assemble import load_sources
    from dus.recipe import load_recipe
    from dus.resolve import resolve
    from dus.search.fitness import Evaluator

    model = str(tiny_models("llama", num_layers=N).resolve())
    plan = resolve(load_recipe({"slices": [{"sources": [{"model": model, "layer_range": [0, 1]}]}]})).plan
    sources = load_sources(plan, torch.float32)
    for bad in (math.nan, math.inf, -math.inf):
        evaluator = Evaluator(sources, None, lambda m, t: (bad, {}))
        with pytest.raises(DusError, match=r"candidate .*\[0:6\) scored (nan|inf|-inf) .*not a finite number"):
            evaluator(canonical([Segment(model, 0, N)]))
        assert not evaluator.cache


def test_minutes_always_leave_at_least_one_evaluation(tiny_models, text, tmp_path):
    model = tiny_models("llama", num_layers=N)
    result = run([model], options(tmp_path / "out", text, minutes=1e-9, evals=10))
    assert result["evaluations"] == 1 and len(result["ranked"]) == 1
    assert (tmp_path / "out" / "rank-1.yaml").is_file()


def test_sources_that_tokenize_differently_get_builds_warning_and_recipes_that_tokenize_as_scored(
        tiny_models, text, tmp_path, run_cli):
    """Two ids swapped in the donor: the search warns as `dus build` does (not a refusal:
    see dus.search.run.tokenizer_warnings), and every written recipe names the first
    model as tokenizer_source, so a graft whose path starts in the donor (the donor's
    embeddings) builds into a model that tokenizes, and scores, as the search did."""
    from dus.checkpoint import ModelDir
    from dus.measure.text import read_text, tokenize_stream
    from dus.search.fitness import PerplexityScorer

    base = tiny_models("llama", num_layers=N)
    donor, *_ = copy_with_two_token_ids_swapped(tiny_models("llama", num_layers=N, seed=4), tmp_path / "donor")
    out = tmp_path / "search"
    result = run_cli("search", "--graft", base, "--donor", donor, "--size", "2", "--data", text, "--window", "64",
                     "--max-tokens", "256", "--top", str(N - 1), "-o", out)
    assert result.code == 0, result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "token id 65" in warnings[0] and "differ" in warnings[0], result
    data = json.loads((out / "search.json").read_text())
    donor_first = next(r for r in data["ranked"] if r["candidate"]["segments"][0]["model"] == str(donor.resolve()))
    recipe = out / donor_first["file"]
    assert f"tokenizer_source: {Path(base).resolve()}" in recipe.read_text()
    built = run_cli("build", recipe, "-o", tmp_path / "built")
    assert built.code == 0 and "token id 65" in built.stdout, built  # build's own warning, the same difference
    directory = ModelDir(tmp_path / "built")
    assert (directory.path / "tokenizer.json").read_text() == (Path(base) / "tokenizer.json").read_text()
    ids = tokenize_stream(directory.tokenizer(), read_text(text), 256)
    value, _ = PerplexityScorer([ids], 64, 64)(directory.load_model(torch.float32, quiet=True).eval(), None)
    assert value == donor_first["value"]

    single = run_cli("search", base, "--data", text, "--depth", "8", "--evals", "2", "--window", "64",
                     "--max-tokens", "256", "-o", tmp_path / "one")
    assert single.code == 0 and "warning:" not in single.stderr
    assert "tokenizer_source" not in (tmp_path / "one" / "rank-1.yaml").read_text()
