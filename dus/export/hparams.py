"""A transformers config as llama.cpp's GGUF hyperparameters.

Read from the transformers config object (not the raw JSON) so that fields transformers
derives, such as `layer_types` and the normalised `rope_parameters`, are what is written.
What llama.cpp cannot run as transformers does is refused here, with the reason, or
reported as a warning when the difference only shows beyond a context length.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from dus.errors import DusError
from dus.export.families import Family

SLIDING = "sliding_attention"


def rope_settings(config, kind: str = "full_attention") -> dict:
    """The rope parameters of one attention kind (Gemma 3 has one set per kind)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if kind in params or "full_attention" in params:
        params = dict(params.get(kind) or params.get("full_attention") or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def sliding_layers(config, family: Family) -> list[bool]:
    """Which layers use sliding-window attention in transformers."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return [kind == SLIDING for kind in types]
    window = getattr(config, "sliding_window", None)
    if window and family.model_type in ("mistral", "mixtral", "phi3"):
        return [True] * n
    return [False] * n


def write_hparams(writer: gguf.GGUFWriter, config, family: Family, file_type: int) -> list[str]:
    """Write the hyperparameters; return warnings (differences llama.cpp will show)."""
    warnings: list[str] = []
    dims = head_dim(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dims)
    writer.add_value_length(dims)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    rope = rope_settings(config)
    rotary = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    writer.add_rope_dimension_count(int(dims * rotary))
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    _write_rope_scaling(writer, config, family, rope)

    if family.experts:
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)

    sliding = sliding_layers(config, family)
    window = getattr(config, "sliding_window", None)
    if family.swa:
        if any(sliding):
            writer.add_sliding_window(int(window))
            writer.add_sliding_window_pattern(sliding)
        if family.model_type == "gemma3_text":
            local = rope_settings(config, SLIDING)
            if local.get("rope_theta") is not None:
                writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    elif any(sliding):
        warnings.append(
            f"llama.cpp runs every layer of a {family.arch_name} model with full attention, but this model slides a "
            f"{window}-token window on {sum(sliding)} of {len(sliding)} layers: outputs match transformers only "
            f"within the first {window} tokens of a context")
    if family.model_type == "phi3":
        writer.add_sliding_window(0)  # llama.cpp runs Phi-3 without a window either way

    if family.model_type in ("gemma2", "gemma3_text"):
        _check_gemma_attention_scale(config, dims)
        if family.model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    return warnings


def _write_rope_scaling(writer: gguf.GGUFWriter, config, family: Family, rope: dict) -> None:
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # a rope_freqs tensor, see extra_tensors
    elif kind in ("longrope", "su") and family.model_type == "phi3":
        original = int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    else:
        raise DusError(f"rope scaling {kind!r} of this {family.model_type} model has no GGUF form dus writes; "
                       "dus export writes default, linear, yarn and llama3 rope (and longrope for phi3)")


def _check_gemma_attention_scale(config, dims: int) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != dims:
        raise DusError(
            f"this Gemma model scales attention by 1/sqrt({scalar}) (query_pre_attn_scalar) but llama.cpp derives the "
            f"scale from head_dim ({dims}) for any depth other than the original 27B's: the GGUF would compute a "
            "different model, so dus export refuses it")


def extra_tensors(config, family: Family) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that a transformers checkpoint keeps in its config."""
    rope = rope_settings(config)
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "llama3":
        return {"rope_freqs.weight": _llama3_rope_factors(rope, head_dim(config))}
    if kind in ("longrope", "su") and family.model_type == "phi3":
        return {
            "rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32),
        }
    return {}


def _llama3_rope_factors(rope: dict, dims: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp
    applies: low frequencies are stretched by `factor`, high ones kept, a smooth ramp between."""
    base = float(rope["rope_theta"])
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelengths = 2 * math.pi / freqs
    divisors = []
    for wavelength in wavelengths:
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)
