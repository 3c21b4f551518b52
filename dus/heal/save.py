"""Saving a heal: the healed model (or the adapter), on rank 0, after training.

A student healed in memory is written by `write_streamed`; a checkpoint healed as built
by transformers (`dus.heal.merge.write_healed_model`), rebuilt first from the files the
trainer gathered when the run was sharded (`reload_trained`).

Writing a model healed in memory: the build plan streamed again, trained tensors from memory.

The healed checkpoint is the (calibrated) build plan executed on disk by the same writer
as `dus build`: every tensor that did not train is a byte copy from its source file (or the
writer's own transform of it: a scale, a blend), and only the tensors that trained come
from memory: the band's or new blocks' parameters, or for a LoRA student each adapted
projection with its adapter merged (the scaled weight plus the adapter's delta, which is
what the trained model computed). Same file layout and names as a build; the manifest
carries the calibrated plan and the heal record in its history.

A layer whose parameters have no on-disk twin by name (Mixtral's experts are fused in
memory) cannot be streamed this way: the model is then made standalone in memory and
saved by transformers, as for a checkpoint healed as built.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch.nn as nn

from dus.assemble import ScaledLinear, decoder, is_quantized
from dus.errors import DusError
from dus.heal.merge import weights_digest, write_healed_model
from dus.heal.output import write_marker
from dus.plan import MANIFEST_NAME, LayerPlan

LAYER_PREFIX = "model.layers"


def save_outputs(run, student, unwrapped, trained_dir: Path, sharded: bool, record: dict, say) -> None:
    """Rank 0: the merged standalone model (or, with --no-merge, the adapter and the record).

    Nothing here may touch sharded parameters or start a collective: the other ranks are
    already waiting at the final barrier."""
    out, tokenizer, is_adapter = run.out, run.inputs.tokenizer, student.peft_config is not None
    if is_adapter:
        if not sharded:
            unwrapped.save_pretrained(str(trained_dir))
        tokenizer.save_pretrained(str(trained_dir))
    if run.cfg.merge or not is_adapter:
        final = reload_trained(run.model_dir, trained_dir, is_adapter, student.calibration) if sharded else unwrapped
        if record["rank_digests"] is None:
            record["gathered_digest"] = weights_digest(final, trainable_only=False)
        write_model(run, student, final, record)
        if trained_dir.name == ".trained":
            shutil.rmtree(trained_dir, ignore_errors=True)
        say(f"[green]healed model written to {out}[/] (loads with from_pretrained)")
    else:
        (out / "dus-heal-record.json").write_text(json.dumps(record, indent=2) + "\n")
        say(f"[green]LoRA adapter written to {out / 'adapter'}[/] (--no-merge)")
    write_marker(out, finished=True, steps=record["steps"], final_loss=record["final_loss"])


def write_model(run, student, model, record: dict) -> None:
    """The healed model into OUT: streamed from the plan when the student was assembled in
    memory, else saved whole by transformers (LoRA merged in)."""
    tokenizer = run.inputs.tokenizer
    if student.gates is not None:
        fold_gates(student)
    if student.in_memory:
        write_streamed(student, tokenizer, run.model_dir.path, run.out, run.manifest, record)
    else:
        manifest = run.manifest
        if manifest is not None and student.calibration is not None and student.calibration.plan is not None:
            manifest = replace(manifest, plan=student.calibration.plan)
        write_healed_model(model, tokenizer, run.model_dir.path, run.out, manifest, record, dtype=student.saved_dtype)


def fold_gates(student) -> None:
    """The learned gates into the plan (shared layers' scale rules) and into the trained
    layers' tensors (dus.heal.gates): the model and plan then describe a plain checkpoint."""
    from dus.heal.gates import fold_into_model, fold_into_plan, names_in_plan

    gates, values = student.gates, student.gates.values()
    names_of = names_in_plan(student.plan, student.sources)
    fold_into_model(gates, set(student.own))  # only private copies are multiplied; shared weights never
    student.plan = fold_into_plan(student.gated_plan, values, names_of)
    student.gates = None


def reload_trained(model_dir, trained_dir: Path, is_adapter: bool, calibration=None):
    """The trained model rebuilt from the files the Trainer gathered (sharded runs), on
    rank 0 alone: loaded as a plain model even under ZeRO-3 (a partitioned load would
    wait for the other ranks). An adapter goes onto the input model with the calibration
    the run applied before training (it is not in the adapter)."""
    from dus.checkpoint import ModelDir
    from dus.heal.distributed import plain_loading

    with plain_loading():
        if not is_adapter:
            return ModelDir(trained_dir).load_model("auto")
        from peft import PeftModel

        from dus.heal.calibrate import scale_layers

        base = model_dir.load_model("auto")
        if calibration is not None and calibration.per_layer:
            scale_layers(base, calibration.per_layer)
        return PeftModel.from_pretrained(base, str(trained_dir))


def trained_tensors(model, plan: LayerPlan, own: list[int]) -> tuple[dict[str, object], dict[str, object]]:
    """For every tensor that training changed, output tensor name -> its value, or (over
    4-bit weights) -> the adapter's delta, which the writer adds to the weight as built."""
    values = {}
    layers = decoder(_causal_lm(model)).layers
    for index in own:
        for name, param in layers[index].named_parameters():
            values[f"{LAYER_PREFIX}.{index}.{name}"] = param.detach()
    merged, deltas = _merged_adapters(model)
    values.update(merged)
    return values, deltas


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _merged_adapters(model) -> tuple[dict[str, object], dict[str, object]]:
    """Each LoRA-adapted projection's merged weight (base as scaled + delta), or over a
    4-bit base only the delta: QLoRA's adapter is merged into the full-precision weight the
    plan describes (the 4-bit rounding is not written), as QLoRA merges are done."""
    from peft.tuners.lora import LoraLayer

    merged, deltas = {}, {}
    base = _causal_lm(model)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            quantized = is_quantized(module.get_base_layer().weight)
            (deltas if quantized else merged)[f"{name}.weight"] = partial(_merged_weight, module, quantized)
    return merged, deltas


def _merged_weight(module, delta_only: bool):
    """One adapted projection's merged weight (or delta), computed when the writer reaches
    it: a 7B SOLAR band's merged weights would otherwise all be in memory at once."""
    import torch

    with torch.no_grad():
        delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
        if delta_only:
            return delta
        layer = module.get_base_layer()
        weight = layer.weight.detach()
        if isinstance(layer, ScaledLinear):
            weight = weight * layer.weight_scale
        return weight + delta.to(weight.dtype)


def write_streamed(student, tokenizer, built_dir: Path, out_dir: Path, manifest, record: dict) -> Path:
    """The healed model into `out_dir` (config and manifest moved in last)."""
    from dus.build import _copy_tokenizer
    from dus.config_rewrite import has_layer_fields, output_config, write_config
    from dus.heal.merge import healed_manifest, move_into, model_card
    from dus.sources import load_source
    from dus.writer import layout, write_shards

    plan = student.plan
    own = sorted(student.own) if student.peft_config is None else []  # the private copies: what trained
    values, deltas = trained_tensors(student.model, plan, own)
    headers = {name: load_source(name, path) for name, path in plan.models.items()}
    tensors = layout(plan, headers)
    names = {tensor.name for tensor in tensors}
    if not set(values) | set(deltas) <= names:
        if deltas:
            raise DusError("a 4-bit student's adapted weights have no twin in the build's layout; heal with "
                           "in_memory: false")
        return write_standalone(student, tokenizer, built_dir, out_dir, manifest, record)
    tensors = [replace(tensor, value=values[tensor.name]) if tensor.name in values
               else replace(tensor, delta=deltas[tensor.name]) if tensor.name in deltas else tensor
               for tensor in tensors]
    tmp = _fresh(out_dir / f".tmp-model-{os.getpid()}")
    try:
        write_shards(tensors, tmp, 5 * 10**9)
        config, _ = output_config(plan, headers)
        config["use_cache"] = True
        write_config(config, tmp, validate=has_layer_fields(config, headers[plan.config_from]))
        _copy_tokenizer(Path(built_dir), tmp)
        (tmp / "README.md").write_text(model_card(Path(built_dir), record))
        healed = healed_manifest(replace(manifest, plan=plan) if manifest else None, record)
        (tmp / MANIFEST_NAME).write_text(json.dumps(healed.to_dict(), indent=2) + "\n")
        move_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_standalone(student, tokenizer, built_dir: Path, out_dir: Path, manifest, record: dict) -> Path:
    """A private copy of every weight (ScaledLinear made plain), saved by transformers."""
    model = copy.deepcopy(student.model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ScaledLinear):
                setattr(parent, name, plain_linear(child))
    manifest = replace(manifest, plan=student.plan) if manifest else None
    return write_healed_model(model, tokenizer, Path(built_dir), out_dir, manifest, record, dtype=student.saved_dtype)


def plain_linear(scaled: ScaledLinear) -> nn.Linear:
    """An nn.Linear holding the product a ScaledLinear computes."""
    linear = nn.Linear(scaled.in_features, scaled.out_features, bias=scaled.bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(scaled.weight.detach() * scaled.weight_scale, requires_grad=False)
    if scaled.bias is not None:
        linear.bias = nn.Parameter(scaled.bias.detach() * scaled.bias_scale, requires_grad=False)
    return linear


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
