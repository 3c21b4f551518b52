"""Tiny random-init models of every supported architecture, made locally.

No hub is reachable in tests or CI, so the tests, the benchmarks and the quick demo all
build their source models here: a real `save_pretrained` directory (config, safetensors,
a byte-level tokenizer with a chat template, generation config, a model card with a
license) that `dus build` treats exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from dus.architectures import ADAPTERS

# ChatML with `{% generation %}` markers, so TRL can mask everything but assistant turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
BYTE_VOCAB = 256
TINY_VOCAB = BYTE_VOCAB + len(SPECIAL_TOKENS)

ARCHITECTURES = tuple(ADAPTERS)  # the one family table (dus/architectures.py): a tiny model of each


def tiny_config(
    arch: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = TINY_VOCAB,
    tie_word_embeddings: bool | None = None,
    **overrides,
):
    """A small config of `arch` that exercises what makes the family special
    (sliding-window layer patterns, fused projections, experts, q/k norms, biases);
    `overrides` are config fields that replace the defaults."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=BYTE_VOCAB + 1,
        eos_token_id=BYTE_VOCAB + 2,
        pad_token_id=BYTE_VOCAB + 3,
    )
    head_dim = hidden_size // num_heads
    families = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, {"sliding_window": 8}),
        # Sliding window on the upper half: `layer_types` differs per layer.
        "qwen2": (tf.Qwen2Config, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": num_layers // 2}),
        "qwen3": (tf.Qwen3Config, {"head_dim": head_dim}),
        # query_pre_attn_scalar = head_dim, as in Gemma 2B/9B and Gemma 3 (llama.cpp assumes it).
        "gemma2": (tf.Gemma2Config, {"head_dim": head_dim, "sliding_window": 8, "query_pre_attn_scalar": head_dim}),
        # Pattern 3 so that a 4-6 layer model has both sliding and full layers.
        "gemma3_text": (tf.Gemma3TextConfig, {"head_dim": head_dim, "sliding_window": 8, "sliding_window_pattern": 3,
                                              "query_pre_attn_scalar": head_dim}),
        "phi3": (tf.Phi3Config, {}),
        "mixtral": (tf.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    }
    if arch not in families:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config_class, special = families[arch]
    config = config_class(**{**common, **special, **overrides})
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    return config


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials): no training, no download,
    identical on every machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    assert len(vocab) == BYTE_VOCAB
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = BYTE_VOCAB + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    num_layers: int = 4,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    license: str = "apache-2.0",
    **config_overrides,
) -> Path:
    """Save a random-init model of `arch` with tokenizer and model card into `path`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = tiny_config(arch, num_layers=num_layers, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    # Norm weights start at exactly 1 (or 0 for Gemma); jitter them so that a wrong
    # layer order or a mixed-up norm is visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    tiny_tokenizer().save_pretrained(path)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
    ).save_pretrained(path)
    (path / "README.md").write_text(
        f"---\nlicense: {license}\n---\n# tiny-{arch}\nRandom-init {arch} with {num_layers} layers, made by dus.tiny.\n"
    )
    return path
