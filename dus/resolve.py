"""Recipe + source models -> LayerPlan.

Here the recipe meets the checkpoints: model paths are opened (headers only), presets
expand into slices, layer ranges are checked against real depths, mergekit's scale
settings are evaluated per layer, and seam smoothing turns cuts into blends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dus.errors import DusError
from dus.plan import Blend, LayerPlan, NonLayerSource, OutputLayer, ScaleRule, find_seams
from dus.presets import expand_preset
from dus.recipe import MAX_OUTPUT_LAYERS, Recipe, SeamSmoothing, SliceSpec
from dus.sources import SourceModel, check_compatible, load_source
from dus.tokenizer_check import first_tokenizer_difference


@dataclass
class Resolved:
    plan: LayerPlan
    sources: dict[str, SourceModel]
    warnings: list[str]


def resolve(recipe: Recipe, opened: dict[str, SourceModel] | None = None) -> Resolved:
    """`opened`: sources already opened and checked together (name -> SourceModel), for a
    caller that resolves many recipes over the same models (`dus search`): their headers
    are not read again and their tokenizers not compared again (no warnings then)."""
    base_dir = recipe.source_file.parent if recipe.source_file else None
    names = recipe.model_names()
    if opened is not None and all(name in opened for name in names):
        sources = {name: opened[name] for name in names}
    else:
        opened = None
        sources = {name: load_source(name, name, base_dir) for name in names}
        check_compatible(list(sources.values()))

    after, preset_notes, non_layer_from = None, [], recipe.non_layer_from
    if recipe.kind == "slices":
        slices = recipe.slices
    elif recipe.kind == "parents":
        from dus.parents import expand_parents

        slices, preset_notes, after, chosen = expand_parents(recipe.preset, recipe.preset_where, sources)
        non_layer_from = non_layer_from or chosen
    else:
        slices = expand_preset(recipe, sources)
    for spec in slices:
        depth = sources[spec.model].num_layers
        if spec.end > depth:
            raise DusError(
                f"{spec.where}: layer_range [{spec.start}, {spec.end}] is outside model {spec.model!r}, "
                f"which has {depth} layers; use 0 <= start < end <= {depth}"
            )

    depth = sum(spec.end - spec.start for spec in slices)
    if depth > MAX_OUTPUT_LAYERS:
        raise DusError(f"{slices[0].where}: the recipe builds {depth} layers, more than {MAX_OUTPUT_LAYERS}; "
                       "check the layer ranges and repeat counts")
    layers = [layer for spec in slices for layer in _slice_layers(spec, recipe.parameters)]
    notes: list[str] = list(preset_notes)
    if after is not None:
        layers = after(layers)
    if recipe.seam_smoothing:
        layers = _smooth_seams(layers, recipe.seam_smoothing, sources, notes)

    first, last = slices[0].model, slices[-1].model
    if non_layer_from:
        global_rules = _rules_at(recipe.parameters, 0.0)
        embeddings = head = NonLayerSource(non_layer_from, global_rules)
    else:
        # mergekit: embeddings from the first slice's model, norm and lm_head from the
        # last slice's, each with that slice's parameters evaluated at t = 0.
        embeddings = NonLayerSource(first, _slice_rules(slices[0], recipe.parameters, 0.0))
        head = NonLayerSource(last, _slice_rules(slices[-1], recipe.parameters, 0.0))
        if embeddings.scale or head.scale:
            notes.append("scale settings of the first/last slice also apply to embeddings/head, as in mergekit")
    config_from = recipe.base_model or non_layer_from or first
    tokenizer_from = recipe.tokenizer_source or recipe.base_model or non_layer_from or first

    used = {layer.model for layer in layers} | {layer.blend.model for layer in layers if layer.blend}
    used |= {embeddings.model, head.model, config_from, tokenizer_from}
    plan = LayerPlan(
        # every named model, except a `parents` base that gives the child nothing (it only chose the layers)
        models={name: str(source.path) for name, source in sources.items()
                if recipe.kind != "parents" or name in used},
        layers=layers,
        embeddings=embeddings,
        head=head,
        config_from=config_from,
        tokenizer_from=tokenizer_from,
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        recipe_kind=recipe.kind,
        notes=notes,
    )
    warnings = _tokenizer_warnings(sources, tokenizer_from) if opened is None else []
    return Resolved(plan, sources, warnings)


def _slice_layers(spec: SliceSpec, global_parameters: dict) -> list[OutputLayer]:
    count = spec.end - spec.start
    layers = []
    for offset in range(count):
        t = offset / (count - 1) if count > 1 else 1.0  # mergekit's position within a slice
        layers.append(
            OutputLayer(
                model=spec.model,
                layer=spec.start + offset,
                scale=_slice_rules(spec, global_parameters, t),
                zero_output=spec.new_block,
            )
        )
    return layers


def _slice_rules(spec: SliceSpec, global_parameters: dict, t: float) -> tuple[ScaleRule, ...]:
    """mergekit looks a parameter up on the source, then the slice, then globally, and a
    conditional list that matches nothing falls through to the next level: so the levels'
    rules, concatenated in that order, give the same first match."""
    rules: list[ScaleRule] = []
    for parameters in (spec.source_parameters, spec.slice_parameters, global_parameters):
        rules.extend(_rules_at(parameters, t))
    return tuple(rules)


def _rules_at(parameters: dict, t: float) -> tuple[ScaleRule, ...]:
    setting = parameters.get("scale")
    if setting is None:
        return ()
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(entry, dict) for entry in setting):
        return tuple(
            ScaleRule(value=_evaluate(entry["value"], t), filter=_filter(entry.get("filter")))
            for entry in setting
        )
    return (ScaleRule(value=_evaluate(setting, t)),)


def _filter(text: str | None) -> str | None:
    return None if text in (None, "*") else text


def _evaluate(value, t: float) -> float:
    """A number, or a gradient (list of numbers) interpolated at t in [0, 1]."""
    if not isinstance(value, list):
        return float(value)
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return float((1 - frac) * value[low] + frac * value[high])


def _smooth_seams(
    layers: list[OutputLayer], smoothing: SeamSmoothing, sources: dict[str, SourceModel], notes: list[str]
) -> list[OutputLayer]:
    """Blend `width` layers on each side of every seam where the two sides overlap in
    source depth (the right side restarts at or below where the left side stopped).

    Left of the seam, layer X[a-k] is blended towards Y[b-1-k], the layer the right side
    would have had there; right of it, Y[b+k] towards X[a+1+k]. The right side's share
    rises linearly across the 2*width positions (or follows `factors`)."""
    width = smoothing.width
    factors = smoothing.factors or [(p + 1) / (2 * width + 1) for p in range(2 * width)]
    result = list(layers)
    claimed: set[int] = set()
    for seam in find_seams(layers):
        window = range(seam - width, seam + width)
        left, right = layers[seam - 1], layers[seam]
        reason = _smoothing_obstacle(layers, seam, width, sources, claimed)
        if reason:
            raise DusError(f"{smoothing.where}: seam_smoothing cannot blend the seam at output layer {seam}: {reason}; "
                           "use a smaller width, or drop seam_smoothing")
        for position, index in enumerate(window):
            layer = layers[index]
            if index < seam:
                other = Blend(right.model, right.layer - (seam - index), factors[position], smoothing.method)
            else:
                other = Blend(left.model, left.layer + 1 + (index - seam), 1 - factors[position], smoothing.method)
            result[index] = OutputLayer(layer.model, layer.layer, layer.scale, layer.zero_output, other)
        claimed.update(window)
        notes.append(f"seam at {seam}: {smoothing.method} blend over layers {seam - width}..{seam + width - 1}")
    return result


def _smoothing_obstacle(layers, seam, width, sources, claimed) -> str | None:
    if seam - width < 0 or seam + width > len(layers):
        return f"width {width} runs past the model's ends"
    if claimed & set(range(seam - width, seam + width)):
        return "its window overlaps the previous seam's"
    left_run = layers[seam - width : seam]
    right_run = layers[seam : seam + width]
    for run in (left_run, right_run):
        if any(layer.new for layer in run) or any(
            b.model != run[0].model or b.layer != run[0].layer + i for i, b in enumerate(run)
        ):
            return f"the {width} layers on each side are not one contiguous run of one source"
    left, right = left_run[-1], right_run[0]
    if right.layer > left.layer:
        return "the two sides do not overlap in source depth"
    if right.layer - width < 0 or left.layer + width >= sources[left.model].num_layers:
        return f"width {width} needs source layers that do not exist"
    return None


def _tokenizer_warnings(sources: dict[str, SourceModel], tokenizer_from: str) -> list[str]:
    warnings = []
    reference = sources[tokenizer_from]
    for name, source in sources.items():
        if name == tokenizer_from:
            continue
        difference = first_tokenizer_difference(Path(reference.path), Path(source.path))
        if difference:
            warnings.append(
                f"tokenizers of {tokenizer_from!r} and {name!r} differ ({difference}); the output uses "
                f"{tokenizer_from!r}'s, so {name!r}'s layers see token ids they were not trained on"
            )
    return warnings
