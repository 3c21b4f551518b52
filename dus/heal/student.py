"""The model a heal trains, what in it trains, and its teacher.

By default the student is the build plan executed in memory (dus.assemble) over one
loaded copy of each source: only the layers that train are copies (the seam band, the new
blocks of an expand build); a LoRA student copies nothing (one adapter per output
position on shared layers); calibration chooses scale rules for the plan with forward
passes and changes no weight; and the teacher is the loaded source itself, starting
from the student's hidden state below the trained layers (dus.heal.teacher).

Where the plan cannot serve, the checkpoint as built is loaded and trained as it is, and
one line says why (`in_memory_obstacle`): no plan in the manifest, weights changed since
the build, sources gone or changed, full fine-tuning, sharded launches.

QLoRA (mode qlora, or distill.student qlora) loads each source once in 4 bits: the student's
layers are shells of those 4-bit layers, and the teacher of a distillation is that same
4-bit source (it teaches the quantized source's distributions, not the full-precision one's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dus.checkpoint import ModelDir
from dus.errors import DusError
from dus.heal.config import HealConfig, build_lora_config
from dus.heal.targets import (
    HealTargets,
    choose_layers,
    describe_targets,
    find_layer_stack,
    manifest_new_layers,
)
from dus.manifest import Manifest
from dus.plan import LayerPlan

DEFAULT_CALIBRATION_TEXT = "data/text/train.jsonl"  # broad plain text shipped with dus


@dataclass
class Student:
    """The model to train, what in it trains, and its teacher."""

    model: object
    targets: HealTargets
    peft_config: object | None
    saved_dtype: str
    calibration: object | None = None
    teacher_dir: Path | None = None  # the first teacher's directory
    teacher_model: object | None = None  # the first teacher
    teacher_models: list = None  # every teacher, in the order of run.teachers
    shareds: list = None  # each teacher's SharedTeacher (in memory)
    plan: LayerPlan | None = None  # in memory: the (calibrated) plan the student was assembled from
    sources: object | None = None  # in memory: dus.assemble.Sources
    shared: object | None = None  # in memory: dus.heal.teacher.SharedTeacher
    built_because: str | None = None  # why the checkpoint as built is trained instead
    hidden_match: object | None = None  # dus.heal.hidden.HiddenMatch, when distill.hidden > 0
    hidden_points: list | None = None  # its (output layer, teacher depth) pairs
    gates: object | None = None  # dus.heal.gates.Gates, when gates train
    gated_plan: LayerPlan | None = None  # the plan stripped of the factors the gates carry
    own: frozenset = frozenset()  # in memory: the output layers that are private copies

    @property
    def in_memory(self) -> bool:
        return self.plan is not None


def in_memory_obstacle(model_dir: ModelDir, cfg: HealConfig) -> str | None:
    """Why this run cannot heal the plan in memory (None: it can)."""
    from dus.heal.distributed import sharded_launch

    manifest = model_dir.manifest
    if not cfg.in_memory:
        return "in_memory is false in the heal config"
    if manifest is None or manifest.plan is None:
        return "the model has no build plan (dus-manifest.json)"
    if any(isinstance(record, dict) and record.get("stage") == "heal" for record in manifest.history):
        return "the model was healed after it was built, so its weights are no longer the plan's"
    if cfg.trains == "full":
        return "full fine-tuning trains every weight, so no layer can be shared with the sources"
    if sharded_launch():
        return "FSDP and DeepSpeed shard each module's weights, and the in-memory model shares weights between layers"
    return _sources_obstacle(manifest)


def _sources_obstacle(manifest: Manifest) -> str | None:
    """A source that is gone or whose weight files changed since the build (sha256, cached)."""
    from dus.hashing import sha256_file

    for name, path in manifest.plan.models.items():
        directory = Path(path)
        if not (directory / "config.json").is_file():
            return f"source {name!r} is not at {path} any more"
        recorded = (manifest.sources.get(name) or {}).get("files") or {}
        for relative, digest in recorded.items():
            if not relative.endswith(".safetensors"):
                continue
            file = directory / relative
            if not file.is_file() or sha256_file(file) != digest:
                return f"source {name!r} changed since the build ({relative})"
    return None


def load_student(run, say) -> Student:
    """The student (calibrated when asked), its trainable set, and the teacher for distill
    (`run.teachers`, resolved and checked before any output existed)."""
    obstacle = in_memory_obstacle(run.model_dir, run.cfg)
    student = None
    if obstacle is None:
        from dus.assemble import NotInMemory

        try:
            student = _in_memory_student(run, say)
        except NotInMemory as error:
            obstacle = str(error)
    if student is None and run.cfg.gates_train:
        raise DusError(f"learned gates live on the in-memory model, and this run cannot heal in memory: {obstacle}; "
                       "heal a dus build whose sources are in place, or drop the gates (gates.train: false)")
    if student is None:
        say(f"  healing the checkpoint as built: {obstacle}")
        student = _built_student(run, say)
        student.built_because = obstacle
    add_hidden_match(run, student)
    return student


def add_hidden_match(run, student: Student) -> None:
    """Activation matching (dus.heal.hidden) at the plan's points, when distill.hidden > 0."""
    distill = run.cfg.section("distill")
    if run.cfg.mode != "distill" or not run.teachers or not distill["hidden"]:
        return
    from dus.heal.hidden import HiddenMatch, hidden_points

    plan = student.plan or run.manifest.plan
    student.hidden_points = hidden_points(plan, distill["hidden_layers"], len(plan.layers))
    weights = run.mix.weights_for(len(run.teachers)) if run.mix else (1.0,)
    student.hidden_match = HiddenMatch(distill["hidden"], student.hidden_points, weights)


