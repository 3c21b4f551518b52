"""Which layers heal: the band around each seam, and what in them is trainable.

A DUS model is broken only where layers that never met were joined, so LoRA goes on the
layers within `radius` of each seam (the manifest says where the seams are), and on every
linear projection inside them. The projections are discovered from the model rather than
listed per architecture: whatever is an `nn.Linear` inside `...layers.N` is a target, so
Llama's q/k/v/o and gate/up/down, Phi-3's fused qkv_proj/gate_up_proj and anything new
work alike. Weights that are not `nn.Linear` (the stacked experts of transformers-5 MoE
blocks, routers) cannot take a LoRA module and are reported as left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dus.errors import DusError
from dus.plan import layers_near_seams


@dataclass
class LayerStack:
    path: str  # e.g. "model.layers"
    num_layers: int

    @property
    def pattern(self) -> str:
        """The last path component, which PEFT's `layers_pattern` matches."""
        return self.path.split(".")[-1]


@dataclass
class HealTargets:
    """What a heal run trains, with the reasons, for printing and for the run record."""

    layers: list[int]
    seams: list[int]
    reason: str
    linear_modules: list[str] = field(default_factory=list)  # relative to a layer
    left_out: list[str] = field(default_factory=list)  # non-Linear weights in the chosen layers
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "seams": self.seams,
            "reason": self.reason,
            "linear_modules": self.linear_modules,
            "left_out": self.left_out,
        }


def find_layer_stack(model) -> LayerStack:
    """The decoder's layer list: the `ModuleList` named `*layers` with one entry per layer."""
    import torch.nn as nn

    num_layers = model.config.get_text_config().num_hidden_layers
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name.split(".")[-1] == "layers"
    ]
    if len(found) != 1:
        raise DusError(
            f"cannot find the decoder layer list of {type(model).__name__} "
            f"(expected one ModuleList '...layers' of {num_layers} blocks, found {found or 'none'}); "
            "set lora.target_modules and lora.layers_to_transform explicitly"
        )
    return LayerStack(found[0], num_layers)


def layer_module(model, stack: LayerStack, index: int):
    return model.get_submodule(stack.path)[index]


def linear_modules(layer) -> list[str]:
    """Names (relative to the layer) of every `nn.Linear` inside one decoder layer."""
    import torch.nn as nn

    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def non_linear_weights(layer) -> list[str]:
    """Matrix-shaped parameters of a layer that live outside any `nn.Linear` (MoE expert
    stacks, routers): LoRA cannot wrap them."""
    import torch.nn as nn

    inside_linear = {
        f"{name}.{pname}" if name else pname
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
        for pname, _ in module.named_parameters(recurse=False)
    }
    # a ZeRO-3 partition is a flat slice; ds_shape is the shape of the whole parameter
    return [name for name, param in layer.named_parameters()
            if len(getattr(param, "ds_shape", param.shape)) >= 2 and name not in inside_linear]


def manifest_seams(manifest, num_layers: int) -> list[int] | None:
    """The seams of the build plan, checked against the model actually loaded; None
    without a manifest (or for a model dus healed but did not build)."""
    if manifest is None or manifest.plan is None:
        return None
    if manifest.num_layers != num_layers:
        raise DusError(
            f"dus-manifest.json describes {manifest.num_layers} layers but the model has {num_layers}; "
            "the manifest belongs to another model; remove it or rebuild with dus build"
        )
    return manifest.seams


def manifest_new_layers(manifest) -> list[int]:
    return manifest.new_layers if manifest is not None else []


def choose_layers(
    num_layers: int, manifest, radius: int, explicit: list[int] | str = "auto"
) -> HealTargets:
    """The layers to heal: explicit ones, else those within `radius` of the manifest's
    seams, else (no manifest, or no seams) every layer, with a warning."""
    seams = manifest_seams(manifest, num_layers)
    if explicit != "auto":
        bad = [i for i in explicit if not 0 <= i < num_layers]
        if bad:
            raise DusError(f"seam.layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        return HealTargets(sorted(set(explicit)), seams or [], "seam.layers given explicitly")
    if seams is None:
        return HealTargets(
            list(range(num_layers)),
            [],
            "no dus-manifest.json: all layers",
            warnings=[
                "no dus-manifest.json in the model directory, so the seams are unknown: LoRA goes on all "
                f"{num_layers} layers (set seam.layers to choose)"
            ],
        )
    if not seams:
        return HealTargets(
            list(range(num_layers)),
            [],
            "manifest has no seams: all layers",
            warnings=["the build manifest lists no seams: LoRA goes on all layers"],
        )
    layers = layers_near_seams(num_layers, seams, radius)
    return HealTargets(layers, seams, f"layers within {radius} of seams {seams}")


def describe_targets(model, targets: HealTargets) -> HealTargets:
    """Fill in the linear modules (union over the chosen layers) and what LoRA cannot reach."""
    stack = find_layer_stack(model)
    names: list[str] = []
    left_out: list[str] = []
    for index in targets.layers:
        layer = layer_module(model, stack, index)
        for name in linear_modules(layer):
            if name not in names:
                names.append(name)
        for name in non_linear_weights(layer):
            if name not in left_out:
                left_out.append(name)
    if not names:
        raise DusError(
            f"no nn.Linear modules in layers {targets.layers} of {type(model).__name__}; "
            "LoRA has nothing to wrap: use mode: full or set lora.target_parameters"
        )
    targets.linear_modules = names
    targets.left_out = left_out
    if left_out:
        targets.warnings.append(
            f"LoRA covers the nn.Linear projections {', '.join(names)}; not covered (not nn.Linear): "
            f"{', '.join(left_out)} (PEFT's lora.target_parameters can reach them)"
        )
    return targets
