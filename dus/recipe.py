"""Recipes: what the user wrote, checked for shape before any model is opened.

A recipe is either mergekit's passthrough YAML, taken verbatim (`slices` of
`sources` with half-open `layer_range`, `merge_method: passthrough`, `dtype`,
`out_dtype`, `base_model`, `tokenizer_source`, `parameters: {scale: ...}` with
mergekit's filter/value semantics), or one short preset (`solar`, `duplicate`,
`interleave`, `graft`, `expand`) that expands into slices once the model depths are
known. dus adds two optional keys: `non_layer_from` (the model that gives embeddings,
final norm and lm_head) and `seam_smoothing` (blend across seams instead of cutting).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

from dus.errors import DusError
from dus.safetensors_io import DTYPE_ALIASES
from dus.yaml_located import load_located, load_located_file, plain, where

PRESETS = ("solar", "stack", "parents", "duplicate", "interleave", "graft", "expand")
TOP_LEVEL_KEYS = {
    "slices", "merge_method", "dtype", "out_dtype", "base_model", "tokenizer_source",
    "parameters", "name", "description", "non_layer_from", "seam_smoothing", *PRESETS,
}
PRESET_KEYS = {
    "solar": ({"model", "trim"}, {"model", "trim"}),
    "stack": ({"models", "trim"}, {"models", "trim"}),
    "parents": ({"models", "base", "method", "layers", "min_run", "blend", "trim", "block", "step"}, {"models", "base"}),
    "duplicate": ({"model", "layers", "times", "scale"}, {"model", "layers"}),
    "interleave": ({"models", "block", "step", "first", "last"}, {"models", "block"}),
    "graft": ({"base", "donor", "layers"}, {"base", "donor", "layers"}),
    "expand": ({"model", "every", "positions"}, {"model"}),
}
SMOOTHING_KEYS = {"method", "width", "factors"}
# Far beyond any real depth up-scaled model (the deepest public ones have a few hundred
# layers): a plan past this is a typo, refused before it exhausts memory.
MAX_OUTPUT_LAYERS = 4096
PARAMETER_NAMES = {"scale"}


@dataclass
class SliceSpec:
    """One passthrough slice: layers [start, end) of `model`."""

    model: str
    start: int
    end: int
    where: str
    source_parameters: dict = field(default_factory=dict)
    slice_parameters: dict = field(default_factory=dict)
    new_block: bool = False  # expand: zero the output projections (function-preserving)


@dataclass
class SeamSmoothing:
    method: str = "linear"
    width: int = 1
    factors: list[float] | None = None
    where: str = "<recipe>"


@dataclass
class Recipe:
    raw: dict  # as written, locations stripped (stored in the manifest)
    source_file: Path | None
    kind: str  # "slices" or a preset name
    slices: list[SliceSpec] = field(default_factory=list)
    preset: dict = field(default_factory=dict)
    preset_where: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    base_model: str | None = None
    tokenizer_source: str | None = None
    parameters: dict = field(default_factory=dict)
    non_layer_from: str | None = None
    seam_smoothing: SeamSmoothing | None = None
    name: str | None = None

    def model_names(self) -> list[str]:
        """Every model the recipe names, in first-mention order."""
        names: list[str] = []
        if self.kind == "slices":
            candidates = [s.model for s in self.slices]
        elif self.kind in ("interleave", "stack"):
            candidates = list(self.preset["models"])
        elif self.kind == "parents":
            candidates = [*self.preset["models"], self.preset["base"]]
        elif self.kind == "graft":
            candidates = [self.preset["base"], self.preset["donor"]]
        else:
            candidates = [self.preset["model"]]
        candidates += [m for m in (self.base_model, self.non_layer_from, self.tokenizer_source) if m]
        for name in candidates:
            if name not in names:
                names.append(name)
        return names


def load_recipe(source: str | Path | dict) -> Recipe:
    """Parse a recipe file (or an already-loaded dict) and check its structure."""
    if isinstance(source, dict):
        data, path = source, None
    else:
        path = Path(source)
        data = load_located_file(path)
    if not isinstance(data, dict):
        raise DusError(f"{where(data, 0) if data else path}: a recipe is a YAML mapping (keys like `slices:` or `solar:`)")
    return _parse(data, path)


def parse_recipe_text(text: str, name: str = "<recipe>") -> Recipe:
    data = load_located(text, name)
    if not isinstance(data, dict):
        raise DusError(f"{name}: a recipe is a YAML mapping (keys like `slices:` or `solar:`)")
    return _parse(data, None)


def _parse(data: dict, path: Path | None) -> Recipe:
    unknown = sorted(set(map(str, data)) - TOP_LEVEL_KEYS)
    if unknown:
        key = unknown[0]
        raise DusError(
            f"{where(data, key)}: unknown recipe key {key!r}; known keys: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    kinds = [key for key in ("slices", *PRESETS) if key in data]
    if len(kinds) != 1:
        found = f"found {', '.join(kinds)}" if kinds else "found none"
        raise DusError(
            f"{getattr(data, 'where', path)}: a recipe needs exactly one of `slices` or a preset "
            f"({', '.join(PRESETS)}); {found}"
        )
    kind = kinds[0]
    method = data.get("merge_method", "passthrough")
    if method != "passthrough":
        raise DusError(
            f"{where(data, 'merge_method')}: merge_method {method!r} is not a depth up-scaling method; "
            "dus builds with `passthrough` (use mergekit for weight-averaging merges)"
        )
    recipe = Recipe(raw=plain(data), source_file=path, kind=kind)
    recipe.dtype = _dtype(data, "dtype")
    recipe.out_dtype = _dtype(data, "out_dtype")
    recipe.name = _optional_str(data, "name")
    recipe.base_model = _optional_str(data, "base_model")
    recipe.non_layer_from = _optional_str(data, "non_layer_from")
    tokenizer_source = _optional_str(data, "tokenizer_source")
    if tokenizer_source == "union":
        raise DusError(
            f"{where(data, 'tokenizer_source')}: tokenizer_source 'union' merges vocabularies, which a depth "
            "up-scaling build does not do; name one model (or `base`)"
        )
    if tokenizer_source == "base":
        tokenizer_source = recipe.base_model
    recipe.tokenizer_source = tokenizer_source
    recipe.parameters = _parameters(data, "parameters")
    if "seam_smoothing" in data:
        recipe.seam_smoothing = _smoothing(data["seam_smoothing"], where(data, "seam_smoothing"))
    if kind == "slices":
        recipe.slices = _slices(data["slices"], where(data, "slices"))
    else:
        recipe.preset, recipe.preset_where = _preset(kind, data[kind], where(data, kind))
    return recipe


def _dtype(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    return dtype_name(value, f"{where(data, key)}: {key}")


def dtype_name(value, label: str = "dtype") -> str:
    """The canonical name (float32, float16, bfloat16) of a dtype a user wrote."""
    if not isinstance(value, str) or value.lower() not in DTYPE_ALIASES:
        raise DusError(f"{label} {value!r} is not a dtype dus writes; use float32, float16 or bfloat16")
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[DTYPE_ALIASES[value.lower()]]


def _optional_str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DusError(f"{where(data, key)}: {key} must be a model path (a string), got {value!r}")
    return value


def _slices(value, place: str) -> list[SliceSpec]:
    if not isinstance(value, list) or not value:
        raise DusError(f"{place}: `slices` must be a non-empty list of `- sources: [...]` entries")
    slices = []
    for i, entry in enumerate(value):
        here = where(value, i)
        if not isinstance(entry, dict):
            raise DusError(f"{here}: slices[{i}] must be a mapping with `sources:`")
        unknown = sorted(set(entry) - {"sources", "parameters", "base_model", "residual_weight"})
        if unknown:
            raise DusError(f"{where(entry, unknown[0])}: slices[{i}] has unknown key {unknown[0]!r}; a slice takes `sources` and `parameters`")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise DusError(f"{here}: slices[{i}] needs `sources:` with one `- model: ..., layer_range: [start, end]`")
        if len(sources) != 1:
            raise DusError(
                f"{where(entry, 'sources')}: slices[{i}] has {len(sources)} sources; passthrough takes one per slice "
                "(to blend layers across a seam, use `seam_smoothing`)"
            )
        source = sources[0]
        source_where = where(sources, 0)
        if not isinstance(source, dict):
            raise DusError(f"{source_where}: slices[{i}].sources[0] must be a mapping with `model` and `layer_range`")
        unknown = sorted(set(source) - {"model", "layer_range", "parameters"})
        if unknown:
            raise DusError(
                f"{where(source, unknown[0])}: slices[{i}].sources[0] has unknown key {unknown[0]!r}; "
                "a source takes `model`, `layer_range` and `parameters`"
            )
        model = source.get("model")
        if not isinstance(model, str) or not model:
            raise DusError(f"{where(source, 'model')}: slices[{i}].sources[0].model must be a model path")
        start, end = _int_pair(source.get("layer_range"), where(source, "layer_range"), f"slices[{i}].sources[0].layer_range")
        slices.append(
            SliceSpec(
                model=model,
                start=start,
                end=end,
                where=where(source, "layer_range"),
                source_parameters=_parameters(source, "parameters"),
                slice_parameters=_parameters(entry, "parameters"),
            )
        )
    return slices


def _int_pair(value, place: str, label: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise DusError(f"{place}: {label} must be two integers [start, end) (end exclusive), got {plain(value)!r}")
    start, end = value
    if start >= end:
        raise DusError(f"{place}: {label} [{start}, {end}] is empty; end is exclusive, so use [start, end] with start < end")
    if start < 0:
        raise DusError(f"{place}: {label} [{start}, {end}] starts below 0; layers count from 0")
    return start, end


def _parameters(data: dict, key: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DusError(f"{where(data, key)}: `{key}` must be a mapping like `scale: 0.5`")
    unknown = sorted(set(value) - PARAMETER_NAMES)
    if unknown:
        raise DusError(
            f"{where(value, unknown[0])}: parameter {unknown[0]!r} has no meaning for passthrough; "
            "the only parameter is `scale`"
        )
    for name, setting in value.items():
        _check_setting(setting, where(value, name), name)
    return plain(value)


def _is_number(value) -> bool:
    """A finite int or float (a NaN or infinite scale would build a checkpoint of NaNs)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_setting(setting, place: str, name: str) -> None:
    """A mergekit parameter setting: a number, a gradient list of numbers, or
    conditional `{filter, value}` entries."""
    if _is_number(setting):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(_is_number(v) for v in setting):
        return
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for entry in setting:
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown or "value" not in entry:
                raise DusError(f"{place}: each {name} condition is `{{filter: NAME, value: NUMBER}}` (filter optional)")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise DusError(f"{place}: {name} filter must be a string (part of a tensor name)")
            value = entry["value"]
            if not (_is_number(value) or (isinstance(value, list) and value and all(_is_number(v) for v in value))):
                raise DusError(f"{place}: {name} value must be a finite number or a list of them, got {plain(value)!r}")
        return
    raise DusError(
        f"{place}: {name} must be a finite number, a list of finite numbers (a gradient) or a list of "
        f"`{{filter, value}}` conditions, got {plain(setting)!r}"
    )


