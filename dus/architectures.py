"""What dus needs to know about a model family, kept small.

Nearly every decoder-only Hugging Face model names a layer's tensors
`<prefix>.layers.<i>.<rest>`, so one name rule assigns every tensor to a layer or to the
non-layer set and no family needs a list of tensor names. An adapter states only what
differs between families: the layer prefix, which tensors are a block's output
projections (zeroed for a function-preserving new block), and which config fields are
per-layer and must follow the plan; and, for `dus export`, what llama.cpp computes
differently. This is the one family table: build, export and the tiny-model maker
(dus/tiny.py) read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dus.errors import DusError

# Config fields that are one entry per layer in any family that has them.
COMMON_PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", "sliding_window_layers")
# Config fields that list layer *indices* (the set of layers with some property).
COMMON_LAYER_INDEX_FIELDS = ("mlp_only_layers",)


@dataclass(frozen=True)
class Adapter:
    model_type: str
    layer_prefix: str = "model.layers"
    # A tensor inside a layer whose name contains one of these is an output projection:
    # zero it and the block adds nothing to the residual stream.
    output_projections: tuple[str, ...] = ("o_proj", "down_proj")
    per_layer_fields: tuple[str, ...] = COMMON_PER_LAYER_FIELDS
    layer_index_fields: tuple[str, ...] = COMMON_LAYER_INDEX_FIELDS
    # Scalar fields meaning "layers below this index are X": recomputed from the plan.
    layer_threshold_fields: tuple[str, ...] = ()
    # (regex, replacement): other names of an on-disk tensor, as transformers names it
    # in memory; recipe filters (`filter: down_proj`) match either name.
    name_aliases: tuple[tuple[str, str], ...] = ()
    # Per-layer fields transformers derives when config.json lacks them (from
    # max_window_layers, a sliding-window pattern, ...): only then is transformers asked.
    derived_fields: tuple[str, ...] = ()
    # llama.cpp (dus export, dus/export/families.py): its architecture (a gguf.MODEL_ARCH
    # member's name, kept as text so that building never imports gguf), and what it
    # computes differently from transformers: q/k rows reordered (interleaved rotary
    # pairs), RMSNorm as (1 + weight), a sliding-window pattern read from the file, the
    # embeddings always used as output head, stacked experts.
    gguf_arch: str = "LLAMA"
    permute_qk: bool = False
    norm_shift: float = 0.0
    swa: bool = False
    ties_head: bool = False
    experts: bool = False

    def layer_pattern(self) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.layer_prefix)}\.(\d+)\.(.+)$")

    def names(self, rest: str) -> tuple[str, ...]:
        """A layer tensor's name and its aliases."""
        aliases = [re.sub(pattern, replacement, rest) for pattern, replacement in self.name_aliases]
        return (rest, *[alias for alias in aliases if alias != rest])

    def is_output_projection(self, rest: str) -> bool:
        return any(pattern in name for name in self.names(rest) for pattern in self.output_projections)


ADAPTERS = {
    adapter.model_type: adapter
    for adapter in [
        Adapter("llama", permute_qk=True),
        Adapter("mistral", permute_qk=True),
        # Qwen2/3: layers at or above max_window_layers use sliding-window attention.
        Adapter("qwen2", layer_threshold_fields=("max_window_layers",), derived_fields=("layer_types",),
                gguf_arch="QWEN2"),
        Adapter("qwen3", layer_threshold_fields=("max_window_layers",), derived_fields=("layer_types",),
                gguf_arch="QWEN3"),
        # Gemma 2/3: the sliding/full pattern lives in layer_types and must come from each
        # output layer's own source layer (the post-norms follow the layer automatically).
        Adapter("gemma2", derived_fields=("layer_types",), gguf_arch="GEMMA2", norm_shift=1.0, swa=True,
                ties_head=True),
        Adapter("gemma3_text", derived_fields=("layer_types",), gguf_arch="GEMMA3", norm_shift=1.0, swa=True),
        # Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; o_proj and
        # down_proj keep their names, so nothing else differs.
        Adapter("phi3", gguf_arch="PHI3"),
        # Mixtral: experts follow their layer. On disk they are
        # block_sparse_moe.experts.<e>.w1/w2/w3 (w2 is the down projection); transformers 5
        # in memory fuses them as mlp.experts.gate_up_proj / down_proj, the names mergekit
        # 0.1.5 filters on, so both names count.
        Adapter(
            "mixtral",
            permute_qk=True,
            experts=True,
            name_aliases=(
                (r"^block_sparse_moe\.experts\.\d+\.w2\.weight$", "mlp.experts.down_proj"),
                (r"^block_sparse_moe\.experts\.\d+\.w[13]\.weight$", "mlp.experts.gate_up_proj"),
                (r"^block_sparse_moe\.gate\.", "mlp.gate."),
            ),
        ),
    ]
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: dict, where: str) -> Adapter:
    """The adapter for a model config, or a DusError naming the supported families."""
    model_type = config.get("model_type")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    hint = ""
    if model_type in ("gemma3", "mistral3", "llava", "qwen2_vl", "qwen2_5_vl"):
        hint = " (a multimodal checkpoint: extract its text model first)"
    raise DusError(
        f"{where}: architecture {model_type!r} ({', '.join(config.get('architectures') or [])}) "
        f"is not supported{hint}; supported: {', '.join(supported_architectures())}"
    )
