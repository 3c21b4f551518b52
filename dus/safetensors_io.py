"""Safetensors at the byte level: read headers, lay out output files, move bytes.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte offsets of each tensor), then the raw bytes. So the whole output header can be
computed before any data moves, and a tensor that passes through unchanged (most of a
depth up-scaling build) is a byte-range copy from its source file, done in the kernel
with `os.copy_file_range` without passing through Python buffers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# names users write in recipes -> safetensors dtype names
DTYPE_ALIASES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

from dus.errors import DusError

COPY_CHUNK = 1 << 30  # copy_file_range moves at most this much per call


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """All tensors of a safetensors file (by name) and its `__metadata__`, checked as the
    format defines it: known dtypes, byte lengths equal to shape x dtype size, data laid
    out back to back from offset 0 to the end of the file, no overlaps and no holes.
    A ValueError says what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise ValueError("not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw_length)
        if length > 100 * 1024 * 1024 or 8 + length > size:
            raise ValueError(f"not a safetensors file (header length {length} for a file of {size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data_start = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_entry(name, entry, path, data_start) for name, entry in header.items()}
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            kind = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
            raise ValueError(f"tensor {info.name!r} {kind} (data offset {info.start - data_start})")
        position = info.end
    if position != size:
        raise ValueError(f"the tensors end at byte {position} but the file has {size} bytes (truncated or padded)")
    return tensors, metadata


def _tensor_entry(name: str, entry, path: Path, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r} has malformed data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != tensor_nbytes(dtype, tuple(shape)):
        raise ValueError(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs "
                         f"{tensor_nbytes(dtype, tuple(shape))}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_SIZES[dtype]


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict,
                  data_start: tuple[int, int] | None = None) -> bytes:
    """The header block (length prefix + JSON padded with spaces) for tensors laid out
    back to back in the given order. entries: (name, dtype, shape, nbytes). The data
    starts at a multiple of 8 bytes; with `data_start=(residue, modulus)` (a residue that
    is a multiple of 8) at a byte offset equal to `residue` modulo `modulus`, so that
    byte copies from a source at that residue stay aligned (the format allows trailing
    spaces in the header)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    if data_start is not None and data_start[0] % 8 == 0:
        residue, modulus = data_start
        body += b" " * ((residue - 8 - len(body)) % modulus)
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, what: str = "a source file") -> None:
    """Copy `length` bytes between files at explicit offsets, the same bytes whichever way:

    - shared extents (FICLONERANGE, a reflink) where the filesystem can (Btrfs, XFS): the
      block-aligned middle of a range whose two offsets agree modulo the block size;
    - in the kernel otherwise: `os.splice` through a 1 MiB pipe, or `os.copy_file_range`
      where the offsets agree modulo 64 KiB (as `cp` copies a whole file) or the range is
      short. copy_file_range moves 64 KiB a step inside the kernel; at offsets that
      disagree every output page is then written in two pieces, and a whole layer takes
      3.6 times as many page-cache folios as through the larger pipe;
    - through a buffer where neither is possible.

    A source that ends early is truncated: one clear error."""
    if length >= CLONE_AT_LEAST:
        span = _clone_span(src_fd, src_offset, dst_fd, dst_offset, length)
        if span is not None:
            head, middle = span
            _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, head, what)
            if _clone(src_fd, src_offset + head, dst_fd, dst_offset + head, middle):
                head += middle
            src_offset, dst_offset, length = src_offset + head, dst_offset + head, length - head
    _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, length, what)


CLONE_AT_LEAST = 1 << 20  # shorter ranges are copied (a reflink of a few blocks saves nothing)
SPLICE_AT_LEAST = 1 << 20  # shorter copies go by copy_file_range whatever their offsets
ALIGNMENT = 1 << 16  # offsets that agree modulo this go by copy_file_range
PIPE_BYTES = 1 << 20  # the pipe for splice (Linux lets any user ask for 1 MiB)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_no_clone: set[tuple[int, int]] = set()  # (source device, output device) pairs that refused a reflink


def _clone_span(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> tuple[int, int] | None:
    """(bytes before the first whole block, block-aligned bytes after them) where a
    reflink may share them, else None."""
    try:
        src_stat, dst_stat = os.fstat(src_fd), os.fstat(dst_fd)
    except OSError:
        return None
    devices = (src_stat.st_dev, dst_stat.st_dev)
    block = max(src_stat.st_blksize, dst_stat.st_blksize, 512)
    if devices[0] != devices[1] or devices in _no_clone or (src_offset - dst_offset) % block:
        return None
    head = -src_offset % block
    middle = (length - head) // block * block
    return (head, middle) if middle > 0 else None


def _clone(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> bool:
    """Share `length` block-aligned bytes of the source with the output; False (nothing
    done) where the filesystem cannot, remembered for the pair of devices."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("=qQQQ", src_fd, src_offset, length, dst_offset))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the output's disk is full: the caller names the output
        _no_clone.add((os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev))
        return False
    return True


def _kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, what: str) -> None:
    if length >= SPLICE_AT_LEAST and (src_offset - dst_offset) % ALIGNMENT:
        done = _splice(src_fd, src_offset, dst_fd, dst_offset, length)
        src_offset, dst_offset, length = src_offset + done, dst_offset + done, length - done
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    while length > 0 and kernel_copy is not None:
        try:
            moved = kernel_copy(src_fd, dst_fd, min(length, COPY_CHUNK), src_offset, dst_offset)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # the output's disk is full: the caller names the output
            break  # not supported by this kernel or filesystem pair: finish through user space
        if moved == 0:
            # The end of the source, or a destination that took nothing (a full disk can
            # answer so): user space tells them apart, reading first and then writing.
            break
        src_offset += moved
        dst_offset += moved
        length -= moved
    while length > 0:
        chunk = memoryview(os.pread(src_fd, min(length, 64 << 20), src_offset))
        if not chunk:
            raise DusError(f"{what} is shorter than its safetensors header says (truncated?); re-download or re-save it")
        src_offset += len(chunk)
        length -= len(chunk)
        dst_offset = _pwrite_all(dst_fd, chunk, dst_offset)


def _splice(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """Move up to `length` bytes source -> pipe -> output in the kernel; returns the bytes
    moved: fewer where splice is not supported here or the source ended (the caller
    finishes another way, and reports a truncated source)."""
    splice = getattr(os, "splice", None)  # Linux, Python 3.10+
    if splice is None:
        return 0
    import fcntl

    read_end, write_end = os.pipe()
    done = 0
    try:
        try:
            capacity = fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        except OSError:
            capacity = 1 << 16  # the default pipe
        while done < length:
            try:
                got = splice(src_fd, write_end, min(length - done, capacity), offset_src=src_offset + done)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                return done  # this file cannot be spliced: nothing is in the pipe
            if got == 0:
                return done  # the end of the source
            put = 0
            while put < got:
                try:
                    moved = splice(read_end, dst_fd, got - put, offset_dst=dst_offset + done + put)
                except OSError as error:
                    if error.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    moved = 0
                if moved == 0:  # the output takes no splice: what is in the pipe goes by write
                    while put < got:
                        data = os.read(read_end, got - put)
                        _pwrite_all(dst_fd, memoryview(data), dst_offset + done + put)
                        put += len(data)
                    return done + put
                put += moved
            done += got
    finally:
        os.close(read_end)
        os.close(write_end)
    return done


def preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a file about to be written whole (fallocate(2), Linux): one
    extent allocated up front instead of a delayed allocation per 4 KiB page, a quarter
    less time copying into it on ext4. Nothing where the filesystem cannot (never
    emulated by writing zeros, as posix_fallocate would); a full disk is an OSError now,
    before any copy."""
    if not sys.platform.startswith("linux") or size <= 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is None:
        return
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of `data` at `offset`; returns the offset after it."""
    while data:
        written = os.pwrite(fd, data, offset)
        if written == 0:  # a write that takes nothing would loop for ever
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data, offset = data[written:], offset + written
    return offset


def read_tensor(info: TensorInfo):
    """Load one tensor into memory as a torch tensor (only for tensors being transformed)."""
    import torch

    with open(info.file, "rb") as handle:
        handle.seek(info.start)
        data = bytearray(handle.read(info.nbytes))
    torch_dtype = getattr(torch, TORCH_NAMES.get(info.dtype, ""), None)
    if torch_dtype is None:
        raise ValueError(f"tensor {info.name} has dtype {info.dtype}, which dus cannot transform")
    if not data:
        return torch.empty(info.shape, dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch_dtype).reshape(info.shape)


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20 (Hugging Face's convention for shard sizes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"shard size {text}: give at least 1 byte, like 5GB, 500MB or 2GiB")
        return text
    value = str(text).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            try:
                size = float(number) * factor
            except ValueError:
                break
            if not math.isfinite(size) or int(size) < 1:
                raise ValueError(f"shard size {text!r}: give a finite size of at least 1 byte, like 5GB, 500MB or 2GiB")
            return int(size)
    raise ValueError(f"cannot read size {text!r}: write it like 5GB, 500MB or 2GiB")
