"""Making the data and the chat template agree on which tokens carry the loss.

TRL trains on assistant tokens only when the chat template marks them with
`{% generation %}`; it patches the templates it knows and refuses the rest. dus keeps
every model trainable: a fallback template when there is none, and, for a template
nobody can mark, conversations split into prompt + last assistant turn, which TRL masks
by tokenizing the prompt alone.
"""

from __future__ import annotations

from dus.heal.data import LoadedData, split_last_turn

# Used only when the tokenizer has no chat template: plain-text role headers (no new
# tokens needed), the assistant turn inside {% generation %} so that assistant-only loss
# works, and the tokenizer's EOS closing each answer so that the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{% else %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


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
            "the chat template has no {% generation %} markers and TRL has no patched version of it: each "
            "conversation is split into prompt + last assistant turn, and the loss falls on that turn"
        )
        return split_last_turn(dataset), False
