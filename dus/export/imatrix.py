"""An importance matrix for llama.cpp's quantizer, computed in PyTorch, and its file.

What llama.cpp's `llama-imatrix` collects, per weight matrix of the decoder layers
(`blk.*`): for each input column j, the sum over calibration tokens of x_j^2 of the
activations entering the matrix, and the number of tokens; the quantizer weighs each
column's rounding error by sum / count. dus computes the same on the transformers model,
names each matrix as `dus export` names it in the GGUF, and writes llama.cpp's current
imatrix file (a GGUF: `NAME.in_sum2` and `NAME.counts` tensors, `imatrix.*` keys) that
`llama-quantize --imatrix` reads. Like `llama-imatrix` by default, the output head is not
collected. Mixture-of-experts expert weights (fused in transformers) are not collected
either: llama.cpp quantizes them without an importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from dus import __version__
from dus.errors import DusError

SUMS, COUNTS = ".in_sum2", ".counts"
DEFAULT_TEXT = "data/text/train.jsonl"  # the bundled broad text healing trains on


@dataclass
class Imatrix:
    """Sums (n_matrices, columns) and token counts (n_matrices,) per GGUF tensor name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """Per-column mean squared activation, flattened, as the quantizer takes it (a
        matrix no token reached gets ones: no column preferred, as llama-quantize does)."""
        result = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float64)[:, None]
            mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
            result[name] = mean.astype(np.float32).reshape(-1)
        return result


def calibration_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[list[int]]:
    """Windows of `window` tokens spread evenly over the whole text (not its first
    `max_tokens`: the bundled text runs through five kinds of writing in turn), each
    starting with BOS where the tokenizer adds one, as llama-imatrix does."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // window
    if available == 0:
        raise DusError(f"the calibration text has {len(ids)} tokens, fewer than one window of {window}; give a longer "
                       "text to --imatrix")
    count = max(1, min(available, max_tokens // window))
    starts = [round(i * (available - 1) / max(count - 1, 1)) * window for i in range(count)]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    windows = []
    for start in starts:
        chunk = list(ids[start:start + window])
        if adds_bos:
            chunk[0] = bos
        windows.append(chunk)
    return windows


def compute(model_dir: Path, text_path: Path, label: str, config, family, max_tokens: int = 8192,
            window: int = 512) -> Imatrix:
    """Run the calibration windows through the transformers model, float32, and collect."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus.measure.text import read_text

    window = min(window, int(config.max_position_embeddings))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = calibration_windows(tokenizer, read_text(text_path), max_tokens, window)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def collector(target: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[target] = sums.get(target, 0) + x.square().sum(0)
            counts[target] = counts.get(target, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target and target.startswith("blk."):
            hooks.append(module.register_forward_pre_hook(collector(target)))
    try:
        with torch.no_grad():
            for chunk in windows:
                model(torch.tensor([chunk]))
    finally:
        for hook in hooks:
            hook.remove()
    result = Imatrix(datasets=[label], chunk_count=len(windows), chunk_size=window)
    for target in sorted(sums):
        values = sums[target].numpy().astype(np.float32)[None, :]
        if not np.isfinite(values).all():
            raise DusError(f"{model_dir}: activations entering {target} are not finite on the calibration text; "
                           "the model is damaged, or quantize without --imatrix")
        result.sums[target] = values
        result.counts[target] = np.asarray([counts[target]], dtype=np.float32)
    return result


def write(imatrix: Imatrix, path: Path) -> None:
    """llama.cpp's GGUF imatrix file at `path` (the caller makes it atomic)."""
    writer = gguf.GGUFWriter(str(path), arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file has none
    writer.add_type("imatrix")
    writer.add_string("dus.version", __version__)  # so that `dus export --force` may replace it, and only it
    writer.add_array("imatrix.datasets", list(imatrix.datasets))
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        writer.add_tensor(name + SUMS, np.ascontiguousarray(imatrix.sums[name], dtype=np.float32))
        writer.add_tensor(name + COUNTS, np.ascontiguousarray(imatrix.counts[name], dtype=np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> Imatrix:
    """An imatrix GGUF file (as `llama-imatrix` or dus writes it)."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise DusError(f"{path}: not an imatrix GGUF file ({error})") from None
    fields = {name: value.contents() for name, value in reader.fields.items()}
    result = Imatrix(datasets=list(fields.get("imatrix.datasets") or []),
                     chunk_count=int(fields.get("imatrix.chunk_count") or 0),
                     chunk_size=int(fields.get("imatrix.chunk_size") or 0))
    for tensor in reader.tensors:
        values = np.array(tensor.data, dtype=np.float32)
        if tensor.name.endswith(SUMS):
            result.sums[tensor.name[: -len(SUMS)]] = values.reshape(-1, int(tensor.shape[0]))
        elif tensor.name.endswith(COUNTS):
            result.counts[tensor.name[: -len(COUNTS)]] = values.reshape(-1)
    if not result.sums or result.sums.keys() != result.counts.keys():
        raise DusError(f"{path}: no matching {SUMS}/{COUNTS} tensors; not an imatrix file llama.cpp writes")
    return result
