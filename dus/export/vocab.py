"""A Hugging Face tokenizer as llama.cpp's GGUF vocabulary.

Two kinds: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: llama.cpp's `gpt2` model) and
SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma: llama.cpp's
`llama` model, which merges the adjacent pair whose result has the highest score and
spells unknown characters as <0xNN> byte tokens).

llama.cpp re-implements tokenizers: it needs the vocabulary, the merges, the token kinds,
the special ids and, for byte-level BPE, the name of the pre-tokenizer (the regex that
splits text before merging), which it knows by name only. The name is read from the
tokenizer's own definition (`tokenizer.json`), never guessed: a pre-tokenizer llama.cpp
has no name for is refused, since a GGUF that tokenizes differently computes another model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from dus.checkpoint import read_json

from dus.errors import DusError

# The split regexes of tokenizer families llama.cpp knows, by the name it knows them by.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
KNOWN = "GPT-2 byte-level, SmolLM (digits + byte-level), Llama 3 and Qwen2 splits, or byte-level with no merges"

# HF's `{% generation %}` marks assistant tokens for training masks; no runtime knows it.
GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class Writer(gguf.GGUFWriter):
    """gguf's writer, also writing an empty typed array: the GGUF format allows one and
    llama.cpp requires the merges key even for a vocabulary of single bytes, which has none."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            prefix = self._pack("I", vtype) if add_vtype else b""
            return prefix + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass
class Vocabulary:
    model: str  # "gpt2": byte-level BPE; "llama": SentencePiece-style BPE with byte fallback
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None  # "llama" only: merge priority, higher first
    add_space_prefix: bool | None = None  # "llama" only: a "▁" before text (and after special tokens)
    warnings: list[str] = field(default_factory=list)  # where llama.cpp will tokenize differently

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.model == "gpt2":
            writer.add_key_value(gguf.Keys.Tokenizer.MERGES, self.merges, gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer_name(definition: dict, has_merges: bool, where: str) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or a DusError."""
    pre = definition.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        if steps[0].get("use_regex", True):
            return "gpt-2"
        if not has_merges:
            return "default"  # no merges: every byte is a token however the text is split
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_REGEXES:
            return SPLIT_REGEXES[pattern]
    raise DusError(f"{where}: its pre-tokenizer ({' + '.join(str(k) for k in kinds) or 'none'}) is not one llama.cpp "
                   f"knows by name, so llama.cpp would split text differently; dus export writes {KNOWN}")


def read_vocabulary(model_dir: Path, vocab_size: int) -> Vocabulary:
    from transformers import AutoTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise DusError(f"{model_dir}: no tokenizer.json; dus export writes fast (tokenizer.json) byte-level BPE "
                       "tokenizers: re-save the tokenizer with transformers")
    definition = read_json(path, "the tokenizer definition", "re-save the tokenizer with transformers")
    if not isinstance(definition, dict) or not isinstance(definition.get("model") or {}, dict):
        raise DusError(f"{path}: not a tokenizer definition (a JSON object with a `model`); re-save the tokenizer "
                       "with transformers")
    model = definition.get("model") or {}
    if model.get("type") != "BPE":
        raise DusError(f"{path}: a {model.get('type')} tokenizer; dus export writes BPE tokenizers: byte-level (GPT-2, "
                       "Llama 3, Qwen, SmolLM style) and SentencePiece-style with byte fallback (Llama 2, Mistral, Gemma)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    sentencepiece = bool(model.get("byte_fallback"))
    pre = "default" if sentencepiece else pre_tokenizer_name(definition, bool(merges), str(path))

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - the tokenizers library refuses a damaged file in many ways
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DusError(f"{path}: the tokenizer does not load ({first}); re-save the tokenizer with transformers") from None
    try:
        by_id = {int(token_id): str(token) for token, token_id in model["vocab"].items()}
        added = {int(entry["id"]): entry for entry in definition.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DusError(f"{path}: its vocab or added_tokens are damaged; re-save the tokenizer with transformers") from None
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id in added:
            entry = added[token_id]
            tokens.append(entry["content"])
            types.append(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
        elif token_id in by_id:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    if len(set(tokens)) != len(tokens):
        raise DusError(f"{path}: two token ids share one string; the tokenizer is damaged")
    scores = space_prefix = warning = None
    if sentencepiece:
        from dus.export.sentencepiece import byte_fallback_vocabulary

        types, scores, space_prefix, warning = byte_fallback_vocabulary(tokenizer, definition, tokens, types, merges,
                                                                        str(path))

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            special_ids[kind] = int(token_id)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = len(probe) > len(bare) and probe[0] == special_ids.get("bos")
    add_eos = len(probe) > len(bare) and probe[-1] == special_ids.get("eos")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template:
        template = GENERATION_TAGS.sub("", template)
    return Vocabulary("llama" if sentencepiece else "gpt2", pre, tokens, types, merges, special_ids, add_bos, add_eos,
                      template, scores, space_prefix, [warning] if warning else [])
