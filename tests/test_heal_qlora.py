"""QLoRA in memory: one 4-bit copy of each source serves the student (shells of its 4-bit
layers, an adapter per output position) and the teacher; scale rules scale the 4-bit
layers' outputs; the adapter is merged into the full-precision weights the plan describes.

bitsandbytes (0.48 or later) runs 4-bit layers on the CPU; its CPU kernels need inputs of
at least one quantization block (64), so these models are wider than the other tiny ones."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tensors

pytest.importorskip("bitsandbytes")

from dus.assemble import assemble, decoder, load_sources  # noqa: E402
from dus.build import build_model  # noqa: E402
from dus.heal.config import load_config  # noqa: E402
from dus.heal.run import heal  # noqa: E402
from dus.heal.student import quantized_loading  # noqa: E402
from dus.tiny import make_tiny_model  # noqa: E402
from reference import logits, sample_ids  # noqa: E402

WIDE = {"hidden_size": 64, "intermediate_size": 128}
FOUR_BIT = {"quantization.bnb_4bit_compute_dtype": "float32"}  # the CPU's dtype; the default is bfloat16
FAST = {
    "sft.report_to": "none", "sft.warmup_steps": 0, "sft.logging_steps": 1, "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2, "sft.max_length": 64, "sft.max_steps": 2, "seam.radius": 1,
    "calibrate.tokens": 256, "calibrate.window": 64, "distill.student": "qlora", **FOUR_BIT,
}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    source = make_tiny_model(root / "source", "llama", num_layers=6, seed=5, **WIDE)
    build_model({"solar": {"model": str(source), "trim": 2}}, root / "built")  # [0 1 2 3 | 2 3 4 5], seam at 4
    prose = "\n\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(300))
    (root / "prose.txt").write_text(prose + "\n")
    return root


def four_bit(path):
    from dus.checkpoint import ModelDir

    kwargs = quantized_loading(load_config(None, FOUR_BIT))
    return ModelDir(path).load_model(torch.float32, **kwargs).eval()


def test_the_4bit_plan_equals_the_built_checkpoint_loaded_in_4bit(space, tmp_path):
    """A power-of-two scale (calibration's 0.5) commutes with NF4 block quantization (absmax
    and double quantization scale exactly), so scaling the 4-bit output is bitwise what
    quantizing the built, scaled weights gives; no layer is a copy."""
    result = build_model({"duplicate": {"model": str(space / "source"), "layers": [2, 4], "scale": 0.5}},
                         tmp_path / "built")
    kwargs = quantized_loading(load_config(None, FOUR_BIT))
    sources = load_sources(result.plan, torch.float32, **kwargs)
    memory = assemble(result.plan, sources).eval()
    built = four_bit(tmp_path / "built")
    ids = sample_ids(built.config.vocab_size, length=20)
    assert torch.equal(logits(memory, ids), logits(built, ids))
    source_layers = decoder(sources[next(iter(result.plan.models))]).layers
    for index, layer in enumerate(result.plan.layers):
        shared = decoder(memory).layers[index].self_attn.o_proj
        assert shared.weight is source_layers[layer.layer].self_attn.o_proj.weight  # the 4-bit tensor, not a copy
        assert getattr(shared, "output_scale", 1.0) == (0.5 if layer.scale else 1.0)


def test_qlora_distillation_in_memory_merges_into_the_plans_weights(space, tmp_path):
    settings = {**FAST, "data.path": str(space / "prose.txt"), "calibrate.factors": [0.7]}
    merged = heal(space / "built", tmp_path / "merged", load_config(None, settings))
    adapter = heal(space / "built", tmp_path / "adapter", load_config(None, {**settings, "merge": False}))
    assert merged.record["in_memory"] is True and merged.record["calibration"]["layers"] == [4, 5]
    assert merged.final_loss == adapter.final_loss  # same seed, same run
    healed, built = tensors(tmp_path / "merged"), tensors(space / "built")
    lora = tensors(tmp_path / "adapter" / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    adapted = set()
    for name, value in lora.items():
        if ".lora_A." not in name:
            continue
        target = name.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        index = int(target.split(".")[2])
        factor = 0.7 if index in (4, 5) and target.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        delta = lora[name.replace("lora_A", "lora_B")] @ value * scaling
        expected = built[target] * factor + delta  # the full-precision weight as the plan scales it, + delta
        assert torch.allclose(healed[target], expected, rtol=0, atol=1e-6), target
        adapted.add(target)
    assert {int(name.split(".")[2]) for name in adapted} == {3, 4}  # the band around the seam
    for name in healed:
        if name not in adapted and not (".5." in name and name.endswith(("o_proj.weight", "down_proj.weight"))):
            if not (".4." in name and name.endswith(("o_proj.weight", "down_proj.weight"))):
                assert torch.equal(healed[name], built[name]), name  # frozen: byte copies of the plan's tensors
    assert torch.equal(healed["model.layers.5.self_attn.o_proj.weight"],
                       built["model.layers.5.self_attn.o_proj.weight"] * 0.7)


# --- QLoRA gradients on the CPU ------------------------------------------------------------


def _adapted(model):
    """`model` with LoRA on every projection, its A and B set from a fixed seed (B is zero
    at init, which would leave A's gradient zero and prove nothing)."""
    from peft import LoraConfig, get_peft_model

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=projections))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _lora_gradients(model, ids) -> dict:
    """Cross-entropy of every position against fixed targets (a one-token input too)."""
    targets = torch.roll(ids, 1, dims=1) if ids.shape[1] > 1 else (ids + 1) % model.config.vocab_size
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {name: (None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters() if "lora_" in name}


def _dequantized_reference(path, quantized):
    """The same model in float32 with each 4-bit weight replaced by its dequantized values
    (bitsandbytes.functional.dequantize_4bit) and every other tensor the 4-bit model's."""
    from bitsandbytes.functional import dequantize_4bit

    from dus.checkpoint import ModelDir

    reference = ModelDir(path).load_model(torch.float32).eval()
    values = dict(reference.named_parameters())
    count = 0
    with torch.no_grad():
        for name, parameter in quantized.named_parameters():
            state = getattr(parameter, "quant_state", None)
            value = dequantize_4bit(parameter.data, state).float() if state is not None else parameter.float()
            count += state is not None
            assert values[name].shape == value.shape, name
            values[name].copy_(value)
    assert count == 6 * 7  # every projection of every layer was 4-bit
    return reference


@pytest.mark.parametrize("shape", [(2, 24), (1, 1)], ids=["batch", "one-token"])
def test_qlora_gradients_equal_the_dequantized_models_after_an_inference_pass(space, shape):
    """The LoRA adapters' gradients on the 4-bit model equal those on the model holding the
    dequantized weights, after an eval-mode no-grad pass such as calibration and the teacher
    make over the shared 4-bit layers: keep_differentiable stops bitsandbytes from repacking
    the weights for its CPU gemv_4bit kernel (bf16, no autograd: no gradient through the
    frozen weight, and PyTorch's "silently incorrect behavior" warning). A batch and a
    one-token input alike (bitsandbytes 0.50 chooses gemv by the repacking, not the rows)."""
    import warnings

    from dus.heal.qlora_cpu import keep_differentiable, repacked_layers

    quantized = four_bit(space / "source")
    assert keep_differentiable(quantized) in (0, 6 * 7)  # 0 where bitsandbytes would never repack (no AVX512-BF16)
    reference = _dequantized_reference(space / "source", quantized)
    ids = sample_ids(quantized.config.vocab_size, length=shape[1], batch=shape[0])
    with torch.no_grad():  # what calibration and the teacher do before and between the steps
        assert torch.allclose(quantized(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert repacked_layers(quantized) == []
    quantized, reference = _adapted(quantized), _adapted(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _lora_gradients(quantized, ids)
    assert not [w for w in caught if "gemv_4bit" in str(w.message)]
    expected = _lora_gradients(reference, ids)
    assert got.keys() == expected.keys() and len(got) == 2 * 6 * 7
    for name, gradient in expected.items():
        assert got[name] is not None and gradient.abs().max() > 0, name
        # bitwise equal on the machine this was written on; the tolerance only allows another BLAS's summation order
        assert torch.allclose(got[name], gradient, rtol=1e-6, atol=1e-7 * gradient.abs().max().item()), name


def test_without_keep_differentiable_an_inference_pass_cuts_the_gradients(space):
    """The failure keep_differentiable prevents, shown where it happens (AVX512-BF16 CPUs):
    one eval-mode no-grad pass repacks every 4-bit weight, and the adapters' gradients then
    differ from the dequantized model's (no gradient through the frozen weights)."""
    from bitsandbytes.functional import has_avx512bf16

    from dus.heal.qlora_cpu import keep_differentiable, repacked_layers

    if torch.cuda.is_available() or not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    quantized = four_bit(space / "source")
    reference = _dequantized_reference(space / "source", quantized)
    ids = sample_ids(quantized.config.vocab_size, length=24, batch=2)
    with torch.no_grad():
        quantized(input_ids=ids)
    assert len(repacked_layers(quantized)) == 6 * 7
    with pytest.raises(RuntimeError, match="already repacked"):
        keep_differentiable(quantized)
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
        got = _lora_gradients(_adapted(quantized), ids)  # the very warning a heal must never print
    expected = _lora_gradients(_adapted(reference), ids)
    wrong = [name for name in expected if got[name] is None or not torch.allclose(got[name], expected[name], rtol=1e-2)]
    assert len(wrong) > len(expected) // 2


def test_a_qlora_heal_never_backpropagates_through_gemv_4bit(space, tmp_path):
    """Calibration's and the teacher's passes over the shared 4-bit layers leave them on
    the differentiable path: no step of the heal goes through gemv_4bit (PyTorch's "an
    autograd kernel was not registered" warning)."""
    import warnings

    settings = {**FAST, "data.path": str(space / "prose.txt"), "calibrate.factors": [0.7]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = heal(space / "built", tmp_path / "out", load_config(None, settings))
    assert result.record["in_memory"] is True
    assert not [str(w.message)[:80] for w in caught if "gemv_4bit" in str(w.message)]