def _dtype_and_kwargs(cfg: HealConfig, use_cpu: bool) -> tuple[object, dict]:
    """`sft.model_init_kwargs` and the dtype: float32 on a CPU, the checkpoint's elsewhere.
    With an accelerator and no sharded launch, weights load straight onto this process's
    device, so calibration's forward passes run there, not on the CPU."""
    from dus.checkpoint import accelerator_type
    from dus.heal.distributed import sharded_launch

    kwargs = dict(cfg.section("sft").get("model_init_kwargs") or {})
    if kwargs.pop("trust_remote_code", False):
        raise DusError("sft.model_init_kwargs.trust_remote_code: dus never runs a model's remote code")
    accelerator = accelerator_type()
    if accelerator in ("cuda", "xpu") and not use_cpu and not sharded_launch():
        kwargs.setdefault("device_map", {"": f"{accelerator}:{int(os.environ.get('LOCAL_RANK', '0'))}"})
    return kwargs.pop("dtype", "float32" if use_cpu else "auto"), kwargs


def _in_memory_student(run, say, sources=None) -> Student:
    """The plan assembled over its sources (loaded here, or `sources` already loaded: a
    search heals its candidates over the copy it scores them on), calibrated, its trainable
    layers private copies; each teacher a loaded source sharing the student's prefix."""
    from dus.assemble import assemble, decoder, load_sources, output_config
    from dus.heal.gated_mlp import recompute_activations
    from dus.heal.norms import recompute_norms
    from dus.heal.teacher import share_with_student, shared_prefix

    cfg, plan = run.cfg, run.manifest.plan
    dtype, kwargs = _dtype_and_kwargs(cfg, run.use_cpu)
    if cfg.quantized:
        kwargs.update(quantized_loading(cfg))
    if sources is None:
        sources = load_sources(plan, dtype, **kwargs)
    if cfg.quantized:
        from dus.heal.qlora_cpu import keep_differentiable

        for source in sources.models.values():  # before any forward (calibration, the teacher)
            keep_differentiable(source)
    config = output_config(plan, sources)
    calibration = None
    if cfg.section("calibrate")["enabled"]:
        calibration = calibrate(run, plan, say, sources=sources, config=config)
        plan = calibration.plan
    targets = trained_layers(plan.num_layers, cfg, run.manifest)
    own = set(targets.layers) if cfg.trains in ("band", "expand") else set()
    gated_plan, factors = (gate_factors(plan, sources) if cfg.gates_train else (None, None))
    model = assemble(gated_plan or plan, sources, own, config)
    targets, peft_config = select_trainable(model, cfg, run.manifest, targets)
    gates = None
    if cfg.gates_train:
        from dus.heal.gates import install_gates

        gates = install_gates(decoder(model).layers, factors, targets.layers, gate_floor(plan))
    recompute_activations(decoder(model).layers)  # bitwise the same step, less kept for backward
    recompute_norms(decoder(model).layers)  # bf16 norms: bitwise the same step, less kept for backward
    if cfg.trains in ("expand", "band") and run.args.gradient_checkpointing:
        model.enable_input_require_grads()
    saved_dtype = run.model_dir.stored_dtype or str(model.dtype).replace("torch.", "")
    student = Student(model, targets, peft_config, saved_dtype, calibration, plan=plan, sources=sources,
                      gates=gates, gated_plan=gated_plan, own=frozenset(own))
    if gates is not None:
        say(f"  gates: {len(gates.parameters())} trained (attention and MLP output of layers {targets.layers}), "
            f"{len(gates.modules) - len(gates.parameters())} fixed; lr {cfg.section('gates')['lr']:g}")
    say(f"  in memory: {len(plan.models)} source(s) loaded once; {len(own)} of {plan.num_layers} layers are copies")
    if run.teachers:
        student.teacher_models, student.shareds = [], []
        for teacher in run.teachers:
            name = sources.by_path(teacher.path)
            if name is not None:
                teacher_model = sources[name]
                start = shared_prefix(plan, name, set(targets.layers))
                say(f"  teacher: the loaded source {name!r}, from layer {start} on (layers below are the student's)")
            else:
                teacher_model, start = ModelDir(teacher.path).load_model(model.dtype), 0
            student.teacher_models.append(teacher_model)
            student.shareds.append(share_with_student(teacher_model, model, start))
        student.teacher_dir, student.teacher_model = run.teachers[0].path, student.teacher_models[0]
        student.shared = student.shareds[0]
    return student


