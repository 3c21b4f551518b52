"""dus scan: an identity layer is found first; proposals follow the measured distances;
recipes build; --rank builds candidates and scores them as a direct build would."""

from __future__ import annotations

import json

import pytest

IDENTITY_LAYER = 5
TEXT = (
    "Scanning a model means running it on ordinary text and watching how much each layer "
    "changes the residual stream. Layers that barely move it can be repeated or removed. "
) * 6




@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """An 8-layer tiny llama whose layer 5 has zero output projections: it adds nothing
    to the residual stream, so it computes the identity."""
    from safetensors.torch import load_file, save_file

    from dus.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("scan") / "identity-8", "llama", num_layers=8, seed=1)
    weights_file = path / "model.safetensors"
    state = load_file(weights_file)
    zeroed = [name for name in state if name.startswith(f"model.layers.{IDENTITY_LAYER}.") and ("o_proj" in name or "down_proj" in name)]
    assert len(zeroed) == 2
    for name in zeroed:
        state[name] = state[name] * 0
    save_file(state, weights_file, metadata={"format": "pt"})
    return path


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


def test_scan_ranks_an_identity_layer_first_and_writes_buildable_recipes(identity_model, heldout, tmp_path, run_cli):
    from PIL import Image

    from dus.build import build_model

    out, recipes = tmp_path / "scan", tmp_path / "recipes"
    result = run_cli("scan", identity_model, "--data", heldout, "--window", 128, "--prune", 1, "--write-recipes", recipes, "-o", out)
    assert result.code == 0, result
    assert "Per layer" in result.stdout and "Proposals" in result.stdout

    scan = json.loads((out / "scan.json").read_text())
    measured, proposal = scan["measurement"], scan["proposal"]
    d1, influence = measured["distances"]["1"], measured["block_influence"]
    assert proposal["layer_ranking"][0] == IDENTITY_LAYER
    assert proposal["influence_ranking"][0] == IDENTITY_LAYER
    assert d1[IDENTITY_LAYER] == pytest.approx(0, abs=1e-6)
    assert influence[IDENTITY_LAYER] == pytest.approx(0, abs=1e-6)
    assert min(d for i, d in enumerate(d1) if i != IDENTITY_LAYER) > 1e-3
    # pruning one layer: the identity layer is the block that costs nothing
    assert (proposal["prunes"][0]["start"], proposal["prunes"][0]["end"]) == (IDENTITY_LAYER, IDENTITY_LAYER + 1)
    # skipping the identity layer does not move the stream: d(h_4, h_6) == d(h_4, h_5)
    assert measured["distances"]["2"][IDENTITY_LAYER - 1] == pytest.approx(d1[IDENTITY_LAYER - 1], rel=1e-5)

    for name in scan["plots"]:
        with Image.open(out / name) as image:
            image.verify()

    written = {path.name: path for path in recipes.glob("*.yaml")}
    assert "solar-trim2.yaml" in written and "prune-5-6.yaml" in written
    expected = {
        "solar-trim2.yaml": list(range(0, 6)) + list(range(2, 8)),
        "prune-5-6.yaml": [0, 1, 2, 3, 4, 6, 7],
    }
    best_duplicate = proposal["duplicates"][0]
    if (best_duplicate["start"], best_duplicate["end"]) != (2, 6):
        start, end = best_duplicate["start"], best_duplicate["end"]
        expected[f"duplicate-{start}-{end}.yaml"] = list(range(0, end)) + list(range(start, 8))
    assert set(written) == set(expected)
    for name, layers in expected.items():
        plan = build_model(written[name], None, dry_run=True).plan
        assert [layer.layer for layer in plan.layers] == layers, name


def _measurement(distance):
    """A ScanMeasurement of a 12-layer model whose d(h_a, h_b) is distance(a, b)."""
    from dus.scan.measure import ScanMeasurement

    depth = 12
    distances = {n: [distance(l, l + n) for l in range(depth - n + 1)] for n in range(1, depth + 1)}
    return ScanMeasurement("m", depth, 100, 64, distances, [0.1] * depth, [1.0] * (depth + 1), {"perplexity": 10.0}, 0.0)


