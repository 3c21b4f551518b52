"""Load a local HF model directory for measurement: safetensors only, no remote code,
one model at a time (free it before loading the next)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

from dus.errors import DusError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def check_model_dir(path: str | Path) -> Path:
    """A directory holding config.json and safetensors weights, or a DusError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise DusError(f"{path}: not a directory; pass a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise DusError(f"{path}: no config.json; pass a Hugging Face model directory (save_pretrained output)")
    if not any(path.glob("*.safetensors")):
        raise DusError(f"{path}: no .safetensors weights; dus never loads pickled weights, convert the model to safetensors first")
    return path


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def num_layers_of(path: str | Path) -> int:
    config = read_config(path)
    config = config.get("text_config", config)
    return int(config["num_hidden_layers"])


def max_positions_of(path: str | Path) -> int | None:
    config = read_config(path)
    config = config.get("text_config", config)
    value = config.get("max_position_embeddings")
    return int(value) if value else None


def resolve_device(name: str = "auto"):
    import torch

    if name not in DEVICES:
        raise DusError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DusError("--device cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_dir: str | Path, device):
    """`auto` keeps the checkpoint's dtype, except float16 on CPU (slow and unsafe there),
    which becomes float32."""
    import torch

    if name not in DTYPES:
        raise DusError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    config = read_config(model_dir)
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(stored), torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def load_tokenizer(model_dir: str | Path):
    """The directory's tokenizer (never remote code); a one-line DusError when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - any failure means no usable tokenizer
        raise DusError(f"{model_dir}: cannot load its tokenizer ({type(error).__name__}: {error})") from None


def load_model(model_dir: str | Path, dtype, device):
    """The causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    # Our own progress bars show the measurement; transformers' per-load bar is noise here.
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    finally:
        if shown:
            logging.enable_progress_bar()
    return model.to(device).eval()


def free(model) -> None:
    """Drop a model and give its memory back before the next one is loaded."""
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder_layers(model):
    """The list of decoder blocks (`<prefix>.layers`), found without a per-family table."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DusError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers); this architecture is not supported")
    return layers


def check_same_tokenizer(tokenizers: dict[str, object]) -> None:
    """Perplexities are comparable only over the same token ids: refuse when any
    tokenizer's vocabulary or special tokens differ from the first one's."""
    names = list(tokenizers)
    reference_name = names[0]
    reference = tokenizers[reference_name]
    ref_vocab = reference.get_vocab()
    ref_special = _special_tokens(reference)
    for name in names[1:]:
        other = tokenizers[name]
        vocab = other.get_vocab()
        difference = _first_vocab_difference(ref_vocab, vocab)
        if difference is None:
            special = _special_tokens(other)
            if special != ref_special:
                key = next(k for k in sorted(set(special) | set(ref_special)) if special.get(k) != ref_special.get(k))
                difference = f"special token {key} is {ref_special.get(key)!r} in {reference_name} but {special.get(key)!r} in {name}"
        if difference is not None:
            raise DusError(
                f"tokenizer of {name} differs from {reference_name}'s ({difference}); perplexity is only "
                "comparable over the same tokens: compare models that share a tokenizer, or pass --skip-perplexity"
            )


def _special_tokens(tokenizer) -> dict[str, str]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {name: str(getattr(tokenizer, name, None)) for name in names}


def _first_vocab_difference(reference: dict[str, int], other: dict[str, int]) -> str | None:
    if reference == other:
        return None
    for token in sorted(reference, key=reference.get):
        if token not in other:
            return f"token {token!r} (id {reference[token]}) is missing"
        if other[token] != reference[token]:
            return f"token {token!r} has id {other[token]} instead of {reference[token]}"
    extra = min((token for token in other if token not in reference), key=other.get)
    return f"extra token {extra!r} (id {other[extra]})"
