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
