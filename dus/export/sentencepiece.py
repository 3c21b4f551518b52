"""SentencePiece-style BPE (byte fallback, "▁" word marks) as llama.cpp's `llama` vocabulary.

llama.cpp tokenizes these models its own way: it starts from characters, repeatedly merges
the adjacent pair whose concatenation is the vocabulary entry with the highest *score*,
and spells what is left unknown as <0xNN> byte tokens. A tokenizer.json (converted from
SentencePiece by transformers) keeps merges, not scores, so the score of a token is its
merge priority: -(rank of the first merge that makes it). Whether a "▁" goes before the
text is asked of the tokenizer itself. llama.cpp also puts one after every special token;
transformers 5 loads Llama-2-style tokenizers with a "▁" at the start only, so for those
the export warns that text following a special token inside a prompt tokenizes differently
(llama.cpp's own converter writes the same vocabulary, with the same difference).
"""

from __future__ import annotations

import re

import gguf

from dus.errors import DusError

BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
SPACE = "\u2581"


def byte_fallback_vocabulary(tokenizer, definition: dict, tokens: list[str], types: list[int], merges: list[str],
                             where: str) -> tuple[list[int], list[float], bool, str | None]:
    """Token types (bytes and the unknown token marked), scores, add_space_prefix and a
    warning where llama.cpp will tokenize some text differently."""
    types = list(types)
    present = set()
    for token_id, token in enumerate(tokens):
        if types[token_id] == gguf.TokenType.NORMAL and BYTE_TOKEN.match(token):
            types[token_id] = gguf.TokenType.BYTE
            present.add(token)
    if len(present) != 256:
        raise DusError(f"{where}: byte fallback with {len(present)} of the 256 <0xNN> byte tokens; llama.cpp needs all "
                       "256 to spell unknown characters, so dus export cannot write this tokenizer")
    unk = (definition.get("model") or {}).get("unk_token")
    if unk in tokens:
        types[tokens.index(unk)] = gguf.TokenType.UNKNOWN

    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, index)
    unreachable = -float(len(merges) + 1)  # in the vocabulary, made by no merge: merged last
    scores = []
    for token_id, token in enumerate(tokens):
        if types[token_id] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED):
            scores.append(-1000.0)  # as llama.cpp's converter scores added tokens
        elif token in rank:
            scores.append(-float(rank[token]))
        else:
            scores.append(0.0 if len(token) == 1 or types[token_id] == gguf.TokenType.BYTE else unreachable)
    return (types, scores, *_space_prefix(tokenizer, tokens, types))


def _space_prefix(tokenizer, tokens: list[str], types: list[int]) -> tuple[bool, str | None]:
    """Whether transformers puts "▁" before text, and a warning where it does so at the start
    but not after a special token: llama.cpp does both or neither (its own converter writes
    such tokenizers the same way, with the same difference)."""
    backend = tokenizer.backend_tokenizer

    def first_piece(text: str, skip: int = 0) -> str:
        pieces = backend.encode(text, add_special_tokens=False).tokens
        return pieces[skip] if len(pieces) > skip else ""

    at_start = first_piece("a").startswith(SPACE)
    specials = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    if specials and first_piece(specials[0] + "a", skip=1).startswith(SPACE) != at_start:
        where = "only at the start of the text" if at_start else "only after special tokens"
        return at_start, (f"transformers puts a '{SPACE}' before text {where}, llama.cpp at the start and after every "
                          "special token: text that follows a special token inside a prompt (e.g. '<|im_start|>user') "
                          f"tokenizes with an extra '{SPACE}' in llama.cpp")
    return at_start, None
