"""A local Hugging Face model directory as a source of layers.

Only headers are read up front: tensor names, dtypes, shapes and byte offsets. Weights
stay on disk until the writer copies them. Pickled `.bin` weights are refused, never
unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from dus.architectures import Adapter, adapter_for
from dus.checkpoint import INDEX_NAME, SINGLE_NAME, layer_count, read_json
from dus.errors import DusError
from dus.safetensors_io import TensorInfo, read_header

# Config fields whose disagreement makes two models' layers incompatible.
SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "num_local_experts", "moe_intermediate_size",
)


@dataclass
class SourceModel:
    name: str  # as written in the recipe
    path: Path
    config: dict
    adapter: Adapter
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    metadata: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def num_layers(self) -> int:
        return layer_count(self.config, self.path / "config.json")

    @cached_property
    def layers(self) -> dict[int, dict[str, TensorInfo]]:
        """layer index -> {name inside the layer: tensor}."""
        pattern = self.adapter.layer_pattern()
        layers: dict[int, dict[str, TensorInfo]] = {}
        for name, info in self.tensors.items():
            match = pattern.match(name)
            if match:
                layers.setdefault(int(match.group(1)), {})[match.group(2)] = info
        return layers

    @cached_property
    def non_layer(self) -> dict[str, TensorInfo]:
        pattern = self.adapter.layer_pattern()
        return {name: info for name, info in self.tensors.items() if not pattern.match(name)}

    def layer(self, index: int) -> dict[str, TensorInfo]:
        return self.layers[index]


def load_source(name: str, path_text: str, base_dir: Path | None = None) -> SourceModel:
    """Open a model directory, with a one-line DusError for each way it can be unusable."""
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        candidate = base_dir / path
        if candidate.exists():
            path = candidate
    if not path.exists():
        raise DusError(
            f"model {name!r}: {path} does not exist; give a local Hugging Face model directory "
            "(download it first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`, or `dus import FILE.gguf`)"
        )
    if not path.is_dir():
        if path.suffix == ".gguf":
            raise DusError(f"model {name!r}: {path} is a GGUF file; convert it first with `dus import {path} -o DIR`")
        from dus.errors import file_not_model_directory

        raise DusError(f"model {name!r}: {file_not_model_directory(path)}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise DusError(f"model {name!r}: {path} has no config.json; is it a Hugging Face model directory?")
    config = read_json(config_path, f"the config of model {name!r}", "re-download the model or re-save it with save_pretrained")
    if not isinstance(config, dict):
        raise DusError(f"{config_path}: the config of model {name!r} is not a JSON object; re-download or re-save the model")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise DusError(
            f"model {name!r}: weights are quantized ({method}); dus builds from unquantized "
            "float weights: use the original float16/bfloat16 checkpoint"
        )
    adapter = adapter_for(config, f"model {name!r} ({path})")
    files = _weight_files(name, path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict = {}
    for file in files:
        try:
            file_tensors, metadata = read_header(file)
        except (ValueError, OSError) as error:
            raise DusError(f"model {name!r}: cannot read {file} ({error}); re-download or re-save it") from None
        twice = sorted(set(file_tensors) & set(tensors))
        if twice:
            raise DusError(f"model {name!r}: tensor {twice[0]!r} is stored in two shards ({tensors[twice[0]].file.name} and "
                           f"{file.name}); re-download or re-save the model")
        tensors.update(file_tensors)
    _check_index(name, path, tensors)
    source = SourceModel(name, path, config, adapter, tensors, files, metadata)
    _check_layers_present(source)
    _check_tensor_sets(source)
    _check_shapes(source)
    return source


def _check_index(name: str, path: Path, tensors: dict[str, TensorInfo]) -> None:
    """The shard index must list every tensor of every shard, each in the shard that holds it."""
    index = path / INDEX_NAME
    if not index.is_file():
        return
    weight_map = read_json(index, "the shard index", "re-download the model")["weight_map"]
    for tensor, info in sorted(tensors.items()):
        listed = weight_map.get(tensor)
        if listed != info.file.name:
            where = "does not list it" if listed is None else f"puts it in {listed}"
            raise DusError(f"model {name!r}: {info.file.name} holds {tensor!r} but {INDEX_NAME} {where}; "
                           "the index and the shards disagree: re-download the model")
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise DusError(f"model {name!r}: {INDEX_NAME} lists {absent[0]!r} in {weight_map[absent[0]]}, which does not hold it; "
                       "re-download the model")


def _check_tensor_sets(source: SourceModel) -> None:
    """Every layer must hold the same tensor names (a layer missing a projection would be
    filled with random weights by transformers, with only a warning), and the non-layer
    set needs the embeddings, the final norm and a head (or tied embeddings)."""
    layers = source.layers
    counts: dict[frozenset, int] = {}
    for names in layers.values():
        counts[frozenset(names)] = counts.get(frozenset(names), 0) + 1
    complete = max(counts, key=lambda names: (counts[names], len(names)))
    for index, names in sorted(layers.items()):
        missing = sorted(complete - set(names))
        extra = sorted(set(names) - complete)
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has an extra tensor {extra[0]!r}"
            raise DusError(f"model {source.name!r}: layer {index} {what}, unlike its other layers; "
                           "the checkpoint is incomplete or damaged: re-download or re-save it")
    for rest in sorted(complete):
        shapes: dict[tuple, int] = {}
        for names in layers.values():
            shapes[names[rest].shape] = shapes.get(names[rest].shape, 0) + 1
        usual = max(shapes, key=shapes.get)
        for index, names in sorted(layers.items()):
            if names[rest].shape != usual:
                raise DusError(f"model {source.name!r}: layer {index}'s {rest} has shape {list(names[rest].shape)} where the "
                               f"other layers have {list(usual)}; the checkpoint is damaged: re-download or re-save it")
    non_layer = list(source.non_layer)
    tied = bool(source.config.get("tie_word_embeddings", source.config.get("text_config", {}).get("tie_word_embeddings", False)))
    needs = {
        "the token embeddings (…embed_tokens.weight)": lambda n: n.endswith("embed_tokens.weight"),
        "the final norm (…norm.weight)": lambda n: n.endswith("norm.weight"),
    }
    if not tied:
        needs["the output head (lm_head.weight; the config does not tie it to the embeddings)"] = lambda n: n.startswith("lm_head.")
    for what, present in needs.items():
        if not any(present(n) for n in non_layer):
            raise DusError(f"model {source.name!r}: its weights lack {what}; the checkpoint is incomplete: re-download or re-save it")


# What the config says each tensor's shape is, by the tensor's name (the first pattern that
# matches, `re.search` on the full name; a bias has the weight's first dimension): one table
# for every family dus knows (fused Phi-3 projections, Mixtral's experts and router, q/k
# norms). Symbols are read from the config by `_ConfigSizes`. A tensor no pattern matches
# (a rotary table saved by an old transformers, say) is not checked.
SHAPE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(^|\.)embed_tokens\.weight$", ("vocab", "hidden")),
    (r"^lm_head\.weight$", ("vocab", "hidden")),
    (r"(^|\.)[qk]_norm\.(weight|bias)$", ("head",)),
    (r"(^|\.)\w*norm\.(weight|bias)$", ("hidden",)),
    (r"(^|\.)q_proj\.(weight|bias)$", ("q", "hidden")),
    (r"(^|\.)[kv]_proj\.(weight|bias)$", ("kv", "hidden")),
    (r"(^|\.)qkv_proj\.(weight|bias)$", ("qkv", "hidden")),
    (r"(^|\.)o_proj\.(weight|bias)$", ("hidden", "q")),
    (r"(^|\.)(gate_proj|up_proj|w1|w3)\.(weight|bias)$", ("intermediate", "hidden")),
    (r"(^|\.)gate_up_proj\.(weight|bias)$", ("2intermediate", "hidden")),
    (r"(^|\.)(down_proj|w2)\.(weight|bias)$", ("hidden", "intermediate")),
    (r"(^|\.)block_sparse_moe\.gate\.weight$", ("experts", "hidden")),
)


class _ConfigSizes:
    """The sizes a config implies, each with the words that say where it comes from
    ("num_key_value_heads 2 x head_dim 8"); a field that is absent or not a whole number
    of at least 1 is one line when a tensor needs it."""

    def __init__(self, source: SourceModel):
        self.source = source
        self.config = source.config

    def field(self, key: str) -> int:
        value = self.config.get(key)
        if key == "num_key_value_heads" and value is None:
            return self.field("num_attention_heads")  # transformers' default: one key/value head per head
        if value is None:
            raise DusError(f"{self.source.path / 'config.json'}: no {key}, which the weights need (model "
                           f"{self.source.name!r}); add it to config.json or re-download the model")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DusError(f"{self.source.path / 'config.json'}: {key} is {json.dumps(value)}; it must be a whole "
                           "number of at least 1: fix config.json or re-download the model")
        return value

    def head(self) -> tuple[int, str]:
        if self.config.get("head_dim") is not None:
            head = self.field("head_dim")
            return head, f"head_dim {head}"
        hidden, heads = self.field("hidden_size"), self.field("num_attention_heads")
        return hidden // heads, f"head_dim {hidden // heads} (hidden_size {hidden} / num_attention_heads {heads})"

    def size(self, symbol: str) -> tuple[int, str]:
        """(the size, how the config gives it)."""
        single = {"vocab": "vocab_size", "hidden": "hidden_size", "intermediate": "intermediate_size",
                  "experts": "num_local_experts"}
        if symbol in single:
            value = self.field(single[symbol])
            return value, f"{single[symbol]} {value}"
        if symbol == "2intermediate":
            value = self.field("intermediate_size")
            return 2 * value, f"2 x intermediate_size {value}"
        if symbol == "head":
            return self.head()
        head, head_words = self.head()
        heads, kv_heads = self.field("num_attention_heads"), self.field("num_key_value_heads")
        if symbol == "q":
            return heads * head, f"num_attention_heads {heads} x {head_words}"
        if symbol == "kv":
            return kv_heads * head, f"num_key_value_heads {kv_heads} x {head_words}"
        if symbol == "qkv":
            return ((heads + 2 * kv_heads) * head,
                    f"(num_attention_heads {heads} + 2 x num_key_value_heads {kv_heads}) x {head_words}")
        raise KeyError(symbol)


def _check_shapes(source: SourceModel) -> None:
    """Every tensor's shape is the one the config implies (SHAPE_RULES), checked from the
    headers: a config that contradicts the weights (hidden_size, intermediate_size, heads,
    key/value heads, head_dim, vocab_size, experts) builds, heals and exports a model
    transformers cannot load, or ends in a traceback. The embeddings come first, so a
    wrong hidden_size or vocab_size is named as such."""
    import re

    rules = [(re.compile(pattern), symbols) for pattern, symbols in SHAPE_RULES]
    checks = []
    for name, info in source.tensors.items():
        for order, (pattern, symbols) in enumerate(rules):
            if pattern.search(name):
                layer = source.adapter.layer_pattern().match(name)
                checks.append((order, int(layer.group(1)) if layer else -1, name, info, symbols))
                break
    sizes = _ConfigSizes(source)
    for _, _, name, info, symbols in sorted(checks, key=lambda check: check[:3]):
        if name.endswith(".bias"):
            symbols = symbols[:1]
        if len(info.shape) != len(symbols):
            raise DusError(f"model {source.name!r}: {name} has shape {list(info.shape)} where a tensor of this name has "
                           f"{len(symbols)} dimension{'s' if len(symbols) > 1 else ''}; the checkpoint is damaged or of "
                           "another architecture than its config.json says: re-download or re-save it")
        for dimension, (symbol, actual) in enumerate(zip(symbols, info.shape)):
            expected, words = sizes.size(symbol)
            if actual != expected:
                said = words if words.endswith(f" {expected}") and " x " not in words else f"{words} = {expected}"
                raise DusError(f"model {source.name!r}: config.json says {said}, but {name} has shape "
                               f"{list(info.shape)} (dimension {dimension} is {actual}); the config contradicts the "
                               f"weights: fix {source.path / 'config.json'} to match them, or re-download the model")


def _weight_files(name: str, path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        index_data = read_json(index, "the shard index", "re-download the model or re-save it with save_pretrained")
        weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
        if not isinstance(weight_map, dict):
            raise DusError(f"{index}: the shard index has no weight_map; re-download the model or re-save it with save_pretrained")
        files = sorted({path / file for file in weight_map.values()})
        missing = [str(file.name) for file in files if not file.is_file()]
        if missing:
            raise DusError(
                f"model {name!r}: {INDEX_NAME} lists {', '.join(missing[:3])} but the file is missing; "
                "re-download the model completely"
            )
        return files
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickled:
        raise DusError(
            f"model {name!r}: {path} has only pickled weights ({pickled[0]}), which dus never unpickles; "
            "convert them once, if you trust the file: `python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\"`"
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise DusError(f"model {name!r}: {path} holds a GGUF file; convert it with `dus import {ggufs[0]} -o DIR`")
    raise DusError(f"model {name!r}: no *.safetensors weights in {path}")


def _check_layers_present(source: SourceModel) -> None:
    found = sorted(source.layers)
    expected = list(range(source.num_layers))
    if found != expected:
        raise DusError(
            f"model {source.name!r}: config.json says {source.num_layers} layers but the weights hold "
            f"layers {_ranges(found)} under {source.adapter.layer_prefix}; the checkpoint is incomplete or mislabelled"
        )


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    return f"{indices[0]}..{indices[-1]} ({len(indices)} layers)"


def check_compatible(models: list[SourceModel]) -> None:
    """All models of a build must share architecture and tensor shapes layer for layer."""
    first = models[0]
    for other in models[1:]:
        if other.model_type != first.model_type:
            raise DusError(
                f"models {first.name!r} ({first.model_type}) and {other.name!r} ({other.model_type}) "
                "are different architectures; all sources of a build must be one family"
            )
        for key in SHAPE_FIELDS:
            a, b = first.config.get(key), other.config.get(key)
            if a != b:
                raise DusError(
                    f"models {first.name!r} and {other.name!r} disagree on {key} ({a} vs {b}); "
                    "their layers cannot be stacked: use fine-tunes of the same base model"
                )
        names_a, names_b = set(first.layer(0)), set(other.layer(0))
        if names_a != names_b:
            diff = sorted(names_a ^ names_b)[0]
            raise DusError(
                f"models {first.name!r} and {other.name!r} name their layer tensors differently ({diff!r}); "
                "use fine-tunes of the same base model"
            )
        for rest, info in first.layer(0).items():
            if other.layer(0)[rest].shape != info.shape:
                raise DusError(
                    f"models {first.name!r} and {other.name!r} disagree on the shape of layer tensor {rest} "
                    f"({list(info.shape)} vs {list(other.layer(0)[rest].shape)})"
                )


def read_license(path: Path) -> str:
    """The license a model directory declares: model-card front matter, else a LICENSE file."""
    from dus.cards import front_matter

    license_id = front_matter(path / "README.md").get("license")
    if license_id:
        return str(license_id)
    for candidate in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (path / candidate).is_file():
            first_line = (path / candidate).read_text(errors="replace").strip().splitlines()[:1]
            return f"see {candidate}" + (f" ({first_line[0][:60]})" if first_line else "")
    return "unknown"
