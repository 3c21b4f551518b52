"""Scaled output projections computed once per search, not once per window.

The in-memory model multiplies a shared weight by its factor on every forward call
(`ScaledLinear`), which is right for training but, when scoring a candidate over several
windows, repeats the same product per window and per candidate. Here each (weight,
factor) product is kept in a small LRU and the Linear reads it: the very tensor the
per-call product would make, so the output is bitwise the same.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_BUDGET = 256 * 2**20


class _Prescaled(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ScaledWeights:
    """(id of the shared weight, factor) -> the product, bounded by `budget` bytes."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget, self.bytes = budget, 0
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # (source, product)

    def product(self, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        key = (id(tensor), factor)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][1]
        with torch.no_grad():
            value = tensor * factor  # the product _ScaledLinearFunction forms on each call
        size = value.numel() * value.element_size()
        if size <= self.budget:
            self.entries[key] = (tensor, value)  # the source is held, so its id is not reused
            self.bytes += size
            while self.bytes > self.budget:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()
        return value

    def apply(self, model: nn.Module) -> int:
        """Swap each frozen ScaledLinear that forms a weight product per call for a Linear
        over the kept product, while this model's products fit in the budget (the model
        holds them until it is dropped; the rest keep forming theirs per call); returns
        how many were swapped."""
        from dus.assemble import ScaledLinear

        swapped = held = 0
        for name, module in list(model.named_modules()):
            if type(module) is not ScaledLinear or module.exact_on_output or module.weight.requires_grad:
                continue
            size = sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)
            if held + size > self.budget:
                continue
            held += size
            bias = None if module.bias is None else self.product(module.bias, module.bias_scale)
            parent_path, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, _Prescaled(self.product(module.weight, module.weight_scale), bias))
            swapped += 1
        return swapped
