"""Learned per-layer gates: one scalar per output layer and residual branch.

A plan already says how loud each layer's residual branches are: a recipe's scale on
`o_proj` / `down_proj`, calibration's factor, 0 for a layer inserted behind a closed gate
(the `parents` preset's `gated` method). Here that factor becomes a trainable scalar: the
output of each branch's projection (attention: `o_proj`; MLP: `down_proj`) is multiplied
by a gate that starts at the plan's factor and is trained by the heal's own loss, alone
(`distill.student: gates`: a few dozen parameters, no weight gradients, no optimizer state
for any weight) or beside the band (`gates.train: true`).

Gates live on the in-memory model only. The plan is first *stripped* of its output-
projection factors (the layers under the gates are the sources' own projections, or for
trained layers unscaled copies), so a gate that starts at 0 still reaches its source's
weights intact; when the healed model is written the gates are *folded* back: a shared
layer's gate becomes its plan's scale rule on `o_proj` / `down_proj` (the writer multiplies
the source weight), a trained layer's gate multiplies its trained tensors. The result is a
plain Hugging Face checkpoint; nothing custom is needed to load it.

Bounds (applied after every optimizer step): in a build of one model a gate whose plan
factor was not 0 stays at or above `MIN_FACTOR` (calibration's floor: no inherited layer
ends below half its source norm, or the deeper model is the base in disguise). A gate that
started at 0 (a layer inserted behind a gate), and every gate of a build of several models,
may go down to 0: the training decides how much of the inserted layer the child keeps. A
gate that is not finite stops the run in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from transformers import TrainerCallback

from dus.errors import DusError
from dus.plan import LayerPlan, ScaleRule, scale_for

BRANCHES = {"attention": "o_proj", "mlp": "down_proj"}
GATE = "dus_gate"  # the parameter's name on a gated projection


def _branch_of(name: str) -> str | None:
    for branch, projection in BRANCHES.items():
        if projection in name:
            return branch
    return None


def projection_params(layer: nn.Module) -> dict[str, list[str]]:
    """Branch -> the names (inside a decoder layer) of its output projection's weight and bias."""
    found: dict[str, list[str]] = {}
    for name, _ in layer.named_parameters():
        branch = _branch_of(name)
        if branch is not None:
            found.setdefault(branch, []).append(name)
    return found


