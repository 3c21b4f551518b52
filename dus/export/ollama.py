"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f OUT.Modelfile`.

Ollama reads the GGUF's own chat template when the Modelfile gives none, so the Modelfile
only names the file and the tokens that end a turn (the end-of-sequence token and, for
ChatML templates, `<|im_end|>`), which Ollama would otherwise not stop on.
"""

from __future__ import annotations

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


def write_modelfile(gguf_path: Path, vocab: Vocabulary, force: bool = False) -> Path:
    from dus.export.run import temporary_beside

    path = gguf_path.with_suffix(".Modelfile")
    if path.exists() and not force:
        raise DusError(f"{path}: already exists; pass --force to replace it")
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
