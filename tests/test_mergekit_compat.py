"""A mergekit passthrough recipe gives the same tensors under `dus build` as under
mergekit itself (when mergekit is installed: it is a reference, never a dependency)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open

from dus.build import build_model

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference here; `pip install mergekit==0.1.5`")


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def _run_mergekit(recipe: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(recipe)
    run_merge(config, out_path=str(out), options=MergeOptions(copy_tokenizer=True, quiet=True))


def _slices(*ranges, params=None):
    slices = []
    for i, (model, start, end) in enumerate(ranges):
        source = {"model": str(model), "layer_range": [start, end]}
        if params and i in params:
            source["parameters"] = params[i]
        slices.append({"sources": [source]})
    return slices


ZERO_OUTPUT = {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]}
HALF_OUTPUT = {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}]}


def _cases(a, b):
    return {
        "solar": (_slices((a, 0, 4), (a, 2, 6)), {}),
        "solar-bf16": (_slices((a, 0, 4), (a, 2, 6)), {"dtype": "bfloat16"}),
        "duplicate-scaled": (_slices((a, 0, 4), (a, 2, 4), (a, 4, 6), params={1: HALF_OUTPUT}), {}),
        "interleave": (_slices((a, 0, 2), (b, 1, 3), (a, 2, 4), (b, 3, 6)), {}),
        "graft": (_slices((a, 0, 2), (b, 2, 4), (a, 4, 6)), {}),
        "expand": (_slices((a, 0, 3), (a, 2, 3), (a, 3, 6), (a, 5, 6), params={1: ZERO_OUTPUT, 3: ZERO_OUTPUT}), {}),
        "gradient": (_slices((a, 0, 6), (a, 1, 5), params={1: {"scale": [0.0, 0.5, 1.0]}}), {"out_dtype": "float16"}),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "mixtral"])
@pytest.mark.parametrize("case", ["solar", "solar-bf16", "duplicate-scaled", "interleave", "graft", "expand", "gradient"])
def test_same_tensors_as_mergekit(arch, case, tiny_models, tmp_path):
    a = tiny_models(arch, num_layers=6, seed=0)
    b = tiny_models(arch, num_layers=6, seed=1)
    slices, extra = _cases(a, b)[case]
    recipe = {"slices": slices, "merge_method": "passthrough", **extra}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    build_model(tmp_path / "recipe.yaml", tmp_path / "dus")
    _run_mergekit(recipe, tmp_path / "mergekit")
    if arch == "mixtral":
        # mergekit 0.1.5 rewrites Mixtral experts into transformers 5's fused in-memory
        # layout (mlp.experts.gate_up_proj); dus keeps the source's on-disk layout
        # (block_sparse_moe.experts.N.w1). Both must load to the same weights.
        ours, theirs = _loaded(tmp_path / "dus"), _loaded(tmp_path / "mergekit")
    else:
        ours, theirs = _tensors(tmp_path / "dus"), _tensors(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


def _loaded(directory) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", use_safetensors=True)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def test_expand_preset_equals_mergekit_zero_scaled_slices(tiny_models, tmp_path):
    a = tiny_models("llama", num_layers=6)
    build_model({"expand": {"model": str(a), "positions": [2, 5]}}, tmp_path / "dus")
    slices, _ = _cases(a, a)["expand"]
    _run_mergekit({"slices": slices, "merge_method": "passthrough"}, tmp_path / "mergekit")
    ours, theirs = _tensors(tmp_path / "dus"), _tensors(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
