"""Perplexities are comparable only over the same token ids: the check that two models
tokenize alike before their perplexities are set side by side."""

from __future__ import annotations

from dus.errors import DusError
from dus.tokenizer_check import first_vocab_difference


def check_same_tokenizer(tokenizers: dict[str, object]) -> None:
    """Perplexities are comparable only over the same token ids: refuse when any
    tokenizer's vocabulary (the id-by-id comparison build and heal use) or special tokens
    differ from the first one's."""
    names = list(tokenizers)
    reference_name = names[0]
    reference = tokenizers[reference_name]
    ref_vocab = reference.get_vocab()
    ref_special = _special_tokens(reference)
    for name in names[1:]:
        other = tokenizers[name]
        vocab = other.get_vocab()
        difference = first_vocab_difference(ref_vocab, vocab)
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

