"""Which GGUF tensors a checkpoint becomes, in what type, and how each is computed.

The plan is made from the safetensors headers alone (names, shapes), so the GGUF header
can be written before any weight is read; each tensor is then loaded, transformed and
converted on its own when its turn comes: memory is bounded by one tensor (a Mixtral
layer's stacked experts count as one, as llama.cpp stores them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from dus.errors import DusError
from dus.export.families import Family
from dus.safetensors_io import TensorInfo, read_tensor

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
EXPERT_TENSORS = {"w1": gguf.MODEL_TENSOR.FFN_GATE_EXP, "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
                  "w3": gguf.MODEL_TENSOR.FFN_UP_EXP}
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first)
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32, in llama.cpp's layout
    source: str = ""  # the checkpoint's name for it (the first expert's, for stacked experts)
    non_finite: int = 0  # NaN or infinite values read, set by data()
    overflowed: int = 0  # finite values that became infinite as float16, set by data()

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)))

    def data(self) -> np.ndarray:
        """The tensor's bytes as llama.cpp reads them."""
        values = self.load()
        if values.shape != self.shape:
            raise DusError(f"tensor {self.name}: expected shape {self.shape}, read {values.shape}; the checkpoint changed "
                           "while exporting")
        finite = np.isfinite(values)
        all_finite = bool(finite.all())
        if not all_finite:
            self.non_finite = int(finite.size - np.count_nonzero(finite))
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return values
        if self.qtype == gguf.GGMLQuantizationType.F16:
            with np.errstate(over="ignore"):  # counted below, and said once
                converted = values.astype(np.float16)
            if all_finite and not np.isfinite(converted).all():
                self.overflowed = int(np.count_nonzero(~np.isfinite(converted)))
            return converted
        return gguf.quants.quantize(values, self.qtype)


def non_finite_warnings(planned: list[PlannedTensor]) -> list[str]:
    """One line naming the first tensor written with NaN or infinite values, and one for
    float16 overflow: llama.cpp computes NaN from either, as transformers does."""
    warnings = []
    bad = [t for t in planned if t.non_finite]
    if bad:
        first = bad[0]
        warnings.append(non_finite_warning(f"{first.source or first.name} (GGUF {first.name})", first.non_finite,
                                           len(bad) - 1))
    over = [t for t in planned if t.overflowed]
    if over:
        first = over[0]
        warnings.append(f"{first.source or first.name} (GGUF {first.name}): {first.overflowed} value"
                        f"{_s(first.overflowed)} beyond float16's range became infinite{_and_more(over)}; "
                        "export with --type bf16 or f32")
    return warnings


def non_finite_warning(label: str, count: int, more: int) -> str:
    """The one line said of weights written with NaN or infinite values (by dus export, and
    by dus import of a GGUF that holds them): `label` names the first such tensor, which
    holds `count` of them, and `more` other tensors hold some too."""
    also = f", and {more} more tensor{_s(more)} too" if more else ""
    return (f"{label} holds {count} NaN or infinite value{_s(count)}{also}, written as they are: the model computes "
            "NaN; check the checkpoint (a diverged training or a damaged file?)")


def _s(count: int) -> str:
    return "s" if count > 1 else ""


def _and_more(tensors: list) -> str:
    return f", and {len(tensors) - 1} more tensor{_s(len(tensors) - 1)} too" if len(tensors) > 1 else ""


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's conventions: norms, biases and the expert router stay float32; q8_0 needs
    rows that are a multiple of its 32-value block, else float16."""
    if len(shape) == 1 or ".ffn_gate_inp." in gguf_name or requested == "f32":
        return gguf.GGMLQuantizationType.F32
    if requested == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] != 0:
        return gguf.GGMLQuantizationType.F16
    return QTYPES[requested]


def as_float32(info: TensorInfo) -> np.ndarray:
    import torch

    return read_tensor(info).to(torch.float32).numpy()


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers rotates the two halves of each head; llama.cpp's llama architecture
    rotates adjacent pairs. Reordering the rows of q/k makes both compute one attention."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def plan_tensors(tensors: dict[str, TensorInfo], config, family: Family, requested: str,
                 extra: dict[str, np.ndarray]) -> list[PlannedTensor]:
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if family.ties_head and "lm_head.weight" in tensors and not tied:
        raise DusError(f"this {family.model_type} model has its own lm_head, but llama.cpp's {family.arch_name} always "
                       "uses the embeddings as output head; dus export cannot write it faithfully")
    planned: list[PlannedTensor] = []
    experts: dict[tuple[int, str], dict[int, TensorInfo]] = {}
    for name, info in tensors.items():
        if SKIPPED.search(name) or (name == "lm_head.weight" and tied):
            continue
        match = EXPERT.match(name) if family.experts else None
        if match:
            experts.setdefault((int(match.group(1)), match.group(3)), {})[int(match.group(2))] = info
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise DusError(f"tensor {name!r} has no place in llama.cpp's {family.arch_name} architecture; "
                           "dus export cannot write this checkpoint")
        planned.append(_planned(target, info, family, requested, heads, kv_heads))
    for (layer, kind), by_expert in sorted(experts.items()):
        infos = [by_expert[e] for e in sorted(by_expert)]
        target = gguf.TENSOR_NAMES[EXPERT_TENSORS[kind]].format(bid=layer) + ".weight"
        shape = (len(infos), *infos[0].shape)
        planned.append(PlannedTensor(target, shape, tensor_type(target, shape, requested),
                                     lambda infos=infos: np.stack([as_float32(i) for i in infos]), infos[0].name))
    for target, values in extra.items():
        planned.append(PlannedTensor(target, values.shape, gguf.GGMLQuantizationType.F32, lambda v=values: v))
    return sorted(planned, key=_gguf_order)


def _planned(target: str, info: TensorInfo, family: Family, requested: str, heads: int, kv_heads: int) -> PlannedTensor:
    transforms: list[Callable[[np.ndarray], np.ndarray]] = []
    if family.permute_qk and ".attn_q." in target:
        transforms.append(lambda w: permute_rotary(w, heads))
    if family.permute_qk and ".attn_k." in target:
        transforms.append(lambda w: permute_rotary(w, kv_heads))
    if family.norm_shift and target.endswith("norm.weight"):
        transforms.append(lambda w: w + np.float32(family.norm_shift))

    def load() -> np.ndarray:
        values = as_float32(info)
        for transform in transforms:
            values = transform(values)
        return np.ascontiguousarray(values, dtype=np.float32)

    return PlannedTensor(target, tuple(info.shape), tensor_type(target, tuple(info.shape), requested), load, info.name)


def _gguf_order(tensor: PlannedTensor) -> tuple:
    """Non-layer tensors first, then layers in order (how llama.cpp's converter lays them out)."""
    match = re.match(r"^blk\.(\d+)\.", tensor.name)
    return (1, int(match.group(1)), tensor.name) if match else (0, 0, tensor.name)
