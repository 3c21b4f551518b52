"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f OUT.Modelfile`.

Ollama reads the GGUF's own chat template when the Modelfile gives none, so the Modelfile
only names the file and the tokens that end a turn (the end-of-sequence token and, for
ChatML templates, `<|im_end|>`), which Ollama would otherwise not stop on.
"""

from __future__ import annotations

import re
from pathlib import Path

from dus.errors import DusError
from dus.export.vocab import Vocabulary


def stop_tokens(vocab: Vocabulary) -> list[str]:
    stops = []
    eos = vocab.special_ids.get("eos")
    if eos is not None:
        stops.append(vocab.tokens[eos])
    if vocab.chat_template and "<|im_end|>" in vocab.chat_template and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    return stops


def modelfile_path(gguf_path: Path) -> Path:
    return Path(gguf_path).with_suffix(".Modelfile")


def written_by_dus_export(path: Path) -> bool:
    """A Modelfile exactly as dus export writes it: `FROM ./FILE` and stop parameters only
    (one a user edited, or wrote, is not)."""
    try:
        return re.fullmatch(r'FROM \./[^\n]+\n(PARAMETER stop "[^\n]*"\n)*', path.read_text(encoding="utf-8")) is not None
    except (OSError, UnicodeDecodeError):
        return False


def check_modelfile(gguf_path: Path, force: bool, model_path: Path | None = None) -> None:
    """Before anything is written: the Modelfile beside `gguf_path` may be written (see
    dus.export.run.check_output: the same rules, for a Modelfile dus export wrote)."""
    from dus.export.run import check_not_in_model, foreign_file

    path = modelfile_path(gguf_path)
    if path == Path(gguf_path):
        raise DusError(f"--ollama: {gguf_path} would be both the GGUF and its Modelfile; give an -o ending in .gguf")
    if model_path is not None:
        check_not_in_model(path, model_path)
    if path.exists() or path.is_symlink():
        if not force:
            raise DusError(f"{path}: already exists; pass --force to replace a previous dus export, or choose another -o")
        why_not = foreign_file(path, written_by_dus_export)
        if why_not:
            raise DusError(f"--force: {path} {why_not}; dus replaces only a Modelfile dus export wrote: remove it "
                           "yourself or choose another -o")


def write_modelfile(gguf_path: Path, vocab: Vocabulary, force: bool = False) -> Path:
    from dus.export.run import temporary_beside

    check_modelfile(gguf_path, force)
    path = modelfile_path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(vocab)]
    temporary = temporary_beside(path)  # unique: two exports to one path never share it
    try:
        temporary.write_text("\n".join(lines) + "\n")
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
