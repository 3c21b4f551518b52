"""What dus needs to know, and to correct, about the distributed setup accelerate gives it.

`accelerate launch` describes the run in environment variables (ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED, FSDP_*, ...); the Trainer's accelerator then decides what
actually runs. Three things here:

- FSDP on a machine without a GPU: accelerate would silently run DDP (with `use_cpu`) or
  one lone process per rank (without). dus makes accelerate's backend choice report
  MULTI_GPU over gloo with the device pinned to the CPU, which is all FSDP needs to shard
  on CPU tensors. Never done when a GPU (or other accelerator) is present.
- What ran, read back from the trainer's accelerator for the heal record.
- ZeRO-3 keeps every parameter partitioned across ranks (transformers loads the model
  under `deepspeed.zero.Init`): code that reads or changes whole weights outside the
  DeepSpeed engine (calibration, digests) must gather them first, on every rank at once.
"""

from __future__ import annotations

import contextlib
import os

from dus.errors import DusError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def fsdp_launch() -> bool:
    """True when `accelerate launch` was told to use FSDP (config file or --use_fsdp)."""
    return _flag("ACCELERATE_USE_FSDP")


def fsdp_version_requested() -> int:
    try:
        return int(os.environ.get("FSDP_VERSION", "1"))
    except ValueError:
        return 1


def sharded_launch() -> bool:
    """`accelerate launch` asked for FSDP or DeepSpeed: the engine owns each forward and
    keeps weights, gradients or optimizer state in parts (dus's one meaning of "sharded")."""
    return fsdp_launch() or _flag("ACCELERATE_USE_DEEPSPEED")


def launched_as(distributed_type: str) -> str:
    """The kind of run the launch asked for, for the console: fsdp, deepspeed, or the state's type."""
    if fsdp_launch():
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return distributed_type.lower().replace("_", "-")


def needs_cpu_fsdp(accelerator: str | None) -> bool:
    """An FSDP launch on a machine with no accelerator (GPU, XPU, MPS)."""
    return fsdp_launch() and accelerator is None


def enable_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP over gloo on CPU tensors in this process.

    accelerate picks the distributed type from the hardware (`PartialState._prepare_backend`):
    without a GPU it can only say NO (or MULTI_CPU with `use_cpu`, which never becomes FSDP).
    The patched choice says MULTI_GPU with backend gloo, and ACCELERATE_TORCH_DEVICE=cpu keeps
    the device on the CPU; AcceleratorState then turns MULTI_GPU into FSDP as on a GPU machine.
    The patch changes only that one answer, and only while no accelerator is present."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    original = PartialState._prepare_backend
    if getattr(original, "_dus_cpu_fsdp", False):
        return

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if (not cpu and distributed_type == DistributedType.NO and fsdp_launch()
                and int(os.environ.get("LOCAL_RANK", "-1")) != -1):
            return "gloo", DistributedType.MULTI_GPU
        return chosen, distributed_type

    prepare_backend._dus_cpu_fsdp = True
    PartialState._prepare_backend = prepare_backend


def check_supported(trains: str, accelerator: str | None) -> None:
    """Combinations known to train and then crash or save something wrong: refused before training."""
    if not fsdp_launch() or fsdp_version_requested() != 1:
        return
    if trains == "lora":
        import peft

        raise DusError(
            f"LoRA under FSDP1 saves an empty adapter with peft {peft.__version__} (its names carry "
            "_fsdp_wrapped_module.); "
            "set fsdp_version: 2 in the accelerate config (launch/fsdp.yaml does), or use DDP or DeepSpeed"
        )
    if accelerator is None:
        raise DusError(
            "FSDP1 without a GPU: torch crashes when it gathers the full weights to save them (offload_to_cpu on CPU "
            "tensors); set fsdp_version: 2 in the accelerate config (launch/cpu-fsdp.yaml does)"
        )


def describe(accelerator, args) -> dict:
    """What ran, as the trainer's accelerator says: accelerate's distributed type, the FSDP
    version or ZeRO stage, the number of processes and the global batch."""
    state = accelerator.state
    distributed_type = state.distributed_type.value if hasattr(state.distributed_type, "value") else str(
        state.distributed_type)
    fsdp = getattr(state, "fsdp_plugin", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)
    world_size = accelerator.num_processes
    accumulation = args.gradient_accumulation_steps
    return {
        "distributed_type": distributed_type,
        "fsdp_version": getattr(fsdp, "fsdp_version", None) if fsdp is not None else None,
        "zero_stage": getattr(deepspeed, "zero_stage", None) if deepspeed is not None else None,
        "world_size": world_size,
        "per_device_batch": args.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "global_batch": args.per_device_train_batch_size * world_size * accumulation,
        "mixed_precision": str(accelerator.mixed_precision),
        "backend": getattr(state, "backend", None),
        "device": str(accelerator.device),
    }


def zero3_partitioned(model) -> bool:
    """True when the model's parameters are ZeRO-3 partitions (deepspeed.zero.Init)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


@contextlib.contextmanager
def whole_weights(model, modify: bool = False):
    """Inside the block every rank sees the full parameters of a ZeRO-3 model; with
    `modify`, what rank 0 changed is kept (and spread to every rank's partition) on exit.
    Every rank must enter it together. A no-op for models that are not partitioned."""
    if not zero3_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None):
        yield


def describe_briefly(facts: dict) -> str:
    """One line for the console: what ran, on how many processes, at what global batch."""
    kind = facts["distributed_type"]
    if facts["fsdp_version"]:
        kind += f" (FSDP{facts['fsdp_version']})"
    if facts["zero_stage"] is not None:
        kind += f" (ZeRO-{facts['zero_stage']})"
    where = f"over {facts['backend']}, {facts['world_size']} processes x " if facts["world_size"] > 1 else "(one process), "
    return (f"{kind} {where}batch {facts['per_device_batch']} x accumulation {facts['gradient_accumulation_steps']}"
            f" = global batch {facts['global_batch']}, device {facts['device']}")


def holds_shards(accelerator) -> bool:
    """True when each rank holds only a part of the parameters (FSDP, ZeRO-3): a per-rank
    hash of the weights means nothing there, and whole weights exist only when gathered."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(state, "deepspeed_plugin", None)
    return state.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def plain_loading():
    """Load models whole inside the block, even under ZeRO-3.

    While a ZeRO-3 config is registered, transformers builds every model it loads inside
    `deepspeed.zero.Init`, which partitions each parameter with a broadcast to all ranks.
    A load on rank 0 alone (the healed model, rebuilt from the gathered files) would then
    wait forever for ranks that are already at the final barrier: the ZeRO-3 hang."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = registered() if registered is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