def _built_student(run, say) -> Student:
    """Today's path: the built checkpoint loaded whole, calibrated in place, a second teacher."""
    from dus.heal.distributed import whole_weights

    cfg = run.cfg
    model = load_model(run.model_dir, cfg, run.use_cpu)
    saved_dtype = run.model_dir.stored_dtype or str(model.dtype).replace("torch.", "")
    calibration = None
    if cfg.section("calibrate")["enabled"]:
        with whole_weights(model, modify=True):  # ZeRO-3 loads partitioned weights; every rank calibrates
            calibration = calibrate(run, run.manifest.plan if run.manifest else None, say, model=model)
    num_layers = model.config.get_text_config().num_hidden_layers
    targets, peft_config = select_trainable(model, cfg, run.manifest, trained_layers(num_layers, cfg, run.manifest))
    if cfg.trains in ("expand", "band") and run.args.gradient_checkpointing:
        model.enable_input_require_grads()
    student = Student(model, targets, peft_config, saved_dtype, calibration)
    if run.teachers:
        student.teacher_models = [ModelDir(teacher.path).load_model(model.dtype) for teacher in run.teachers]
        student.teacher_dir, student.teacher_model = run.teachers[0].path, student.teacher_models[0]
    return student


def load_model(model_dir: ModelDir, cfg: HealConfig, use_cpu: bool):
    """The built checkpoint as the student, with `sft.model_init_kwargs`."""
    dtype, kwargs = _dtype_and_kwargs(cfg, use_cpu)
    if cfg.quantized:
        kwargs.update(quantized_loading(cfg))
    model = model_dir.load_model(dtype, **kwargs)
    if cfg.quantized:
        from dus.heal.qlora_cpu import keep_differentiable

        keep_differentiable(model)  # before any forward: bitsandbytes' CPU repacking has no backward
    return model


def quantized_loading(cfg: HealConfig) -> dict:
    """from_pretrained arguments for 4-bit weights: on this process's GPU, else the CPU."""
    import torch

    config = quantization_config(cfg)
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


# bitsandbytes runs 4-bit layers on the CPU from this version on (checked with 0.50.2)
BITSANDBYTES_CPU = (0, 48)


def quantization_config(cfg: HealConfig):
    import importlib.metadata
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        where = "" if torch.cuda.is_available() else " (0.48 or later without a CUDA GPU)"
        raise DusError(f"qlora loads the model in 4 bits with bitsandbytes{where}: pip install bitsandbytes, "
                       "or use mode lora (train/lora-seam.yaml)")
    if not torch.cuda.is_available():
        version = importlib.metadata.version("bitsandbytes")
        if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < BITSANDBYTES_CPU:
            raise DusError(f"qlora without a CUDA GPU needs bitsandbytes 0.48 or later (its CPU kernels), found "
                           f"{version}: pip install -U bitsandbytes, or use mode lora (train/lora-seam.yaml)")
    kwargs = dict(cfg.section("quantization"))
    if isinstance(kwargs.get("bnb_4bit_compute_dtype"), str):
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kwargs)


