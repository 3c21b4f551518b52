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

from dataclasses import asdict, dataclass, field, replace

from dus.errors import DusError
from dus.plan import LayerPlan, ScaleRule, scale_for

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
    plan: LayerPlan | None = field(default=None, repr=False)  # the build plan with the chosen factors as scale rules

    def to_dict(self) -> dict:
        data = asdict(replace(self, plan=None))
        del data["plan"]
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


def projection_names(layer) -> list[str]:
    """Names (inside a decoder layer) of the parameters of its output projections."""
    return [name for name, _ in layer.named_parameters() if "o_proj" in name or "down_proj" in name]


def with_output_factors(plan: LayerPlan, per_layer: dict[int, float], names: list[str]) -> LayerPlan:
    """The plan with each layer's output projections (`names`, inside a layer) multiplied
    by its factor: scale rules placed before the recipe's own, so the product of both is
    what `dus build` writes and what the in-memory model computes."""
    layers = list(plan.layers)
    for index, factor in per_layer.items():
        if factor == 1.0:
            continue
        layer = layers[index]
        rules = []
        for name in names:
            built = scale_for(layer.scale, f"model.layers.{index}.{name}")
            rules.append(ScaleRule((1.0 if built is None else built) * factor, name))
        layers[index] = replace(layer, scale=(*rules, *layer.scale))
    return replace(plan, layers=layers)


def calibrate_plan(plan: LayerPlan, sources, ids, factors=DEFAULT_FACTORS, window: int = 512, on_factor=None,
                   copies: str = "later", config=None) -> Calibration:
    """`calibrate` on the plan executed in memory: each factor is a plan of its own
    (scale rules), assembled over the loaded sources and scored, with no weight changed.
    The result's `plan` is the plan to heal from."""
    from dus.assemble import assemble, decoder
    from dus.measure.perplexity import evaluate_stream

    layers = repeated_layers(plan, copies)
    if not layers:
        return Calibration([], 1.0, {}, {}, len(ids), plan=plan)
    _check_factors(factors)
    first = plan.layers[layers[0]]
    names = projection_names(decoder(sources[first.model]).layers[first.layer])
    scores: dict[str, float] = {}
    for factor in sorted(set(factors), reverse=True):
        candidate = with_output_factors(plan, factors_for(plan, layers, factor), names)
        model = assemble(candidate, sources, config=config).eval()
        scores[f"{factor:g}"] = evaluate_stream(model, ids, window, window).perplexity
        del model
        if on_factor is not None:
            on_factor(factor, scores[f"{factor:g}"])
    best = min(scores, key=scores.get)
    chosen = factors_for(plan, layers, float(best))
    return Calibration(layers, float(best), chosen, scores, len(ids), plan=with_output_factors(plan, chosen, names))


def _check_factors(factors) -> None:
    bad = [f for f in factors if not 0 < f <= 1.0]
    if bad:
        raise DusError(f"calibrate.factors {bad}: factors are in (0, 1]; {MIN_FACTOR} is the floor")


def factors_for(plan: LayerPlan, layers: list[int], factor: float) -> dict[int, float]:
    return {index: max(factor, floor_for(plan, index)) for index in layers}


def calibrate(model, plan: LayerPlan, ids, factors=DEFAULT_FACTORS, window: int = 512, on_factor=None,
              copies: str = "later") -> Calibration:
    """Score each factor on the token stream `ids` (perplexity, non-overlapping windows),
    leave the best one applied to `model`, and say what was chosen."""
    from dus.heal.targets import find_layer_stack
    from dus.measure.perplexity import evaluate_stream

    layers = repeated_layers(plan, copies)
    if not layers:
        return Calibration([], 1.0, {}, {}, len(ids), plan=plan)
    _check_factors(factors)
    stack = model.get_submodule(find_layer_stack(model).path)
    # Each factor multiplies the weights as built (kept aside), never the previous factor's
    # product: the chosen weights are exactly what the calibrated plan describes.
    originals = {index: [(linear, linear.weight.detach().clone(), None if linear.bias is None else
                          linear.bias.detach().clone()) for linear in output_projections(stack[index])]
                 for index in layers}
    scores: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for factor in sorted(set(factors), reverse=True):
        _set_factors(originals, factors_for(plan, layers, factor))
        scores[f"{factor:g}"] = evaluate_stream(model, ids, window, window).perplexity
        if on_factor is not None:
            on_factor(factor, scores[f"{factor:g}"])
    best = min(scores, key=scores.get)
    chosen = factors_for(plan, layers, float(best))
    _set_factors(originals, chosen)
    model.train(was_training)
    names = projection_names(stack[layers[0]])
    return Calibration(layers, float(best), chosen, scores, len(ids), plan=with_output_factors(plan, chosen, names))


def _set_factors(originals: dict, per_layer: dict[int, float]) -> None:
    import torch

    with torch.no_grad():
        for index, factor in per_layer.items():
            for linear, weight, bias in originals[index]:
                linear.weight.copy_(weight * factor)
                if bias is not None:
                    linear.bias.copy_(bias * factor)
