"""Held-out text: a .txt file is one stream; a .jsonl file gives one document per line
(its `text` field), joined by blank lines into one stream."""

from __future__ import annotations

import json
from pathlib import Path

from dus.errors import DusError, read_user_text

DOCUMENT_SEPARATOR = "\n\n"
PLAIN_SUFFIXES = {".txt", ".md", ".text", ""}


def read_text(path: str | Path) -> str:
    """The whole held-out stream as one string."""
    path = Path(path)
    if not path.is_file():
        raise DusError(f"{path}: no such file; pass held-out text with --data (a .txt file, or .jsonl with a 'text' field)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = DOCUMENT_SEPARATOR.join(jsonl_strings(path, "text"))
    elif suffix in PLAIN_SUFFIXES:
        text = read_user_text(path, "held-out text (.txt, or .jsonl with a 'text' field)")
    else:
        raise DusError(f"{path}: unsupported text format {suffix!r}; use a .txt file or a .jsonl file with a 'text' field")
    if not text.strip():
        raise DusError(f"{path}: the text is empty; give held-out text to measure on")
    return text


def jsonl_strings(path: Path, field: str) -> list[str]:
    """The string `field` of every non-empty line of a JSONL file; a one-line DusError
    naming the line for anything else."""
    values = []
    for number, line in enumerate(read_user_text(path, "a JSONL file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DusError(f"{path}:{number}: not valid JSON ({error.msg}); each line must be an object with a '{field}' field") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DusError(f"{path}:{number}: no string '{field}' field; each line must look like {{\"{field}\": \"...\"}}")
        values.append(record[field])
    return values


def check_max_tokens(max_tokens: int | None) -> None:
    """`--max-tokens` of compare, scan and search: None (all) or at least 2 tokens."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise DusError(f"--max-tokens {max_tokens}: give at least 2 (a token and the next one to predict)")


def tokenize_stream(tokenizer, text: str, max_tokens: int | None = None):
    """Token ids of the whole stream (1-D LongTensor), cut to `max_tokens` if given.

    The tokenizer's own special-token handling is kept (a BOS where it adds one), so
    every model sharing the tokenizer sees exactly the same ids."""
    import torch

    check_max_tokens(max_tokens)
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DusError("the held-out text has fewer than 2 tokens; nothing to score, give a longer text")
    return torch.tensor(ids, dtype=torch.long)