def trained_layers(num_layers: int, cfg: HealConfig, manifest: Manifest | None) -> HealTargets:
    """Which output layers train, decided from the config and the plan before any model exists."""
    trains = cfg.trains
    if trains in ("lora", "band", "gates"):
        seam = cfg.section("seam")
        return choose_layers(num_layers, manifest, seam["radius"], seam["layers"])
    if trains == "expand":
        new = manifest_new_layers(manifest)
        if not new:
            raise DusError(
                "mode expand trains the new blocks of an expand build, but "
                + ("the model has no dus-manifest.json" if manifest is None else "its manifest lists no new layers")
                + "; use mode lora or full"
            )
        return HealTargets(new, [], "new blocks of the expand build (all their parameters)")
    return HealTargets(list(range(num_layers)), [], "full fine-tuning: every parameter")


def select_trainable(model, cfg: HealConfig, manifest: Manifest | None, targets: HealTargets):
    """The PEFT config for LoRA students; requires_grad flags for band, expand and full."""
    trains = cfg.trains
    if trains == "lora":
        targets = describe_targets(model, targets)
        stack = find_layer_stack(model)
        lora = build_lora_config(cfg, targets.linear_modules, targets.layers, stack.pattern)
        if lora.layers_to_transform is not None:
            explicit = lora.layers_to_transform
            targets.layers = [explicit] if isinstance(explicit, int) else list(explicit)
        return targets, lora
    if trains == "gates":
        model.requires_grad_(False)
        targets.reason += " (their gates only: no weight trains)"
        return targets, None
    if trains in ("band", "expand"):
        train_only_layers(model, targets.layers)
        if trains == "band":
            targets.reason += " (all their parameters)"
        return targets, None
    model.requires_grad_(True)
    return targets, None


def gate_factors(plan: LayerPlan, sources):
    """The plan without its output-projection factors, and those factors (the gates' start)."""
    from dus.heal.gates import names_in_plan, plan_factors, strip_factors

    names_of = names_in_plan(plan, sources)
    return strip_factors(plan, names_of), plan_factors(plan, names_of)


def gate_floor(plan: LayerPlan):
    """The lowest value each gate may take (dus.heal.gates' docstring): calibration's floor
    for an inherited layer of a one-model build, 0 for a closed gate or several parents."""
    from dus.heal.calibrate import MIN_FACTOR

    one_model = len({layer.model for layer in plan.layers}) == 1

    def floor(_index: int, initial: float) -> float:
        if one_model and initial > 0:
            return min(MIN_FACTOR, initial)
        return 0.0

    return floor


def train_only_layers(model, layers: list[int]) -> None:
    """Every parameter of the given decoder layers trains, nothing else."""
    stack = model.get_submodule(find_layer_stack(model).path)
    model.requires_grad_(False)
    for index in layers:
        stack[index].requires_grad_(True)


def calibrate(run, plan: LayerPlan | None, say, sources=None, config=None, model=None):
    """Choose the scale of the repeated layers' output projections on calibration text
    (dus.heal.calibrate): on the plan in memory (`sources`), or on a loaded `model`,
    whose weights are scaled in place."""
    from dus.heal.calibrate import calibrate as calibrate_model
    from dus.heal.calibrate import calibrate_plan
    from dus.measure.text import read_text, tokenize_stream
    from dus.resources import local_or_shipped

    section, inputs = run.cfg.section("calibrate"), run.inputs
    if plan is None:
        say("[yellow]warning:[/] calibration skipped: the model has no build plan (dus-manifest.json) naming "
            "repeated layers")
        return None
    if section["text"] == "auto" and inputs.train_data.shape == "text":
        source, text = inputs.train_data.source, "\n\n".join(inputs.train_data.dataset["text"])
    else:  # chat data calibrates on the bundled broad text, unless calibrate.text names a file
        source = section["text"] if section["text"] != "auto" else DEFAULT_CALIBRATION_TEXT
        text = read_text(local_or_shipped(source))
    ids = tokenize_stream(inputs.tokenizer, text[: 16 * section["tokens"]], section["tokens"])  # no token is 16+ chars
    say(f"  calibrating repeated layers on {len(ids)} tokens of {source}")
    report = lambda f, ppl: say(f"    factor {f:g}: perplexity {ppl:.3f}")  # noqa: E731
    if sources is not None:
        result = calibrate_plan(plan, sources, ids, section["factors"], section["window"], report, section["copies"],
                                config)
    else:
        result = calibrate_model(model, plan, ids, section["factors"], section["window"], on_factor=report,
                                 copies=section["copies"])
    if result.layers:
        say(f"  calibration: output projections of layers {result.layers} scaled by {result.factor:g}")
    else:
        say("  calibration: the plan repeats no layer; nothing to scale")
    return result