def _smoothing(value, place: str) -> SeamSmoothing:
    if not isinstance(value, dict):
        raise DusError(f"{place}: seam_smoothing must be a mapping like `{{method: slerp, width: 2}}`")
    unknown = sorted(set(value) - SMOOTHING_KEYS)
    if unknown:
        raise DusError(f"{where(value, unknown[0])}: seam_smoothing has unknown key {unknown[0]!r}; known: {', '.join(sorted(SMOOTHING_KEYS))}")
    method = value.get("method", "linear")
    if method not in ("linear", "slerp"):
        raise DusError(f"{where(value, 'method')}: seam_smoothing method {method!r} is unknown; use linear or slerp")
    width = value.get("width", 1)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise DusError(f"{where(value, 'width')}: seam_smoothing width must be a whole number >= 1 (layers blended on each side)")
    factors = value.get("factors")
    if factors is not None:
        if not isinstance(factors, list) or len(factors) != 2 * width or not all(_is_number(f) and 0 <= f <= 1 for f in factors):
            raise DusError(
                f"{where(value, 'factors')}: seam_smoothing factors must be {2 * width} numbers in [0, 1] "
                "(the share of the right-hand side at each blended position, left to right)"
            )
        factors = [float(f) for f in factors]
    return SeamSmoothing(method=method, width=width, factors=factors, where=place)


