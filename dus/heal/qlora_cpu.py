"""QLoRA on a CPU: keep bitsandbytes' 4-bit layers on the path that back-propagates.

bitsandbytes (0.50.2 checked) repacks a `Linear4bit`'s weight, in place and for good, the
first time the layer runs in eval mode on an input that needs no gradient on a CPU with
AVX512-BF16 (`Linear4bit.forward`: `support_avx512bf16_for_cpu`, `not self.training`,
`x.requires_grad == False`): the weight goes into a CPU layout and the quant state's
absmax into bf16 (`packing_format_for_cpu`). From then on `bnb.matmul_4bit` sends every
call with that weight on the CPU, training ones included, to the fused `gemv_4bit`
kernel, whatever the input's shape or `requires_grad`; that kernel computes in bf16 and
has no autograd formula. PyTorch then warns "bitsandbytes::gemv_4bit: an autograd kernel
was not registered ... silently incorrect behavior", and backward passes nothing through
the layer's frozen weight: an adapter below such a layer gets only the part of its
gradient that skips every repacked layer above it, and every forward is in bf16 even with
`bnb_4bit_compute_dtype: float32`. (Older bitsandbytes chose gemv for one-row inputs
only when they needed no gradient; 0.50 has no such rule, the repacking is the only way
in.) In a heal the first such call is calibration's or the teacher's forward over the
4-bit layers it shares with the student, so every training step after it ran on
repacked weights.

`keep_differentiable(model)`, called on each 4-bit model right after it is loaded (before
any forward), turns the repacking off: every call then goes through `MatMul4Bit` (the
weight dequantized, an ordinary matmul in the compute dtype, a backward that uses the
same dequantized weight) when a gradient is needed, and bitsandbytes' `gemm_4bit` (the
same dequantized values) when not. The gradients are then those of the model with each
4-bit weight replaced by its dequantized values (tests/test_heal_qlora.py). What it costs:
eval-mode forwards (calibration, the teacher) run in the compute dtype instead of the
bf16 kernel. GPUs are untouched (they never repack).
"""

from __future__ import annotations

REPACK_FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes' Linear4bit: repack for the CPU kernel in eval mode


def keep_differentiable(model) -> int:
    """Turn bitsandbytes' CPU repacking off in every 4-bit layer of `model` (a no-op for a
    model without any); returns how many layers it changed. Call it before the model's
    first forward: a weight already repacked cannot be restored exactly (its absmax was
    rounded to bf16), so one is refused as a programming error, not repaired."""
    changed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: bitsandbytes already repacked this 4-bit weight for its CPU inference kernel "
                               "(no gradient flows through it); call keep_differentiable right after loading, "
                               "before any forward")
        if getattr(module, REPACK_FLAG, False):
            setattr(module, REPACK_FLAG, False)
            changed += 1
    return changed


def repacked_layers(model) -> list[str]:
    """Names of the 4-bit layers bitsandbytes has repacked for its CPU kernel (none after
    `keep_differentiable`)."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
