"""`dus export`: a model directory -> one GGUF file that llama.cpp runs like the checkpoint.

Order of work: validate the directory and everything llama.cpp needs (family, rope,
tokenizer) before a byte is written; plan every tensor from the safetensors headers;
write header, metadata and tensor table; then stream the tensors one by one into a
temporary file beside the output, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from dus import __version__
from dus.checkpoint import ModelDir
from dus.errors import DusError
from dus.export.families import family_for
from dus.export.hparams import extra_tensors, write_hparams
from dus.export.tensors import FILE_TYPES, QTYPES, plan_tensors
from dus.export.vocab import Writer, read_vocabulary

TYPES = tuple(QTYPES)
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


def check_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise DusError(f"{output}: is a directory; give the GGUF file to write, e.g. {output / 'model.gguf'}")
    if output.exists() and not force:
        raise DusError(f"{output}: already exists; pass --force to replace it, or choose another path")
    if not output.parent.is_dir():
        raise DusError(f"{output.parent}: no such directory; create it first or choose another path")


def export_gguf(model_path: Path, output: Path, type_name: str = "f16", force: bool = False,
                ollama: bool = False, progress: bool = True) -> ExportResult:
    """Write `model_path` as a GGUF file of `type_name` at `output`."""
    from transformers import AutoConfig

    from dus.sources import load_source

    started = time.perf_counter()
    if type_name not in QTYPES:
        raise DusError(f"unknown GGUF type {type_name!r}; dus export writes {', '.join(TYPES)}")
    output = Path(output)
    check_output(output, force)
    model = ModelDir(model_path)
    source = load_source(model.name, str(model.path))  # validated headers, shards and layers
    family = family_for(source.model_type, str(model.path))
    config = AutoConfig.from_pretrained(str(model.path), trust_remote_code=False)
    vocab = read_vocabulary(model.path, config.vocab_size)

    writer = Writer(None, family.arch_name)
    write_provenance(writer, model)
    warnings = write_hparams(writer, config, family, FILE_TYPES[type_name])
    vocab.write(writer)
    planned = plan_tensors(source.tensors, config, family, type_name, extra_tensors(config, family))
    for tensor in planned:
        writer.add_tensor_info(tensor.name, tensor.shape, gguf.np.float32, tensor.nbytes, raw_dtype=tensor.qtype)

    temporary = output.with_name(f".{output.name}{TEMP_SUFFIX}")
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
    modelfile = None
    if ollama:
        from dus.export.ollama import write_modelfile

        modelfile = write_modelfile(output, vocab, force=force)
    return ExportResult(output, type_name, family.arch_name, len(planned), output.stat().st_size,
                        time.perf_counter() - started, warnings, modelfile)


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
