"""Bytes autograd keeps for backward, weights aside: how the recomputing modules
(gated_mlp.py, norms.py) are measured, in their tests and in benchmarks/bench_recompute.py."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def kept_for_backward(model: torch.nn.Module):
    """Within: every tensor autograd saves is counted once (by storage) into the yielded
    dict (storage address -> bytes), unless it is one of `model`'s weights or a view of one."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield kept
