"""Execute a LayerPlan: lay out the output tensors, then stream them into shards.

Every output tensor is described (name, dtype, shape, where its bytes come from, what is
done to them) before any byte moves, so the headers and the shard index are computed up
front. Unchanged tensors are byte-range copies in the kernel; only transformed ones
(dtype change, scale, zero-init, blend) are loaded, one at a time, so peak memory is one
tensor (two for a blend) plus a constant, whatever the model's size.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dus.checkpoint import INDEX_NAME
from dus.errors import DusError
from dus.plan import Blend, LayerPlan, NonLayerSource, scale_for
from dus.safetensors_io import (
    DTYPE_ALIASES,
    DTYPE_SIZES,
    TORCH_NAMES,
    TensorInfo,
    copy_range,
    encode_header,
    preallocate,
    read_tensor,
    tensor_bytes,
    tensor_nbytes,
)
from dus.sources import SourceModel



@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype of the output
    shape: tuple[int, ...]
    source: TensorInfo
    compute_dtype: str | None = None  # recipe `dtype`: convert before transforming
    scale: float | None = None
    zero: bool = False
    blend: tuple[TensorInfo, Blend] | None = None
    value: object = None  # a tensor computed in memory (a healed layer), or a function giving it when written
    delta: object = None  # added (in float32) to the transformed source: a LoRA merged into full-precision weights

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def is_byte_copy(self) -> bool:
        return (
            self.value is None
            and self.delta is None
            and not self.zero
            and self.blend is None
            and self.scale in (None, 1.0)
            and self.dtype == self.source.dtype
            and self.compute_dtype in (None, self.source.dtype)
        )


def _st_dtype(name: str | None) -> str | None:
    return DTYPE_ALIASES[name] if name else None


def layout(plan: LayerPlan, sources: dict[str, SourceModel]) -> list[OutputTensor]:
    """Every output tensor, in checkpoint order: embeddings, layers 0..L-1, norm and head."""
    out_dtype = _st_dtype(plan.output_dtype)
    compute_dtype = _st_dtype(plan.dtype)
    tensors: list[OutputTensor] = []

    def add(name: str, info: TensorInfo, scale=None, zero=False, blend=None):
        floating = info.dtype in TORCH_NAMES
        tensors.append(
            OutputTensor(
                name=name,
                dtype=(out_dtype or compute_dtype or info.dtype) if floating else info.dtype,
                shape=info.shape,
                source=info,
                compute_dtype=compute_dtype if floating else None,
                scale=scale,
                zero=zero,
                blend=blend,
            )
        )

    def add_non_layer(group: NonLayerSource, embeddings: bool):
        source = sources[group.model]
        for name, info in sorted(source.non_layer.items()):
            if is_embedding(name) == embeddings:
                add(name, info, scale=scale_for(group.scale, name))

    add_non_layer(plan.embeddings, embeddings=True)
    for index, layer in enumerate(plan.layers):
        source = sources[layer.model]
        prefix = source.adapter.layer_prefix
        for rest, info in sorted(source.layer(layer.layer).items()):
            name = f"{prefix}.{index}.{rest}"
            blend = None
            if layer.blend is not None:
                blend = (sources[layer.blend.model].layer(layer.blend.layer)[rest], layer.blend)
            zero = layer.zero_output and source.adapter.is_output_projection(rest)
            names = [f"{prefix}.{index}.{alias}" for alias in source.adapter.names(rest)]
            add(name, info, scale=scale_for(layer.scale, *names), zero=zero, blend=blend)
    add_non_layer(plan.head, embeddings=False)
    return tensors


def is_embedding(name: str) -> bool:
    """Embeddings come before the layers (mergekit's "pre" weights); all other non-layer
    tensors (final norm, lm_head) come after them."""
    return "embed" in name or name.endswith("wte.weight")


def shard(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Greedy shards in checkpoint order; a tensor larger than the limit gets its own.
    Within a shard, wider dtypes go first so every tensor stays aligned to its element
    size (the format allows no gaps between tensors)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    order = {tensor.name: i for i, tensor in enumerate(tensors)}
    return [sorted(group, key=lambda t: (-DTYPE_SIZES[t.dtype], order[t.name])) for group in shards]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(tensors: list[OutputTensor], directory: Path, max_bytes: int, progress=None) -> list[str]:
    """Write all shards (and the index when there are several) into `directory`."""
    groups = shard(tensors, max_bytes)
    names = shard_names(len(groups))
    source_fds: dict[Path, int] = {}
    try:
        for name, group in zip(names, groups):
            _write_one(directory / name, group, source_fds, progress)
    finally:
        for fd in source_fds.values():
            os.close(fd)
    if len(groups) > 1:
        weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_one(path: Path, group: list[OutputTensor], source_fds: dict[Path, int], progress) -> None:
    runs = _runs(group)
    header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in group], {"format": "pt"},
                           data_start=_aligned_start(runs))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data_bytes = sum(tensor.nbytes for tensor in group)
        if data_bytes >= PREALLOCATE_AT_LEAST:
            preallocate(fd, len(header) + data_bytes)
        os.write(fd, header)
        offset = len(header)
        for run in runs:
            first = run[0]
            nbytes = sum(tensor.nbytes for tensor in run)
            if first.is_byte_copy:
                source_path = first.source.file
                if source_path not in source_fds:
                    source_fds[source_path] = os.open(source_path, os.O_RDONLY)
                copy_range(source_fds[source_path], first.source.start, fd, offset, nbytes, what=str(source_path))
            else:
                data = tensor_bytes(materialize(first))
                if len(data) != first.nbytes:  # the header was computed from the plan: a bug, not bad input
                    raise RuntimeError(f"{first.name}: {len(data)} bytes computed, {first.nbytes} planned")
                written = 0
                while written < len(data):
                    moved = os.pwrite(fd, data[written:], offset + written)
                    if moved == 0:  # a write that takes nothing would loop for ever
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += moved
            offset += nbytes
            if progress is not None:
                progress(nbytes)
    finally:
        os.close(fd)


ALIGN_MODULUS = 4096  # the block of most filesystems: what a reflink needs
ALIGN_AT_LEAST = 1 << 24  # pad the header (by < 4 KiB) only for at least 16 MiB of byte copies so aligned
PREALLOCATE_AT_LEAST = 1 << 24  # shards this large have their blocks reserved before the copy


def _aligned_start(runs: list[list[OutputTensor]]) -> tuple[int, int] | None:
    """Where (modulo 4 KiB) the shard's data should start so that the most bytes copied
    from sources sit at the same offset modulo the block size in the output as in their
    source: a filesystem with reflinks (Btrfs, XFS) then shares those blocks instead of
    copying them. None (the header as short as it can be, the layout of small shards
    unchanged) when that aligns under 16 MiB."""
    aligned: dict[int, int] = {}
    offset = 0
    for run in runs:
        nbytes = sum(tensor.nbytes for tensor in run)
        if run[0].is_byte_copy:
            residue = (run[0].source.start - offset) % ALIGN_MODULUS
            if residue % 8 == 0:
                aligned[residue] = aligned.get(residue, 0) + nbytes
        offset += nbytes
    if not aligned:
        return None
    residue, nbytes = max(aligned.items(), key=lambda item: (item[1], -item[0]))
    return (residue, ALIGN_MODULUS) if nbytes >= ALIGN_AT_LEAST else None


def _runs(group: list[OutputTensor]) -> list[list[OutputTensor]]:
    """Consecutive byte copies whose source bytes are also consecutive in one file (a whole
    layer, in a checkpoint written by safetensors, which stores tensors sorted by name) are
    one run, moved by one copy call; every transformed tensor is a run of its own."""
    runs: list[list[OutputTensor]] = []
    for tensor in group:
        previous = runs[-1][-1] if runs else None
        if (
            previous is not None
            and tensor.is_byte_copy
            and previous.is_byte_copy
            and tensor.source.file == previous.source.file
            and tensor.source.start == previous.source.end
        ):
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
    return runs


def materialize(tensor: OutputTensor):
    """The output value of a transformed tensor, in the order mergekit applies the same
    steps: convert to the compute dtype, (blend,) scale, convert to the output dtype."""
    import torch

    out_dtype = getattr(torch, TORCH_NAMES.get(tensor.dtype, ""), None)
    if tensor.value is not None:
        value = tensor.value() if callable(tensor.value) else tensor.value
        return value.detach().to("cpu", out_dtype)
    if tensor.delta is not None:
        delta = tensor.delta() if callable(tensor.delta) else tensor.delta
        value = _transformed(tensor, out_dtype).float()  # the source as the plan transforms it
        return (value + delta.detach().to("cpu", torch.float32)).to(out_dtype)
    return _transformed(tensor, out_dtype)


def _transformed(tensor: OutputTensor, out_dtype):
    """The source tensor with the plan's own transforms (zero, dtype, blend, scale)."""
    import torch

    if tensor.zero:
        return torch.zeros(tensor.shape, dtype=out_dtype)
    value = inputs = read_tensor(tensor.source)
    if tensor.compute_dtype:
        value = value.to(getattr(torch, TORCH_NAMES[tensor.compute_dtype]))
    other = None
    if tensor.blend is not None:
        other_info, blend = tensor.blend
        other = read_tensor(other_info)
        value = blend_tensors(value, other, blend.t, blend.method).to(value.dtype)
    if tensor.scale is not None:
        value = value * tensor.scale
    result = value.to(out_dtype)
    check_no_overflow(tensor, inputs, other, result, value.dtype)
    return result


def check_no_overflow(tensor: OutputTensor, source, other, result, compute_dtype=None) -> None:
    """A transform (scale, dtype conversion, blend) must not turn finite values infinite or
    NaN: a finite scale of 1e39 on float32 weights, or 1e37 on float16, would otherwise
    write a model that computes NaN. Values the source already held as NaN or infinite
    pass as they are (a byte copy would keep them too). One line naming the tensor, the
    transform, the largest value the output dtype holds and the fix; raised before the
    output is renamed into place, so nothing is left at the output path."""
    import torch

    if not result.is_floating_point() or bool(torch.isfinite(result).all()):
        return
    finite = torch.isfinite(source) if source.is_floating_point() else torch.ones_like(result, dtype=torch.bool)
    if other is not None and other.is_floating_point():
        finite &= torch.isfinite(other)
    broken = int((~torch.isfinite(result) & finite).sum())
    if not broken:
        return
    dtype = str(result.dtype).removeprefix("torch.")
    # The scale is applied in the compute dtype (itself a number of it), the result stored in the output dtype.
    compute = compute_dtype if compute_dtype is not None and compute_dtype.is_floating_point else result.dtype
    compute_max = float(torch.finfo(compute).max)
    largest = min(float(torch.finfo(result.dtype).max), compute_max)
    narrowest = str(compute if compute_max < float(torch.finfo(result.dtype).max) else result.dtype)
    peak = float(source[finite].abs().max().float()) if source.is_floating_point() else 0.0
    what, fix = [], []
    if tensor.scale not in (None, 1.0):
        what.append(f"scale {tensor.scale:g}")
        if peak > 0:
            fix.append(f"a scale of magnitude below {min(largest / peak, compute_max):.3g} (the tensor's largest value "
                       f"is {peak:.3g})")
        else:
            fix.append("a smaller scale")
    if tensor.blend is not None:
        what.append(f"{tensor.blend[1].method} blend")
    if tensor.dtype != tensor.source.dtype:
        what.append(f"conversion from {TORCH_NAMES.get(tensor.source.dtype, tensor.source.dtype)} to {dtype}")
    if compute_dtype is not None and compute_dtype.is_floating_point and compute_dtype != torch.float32 \
            and tensor.compute_dtype:
        fix.append("dtype: float32")
    if dtype != "float32":
        fix.append("out_dtype: float32")
    s = "s" if broken > 1 else ""
    raise DusError(f"{tensor.name}: the {' and '.join(what) or 'transform'} turns {broken} finite value{s} into "
                   f"infinity or NaN ({narrowest.removeprefix('torch.')} holds at most {largest:.4g}); the model "
                   f"would compute NaN: use {' or '.join(fix) or 'a smaller scale'}")


def blend_tensors(a, b, t: float, method: str):
    """Interpolate two same-shaped tensors in float32: linearly, or along the great
    circle between them (SLERP), falling back to linear when they are nearly parallel."""
    import torch

    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if method == "linear":
        return (1 - t) * a32 + t * b32
    flat_a, flat_b = a32.reshape(-1), b32.reshape(-1)
    norm_a, norm_b = flat_a.norm(), flat_b.norm()
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * a32 + t * b32
    cosine = torch.clamp(torch.dot(flat_a / norm_a, flat_b / norm_b), -1.0, 1.0)
    if cosine.abs() > 0.9995:
        return (1 - t) * a32 + t * b32
    omega = torch.arccos(cosine)
    sin_omega = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin_omega) * a32 + (torch.sin(t * omega) / sin_omega) * b32
