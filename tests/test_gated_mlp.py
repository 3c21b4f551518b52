"""The gated MLP that recomputes its activation (and, where down_proj trains, its product)
in backward: same logits and gradients, bitwise, and one intermediate-sized tensor fewer
kept per layer in the gradient's path, two per trained layer."""

from __future__ import annotations

import copy

import pytest
import torch

from dus.heal.gated_mlp import recompute_activations
from dus.heal.kept import kept_for_backward


def _model(tiny_models, arch):
    from dus.checkpoint import ModelDir

    return ModelDir(tiny_models(arch, num_layers=4)).load_model(torch.float32, quiet=True).train()


def _step(model, ids, trainable: range):
    """Forward and backward with only `trainable` layers' weights trained (the rest frozen
    but in the gradient's path above them); returns logits, gradients, bytes kept for backward."""
    layers = model.model.layers
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for index in trainable:
        for parameter in layers[index].parameters():
            parameter.requires_grad_(True)
    with kept_for_backward(model) as kept:  # weights and views of them not counted
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_recomputing_the_activation_gives_the_same_logits_and_gradients_and_keeps_less(arch, tiny_models):
    plain = _model(tiny_models, arch)
    patched = copy.deepcopy(plain)
    assert recompute_activations(patched.model.layers) == 4
    assert recompute_activations(patched.model.layers) == 0  # once is enough
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, grads, kept = _step(plain, ids, range(1, 2))
    logits2, grads2, kept2 = _step(patched, ids, range(1, 2))
    assert torch.equal(logits, logits2)
    assert grads.keys() == grads2.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    intermediate = 2 * 24 * plain.config.intermediate_size * 4  # one act(gate) of the batch, float32
    # act(gate) of layers 1, 2, 3 (in the gradient's path) and the product of layer 1 (trained)
    assert kept - kept2 == 4 * intermediate


def test_the_up_projection_alone_trained_gets_its_gradient(tiny_models):
    """Only up_proj trains (as a LoRA target may): act(gate) is recomputed for its gradient."""
    plain = _model(tiny_models, "llama")
    patched = copy.deepcopy(plain)
    recompute_activations(patched.model.layers)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, patched):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.model.layers[3].mlp.up_proj.weight.requires_grad_(True)
        model(input_ids=ids, use_cache=False).logits.sum().backward()
        results.append(model.model.layers[3].mlp.up_proj.weight.grad)
    assert results[1] is not None and torch.equal(results[0], results[1])


def test_a_down_projection_with_a_bias_keeps_its_own_product(tiny_models):
    """mlp_bias: the trained down_proj is not the bias-free case TrainedDown reproduces
    bitwise, so only act(gate) is recomputed there; the gradients stay the same."""
    from dus.checkpoint import ModelDir

    plain = ModelDir(tiny_models("llama", num_layers=4, mlp_bias=True)).load_model(torch.float32, quiet=True).train()
    patched = copy.deepcopy(plain)
    recompute_activations(patched.model.layers)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    logits, grads, kept = _step(plain, ids, range(1, 2))
    logits2, grads2, kept2 = _step(patched, ids, range(1, 2))
    assert torch.equal(logits, logits2) and plain.model.layers[1].mlp.down_proj.bias.grad is not None
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    assert kept - kept2 == 3 * 2 * 24 * plain.config.intermediate_size * 4  # act(gate) only


@pytest.mark.parametrize("arch", ["phi3", "mixtral"])
def test_other_mlps_keep_their_own_forward(arch, tiny_models):
    model = _model(tiny_models, arch)
    assert recompute_activations(model.model.layers) == 0