def projection_modules(layer: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Branch -> (name inside the layer, module) of its output projection (an nn.Linear)."""
    found = {}
    for name, module in layer.named_modules():
        leaf = name.split(".")[-1]
        for branch, projection in BRANCHES.items():
            if leaf == projection and isinstance(module, nn.Linear):
                found[branch] = (name, module)
    return found


def names_in_plan(plan: LayerPlan, sources):
    """`names_of(index)`: projection_params of output layer `index`'s source layer."""
    from dus.assemble import decoder

    def names_of(index: int) -> dict[str, list[str]]:
        layer = plan.layers[index]
        return projection_params(decoder(sources[layer.model]).layers[layer.layer])

    return names_of


def plan_factors(plan: LayerPlan, names_of) -> dict[int, dict[str, float]]:
    """Each output layer's factor per branch, as the plan scales its output projection.

    `names_of(index)` gives that layer's projection_params. A branch whose weight and bias
    the plan scales differently has no single gate: refused."""
    factors: dict[int, dict[str, float]] = {}
    for index, layer in enumerate(plan.layers):
        per_branch = {}
        for branch, names in names_of(index).items():
            values = {scale_for(layer.scale, f"model.layers.{index}.{name}") for name in names}
            values = {1.0 if v is None else float(v) for v in values}
            if len(values) != 1:
                raise DusError(f"output layer {index}: the plan scales the {BRANCHES[branch]} weight and bias "
                               "differently, which one gate cannot carry; drop the gates (gates.train: false)")
            per_branch[branch] = values.pop()
        factors[index] = per_branch
    return factors


def strip_factors(plan: LayerPlan, names_of) -> LayerPlan:
    """The plan with every output-projection factor set to 1 (the gates carry them)."""
    layers = []
    for index, layer in enumerate(plan.layers):
        names = [name for group in names_of(index).values() for name in group]
        if any(scale_for(layer.scale, f"model.layers.{index}.{name}") not in (None, 1.0) for name in names):
            layer = replace(layer, scale=(*(ScaleRule(1.0, name) for name in names), *layer.scale))
        layers.append(layer)
    return replace(plan, layers=layers)


def fold_into_plan(plan: LayerPlan, gates: dict[int, dict[str, float]], names_of) -> LayerPlan:
    """The stripped plan with each gate as its layer's output-projection scale rule."""
    layers = list(plan.layers)
    for index, per_branch in gates.items():
        rules = [ScaleRule(float(per_branch[branch]), name)
                 for branch, names in names_of(index).items() for name in names if branch in per_branch]
        if rules:
            layers[index] = replace(layers[index], scale=(*rules, *layers[index].scale))
    return replace(plan, layers=layers)


def _gated_output(module, _args, output):
    return output * getattr(module, GATE).to(output.dtype)


@dataclass
class Gates:
    """The gates installed on one model: where they are, where they started, their bounds."""

    modules: dict[tuple[int, str], nn.Module]
    initial: dict[tuple[int, str], float]
    floors: dict[tuple[int, str], float]
    trained: list[int]
    owners: dict = field(default_factory=dict, repr=False)  # (index, branch) -> (layer, name inside it)
    handles: list = field(default_factory=list, repr=False)

    def parameters(self) -> list[nn.Parameter]:
        return [getattr(module, GATE) for key, module in self.modules.items() if key[0] in self.trained]

    def values(self) -> dict[int, dict[str, float]]:
        result: dict[int, dict[str, float]] = {}
        for (index, branch), module in sorted(self.modules.items()):
            result.setdefault(index, {})[branch] = float(getattr(module, GATE).detach())
        return result

    def check_and_bound(self, step: int | None = None) -> None:
        """After an optimizer step: refuse a non-finite gate, keep each above its floor."""
        with torch.no_grad():
            for key, module in self.modules.items():
                gate = getattr(module, GATE)
                value = float(gate)
                if not math.isfinite(value):
                    at = f" at step {step}" if step is not None else ""
                    raise DusError(f"the gate of output layer {key[0]}'s {key[1]} branch became {value}{at}; no model "
                                   "was written: lower gates.lr (or --lr)")
                if value < self.floors[key]:
                    gate.fill_(self.floors[key])

    def record(self) -> dict:
        """For the heal record, the model card and `dus compare`."""
        values = self.values()
        return {"trained_layers": self.trained,
                "initial": {str(i): {b: self.initial[(i, b)] for b in values[i]} for i in values},
                "final": {str(i): values[i] for i in values},
                "floors": {str(i): {b: self.floors[(i, b)] for b in values[i]} for i in values}}

    def remove(self) -> None:
        """Take the hooks and parameters off the model (after folding)."""
        for handle in self.handles:
            handle.remove()
        for module in self.modules.values():
            delattr(module, GATE)
        self.handles.clear()


def install_gates(layers: nn.ModuleList, factors: dict[int, dict[str, float]], trained: list[int],
                  floor_of) -> Gates:
    """A gate on every branch whose plan factor is not 1 and on every branch of the
    trained layers; only the trained layers' gates train. `floor_of(index, initial)` is
    the lowest value a gate may take."""
    modules, initial, floors, owners, handles = {}, {}, {}, {}, []
    trained_set = set(trained)
    for index, layer in enumerate(layers):
        found = projection_modules(layer)
        for branch, factor in factors.get(index, {}).items():
            if factor == 1.0 and index not in trained_set:
                continue
            name, module = found.get(branch, (None, None))
            if module is None:
                raise DusError(f"output layer {index} has no nn.Linear {BRANCHES[branch]} to gate; "
                               "drop the gates (gates.train: false)")
            module.register_parameter(GATE, nn.Parameter(torch.tensor(float(factor)),
                                                         requires_grad=index in trained_set))
            handles.append(module.register_forward_hook(_gated_output))
            modules[(index, branch)] = module
            owners[(index, branch)] = (layer, name)
            initial[(index, branch)] = float(factor)
            floors[(index, branch)] = floor_of(index, float(factor))
    return Gates(modules, initial, floors, sorted(trained_set), owners, handles)


def fold_into_model(gates: Gates, private: set[int]) -> None:
    """Make the in-memory model compute what the folded plan describes, without hooks:
    a private (trained) layer's projection tensors are multiplied by its gate; a shared
    layer's projection becomes a ScaledLinear over the source's own weight."""
    from dus.assemble import ScaledLinear

    values = gates.values()
    gates.remove()
    with torch.no_grad():
        for (index, branch), module in gates.modules.items():
            value = values[index][branch]
            if index in private:
                module.weight.mul_(value)
                if module.bias is not None:
                    module.bias.mul_(value)
            else:
                layer, name = gates.owners[(index, branch)]
                parent_path, _, attribute = name.rpartition(".")
                parent = layer.get_submodule(parent_path) if parent_path else layer
                setattr(parent, attribute, ScaledLinear(module, value, value))


class BoundGates(TrainerCallback):
    """After every optimizer step: a non-finite gate stops the run; each gate keeps its floor."""

    def __init__(self, gates: Gates):
        self.gates = gates

    def on_step_end(self, args, state, control, **kwargs):
        self.gates.check_and_bound(state.global_step)


class GateGroup:
    """The gates as an optimizer parameter group of their own (their learning rate, no
    weight decay), added to a Trainer's optimizer before its scheduler is made."""

    @staticmethod
    def add(trainer, gates: Gates, lr: float) -> None:
        params = gates.parameters()
        if not params:
            return
        trainer.create_optimizer()
        optimizer = trainer.optimizer
        ids = {id(p) for p in params}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        defaults = dict(optimizer.defaults)
        defaults.update(lr=lr, weight_decay=0.0, params=params)
        optimizer.add_param_group(defaults)


def has_aliased_tensors(model) -> bool:
    """Two parameter names over one tensor, other than tied embeddings: an in-memory plan
    whose repeated layers are shared (a gates-only student, a band narrower than the overlap)."""
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = param.data_ptr()
        if key in seen and not ({"embed_tokens", "lm_head"} & set(f"{seen[key]}.{name}".split("."))):
            return True
        seen.setdefault(key, name)
    return False


def save_only_what_trains(trainer) -> None:
    """Checkpoints of an in-memory student hold only its trainable tensors (the frozen rest
    is the sources' own, unchanged, and shared between layers, which save_pretrained refuses);
    the Trainer's resume loads them back non-strictly, by name."""
    original = trainer._save

    def save(output_dir=None, state_dict=None):
        if state_dict is None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            state_dict = {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
        return original(output_dir, state_dict=state_dict)

    trainer._save = save