def test_proposals_follow_the_distances():
    from dus.errors import DusError
    from dus.scan.propose import propose, rank_pool

    # the block [7, 10) is nearly free: every other layer turns the stream by 0.1
    cost = lambda a, b: sum(0.001 if 7 <= l < 10 else 0.1 for l in range(a, b))  # noqa: E731
    proposal = propose(_measurement(cost))
    assert proposal.trim == 3
    assert (proposal.solar.start, proposal.solar.end, proposal.solar.output_layers) == (3, 9, 18)
    assert proposal.solar.distance == pytest.approx(cost(3, 9))
    assert proposal.duplicate_size == 6 and proposal.prune_size == 3
    assert [c.distance for c in proposal.duplicates] == sorted(c.distance for c in proposal.duplicates)
    assert len(proposal.duplicates) == 12 - 6 + 1
    assert (proposal.prunes[0].start, proposal.prunes[0].end) == (7, 10)
    assert proposal.layer_ranking[:3] == [7, 8, 9]
    assert all(c.output_layers == 18 for c in proposal.duplicates)
    assert [c.start for c in proposal.solar_by_trim] == [1, 2, 3, 4, 5]

    pool = rank_pool(proposal, 2)
    assert [c.kind for c in pool] == ["duplicate", "duplicate", "solar"]
    assert rank_pool(proposal, 20)[-1].kind in ("solar", "duplicate") and sum(c.kind == "solar" for c in rank_pool(proposal, 20)) == 1

    recipe = proposal.prunes[0].recipe("/m", 12)
    assert recipe["slices"] == [{"sources": [{"model": "/m", "layer_range": [0, 7]}]}, {"sources": [{"model": "/m", "layer_range": [10, 12]}]}]
    assert proposal.solar.recipe("/m", 12) == {"solar": {"model": "/m", "trim": 3}}
    assert proposal.duplicates[0].recipe("/m", 12)["duplicate"]["layers"] == [proposal.duplicates[0].start, proposal.duplicates[0].end]

    with pytest.raises(DusError, match="--trim 6"):
        propose(_measurement(cost), trim=6)
    with pytest.raises(DusError, match="--duplicate 12"):
        propose(_measurement(cost), duplicate=12)


def test_rank_builds_candidates_and_scores_them_like_a_direct_build(identity_model, heldout, tmp_path, run_cli, monkeypatch):
    import tempfile

    import torch

    from dus.build import build_model
    from dus.checkpoint import ModelDir
    from dus.measure.perplexity import evaluate_stream
    from dus.measure.text import tokenize_stream

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "scan"
    result = run_cli("scan", identity_model, "--data", heldout, "--window", 128, "--max-tokens", 500, "--rank", 2, "-o", out)
    assert result.code == 0, result
    assert "Built candidates" in result.stdout
    ranked = json.loads((out / "scan.json").read_text())["ranked"]
    names = [entry["name"] for entry in ranked]
    assert len(names) in (2, 3) and "solar-trim2" in names
    assert [entry["perplexity"] for entry in ranked] == sorted(entry["perplexity"] for entry in ranked)
    assert list(scratch.iterdir()) == []  # candidates were built in a temporary directory and removed

    solar = next(entry for entry in ranked if entry["name"] == "solar-trim2")
    built = build_model({"solar": {"model": str(identity_model), "trim": 2}}, tmp_path / "solar")
    model = ModelDir(built.output).load_model(torch.float32, torch.device("cpu")).eval()
    ids = tokenize_stream(ModelDir(built.output).tokenizer(), TEXT, 500)
    direct = evaluate_stream(model, ids, 128, 128)
    assert solar["tokens_scored"] == direct.tokens
    assert solar["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)


def test_scan_refuses_bad_options(identity_model, heldout, run_cli):
    result = run_cli("scan", identity_model, "--data", heldout, "--trim", 4)
    assert result.code == 2 and "--trim 4" in result.stderr and len(result.stderr.strip().splitlines()) == 1
