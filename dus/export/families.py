"""What llama.cpp needs to know about each family dus builds, kept as data.

llama.cpp names its architectures and tensors its own way (the `gguf` package holds the
name maps); what it computes differently from transformers is listed here per family, so
that the exporter stays one loop and a new family is one entry:

- `permute_qk`: llama.cpp's `llama` architecture rotates interleaved pairs, transformers
  rotates halves; q/k rows are reordered so both compute the same attention.
- `norm_shift`: Gemma's RMSNorm multiplies by (1 + weight); llama.cpp by weight.
- `swa`: whether llama.cpp's graph for the family has sliding-window layers at all, and
  reads the per-layer pattern from the file (a DUS build keeps each source layer's kind).
- `ties_head`: the family's llama.cpp graph always uses the embeddings as output head.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from dus.errors import DusError


@dataclass(frozen=True)
class Family:
    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    swa: bool = False
    ties_head: bool = False
    experts: bool = False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


FAMILIES = {
    family.model_type: family
    for family in [
        Family("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Family("mistral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Family("mixtral", gguf.MODEL_ARCH.LLAMA, permute_qk=True, experts=True),
        Family("qwen2", gguf.MODEL_ARCH.QWEN2),
        Family("qwen3", gguf.MODEL_ARCH.QWEN3),
        Family("gemma2", gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, swa=True, ties_head=True),
        Family("gemma3_text", gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, swa=True),
        Family("phi3", gguf.MODEL_ARCH.PHI3),
    ]
}


def family_for(model_type: str, where: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise DusError(f"{where}: dus export cannot write architecture {model_type!r} to GGUF; "
                   f"it writes {', '.join(sorted(FAMILIES))}")
