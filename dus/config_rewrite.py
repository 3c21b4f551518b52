"""The output config.json: the base config with every per-layer field following the plan.

Depth changes break configs that carry one entry per layer. mergekit rewrites only
`num_hidden_layers`, so Qwen2/3 and Gemma 2/3 outputs fail validation
(`num_hidden_layers (12) must be equal to the number of layer_types (8)`). Here each
output layer takes its per-layer values (attention type, ...) from its own source layer,
read from the source config as transformers materialises it, so a Gemma 3
sliding/full pattern is carried, never regenerated.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from dus.errors import DusError
from dus.plan import LayerPlan
from dus.sources import SourceModel


def _layer_fields(source: SourceModel) -> tuple[str, ...]:
    adapter = source.adapter
    return (*adapter.per_layer_fields, *adapter.layer_index_fields, *adapter.layer_threshold_fields)


def _materialised(source: SourceModel) -> dict:
    """The source's per-layer config values. Read from config.json; only when a field that
    transformers derives is absent there is transformers asked (importing it and torch
    costs seconds, more than copying a 1.5B model)."""
    values = {field: source.config[field] for field in _layer_fields(source) if source.config.get(field) is not None}
    if all(field in values for field in source.adapter.derived_fields):
        return values
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError, KeyError, ... on bad configs
        raise DusError(f"model {source.name!r}: transformers rejects its config.json ({error}); fix the source config") from None
    for field in _layer_fields(source):
        value = getattr(config, field, None)
        if value is not None:
            values[field] = value
    return values


def output_config(plan: LayerPlan, sources: dict[str, SourceModel]) -> tuple[dict, list[str]]:
    """The rewritten config and notes about fields that could not be mapped."""
    base = sources[plan.config_from]
    config = copy.deepcopy(base.config)
    adapter = base.adapter
    per_model = {name: _materialised(sources[name]) for name in {layer.model for layer in plan.layers}}
    notes: list[str] = []

    for field in adapter.per_layer_fields:
        if field not in per_model[plan.layers[0].model]:
            continue
        values = []
        for layer in plan.layers:
            source_values = per_model[layer.model].get(field)
            if not isinstance(source_values, list) or len(source_values) != sources[layer.model].num_layers:
                raise DusError(
                    f"model {layer.model!r}: config field {field} should have one entry per layer "
                    f"({sources[layer.model].num_layers}); fix the source config"
                )
            values.append(source_values[layer.layer])
        config[field] = values

    for field in adapter.layer_index_fields:
        if field in per_model[plan.layers[0].model]:
            config[field] = [
                i for i, layer in enumerate(plan.layers) if layer.layer in (per_model[layer.model].get(field) or [])
            ]

    for field in adapter.layer_threshold_fields:
        if field in per_model[plan.layers[0].model]:
            # "layers below index k are X": k becomes the number of output layers whose
            # source layer was below its source's k.
            config[field] = sum(
                1 for layer in plan.layers if layer.layer < int(per_model[layer.model][field])
            )

    known = {*adapter.per_layer_fields, *adapter.layer_index_fields}
    for key, value in base.config.items():
        if key not in known and isinstance(value, list) and len(value) == base.num_layers and "layer" in key:
            notes.append(f"config field {key} looks per-layer but dus does not know it; left unchanged")

    config["num_hidden_layers"] = plan.num_layers
    if plan.output_dtype:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = plan.output_dtype
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = plan.output_dtype
    config.pop("_name_or_path", None)
    return config, notes


def has_layer_fields(config: dict, source: SourceModel) -> bool:
    """Whether the rewritten config carries per-layer fields worth validating."""
    return any(field in config for field in _layer_fields(source))


def write_config(config: dict, directory: Path, validate: bool = True) -> None:
    """Write config.json and, when it carries per-layer fields, check that transformers
    accepts it, so a broken config is an error at build time rather than at load time."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not validate:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # transformers raises ValueError, KeyError, ... on bad configs
        raise DusError(f"the rewritten config does not validate: {error}") from None
