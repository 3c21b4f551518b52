"""`dus export`: a model directory -> one GGUF file that llama.cpp runs like the checkpoint.

Order of work: validate the directory and everything llama.cpp needs (family, rope,
tokenizer) before a byte is written; plan every tensor from the safetensors headers;
write header, metadata and tensor table; then stream the tensors one by one into a
temporary file beside the output, renamed into place only when complete. K-quants and
the other types only llama.cpp writes: that file is an f16 (bf16) temporary, quantized by
llama.cpp's own quantizer (quantize.py) into another temporary, renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from dus import __version__
from dus.checkpoint import ModelDir
from dus.errors import DusError, output_disk_error
from dus.export.families import family_for
from dus.export.hparams import extra_tensors, write_hparams
from dus.export.imatrix import DEFAULT_TEXT as DEFAULT_IMATRIX_TEXT
from dus.export.quantize import LLAMA_TYPES
from dus.export.tensors import FILE_TYPES, QTYPES, non_finite_warnings, plan_tensors
from dus.export.vocab import Writer, read_vocabulary

TYPES = (*QTYPES, *LLAMA_TYPES)
TEMP_SUFFIX = ".dus-partial"


@dataclass
class ExportResult:
    path: Path
    type: str
    architecture: str
    tensors: int
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    modelfile: Path | None = None
    imatrix: Path | None = None
    notes: list[str] = field(default_factory=list)


def check_output(output: Path, force: bool, model_path: Path | None = None) -> None:
    """`output` may be written: never in (or one of the files of) the model being read, and
    an existing file is replaced only with --force and only when dus export wrote it (a
    GGUF whose metadata holds `dus.version`), never a symbolic link or a file of yours."""
    if model_path is not None:
        check_not_in_model(output, model_path)
    if output.is_dir():
        raise DusError(f"{output}: is a directory; give the GGUF file to write, e.g. {output / 'model.gguf'}")
    if output.exists() or output.is_symlink():
        if not force:
            raise DusError(f"{output}: already exists; pass --force to replace a previous dus export, or choose "
                           "another path")
        why_not = foreign_file(output, written_by_dus_export)
        if why_not:
            raise DusError(f"--force: {output} {why_not}; dus replaces only a file dus export wrote: remove it "
                           "yourself or choose another path")
    if not output.parent.is_dir():
        raise DusError(f"{output.parent}: no such directory; create it first or choose another path")


def check_not_in_model(output: Path, model_path: Path) -> None:
    """`output` (paths resolved: `..`, symbolic links) is neither inside the model directory
    being exported nor one of its files (a file it links to, as in a Hugging Face cache)."""
    model = Path(model_path)
    resolved_model = model.resolve()
    candidates = {Path(os.path.abspath(output)), Path(output).resolve()}
    if any(resolved_model == path or resolved_model in path.parents for path in candidates) \
            or any(Path(os.path.abspath(model)) in path.parents for path in candidates):
        raise DusError(f"{output} is inside the model {model_path}, which dus export reads; write the GGUF somewhere "
                       "else")
    resolved = Path(output).resolve()
    try:
        entries = list(model.iterdir())
    except OSError:
        return
    for entry in entries:
        target = entry.resolve()
        if target == resolved or (entry.is_dir() and target in resolved.parents):
            raise DusError(f"{output} is {entry.name} of the model {model_path} (the same file, through a link), "
                           "which dus export reads; write the GGUF somewhere else")


def foreign_file(path: Path, is_ours) -> str | None:
    """Why the existing `path` is not a file dus wrote (a symbolic link, not a regular
    file, or `is_ours(path)` false), or None."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_file():
        return "is not a regular file"
    if not is_ours(path):
        return "was not written by dus export"
    return None


