"""RMSNorms of bf16 (or fp16) inputs that keep only their input for backward.

An RMSNorm as transformers writes it (`weight * (x * rsqrt(mean(x^2) + eps))`, computed in
float32) keeps for backward a float32 copy of a low-precision x (4 bytes an element against
x's own 2) and, where its weight trains, the normalized x as well. Here such a norm keeps x
alone and runs its own forward again in backward: the same graph, so bitwise the same
gradients (tests/test_heal_norms.py, five families). On a Llama-2-7B band heal at 4 x 2048
bf16 tokens that is 134 MB for each trained norm and 67 MB for each frozen one in the
gradient's path (arithmetic).

Float32 inputs are left alone: there the norm keeps no copy, and recomputing a trained
norm would only drop its normalized x at the price of summing the residual stream's
gradient in another order (float rounding, which Adam amplifies past the 1e-5 the in-memory
heal is held to against the built checkpoint's).
"""

from __future__ import annotations

import types

import torch
from torch import nn


class RecomputedNorm(torch.autograd.Function):
    """A norm module's forward that keeps only its input for backward and runs the
    module's own forward again there (the same graph, so the same gradients)."""

    @staticmethod
    def forward(ctx, x, weight, module):
        ctx.module = module
        ctx.save_for_backward(x)
        return module.plain_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        wants_x, wants_weight = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(wants_x)
            out = ctx.module.plain_forward(leaf)
        wanted = [t for t, wants in ((leaf, wants_x), (ctx.module.weight, wants_weight)) if wants]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (next(grads) if wants_x else None), (next(grads) if wants_weight else None), None


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _norm_forward(self, x):
    # x without a gradient: the plain norm keeps at most its normalized x, no larger than x
    if torch.is_grad_enabled() and x.requires_grad and x.dtype in LOW_PRECISION:
        return RecomputedNorm.apply(x, self.weight, self)
    return self.plain_forward(x)


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)


def recompute_norms(layers) -> int:
    """RMSNorms in `layers` keep only their input for backward when it is bf16 or fp16 and
    has a gradient (see the module docstring); returns how many were patched."""
    patched = 0
    for layer in layers:
        for module in layer.modules():
            if is_rms_norm(module) and not hasattr(module, "plain_forward"):
                module.plain_forward = module.forward
                module.forward = types.MethodType(_norm_forward, module)
                patched += 1
    return patched
