"""Presets: the named depth up-scaling recipes, each expanded into passthrough slices.

Every preset ends as the same list of slices a mergekit user would have written by hand,
so one resolver, one plan format and one writer serve them all.
"""

from __future__ import annotations

from dus.errors import DusError
from dus.recipe import Recipe, SliceSpec
from dus.sources import SourceModel


def expand_preset(recipe: Recipe, sources: dict[str, SourceModel]) -> list[SliceSpec]:
    """Slices for `recipe`'s preset, given the opened source models."""
    spec, places = recipe.preset, recipe.preset_where

    def depth(model: str) -> int:
        return sources[model].num_layers

    if recipe.kind == "stack":
        lower, upper = spec["models"]
        if sources[lower].path.resolve() == sources[upper].path.resolve():
            raise DusError(f"{places['models']}: stack names one model twice ({lower}"
                           f"{'' if lower == upper else f' and {upper}'}); a stack of a model on itself is the solar "
                           f"preset: write `solar: {{model: {lower}, trim: {spec['trim']}}}` (dus build --solar MODEL "
                           "--trim M), or give two different fine-tunes")
    if recipe.kind == "duplicate":
        return _duplicate(spec, places, depth, sources[spec["model"]].adapter.output_projections)
    builder = {
        "solar": _solar,
        "stack": _stack,
        "interleave": _interleave,
        "graft": _graft,
        "expand": _expand,
    }[recipe.kind]
    return builder(spec, places, depth)


def _solar(spec, places, depth) -> list[SliceSpec]:
    """SOLAR (Kim et al. 2023): copy A without its last m layers, then copy B without its
    first m: 2n - 2m layers with one seam."""
    model, trim = spec["model"], spec["trim"]
    n = depth(model)
    if trim >= n:
        raise DusError(f"{places['trim']}: solar trim {trim} leaves no layers of a {n}-layer model; use 0 <= trim < {n} (SOLAR used n/4)")
    return [
        SliceSpec(model, 0, n - trim, places["model"]),
        SliceSpec(model, trim, n, places["model"]),
    ]


def _stack(spec, places, depth) -> list[SliceSpec]:
    """Two parents, one child: the lower n - m layers of A, then the upper n - m layers of
    B (SOLAR's shape over two different fine-tunes of one base)."""
    lower, upper = spec["models"]
    trim, n = spec["trim"], depth(lower)
    if depth(upper) != n:
        raise DusError(f"{places['models']}: stack needs two models of equal depth ({lower}: {n}, {upper}: {depth(upper)})")
    if trim >= n:
        raise DusError(f"{places['trim']}: stack trim {trim} leaves no layers of {n}-layer models; use 0 <= trim < {n}")
    return [
        SliceSpec(lower, 0, n - trim, places["models"]),
        SliceSpec(upper, trim, n, places["models"]),
    ]


def _duplicate(spec, places, depth, output_projections: tuple[str, ...]) -> list[SliceSpec]:
    """Repeat layers [start, end) in place, `times` extra times (Yi-9B: [12, 28) of 32 -> 48)."""
    model = spec["model"]
    start, end = spec["layers"]
    n = depth(model)
    if end > n:
        raise DusError(f"{places['layers']}: duplicate.layers [{start}, {end}] is outside the model's {n} layers; use 0 <= start < end <= {n}")
    params = {}
    if "scale" in spec:
        # Every copy of the repeated range is scaled, so the copies together add about
        # what the one original did to the residual stream.
        params = {"scale": [{"filter": name, "value": spec["scale"]} for name in output_projections]}
    slices = [SliceSpec(model, 0, start, places["model"])] if start > 0 else []
    for _ in range(1 + spec.get("times", 1)):
        slices.append(SliceSpec(model, start, end, places["layers"], slice_parameters=params))
    if end < n:
        slices.append(SliceSpec(model, end, n, places["model"]))
    return slices


def _interleave(spec, places, depth) -> list[SliceSpec]:
    """Alternate blocks of `block` layers from several fine-tunes of one base, a new block
    starting every `step` layers (step < block overlaps them, as Goliath-120B did). The
    first block is [0, first); the last block is [n - last, n)."""
    models = spec["models"]
    depths = {model: depth(model) for model in models}
    n = depths[models[0]]
    if len(set(depths.values())) != 1:
        detail = ", ".join(f"{m}: {d}" for m, d in depths.items())
        raise DusError(f"{places['models']}: interleave needs models of equal depth ({detail})")
    block = spec["block"]
    step = spec.get("step", block)
    first = spec.get("first", block)
    last = spec.get("last")
    if step > block:
        raise DusError(f"{places['step']}: interleave step {step} is larger than block {block}, which would skip layers")
    if first > n or block > n or (last is not None and last > n):
        raise DusError(f"{places['block']}: interleave blocks longer than the models' {n} layers")
    slices = [SliceSpec(models[0], 0, first, places["models"])]
    start, turn = first - (block - step), 1
    end = first
    while end < n:
        end = min(start + block, n)
        if last is not None and end > n - last:
            break
        slices.append(SliceSpec(models[turn % len(models)], start, end, places["models"]))
        start, turn = start + step, turn + 1
    if last is not None and slices[-1].end < n:
        slices.append(SliceSpec(models[turn % len(models)], n - last, n, places["last"]))
    return slices


def _graft(spec, places, depth) -> list[SliceSpec]:
    """Replace layers [start, end) of `base` with the same layers of `donor`."""
    base, donor = spec["base"], spec["donor"]
    start, end = spec["layers"]
    n = depth(base)
    if depth(donor) != n:
        raise DusError(f"{places['donor']}: graft donor has {depth(donor)} layers, base has {n}; graft between models of equal depth")
    if end > n:
        raise DusError(f"{places['layers']}: graft.layers [{start}, {end}] is outside the {n}-layer models; use 0 <= start < end <= {n}")
    slices = [SliceSpec(base, 0, start, places["base"])] if start > 0 else []
    slices.append(SliceSpec(donor, start, end, places["layers"]))
    if end < n:
        slices.append(SliceSpec(base, end, n, places["base"]))
    return slices


def _expand(spec, places, depth) -> list[SliceSpec]:
    """LLaMA-Pro block expansion: after every k layers (or after each listed source layer)
    insert a copy of the layer just before it with o_proj and down_proj zeroed, so the
    expanded model computes exactly the base function until the new blocks are trained."""
    model = spec["model"]
    n = depth(model)
    if "every" in spec:
        k = spec["every"]
        if k > n:
            raise DusError(f"{places['every']}: expand every {k} is more than the model's {n} layers")
        positions = list(range(k - 1, n, k))
    else:
        positions = sorted(spec["positions"])
        repeated = sorted({p for p in positions if positions.count(p) > 1})
        if repeated:
            raise DusError(f"{places['positions']}: expand position {repeated[0]} is listed twice; list each source "
                           "layer once (a new block goes after each)")
        if positions[-1] >= n:
            raise DusError(f"{places['positions']}: expand position {positions[-1]} is outside the model's {n} layers (0..{n - 1})")
    slices, start = [], 0
    for position in positions:
        slices.append(SliceSpec(model, start, position + 1, places["model"]))
        slices.append(SliceSpec(model, position, position + 1, places["model"], new_block=True))
        start = position + 1
    if start < n:
        slices.append(SliceSpec(model, start, n, places["model"]))
    return slices