def written_by_dus_export(path: Path) -> bool:
    """A GGUF file (its magic) whose metadata says dus wrote it (`dus.version`: every
    export, and the importance matrices saved beside them)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        return "dus.version" in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - a file gguf cannot read is not one dus wrote
        return False


def imatrix_path(output: Path) -> Path:
    """Where the importance matrix of `output` is saved: OUT.imatrix.gguf beside it."""
    return output.with_name(f"{output.stem}.imatrix.gguf")


def temporary_beside(output: Path) -> Path:
    """A new, unique hidden file in the output's directory (same file system: the final
    rename is atomic), which a reader never mistakes for a finished output: named
    `.NAME.PID-RANDOM.dus-partial`, so two exports to one path never share one."""
    handle, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.{os.getpid()}-",
                                    suffix=TEMP_SUFFIX)
    os.close(handle)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(name, 0o666 & ~mask)  # mkstemp makes it private; the output is an ordinary file
    return Path(name)


def export_gguf(model_path: Path, output: Path, type_name: str = "f16", force: bool = False,
                ollama: bool = False, progress: bool = True, imatrix_text: str | Path | None = None,
                imatrix_tokens: int = 8192) -> ExportResult:
    """Write `model_path` as a GGUF file of `type_name` at `output`.

    Types the `gguf` package writes (f32, f16, bf16, q8_0) are written directly; the
    others are written as f16 (bf16 for a bf16 checkpoint) into a temporary file and
    quantized by llama.cpp's own quantizer, with an importance matrix computed on
    `imatrix_text` when one is given."""
    from transformers import AutoConfig

    from dus.sources import load_source

    started = time.perf_counter()
    if type_name not in TYPES:
        raise DusError(f"unknown GGUF type {type_name!r}; dus export writes {', '.join(QTYPES)} itself and "
                       f"{', '.join(LLAMA_TYPES)} through llama.cpp's quantizer")
    quantized = type_name in LLAMA_TYPES
    if imatrix_text is not None and not quantized:
        raise DusError(f"--imatrix applies to the types llama.cpp quantizes ({', '.join(LLAMA_TYPES)}); "
                       f"{type_name} does not use one: drop --imatrix or choose e.g. --type q4_k_m")
    if quantized:
        from dus.export.quantize import check_available

        check_available(type_name)
    output = Path(output)
    model = ModelDir(model_path)
    check_output(output, force, model.path)
    if imatrix_text is not None:
        check_output(imatrix_path(output), force, model.path)
        text_path = _imatrix_text(imatrix_text)
    if ollama:
        from dus.export.ollama import check_modelfile

        check_modelfile(output, force, model.path)
    source = load_source(model.name, str(model.path))  # validated headers, shards and layers
    family = family_for(source.model_type, str(model.path))
    config = AutoConfig.from_pretrained(str(model.path), trust_remote_code=False)
    vocab = read_vocabulary(model.path, config.vocab_size)
    try:
        if not quantized:
            planned, warnings = _write_gguf(model, source, family, config, vocab, type_name, output, progress)
            notes, saved_imatrix = [], None
        else:
            planned, warnings, notes, saved_imatrix = _write_quantized(
                model, source, family, config, vocab, type_name, output, progress,
                text_path if imatrix_text is not None else None,
                DEFAULT_IMATRIX_TEXT if str(imatrix_text) == "default" else str(imatrix_text), imatrix_tokens)
    except OSError as error:  # the temporaries are gone already: name the output's disk, not a source
        full = output_disk_error(error, output)
        if full is None:
            raise
        raise full from None
    modelfile = None
    if ollama:
        from dus.export.ollama import write_modelfile

        modelfile = write_modelfile(output, vocab, force=force)
    return ExportResult(output, type_name, family.arch_name, len(planned), output.stat().st_size,
                        time.perf_counter() - started, [*warnings, *vocab.warnings], modelfile, saved_imatrix, notes)


def _imatrix_text(value: str | Path) -> Path:
    from dus.resources import local_or_shipped

    path = local_or_shipped(DEFAULT_IMATRIX_TEXT if str(value) == "default" else value)
    if not Path(path).is_file():
        raise DusError(f"{value}: no such calibration text for --imatrix; give a .txt or .jsonl file, or 'default' "
                       f"for the bundled {DEFAULT_IMATRIX_TEXT}")
    return Path(path)


def _write_gguf(model, source, family, config, vocab, type_name: str, output: Path, progress: bool,
                extra_keys: dict | None = None):
    """The GGUF of a type the `gguf` package writes, atomically at `output`."""
    writer = Writer(None, family.arch_name)
    write_provenance(writer, model)
    for key, value in (extra_keys or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
    warnings = write_hparams(writer, config, family, FILE_TYPES[type_name])
    vocab.write(writer)
    planned = plan_tensors(source.tensors, config, family, type_name, extra_tensors(config, family))
    for tensor in planned:
        writer.add_tensor_info(tensor.name, tensor.shape, gguf.np.float32, tensor.nbytes, raw_dtype=tensor.qtype)

    temporary = temporary_beside(output)
    try:
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, planned, progress)
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    return planned, [*warnings, *non_finite_warnings(planned)]


def _write_quantized(model, source, family, config, vocab, type_name: str, output: Path, progress: bool,
                     text_path: Path | None, label: str, imatrix_tokens: int):
    """f16/bf16 GGUF into a temporary, quantized by llama.cpp into another, renamed into place;
    the importance matrix (if any) saved beside the output the same way."""
    from dus.export import imatrix as importance
    from dus.export.quantize import quantize

    base_type = "bf16" if model.stored_dtype == "bfloat16" else "f16"
    notes, matrix, extra = [], None, {}
    if text_path is not None:
        matrix = importance.compute(model.path, text_path, label, config, family, max_tokens=imatrix_tokens)
        extra = {"quantize.imatrix.file": imatrix_path(output).name, "quantize.imatrix.dataset": label,
                 "quantize.imatrix.entries_count": len(matrix.sums), "quantize.imatrix.chunks_count": matrix.chunk_count}
        if family.experts:
            notes.append("the experts' weights have no importance matrix (transformers fuses them): llama.cpp "
                         "quantizes them without one")
    base = temporary_beside(output)
    quantized = temporary_beside(output)
    saved = imatrix_path(output) if matrix is not None else None
    staged_imatrix = temporary_beside(saved) if saved is not None else None
    try:
        planned, warnings = _write_gguf(model, source, family, config, vocab, base_type, base, progress, extra)
        if saved is not None:
            importance.write(matrix, staged_imatrix)
        notes += quantize(base, quantized, type_name, matrix.means() if matrix is not None else None)
        if saved is not None:
            os.replace(staged_imatrix, saved)
        os.replace(quantized, output)
    finally:
        for path in (base, quantized, staged_imatrix):
            if path is not None:
                path.unlink(missing_ok=True)
    return planned, warnings, notes, saved


def _write_tensors(writer: gguf.GGUFWriter, planned, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(t.nbytes for t in planned)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress, leave=False) as bar:
        for tensor in planned:
            data = tensor.data()
            if data.nbytes != tensor.nbytes:
                raise DusError(f"tensor {tensor.name}: {data.nbytes} bytes converted, {tensor.nbytes} planned; "
                               "this is a dus bug, please report it")
            writer.write_tensor_data(data)
            bar.update(tensor.nbytes)


def write_provenance(writer: gguf.GGUFWriter, model: ModelDir) -> None:
    """general.* fields llama.cpp tools show, and the full dus manifest (sources with
    hashes and licenses, layer map, heal history) as JSON under `dus.manifest`."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.name)
    manifest = model.manifest
    writer.add_string("dus.version", __version__)
    if manifest is None:
        license_id = _card_license(model.path)
        if license_id:
            writer.add_license(license_id)
        return
    licenses = sorted({str(source.get("license", "unknown")) for source in manifest.sources.values()})
    if licenses:
        writer.add_license(licenses[0] if len(licenses) == 1 else " AND ".join(licenses))
    writer.add_base_model_count(len(manifest.sources))
    for index, (name, source) in enumerate(manifest.sources.items()):
        writer.add_base_model_name(index, str(source.get("path") or name))
    if manifest.plan is not None:
        from dus.manifest import _span, layer_runs

        runs = [f"{_span(a, b)} <- {first.model} {_span(first.layer, last.layer)}"
                + ("" if first.transform == "copy" else f" ({first.transform})")
                for a, b, first, last in layer_runs(manifest.plan.layers)]
        writer.add_description(f"Depth up-scaled by dus from {', '.join(manifest.sources)}; layers: " + "; ".join(runs))
        writer.add_array("dus.layer_map", runs)
    writer.add_string("dus.manifest", json.dumps(manifest.to_dict(), sort_keys=True))


def _card_license(path: Path) -> str | None:
    from dus.sources import read_license

    value = read_license(path)
    return None if value in (None, "unknown") else value
