"""Every recipe shipped in recipes/ parses and resolves (its model paths pointed at tiny
models of SmolLM2's depth), and the SOLAR one builds a loadable model."""

from __future__ import annotations

from pathlib import Path

import pytest

from dus.build import build_model
from dus.recipe import parse_recipe_text

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
PLACEHOLDERS = ["models/SmolLM2-135M-Instruct", "models/finetune-a", "models/finetune-b", "models/base", "models/donor"]


@pytest.fixture(scope="module")
def thirty_layer_models(tmp_path_factory):
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("thirty")
    return {
        placeholder: make_tiny_model(root / str(i), "llama", num_layers=30, seed=i, hidden_size=16, intermediate_size=32)
        for i, placeholder in enumerate(PLACEHOLDERS)
    }


def test_recipes_are_shipped():
    names = {path.stem for path in RECIPES}
    assert {"solar", "stack", "duplicate", "interleave", "graft", "expand", "solar-mergekit"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_resolves(path, thirty_layer_models, tmp_path):
    text = path.read_text()
    for placeholder, directory in thirty_layer_models.items():
        text = text.replace(placeholder, str(directory))
    recipe = parse_recipe_text(text, path.name)
    result = build_model(recipe, None, dry_run=True)
    assert result.plan.num_layers > 0
    if path.stem in ("solar", "solar-mergekit", "solar-smoothed", "stack"):
        assert result.plan.num_layers == 44 and result.plan.seams == [22]
    if path.stem == "duplicate":
        assert result.plan.num_layers == 40
    if path.stem == "expand":
        assert result.plan.num_layers == 36 and len(result.plan.new_layers) == 6


def test_shipped_solar_recipe_builds(thirty_layer_models, tmp_path):
    from transformers import AutoModelForCausalLM

    text = (Path(__file__).parent.parent / "recipes" / "solar.yaml").read_text()
    text = text.replace(PLACEHOLDERS[0], str(thirty_layer_models[PLACEHOLDERS[0]]))
    build_model(parse_recipe_text(text), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert model.config.num_hidden_layers == 44
