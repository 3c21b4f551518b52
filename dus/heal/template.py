"""Making the data and the chat template agree on which tokens carry the loss.

TRL trains on assistant tokens only when the chat template marks them with
`{% generation %}`; it patches the templates it knows and refuses the rest. dus keeps
every model trainable: a fallback template when there is none, and, for a template
nobody marked (SmolLM2's, for one), the assistant tokens are found by rendering: the
conversation up to an assistant turn with the generation prompt is a prefix of the
conversation including that turn, and the text between the two is the turn. The
conversations are then handed to TRL already tokenized, with labels.
"""

from __future__ import annotations

from pathlib import Path

from dus.errors import DusError
from dus.heal.data import LoadedData

# Used only when the tokenizer has no chat template: plain-text role headers (no new
# tokens needed), the assistant turn inside {% generation %} so that assistant-only loss
# works, and the tokenizer's EOS closing each answer so that the model learns to stop.
# Kept as a Jinja file (dus/templates/fallback_chat.jinja, package data), read as it is.
FALLBACK_CHAT_TEMPLATE = (Path(__file__).resolve().parents[1] / "templates" / "fallback_chat.jinja").read_text(encoding="utf-8")


def fit_data_to_template(data: LoadedData, tokenizer, assistant_only_loss: bool, notes: list[str]):
    """Make the data and the chat template agree; returns (dataset, assistant_only_loss)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    dataset = data.dataset
    conversational = data.shape == "messages" or (
        data.shape == "prompt-completion" and isinstance(dataset[0]["prompt"], list)
    )
    if conversational and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        notes.append("the tokenizer has no chat template: using dus's fallback (### User / ### Assistant headers)")
    if data.shape != "messages":
        if assistant_only_loss:
            kind = "completion tokens" if data.shape == "prompt-completion" else "every token"
            notes.append(f"{data.shape} data: the loss falls on {kind} (assistant_only_loss applies to chats)")
        return dataset, False
    if not assistant_only_loss or has_generation_markers(tokenizer.chat_template):
        return dataset, assistant_only_loss
    try:
        get_training_chat_template(tokenizer)
        return dataset, True  # TRL swaps in its patched version of this known template
    except ValueError:
        notes.append(
            "the chat template has no {% generation %} markers and TRL has no patched version of it: dus "
            "finds the assistant turns by rendering each conversation turn by turn and labels those tokens"
        )
        return label_assistant_turns(dataset, tokenizer), False


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    def render(part, prompt=False):
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:index], prompt=True), render(messages[: index + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DusError(
                "the chat template renders a conversation differently from its beginning (not prefix-preserving), "
                "so assistant tokens cannot be found; set sft.assistant_only_loss: false, or give the tokenizer a "
                "template with {% generation %} markers"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def label_assistant_turns(dataset, tokenizer):
    """Conversations -> `input_ids` + `labels` (-100 outside assistant turns), for TRL."""
    if not getattr(tokenizer, "is_fast", False):
        raise DusError(
            "finding assistant tokens needs a fast tokenizer (character offsets); set sft.assistant_only_loss: "
            "false, or give the tokenizer a chat template with {% generation %} markers"
        )

    def encode(row):
        text, spans = assistant_spans(tokenizer, row["messages"])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            token if any(begin <= start < end for begin, end in spans) else -100
            for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
        ]
        return {"input_ids": encoded["input_ids"], "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names)


def first_loss_token(row: dict, tokenizer, assistant_only: bool) -> int | None:
    """Where the first token that carries loss sits in one training example as TRL
    tokenizes it (None: no token does): the first assistant token of a chat under
    assistant-only loss, the first completion token of prompt-completion data, else 0."""
    if "labels" in row:  # labelled here (label_assistant_turns)
        return next((i for i, label in enumerate(row["labels"]) if label != -100), None)
    if "messages" in row:
        if not assistant_only:
            return 0
        messages = row["messages"]
        index = next((i for i, message in enumerate(messages) if message["role"] == "assistant"), None)
        if index is None:
            return None
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(before, add_special_tokens=False)["input_ids"])
    if "prompt" in row and "completion" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return len(tokenizer(prompt)["input_ids"])
    return 0


def check_some_example_fits(dataset, tokenizer, assistant_only: bool, max_length: int | None, packing: bool,
                            truncation_mode: str = "keep_start", what: str = "data",
                            packing_strategy: str = "bfd") -> None:
    """TRL cuts every example to max_length tokens (keeping the start) and drops those
    left without a token to learn from; when that is every example, refuse now, before
    any output exists, instead of failing inside the trainer with an empty data set (or,
    packed best-fit, training on batches without a label). Wrapped packing and bfd_split
    cut nothing away: every token lands in some packed sequence."""
    cuts = (not packing and truncation_mode == "keep_start") or (packing and packing_strategy == "bfd")
    if max_length is None or not cuts:
        return
    shortest = None
    for row in dataset:
        start = first_loss_token(row, tokenizer, assistant_only)
        if start is None:
            continue
        if start < max_length:
            return
        shortest = start if shortest is None else min(shortest, start)
    if shortest is None:
        return  # nothing carries loss at all: refused elsewhere, or TRL's own message
    raise DusError(f"{what}: no example has a token to learn from within --max-length {max_length} (the loss "
                   f"starts at token {shortest} at the earliest; TRL cuts the rest and drops them all); raise "
                   f"--max-length above {shortest} or give shorter prompts")
