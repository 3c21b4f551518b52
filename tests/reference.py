"""Reference models assembled in memory from a source model's own layer modules.

The built checkpoint must compute exactly what the source's layer modules compute when
stacked in the planned order; this builds that stack with transformers alone, without
any dus code, so the comparison is independent of the build."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM


def load(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.eval()


def assemble(
    sources: dict,
    order: list[tuple[str, int]],
    base: str,
    zero_output: set[int] = frozenset(),
    head_from: str | None = None,
    scale_output: dict[int, float] | None = None,
):
    """A copy of sources[base] whose decoder layers are sources[model].layers[i] for each
    (model, i) in `order`; output layers in `zero_output` get o_proj/down_proj zeroed,
    those in `scale_output` get them multiplied; final norm and lm_head from `head_from`."""
    reference = copy.deepcopy(sources[base])
    if head_from is not None and head_from != base:
        reference.model.norm = copy.deepcopy(sources[head_from].model.norm)
        if not reference.config.tie_word_embeddings:
            reference.lm_head = copy.deepcopy(sources[head_from].lm_head)
    layers = []
    for index, (name, layer_index) in enumerate(order):
        layer = copy.deepcopy(sources[name].model.layers[layer_index])
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        if index in zero_output:
            with torch.no_grad():
                for param_name, param in layer.named_parameters():
                    if "o_proj" in param_name or "down_proj" in param_name:
                        param.zero_()
        if scale_output and index in scale_output:
            with torch.no_grad():
                for param_name, param in layer.named_parameters():
                    if "o_proj" in param_name or "down_proj" in param_name:
                        param.mul_(scale_output[index])
        layers.append(layer)
    reference.model.layers = torch.nn.ModuleList(layers)
    reference.config.num_hidden_layers = len(layers)
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [
            sources[name].config.layer_types[layer_index] for name, layer_index in order
        ]
    return reference


def sample_ids(vocab_size: int, length: int = 24, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits
