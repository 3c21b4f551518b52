"""Zero-token seam calibration: quieten the repeated layers before any training.

In a SOLAR or duplication build the second copy of a source layer meets a residual
stream that already went through its first copy, and applies the same transformation
again, moving the stream along directions the layers after it never saw in training.
Scaling the residual-branch outputs (`o_proj`, `down_proj`) of the repeated copies by a
factor below 1 softens that (measured on SmolLM2 SOLAR 30 -> 44: x0.5 wins back about 60%
of the seam's perplexity cost with no training), and the right factor can be chosen with
forward passes alone: score a few factors on calibration text and keep the best.

A floor keeps the built model what the user built: no factor may leave a layer's output
projections with less than `MIN_FACTOR` of the norm they had in the source (below that the
deeper model is the base model in disguise). Factors are relative to the weights as built,
so a layer the recipe already scaled gets a correspondingly smaller range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dus.errors import DusError
from dus.plan import LayerPlan, scale_for

MIN_FACTOR = 0.5  # of the source layer's output-projection norm; see the module docstring
DEFAULT_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


COPIES = ("later", "all")  # which copies of a repeated source layer calibration scales


def repeated_layers(plan: LayerPlan, copies: str = "later") -> list[int]:
    """Output layers whose source layer appears more than once in the plan: with
    `copies="later"` the second (third ...) copies, which add a source layer's update to
    the stream once more; with "all" every copy, the first included. New
    (zero-initialised) blocks are excluded: they add nothing until trained."""
    by_source: dict[tuple[str, int], list[int]] = {}
    for index, layer in enumerate(plan.layers):
        if not layer.new:
            by_source.setdefault((layer.model, layer.layer), []).append(index)
    chosen = [indices[0 if copies == "all" else 1:] for indices in by_source.values() if len(indices) > 1]
    return sorted(index for indices in chosen for index in indices)


def floor_for(plan: LayerPlan, index: int) -> float:
    """The smallest factor layer `index` may take: MIN_FACTOR of its source norm, relative
    to the scale the recipe already applied to its output projections."""
    layer = plan.layers[index]
    built = min(
        abs(scale_for(layer.scale, name) if scale_for(layer.scale, name) is not None else 1.0)
        for name in ("o_proj", "down_proj")
    )
    if built <= MIN_FACTOR:
        return 1.0  # already at or below the floor: leave it alone
    return MIN_FACTOR / built


@dataclass
class Calibration:
    """What calibration chose, for the heal record and `dus compare`."""

    layers: list[int]
    factor: float  # the factor asked for; each layer gets max(factor, its floor)
    per_layer: dict[int, float]
    scores: dict[str, float] = field(default_factory=dict)  # factor -> calibration perplexity
    tokens: int = 0
    text: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_layer"] = {str(k): v for k, v in self.per_layer.items()}
        return data


def output_projections(layer) -> list:
    """The `nn.Linear` modules of a decoder layer that write into the residual stream."""
    import torch.nn as nn

    found = [
        module for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in ("o_proj", "down_proj")
    ]
    if not found:
        raise DusError(f"{type(layer).__name__}: no o_proj/down_proj to calibrate")
    return found


def scale_layers(model, per_layer: dict[int, float]) -> None:
    """Multiply the output projections (weights and biases) of each layer in place."""
    import torch

    from dus.heal.targets import find_layer_stack

    stack = model.get_submodule(find_layer_stack(model).path)
    with torch.no_grad():
        for index, factor in per_layer.items():
            if factor == 1.0:
                continue
            for linear in output_projections(stack[index]):
                linear.weight.mul_(factor)
                if linear.bias is not None:
                    linear.bias.mul_(factor)


def factors_for(plan: LayerPlan, layers: list[int], factor: float) -> dict[int, float]:
    return {index: max(factor, floor_for(plan, index)) for index in layers}


def calibrate(model, plan: LayerPlan, ids, factors=DEFAULT_FACTORS, window: int = 512, on_factor=None,
              copies: str = "later") -> Calibration:
    """Score each factor on the token stream `ids` (perplexity, non-overlapping windows),
    leave the best one applied to `model`, and say what was chosen."""
    from dus.measure.perplexity import evaluate_stream

    layers = repeated_layers(plan, copies)
    if not layers:
        return Calibration([], 1.0, {}, {}, len(ids))
    bad = [f for f in factors if not 0 < f <= 1.0]
    if bad:
        raise DusError(f"calibrate.factors {bad}: factors are in (0, 1]; {MIN_FACTOR} is the floor")
    current = {index: 1.0 for index in layers}
    scores: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for factor in sorted(set(factors), reverse=True):
        wanted = factors_for(plan, layers, factor)
        scale_layers(model, {i: wanted[i] / current[i] for i in layers})
        current = wanted
        scores[f"{factor:g}"] = evaluate_stream(model, ids, window, window).perplexity
        if on_factor is not None:
            on_factor(factor, scores[f"{factor:g}"])
    best = min(scores, key=scores.get)
    chosen = factors_for(plan, layers, float(best))
    scale_layers(model, {i: chosen[i] / current[i] for i in layers})
    model.train(was_training)
    return Calibration(layers, float(best), chosen, scores, len(ids))
