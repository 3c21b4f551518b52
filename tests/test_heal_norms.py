"""RMSNorms of bf16 inputs that keep only their input for backward (dus/heal/norms.py):
bitwise the same logits and gradients, less kept; float32 steps exactly as before."""

from __future__ import annotations

import copy

import pytest
import torch

from dus.heal.kept import kept_for_backward
from dus.heal.norms import recompute_norms


def _model(tiny_models, arch, dtype):
    from dus.checkpoint import ModelDir

    return ModelDir(tiny_models(arch, num_layers=4)).load_model(dtype, quiet=True).train()


def _step(model, ids):
    """Forward and backward with layer 1 trained and layers 2-3 frozen in the gradient's
    path; returns logits, gradients and the bytes autograd keeps (weights aside)."""
    model.requires_grad_(False)
    model.model.layers[1].requires_grad_(True)
    with kept_for_backward(model) as kept:  # weights and views of them not counted
        logits = model(input_ids=ids, use_cache=False).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_recomputed_norms_give_the_same_logits_and_gradients_and_keep_less(arch, dtype, tiny_models):
    plain = _model(tiny_models, arch, dtype)
    patched = copy.deepcopy(plain)
    assert recompute_norms(patched.model.layers) > 0
    assert recompute_norms(patched.model.layers) == 0  # once is enough
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, grads, kept = _step(plain, ids)
    logits2, grads2, kept2 = _step(patched, ids)
    assert torch.equal(logits, logits2)
    assert grads.keys() == grads2.keys() and any(".layers.1." in name and "norm" in name for name in grads)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    assert (kept2 < kept) if dtype == torch.bfloat16 else (kept2 == kept)


def test_what_a_bf16_llama_layer_no_longer_keeps(tiny_models):
    """Layer 1 trains and its input has no gradient (layer 0 is frozen), so its first norm
    runs as before. Its second norm drops the float32 copy of x, the bf16 normalized x and
    the rsqrt; each norm of the frozen layers 2 and 3 the float32 copy and the rsqrt (x
    itself, bf16, is kept instead)."""
    plain = _model(tiny_models, "llama", torch.bfloat16)
    tokens, hidden = 2 * 24, plain.config.hidden_size
    patched = copy.deepcopy(plain)
    recompute_norms(patched.model.layers)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    kept, kept2 = _step(plain, ids)[2], _step(patched, ids)[2]
    trained = tokens * (4 * hidden + 2 * hidden + 4 - 2 * hidden)
    frozen = tokens * (4 * hidden + 4 - 2 * hidden)
    assert kept - kept2 == trained + 4 * frozen


def test_norms_outside_the_gradient_path_run_as_before(tiny_models):
    model = _model(tiny_models, "llama", torch.float32)
    recompute_norms(model.model.layers)
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("kept a tensor"), lambda t: t):
        model(input_ids=ids, use_cache=False)
