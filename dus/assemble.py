"""Execute a LayerPlan in memory: the built model without writing it.

`dus build` executes a plan on disk (writer.py). Here the same plan becomes an ordinary
transformers model object over one loaded copy of each source: every output layer is a
*shell* of its source layer, a module tree of its own whose parameters and buffers are
the source's own tensors, so a layer repeated in the plan costs no memory, its attention
still knows its own output index (the KV cache of `generate` works), and PEFT can put a
separate adapter on each output position (as its `layer_replication` does).

The plan's transforms are applied without copying frozen weights:
- a scale on a layer's tensors (recipes' `parameters: scale`, calibration): the matching
  `nn.Linear` modules of the shell become `ScaledLinear`, which multiplies the shared
  weight by the factor on the fly (the same float32 product the writer stores, so the
  logits equal the built model's), and whose backward recomputes that product instead
  of keeping it;
- a new (zero-init) block: its output projections scaled by 0;
- a blend (seam smoothing), or a scale on a tensor outside any `nn.Linear` (Mixtral's
  stacked experts, norms, embeddings): a private transformed copy of that tensor, since
  its value exists nowhere else;
- on 4-bit (QLoRA) sources, a scale on a quantized Linear scales its output (a forward
  hook, `output_scale`): the product of a scale and a 4-bit weight exists only as that.
Layers named in `own` (the ones a heal trains) are private copies, transformed exactly
as the writer transforms them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dus.errors import DusError
from dus.plan import LayerPlan, NonLayerSource, OutputLayer, scale_for


class NotInMemory(DusError):
    """A plan (or a launch) the in-memory model cannot execute exactly; callers fall back
    to the built checkpoint and say why in one line."""


class _ScaledLinearFunction(torch.autograd.Function):
    """y = x (s W)^T + s_b b, keeping only W (the shared parameter) for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_scale: float, bias_scale: float):
        ctx.save_for_backward(weight)
        ctx.weight_scale = weight_scale
        scaled_bias = None if bias is None else bias * bias_scale
        return F.linear(x, weight * weight_scale, scaled_bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_x = grad_output @ (weight * ctx.weight_scale) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class ScaledLinear(nn.Linear):
    """An `nn.Linear` over another Linear's (frozen, shared) parameters, with the plan's
    factors for its weight and bias. A subclass of nn.Linear so PEFT can wrap it."""

    def __init__(self, linear: nn.Linear, weight_scale: float, bias_scale: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_scale = float(weight_scale)
        self.bias_scale = float(bias_scale)

    @property
    def exact_on_output(self) -> bool:
        """A power-of-two factor shared by weight and bias (calibration's floor 0.5, say)
        scales every product and sum exactly, so the output can be scaled instead of the
        weight: bitwise the same result, with no weight-sized product per pass."""
        same = self.bias is None or self.bias_scale == self.weight_scale
        return same and self.weight_scale != 0 and math.frexp(self.weight_scale)[0] == 0.5

    def forward(self, x):
        if self.exact_on_output:
            return F.linear(x, self.weight, self.bias) * self.weight_scale
        if self.weight.requires_grad:  # trained through: let autograd see the product
            bias = None if self.bias is None else self.bias * self.bias_scale
            return F.linear(x, self.weight * self.weight_scale, bias)
        return _ScaledLinearFunction.apply(x, self.weight, self.bias, self.weight_scale, self.bias_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.weight_scale:g}, bias_scale={self.bias_scale:g}"


def is_quantized(tensor: torch.Tensor) -> bool:
    """A packed low-bit weight (bitsandbytes' Params4bit / Int8Params), not a value."""
    return not tensor.is_floating_point()


def _scaled_output(module, _args, output):
    return output * module.output_scale


def scale_output(linear: nn.Module, factor: float) -> None:
    """Multiply a quantized Linear's output by `factor` (its weight cannot take it)."""
    linear.output_scale = float(factor)
    linear.register_forward_hook(_scaled_output)


def shell(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors."""
    memo = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


@dataclass
class Sources:
    """One loaded model per plan source, by the name the plan uses."""

    models: dict[str, nn.Module]
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> nn.Module:
        return self.models[name]

    def by_path(self, path: str | Path) -> str | None:
        """The plan's name of the source at `path`, if one is loaded from there."""
        wanted = Path(path).resolve()
        for name, source in self.paths.items():
            if source.resolve() == wanted:
                return name
        return None


def load_sources(plan: LayerPlan, dtype=None, device=None, quiet: bool = True, **kwargs) -> Sources:
    """Load each source of the plan once (safetensors only, no remote code)."""
    from dus.checkpoint import ModelDir

    models, paths = {}, {}
    for name, path in plan.models.items():
        directory = ModelDir(path)
        model = directory.load_model(dtype, device, quiet=quiet, **kwargs)
        model.eval()
        model.requires_grad_(False)
        models[name], paths[name] = model, directory.path
    return Sources(models, paths)


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder (`model.model` of a transformers causal LM)."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise DusError(f"{type(model).__name__}: no decoder with a `layers` list; dus assembles "
                       "models of the form model.layers.<i>")
    return inner


def output_config(plan: LayerPlan, sources: Sources):
    """The transformers config of the plan's output: what `dus build` writes as config.json."""
    from dus.config_rewrite import output_config as config_dict
    from dus.sources import load_source

    headers = {name: load_source(name, path) for name, path in plan.models.items()}
    data, _ = config_dict(plan, headers)
    return type(sources[plan.config_from].config).from_dict(data)


def assemble(plan: LayerPlan, sources: Sources, own: set[int] | frozenset = frozenset(), config=None):
    """The plan as a transformers model over `sources`' own tensors; layers in `own`
    (output indices) are private copies. See the module docstring."""
    base = sources[plan.config_from]
    config = config if config is not None else output_config(plan, sources)
    config.dtype = getattr(base.config, "dtype", None)
    config._attn_implementation = base.config._attn_implementation  # masks are made for the layers' kernel
    model = shell_without_layers(base)
    model.config = config
    inner = decoder(model)
    inner.config = config
    _take_non_layer_modules(model, plan, sources)
    layers = []
    for index, layer in enumerate(plan.layers):
        source_layer = decoder(sources[layer.model]).layers[layer.layer]
        if index in own or layer.blend is not None:
            built = _private_layer(source_layer, layer, index, sources)
        else:
            built = _shared_layer(source_layer, layer, index)
        for module in built.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        layers.append(built)
    inner.layers = nn.ModuleList(layers)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = inner.embed_tokens.weight
    model.name_or_path = ""
    return model


def shell_without_layers(model: nn.Module) -> nn.Module:
    """A shell of a causal LM (or of its decoder) with an empty layer list: the layers come
    from elsewhere (the plan; the teacher's view)."""
    inner = model if isinstance(getattr(model, "layers", None), nn.ModuleList) else decoder(model)
    layers = inner.layers
    inner.layers = nn.ModuleList()
    try:
        return shell(model)
    finally:
        inner.layers = layers


def _take_non_layer_modules(model: nn.Module, plan: LayerPlan, sources: Sources) -> None:
    """Embeddings from the plan's embeddings source, final norm and lm_head from its head
    source, each with its scale rules; parameterless modules (rotary tables) stay."""
    from dus.writer import is_embedding

    inner = decoder(model)
    holders = [(inner, name, f"model.{name}") for name, _ in inner.named_children() if name != "layers"]
    holders += [(model, name, name) for name, _ in model.named_children() if name != "model"]
    for parent, name, path in holders:
        group = plan.embeddings if is_embedding(f"{path}.weight") else plan.head
        source_model = sources[group.model]
        source_parent = decoder(source_model) if parent is inner else source_model
        module = getattr(source_parent, name)
        if not any(True for _ in module.parameters()):
            continue
        setattr(parent, name, _transformed(shell(module), path, group))


def _transformed(module: nn.Module, path: str, group: NonLayerSource) -> nn.Module:
    """A non-layer module with its group's scale rules (a private copy where one applies)."""
    for name, param in list(module.named_parameters()):
        factor = scale_for(group.scale, f"{path}.{name}")
        if factor is not None and factor != 1.0:
            if is_quantized(param):
                raise NotInMemory(f"{path}.{name} is 4-bit and has a scale rule")
            _replace_parameter(module, name, param.detach() * factor)
    return module


def _replace_parameter(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, name = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    setattr(owner, name, nn.Parameter(value, requires_grad=False))


def _tensor_names(index: int, param_name: str) -> tuple[str, ...]:
    """The name a recipe filter is matched against, as the writer matches it."""
    return (f"model.layers.{index}.{param_name}",)


def _is_output_projection(name: str) -> bool:
    return any(part in name for part in ("o_proj", "down_proj"))


def _factor(layer: OutputLayer, index: int, param_name: str) -> float | None:
    """The factor of one parameter of output layer `index`: 0 for the output projections
    of a new block, else the first matching scale rule (None: unchanged)."""
    if layer.zero_output and _is_output_projection(param_name):
        return 0.0
    return scale_for(layer.scale, *_tensor_names(index, param_name))


def _shared_layer(source_layer: nn.Module, layer: OutputLayer, index: int) -> nn.Module:
    """A shell of the source layer; factors on its Linears are applied on the fly."""
    built = shell(source_layer)
    if not layer.scale and not layer.zero_output:
        return built
    handled: set[str] = set()
    linears = [(n, m) for n, m in built.named_modules()  # plain Linears and 4-bit ones; other subclasses as params
               if type(m) is nn.Linear or (isinstance(m, nn.Linear) and m.weight is not None and is_quantized(m.weight))]
    for name, linear in linears:
        weight = _factor(layer, index, f"{name}.weight")
        bias = _factor(layer, index, f"{name}.bias") if linear.bias is not None else None
        quantized = is_quantized(linear.weight)
        handled.update({f"{name}.weight", f"{name}.bias"})
        if weight in (None, 1.0) and bias in (None, 1.0):
            continue
        if quantized:
            if linear.bias is not None and bias != weight:
                raise NotInMemory(f"output layer {index}: {name} is 4-bit and its weight and bias have different "
                                  "scales, which only the built weights can hold")
            scale_output(linear, 1.0 if weight is None else weight)
            continue
        parent_path, _, attr = name.rpartition(".")
        parent = built.get_submodule(parent_path) if parent_path else built
        setattr(parent, attr, ScaledLinear(linear, 1.0 if weight is None else weight, 1.0 if bias is None else bias))
    for name, param in list(built.named_parameters()):
        factor = None if name in handled else _factor(layer, index, name)
        if factor is not None and factor != 1.0:
            if is_quantized(param):
                raise NotInMemory(f"output layer {index}: {name} is 4-bit outside a Linear and has a scale rule")
            _replace_parameter(built, name, param.detach() * factor)  # no Linear to scale: a private copy
    return built


def _private_layer(source_layer: nn.Module, layer: OutputLayer, index: int, sources: Sources) -> nn.Module:
    """A copy of the layer with its own parameters, transformed in the writer's order
    (blend, then scale; zero for a new block's output projections)."""
    from dus.writer import blend_tensors

    if any(is_quantized(param) for param in source_layer.parameters()):
        raise NotInMemory(f"output layer {index} must be a copy of its own (it trains or is blended), and its "
                          "source is loaded in 4 bits")
    built = copy.deepcopy(source_layer)
    other = None
    if layer.blend is not None:
        other = dict(decoder(sources[layer.blend.model]).layers[layer.blend.layer].named_parameters())
    with torch.no_grad():
        for name, param in built.named_parameters():
            if layer.zero_output and _is_output_projection(name):
                param.zero_()  # as the writer writes a new block: +0.0, not a product
                continue
            value = param.detach()
            if other is not None:
                if layer.blend.method == "slerp" and value.dim() > 2:
                    raise NotInMemory(f"output layer {index} SLERP-blends stacked expert weights, which the build "
                                      "blends expert by expert")
                value = blend_tensors(value, other[name].detach(), layer.blend.t, layer.blend.method).to(value.dtype)
            factor = _factor(layer, index, name)
            if factor is not None:
                value = value * factor
            param.copy_(value)
    return built
