"""A model directory, as every stage reads and writes it.

build writes one, heal reads one and writes another, compare and scan read several,
import writes one from a GGUF. What they share lives here, once: validating a directory
(config, safetensors weights, never pickles), its config facts, its typed manifest, one
dtype/device policy for loading it, and the one way a new directory appears (written
beside its final path, renamed into place when complete, replacing only what dus wrote).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from dus.errors import DusError, output_disk_error

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "xpu", "mps")


def read_json(path: str | Path, what: str, fix: str):
    """A JSON file dus reads, or one line naming the file, what is wrong and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DusError(f"{path}: {what} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as error:
        raise DusError(f"{path}: {what} is not valid JSON ({error.msg} at line {error.lineno}); {fix}") from None


def pickled_weights_error(path: Path, pickled: str) -> DusError:
    return DusError(
        f"{path}: weights are pickled ({pickled}), which dus never unpickles; convert them once, if you "
        "trust the file: `python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\"`"
    )


class ModelDir:
    """A local Hugging Face model directory with safetensors weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            from dus.errors import file_not_model_directory

            raise DusError(file_not_model_directory(self.path))
        if not self.path.is_dir():
            raise DusError(f"{self.path}: not a directory; pass a local Hugging Face model directory")
        if not (self.path / CONFIG_NAME).is_file():
            raise DusError(f"{self.path}: not a Hugging Face model directory (no config.json); pass a save_pretrained output")
        if not any(self.path.glob("*.safetensors")):
            pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            if pickled:
                raise pickled_weights_error(self.path, pickled[0])
            raise DusError(f"{self.path}: no .safetensors weights; dus never loads pickled weights, "
                           "convert the model to safetensors first")

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def config(self) -> dict:
        config = read_json(self.path / CONFIG_NAME, "the model config", "re-save or re-download the model")
        if not isinstance(config, dict):
            raise DusError(f"{self.path / CONFIG_NAME}: not a JSON object; re-save or re-download the model")
        return config

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config", self.config)

    @property
    def num_layers(self) -> int:
        return layer_count(self.text_config, self.path / CONFIG_NAME)

    def check_weights(self) -> None:
        """Config against weights, from the safetensors headers only (no weight is read):
        for a family dus builds, the checks build makes of its sources (every layer the
        config names present and no other, the same tensors and shapes in every layer,
        embeddings, norm and head, shards and index agreeing); for any other model, the
        layer count under `model.layers`. transformers would fill missing layers with
        random weights, or drop extra ones, and only warn."""
        if self._weights_checked:
            return
        from dus.architectures import ADAPTERS

        if self.config.get("model_type") in ADAPTERS and not self.config.get("quantization_config"):
            from dus.sources import load_source

            load_source(self.name, str(self.path))
        else:
            self._check_layer_count()
        self._weights_checked = True

    _weights_checked = False

    def _check_layer_count(self) -> None:
        import re

        from dus.safetensors_io import read_header

        expected = self.num_layers
        pattern = re.compile(r"^model\.layers\.(\d+)\.")
        found: set[int] = set()
        for file in sorted(self.path.glob("*.safetensors")):
            try:
                tensors, _ = read_header(file)
            except (ValueError, OSError) as error:
                raise DusError(f"{self.path}: cannot read {file.name} ({error}); re-download or re-save the model") from None
            found.update(int(match.group(1)) for name in tensors if (match := pattern.match(name)))
        if found and sorted(found) != list(range(expected)):
            raise DusError(f"{self.path / CONFIG_NAME}: says {expected} layers but the weights hold "
                           f"{len(found)} (model.layers.{min(found)}..{max(found)}); the checkpoint is incomplete or "
                           "mislabelled")

    @property
    def max_positions(self) -> int | None:
        value = self.text_config.get("max_position_embeddings")
        return int(value) if value else None

    @property
    def stored_dtype(self) -> str | None:
        """The dtype the checkpoint was saved in (config `dtype` / `torch_dtype`)."""
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return value if isinstance(value, str) and value != "auto" else None

    @cached_property
    def manifest(self):
        """The typed dus manifest (dus.manifest.Manifest), or None for a model dus did not make."""
        from dus.manifest import read_manifest

        return read_manifest(self.path)

    def tokenizer(self):
        """The directory's tokenizer (never remote code); one line when there is none."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - any failure means no usable tokenizer
            raise DusError(f"{self.path}: cannot load its tokenizer ({type(error).__name__}: {error})") from None

    def load_model(self, dtype=None, device=None, quiet: bool = False, **kwargs):
        """The causal LM: safetensors only, no remote code, `dtype` a torch dtype or name."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        if kwargs.pop("trust_remote_code", False):
            raise DusError("trust_remote_code: dus never runs a model's remote code")
        self.check_weights()
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        shown = logging.is_progress_bar_enabled()
        if quiet:
            logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(self.path), dtype=dtype if dtype is not None else "auto", use_safetensors=True,
                trust_remote_code=False, **kwargs)
        except OSError as error:
            raise DusError(f"{self.path}: cannot load the model ({str(error).splitlines()[0]})") from None
        finally:
            if quiet and shown:
                logging.enable_progress_bar()
        return model.to(device) if device is not None else model


def layer_count(config: dict, config_path: Path) -> int:
    """`num_hidden_layers` of a config: a whole number of at least 1, or one line."""
    value = config.get("num_hidden_layers") if isinstance(config, dict) else None
    if value is None:
        raise DusError(f"{config_path}: no num_hidden_layers; is this a decoder-only language model?")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DusError(f"{config_path}: num_hidden_layers is {json.dumps(value)}; it must be a whole number of at least 1 "
                       "(the number of decoder layers): fix config.json or re-save the model")
    return value


def free(model) -> None:
    """Drop a model and give its memory back before the next one is loaded."""
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def accelerator_type() -> str | None:
    """The accelerator torch sees ("cuda", "xpu", "mps"), or None on a CPU-only machine."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def resolve_device(name: str = "auto"):
    """`auto`: the accelerator when there is one, else the CPU; a named device must exist."""
    import torch

    if name not in DEVICES:
        raise DusError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device(accelerator_type() or "cpu")
    if name != "cpu" and accelerator_type() != name:
        raise DusError(f"--device {name} but no {name} device is available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, model: ModelDir, device):
    """`auto` keeps the checkpoint's dtype, except float16 on CPU (slow and unsafe there),
    which becomes float32."""
    import torch

    if name not in DTYPES:
        raise DusError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    dtype = getattr(torch, model.stored_dtype or "float32", torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


TEMP_MARKER = ".dus-tmp-"
# Files that mark a directory as written by dus (build or heal; import), so --force may replace it.
DUS_MARKERS = ("dus-manifest.json", "dus-import.json")


def replace_only_dus_outputs(force: bool, sources=()):
    """The `replaceable` policy of build and import: an existing output is replaced only
    with --force, only if dus wrote it (it has a dus manifest or import record), and
    never when it is, or holds, a source of the same command."""

    def check(output: Path) -> str | None:
        if not force:
            return f"{output} already exists; choose another -o, or add --force to replace a previous dus output"
        kind = "symlink" if output.is_symlink() else "file" if not output.is_dir() else None
        if kind:
            return (f"--force: {output} is a {kind}, not a directory dus wrote; dus replaces only its own outputs: "
                    "remove it yourself or choose another -o")
        resolved = output.resolve()
        for source in sources:
            source = Path(source).resolve()
            if source == resolved or resolved in source.parents:
                return (f"--force: {output} is {'a source of this command' if source == resolved else f'the directory holding the source {source}'}; "
                        "write the output somewhere else")
        if not any((output / marker).is_file() for marker in DUS_MARKERS):
            return (f"--force: {output} was not written by dus (no {' or '.join(DUS_MARKERS)}); dus replaces only its own "
                    "outputs: remove it yourself or choose another -o")
        return None

    return check


@contextmanager
def atomic_directory(output: Path, replaceable):
    """Yield a temporary directory beside `output`; when the block succeeds it becomes
    `output` by a rename (an existing `output` is replaced only if `replaceable(output)`
    says so, and is checked before any work). On failure nothing is left at `output`.
    Temporaries of killed writers (their process gone) are removed on the way."""
    output = Path(output)
    if output.exists() or output.is_symlink():
        why_not = replaceable(output)
        if why_not:
            raise DusError(why_not)
    # `..` resolved lexically: `B/../B` must not put the temporary inside B, which is renamed away
    output = Path(os.path.abspath(output))
    temporary = output.parent / f".{output.name}{TEMP_MARKER}{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    except OSError as error:
        raise DusError(f"cannot write {output} ({error.strerror or error}); choose a writable -o") from None
    try:
        yield temporary
        if output.is_symlink() or output.is_file():
            output.unlink()
        if output.exists():
            retired = output.parent / f".{output.name}{TEMP_MARKER}old-{os.getpid()}"
            output.rename(retired)
            temporary.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            temporary.rename(output)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        full = output_disk_error(error, output)
        if full is not None:  # blame the output's disk, not the source being copied when it filled up
            raise full from None
        raise


def _remove_stale_temporaries(output: Path) -> None:
    for candidate in output.parent.glob(f".{output.name}{TEMP_MARKER}*"):
        pid_text = candidate.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """A process of this host that runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    except (OSError, IndexError):
        return True


def check_outside_models(output, models, flag: str = "-o") -> None:
    """An output path is never a model the command reads, inside one, nor a directory holding
    one (symbolic links and `..` resolved): a model directory stays the model alone, and a
    replaced or cleared output never takes a source with it. One line, before any work."""
    resolved = Path(os.path.abspath(output)).resolve()
    for model in models:
        source = Path(model).resolve()
        if source == resolved:
            where = "is"
        elif source in resolved.parents:
            where = "is inside"
        elif resolved in source.parents:
            where = "holds"
        else:
            continue
        raise DusError(f"{flag} {output} {where} the model {model}, which this command reads; write the output "
                       "outside every model's directory")
