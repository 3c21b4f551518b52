"""A tiny SentencePiece-style tokenizer (Llama 2 / Mistral v0.1 / Gemma layout) for the
export tests: BPE with byte fallback, "▁" word marks, <0x00>..<0xFF> byte tokens, merges
in SentencePiece order (every split of every piece, by the piece's rank, as transformers'
converter writes them), trained deterministically on a fixed text. `style="llama"` puts
"▁" before text and after special tokens (Llama 2's normalizer), `style="gemma"` nowhere,
`style="first"` only at the start (a Metaspace pre-tokenizer; llama.cpp cannot do that).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is left when twelve dogs and three cats "
    "go home? The model answers questions about animals, numbers and words. Depth up-scaling "
    "copies layers of a model and heals the seam with a little training on plain text. "
) * 4
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT = ["<|im_start|>", "<|im_end|>"]
SPACE = "\u2581"


def _normalizer(style: str):
    from tokenizers import normalizers

    replace = normalizers.Replace(" ", SPACE)
    return normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if style == "llama" else replace


def _trained_pieces(style: str, size: int) -> list[str]:
    from tokenizers import Tokenizer, models, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = _normalizer(style)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[], show_progress=False, min_frequency=2)
    backend.train_from_iterator([CORPUS], trainer=trainer)
    vocab = backend.get_vocab()
    return sorted(vocab, key=vocab.get)


def tiny_sentencepiece_tokenizer(style: str = "llama", size: int = 160):
    """A PreTrainedTokenizerFast with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    from dus.tiny import CHAT_TEMPLATE

    pieces = [p for p in _trained_pieces("llama" if style == "first" else style, size) if p not in SPECIALS]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        if piece in SPECIALS or piece.startswith("<0x"):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "first":
        from tokenizers import pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    else:
        backend.normalizer = _normalizer(style)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if style != "gemma" else []))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    backend.add_special_tokens(SPECIALS + CHAT)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<unk>", pad_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_sentencepiece_model(path: Path, arch: str = "llama", style: str = "llama", **overrides) -> Path:
    """A tiny random model of `arch` whose tokenizer is `tiny_sentencepiece_tokenizer(style)`."""
    from dus.tiny import make_tiny_model

    tokenizer = tiny_sentencepiece_tokenizer(style)
    ids = tokenizer.convert_tokens_to_ids
    path = make_tiny_model(path, arch, vocab_size=len(tokenizer), bos_token_id=ids("<s>"),
                           eos_token_id=ids("<|im_end|>"), pad_token_id=ids("</s>"), **overrides)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(path)
    return path
