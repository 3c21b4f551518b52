"""A gated MLP that keeps two of its three large activations for backward.

`down_proj(act(gate_proj(x)) * up_proj(x))` (Llama, Mistral, Qwen2/3, Gemma 2/3) saves
three intermediate-sized tensors per layer for backward as autograd builds it: `gate`
(for the activation's derivative), and `act(gate)` and `up` (for the product's). The
activation is cheap to compute again from `gate`, so the product here saves only `gate`
and `up` and recomputes `act(gate)` in backward, with the same kernels: the forward and
every gradient are bitwise what the unpatched module gives (tests/test_gated_mlp.py).
On SmolLM2 SOLAR 44 (batch 4 x 256, 30 layers in the gradient's path) that is 6.3 MB a
layer; on a 7B model at 4 x 2048 tokens, 180 MB a layer in bf16.
"""

from __future__ import annotations

import types

import torch
from torch import nn

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class ActTimesUp(torch.autograd.Function):
    """act(gate) * up, keeping gate and up (not act(gate)) for backward."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        wants_gate, wants_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(wants_gate)
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if wants_up else None
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if wants_gate else None
        return grad_gate, grad_up, None


def _forward(self, x):
    return self.down_proj(ActTimesUp.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, part) for part in GATED_MLP_PARTS) and not hasattr(module, "experts")


def recompute_activations(layers) -> int:
    """Give every gated MLP in `layers` the forward above; returns how many. Other MLPs
    (Phi-3's fused gate_up_proj, mixture-of-experts blocks) keep their own."""
    patched = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and is_gated_mlp(mlp) and getattr(mlp.forward, "__func__", None) is not _forward:
            mlp.forward = types.MethodType(_forward, mlp)
            patched += 1
    return patched
