"""Property tests over random slice lists: a valid one always builds a model equal to
its reference stack; an invalid one always gets a clean DusError and leaves no output."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dus.build import build_model
from dus.errors import DusError
from reference import assemble, load, logits, sample_ids

DEPTH = 4
counter = itertools.count()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("prop-models")
    paths = [make_tiny_model(root / f"m{i}", "qwen2", num_layers=DEPTH, seed=i) for i in range(2)]
    return paths, {str(i): load(path) for i, path in enumerate(paths)}


valid_slice = st.tuples(st.integers(0, 1), st.integers(0, DEPTH - 1)).flatmap(
    lambda pair: st.tuples(st.just(pair[0]), st.just(pair[1]), st.integers(pair[1] + 1, DEPTH))
)


def _recipe(paths, slices):
    return {
        "slices": [{"sources": [{"model": str(paths[m]), "layer_range": [a, b]}]} for m, a, b in slices],
        "merge_method": "passthrough",
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slices=st.lists(valid_slice, min_size=1, max_size=4))
def test_valid_slices_always_build_the_reference(slices, two_models, tmp_path):
    paths, loaded = two_models
    out = tmp_path / f"out{next(counter)}"
    result = build_model(_recipe(paths, slices), out)
    order = [(str(m), layer) for m, a, b in slices for layer in range(a, b)]
    assert [(str(paths.index(Path(l.model))), l.layer) for l in result.plan.layers] == order
    reference = assemble(loaded, order, base=order[0][0], head_from=order[-1][0])
    built = load(out)
    ids = sample_ids(built.config.vocab_size, length=12, batch=1)
    assert torch.equal(logits(built, ids), logits(reference, ids))
    shutil.rmtree(out)


def _invalid_source(paths):
    """A source entry broken in one of the ways users break them."""
    good = st.sampled_from([0, 1]).map(lambda m: str(paths[m]))
    return st.one_of(
        st.builds(lambda m, a, b: {"model": m, "layer_range": [a, b]}, good, st.integers(0, DEPTH), st.integers(DEPTH + 1, 99)),
        st.builds(lambda m, a: {"model": m, "layer_range": [a, a]}, good, st.integers(0, DEPTH)),
        st.builds(lambda m, a, b: {"model": m, "layer_range": [b, a]}, good, st.integers(0, 1), st.integers(2, DEPTH)),
        st.builds(lambda m, a: {"model": m, "layer_range": [-a, 2]}, good, st.integers(1, 5)),
        st.builds(lambda m: {"model": m, "layer_range": [0, "2"]}, good),
        st.builds(lambda m: {"model": m, "layer_range": [0]}, good),
        st.builds(lambda m: {"model": m}, good),
        st.builds(lambda m: {"model": m, "layer_range": [0, 2], "weight": 0.5}, good),
        st.just({"model": "/does/not/exist", "layer_range": [0, 2]}),
        st.just({"model": 7, "layer_range": [0, 2]}),
        st.builds(lambda m: {"model": m, "layer_range": [0, 2], "parameters": {"density": 0.5}}, good),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invalid_slices_always_fail_cleanly(data, two_models, tmp_path):
    paths, _ = two_models
    valid = [{"sources": [{"model": str(paths[m]), "layer_range": [a, b]}]} for m, a, b in data.draw(st.lists(valid_slice, max_size=3))]
    broken = {"sources": [data.draw(_invalid_source(paths))]}
    position = data.draw(st.integers(0, len(valid)))
    slices = valid[:position] + [broken] + valid[position:]
    out = tmp_path / f"bad{next(counter)}"
    with pytest.raises(DusError) as error:
        build_model({"slices": slices, "merge_method": "passthrough"}, out)
    message = str(error.value)
    assert "\n" not in message and len(message) < 600
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}*"))
