"""Greedy generations on a fixed prompt file, so models can be read side by side.

Prompts go through the tokenizer's chat template (user turn + generation prompt).
A tokenizer without a chat template gets the raw prompt followed by a newline, and the
result records that, since a base model prompted that way is not comparable to a chat
model prompted properly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dus.measure.text import jsonl_strings
from dus.errors import DusError, read_user_text


@dataclass(frozen=True)
class Generation:
    prompt: str
    output: str
    new_tokens: int
    chat_template: bool  # False: the fallback (raw prompt + newline) was used


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from .jsonl (`{"prompt": ...}` per line) or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DusError(f"{path}: no such prompt file; pass --prompts a .jsonl with a 'prompt' field or a .txt with one prompt per line")
    if path.suffix.lower() == ".jsonl":
        prompts = jsonl_strings(path, "prompt")
    else:
        prompts = [line.strip() for line in read_user_text(path, "prompts (.jsonl or .txt)").splitlines() if line.strip()]
    if not prompts:
        raise DusError(f"{path}: no prompts in the file")
    return prompts


def encode_prompt(tokenizer, prompt: str):
    """(input_ids [1, n], used_chat_template)."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"], True
    return tokenizer(prompt + "\n", return_tensors="pt")["input_ids"], False


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, on_prompt=None) -> list[Generation]:
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = getattr(base, "pad_token_id", None) if base is not None else None
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids, templated = encode_prompt(tokenizer, prompt)
            ids = ids.to(device)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            new = output[0, ids.shape[1] :]
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            results.append(Generation(prompt, text, int(new.numel()), templated))
            if on_prompt is not None:
                on_prompt()
    return results


def generations_to_dicts(generations: list[Generation]) -> list[dict]:
    return [asdict(generation) for generation in generations]