def _check_parents(value: dict, places: dict) -> None:
    from dus.parents import DEFAULT_METHOD, METHODS

    models = value["models"]
    if not isinstance(models, list) or len(models) != 2 or not all(isinstance(m, str) and m for m in models):
        count = f"{len(models)} models" if isinstance(models, list) else repr(plain(models))
        raise DusError(f"{places['models']}: `parents.models` must list exactly two fine-tunes of the base, A then B "
                       f"(got {count}); for more models use `interleave`")
    if models[0] == models[1]:
        raise DusError(f"{places['models']}: `parents.models` names {models[0]!r} twice; give two different fine-tunes")
    method = value.get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise DusError(f"{places.get('method')}: `parents.method` {plain(method)!r} is unknown; use one of "
                       f"{', '.join(METHODS)}")
    if "blend" in value and not (_is_number(value["blend"]) and 0 <= value["blend"] <= 0.5):
        raise DusError(f"{places['blend']}: `parents.blend` must be a number in [0, 0.5] (how far a layer next to a "
                       f"change of parent moves towards the other parent), got {plain(value['blend'])!r}")


def _preset(kind: str, value, place: str) -> tuple[dict, dict]:
    allowed, required = PRESET_KEYS[kind]
    if not isinstance(value, dict):
        raise DusError(f"{place}: `{kind}` must be a mapping with {', '.join(sorted(required))}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise DusError(f"{where(value, unknown[0])}: `{kind}` has unknown key {unknown[0]!r}; known: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(value))
    if missing:
        raise DusError(f"{place}: `{kind}` needs `{missing[0]}`")
    if kind == "expand" and ("every" in value) == ("positions" in value):
        raise DusError(f"{place}: `expand` needs exactly one of `every: K` or `positions: [...]`")
    places = {key: where(value, key) for key in value}
    for key in ("model", "base", "donor"):
        if key in value and (not isinstance(value[key], str) or not value[key]):
            raise DusError(f"{places[key]}: `{kind}.{key}` must be a model path")
    if kind == "interleave":
        models = value["models"]
        if not isinstance(models, list) or len(models) < 2 or not all(isinstance(m, str) for m in models):
            raise DusError(f"{places['models']}: `interleave.models` must list two or more model paths")
    if kind == "stack":
        models = value["models"]
        if not isinstance(models, list) or len(models) != 2 or not all(isinstance(m, str) and m for m in models):
            raise DusError(f"{places['models']}: `stack.models` must list two model paths: the lower part's, then the "
                           "upper part's")
    if kind == "parents":
        _check_parents(value, places)
    for key in ("trim", "times", "block", "step", "first", "last", "every", "min_run"):
        if key in value:
            number = value[key]
            minimum = 0 if key == "trim" else 1
            if not isinstance(number, int) or isinstance(number, bool) or number < minimum:
                raise DusError(f"{places[key]}: `{kind}.{key}` must be a whole number >= {minimum}, got {plain(number)!r}")
            if key == "times" and number > MAX_OUTPUT_LAYERS:
                raise DusError(f"{places[key]}: `duplicate.times` {number} would build a model of over "
                               f"{MAX_OUTPUT_LAYERS} layers; repeat the range a few times at most")
    if "layers" in value:
        _int_pair(value["layers"], places["layers"], f"{kind}.layers")
    if "positions" in value:
        positions = value["positions"]
        if not isinstance(positions, list) or not positions or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions):
            raise DusError(f"{places['positions']}: `expand.positions` must list source layer indices (a new block goes after each)")
    if "scale" in value and not _is_number(value["scale"]):
        raise DusError(f"{places['scale']}: `duplicate.scale` must be a finite number (applied to o_proj/down_proj of the repeated layers)")
    return plain(value), places
