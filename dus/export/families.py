"""What llama.cpp needs to know about each family dus builds, read from the one family
table (dus/architectures.py).

llama.cpp names its architectures and tensors its own way (the `gguf` package holds the
name maps); what it computes differently from transformers is listed here per family, so
that the exporter stays one loop and a new family is one entry there:

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

from dus.architectures import ADAPTERS
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


def _family(adapter) -> Family:
    return Family(adapter.model_type, gguf.MODEL_ARCH[adapter.gguf_arch], permute_qk=adapter.permute_qk,
                  norm_shift=adapter.norm_shift, swa=adapter.swa, ties_head=adapter.ties_head, experts=adapter.experts)


# The llama.cpp side of the one family table (dus/architectures.py).
FAMILIES = {model_type: _family(adapter) for model_type, adapter in ADAPTERS.items()}


def family_for(model_type: str, where: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise DusError(f"{where}: dus export cannot write architecture {model_type!r} to GGUF; "
                   f"it writes {', '.join(sorted(FAMILIES))}")
