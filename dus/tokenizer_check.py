"""Do two model directories tokenize alike? Answered from files, without loading them.

Layers from models with different vocabularies see token ids they were not trained on;
a graft or interleave across such models is allowed but warned about, naming the first
difference so the user can judge it.
"""

from __future__ import annotations

from pathlib import Path

from dus.checkpoint import read_json
from dus.errors import DusError


def _vocab(path: Path) -> dict[str, int] | None:
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        data = read_json(tokenizer_file, "the tokenizer", "re-save the tokenizer or re-download the model")
        vocab = data.get("model", {}).get("vocab")
        if isinstance(vocab, list):  # unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        vocab = dict(vocab or {})
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        return vocab
    vocab_file = path / "vocab.json"
    if vocab_file.is_file():
        return read_json(vocab_file, "the vocabulary", "re-save the tokenizer or re-download the model")
    return None


def _file_digest(path: Path) -> str | None:
    import hashlib

    for name in ("tokenizer.model", "tokenizer.json", "vocab.json"):
        if (path / name).is_file():
            return hashlib.sha256((path / name).read_bytes()).hexdigest()
    return None


def first_tokenizer_difference(a: Path, b: Path) -> str | None:
    """None when the tokenizers agree, else a short description of the first difference."""
    size_a = read_json(a / "config.json", "the model config", "re-download the model").get("vocab_size")
    size_b = read_json(b / "config.json", "the model config", "re-download the model").get("vocab_size")
    if size_a != size_b:
        return f"vocab_size {size_a} vs {size_b}"
    vocab_a, vocab_b = _vocab(a), _vocab(b)
    if vocab_a is None or vocab_b is None:
        if (vocab_a is None) != (vocab_b is None):
            return "only one of them has a tokenizer.json or vocab.json"
        digest_a, digest_b = _file_digest(a), _file_digest(b)
        return None if digest_a == digest_b else "tokenizer files differ"
    return first_vocab_difference(vocab_a, vocab_b)


def first_vocab_difference(vocab_a: dict[str, int], vocab_b: dict[str, int]) -> str | None:
    """The one id-by-id vocabulary comparison (build's warning across sources, heal's
    teacher check, compare's perplexity check): None when every token id names the same
    token in both, else the first id that does not."""
    if vocab_a == vocab_b:
        return None
    by_id_a = {i: token for token, i in vocab_a.items()}
    by_id_b = {i: token for token, i in vocab_b.items()}
    for token_id in sorted(set(by_id_a) | set(by_id_b)):
        if by_id_a.get(token_id) != by_id_b.get(token_id):
            return f"token id {token_id} is {by_id_a.get(token_id)!r} vs {by_id_b.get(token_id)!r}"
    return None


JSON_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "chat_template.json", "generation_config.json",
)


def check_tokenizer_file(path: Path) -> dict:
    """One tokenizer file, parsed: a JSON object, else one line naming it."""
    data = read_json(path, f"the tokenizer file {path.name}", "re-save the tokenizer or re-download the model")
    if not isinstance(data, dict):
        raise DusError(f"{path}: the tokenizer file {path.name} is not a JSON object; re-save the tokenizer or "
                       "re-download the model")
    return data


def check_tokenizer_files(directory: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """The tokenizer files a build copies from `directory`, checked before anything is
    written: each JSON one must parse as a JSON object (else one line naming the file), and
    a tokenizer_config.json that maps the tokenizer to remote code (`auto_map`) gives a
    warning: the file is copied as it is, the code is neither run nor copied. `skip`: files
    the caller checks itself (build parses the large tokenizer.json while it copies)."""
    directory = Path(directory)
    warnings: list[str] = []
    for name in JSON_TOKENIZER_FILES:
        if name in skip or not (directory / name).is_file():
            continue
        data = check_tokenizer_file(directory / name)
        if name == "tokenizer_config.json" and data.get("auto_map"):
            auto_map = data["auto_map"]
            targets = sorted({str(v) for value in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                              for v in (value if isinstance(value, (list, tuple)) else [value]) if v})
            warnings.append(
                f"{directory / name}: names remote tokenizer code ({', '.join(targets) or auto_map}); dus copies the file but "
                "never runs that code, nor copies it: the output's tokenizer loads only if its tokenizer_class is "
                "one transformers has (check it, or save the tokenizer with a standard class)")
    return warnings
