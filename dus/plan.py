"""The LayerPlan: the one resolved object that every stage reads.

A recipe (what the user wrote) resolves into a plan: for each output layer, which source
model and layer it comes from and how it is transformed; where the non-layer tensors
(embeddings, final norm, lm_head) come from; and the seams. `dus build` executes it,
`dus build --dry-run` prints it, the manifest stores it, and `dus heal` / `dus compare`
read the seams and new blocks back from the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MANIFEST_NAME = "dus-manifest.json"


@dataclass(frozen=True)
class ScaleRule:
    """Multiply a tensor whose name contains `filter` (every tensor when None) by `value`.

    A layer carries an ordered tuple of rules; the first that matches wins and a tensor
    that matches none is left as it is (mergekit's conditional-parameter semantics)."""

    value: float
    filter: str | None = None

    def matches(self, tensor_names: tuple[str, ...]) -> bool:
        return self.filter is None or any(self.filter in name for name in tensor_names)


def scale_for(rules: tuple[ScaleRule, ...], *tensor_names: str) -> float | None:
    """The value of the first rule matching the tensor (by any of its names), or None."""
    for rule in rules:
        if rule.matches(tensor_names):
            return rule.value
    return None


@dataclass(frozen=True)
class Blend:
    """Seam smoothing: this layer is interpolated towards `layer` of `model` by `t`
    (0 keeps the primary source, 1 gives the other), linearly or by SLERP."""

    model: str
    layer: int
    t: float
    method: str = "linear"


@dataclass(frozen=True)
class OutputLayer:
    model: str
    layer: int
    scale: tuple[ScaleRule, ...] = ()
    zero_output: bool = False
    blend: Blend | None = None

    @property
    def new(self) -> bool:
        """A function-preserving inserted block (LLaMA-Pro): its output projections are
        zero, so it computes the identity until trained."""
        return self.zero_output

    @property
    def transform(self) -> str:
        parts = []
        if self.zero_output:
            parts.append("zero-init o_proj/down_proj (new block)")
        if self.blend:
            parts.append(f"{self.blend.method} blend t={self.blend.t:g} with {self.blend.model}[{self.blend.layer}]")
        if self.scale:
            parts.append(
                "scale " + ", ".join(f"{r.filter or '*'}x{r.value:g}" for r in self.scale)
            )
        return "; ".join(parts) or "copy"

    def to_dict(self, index: int) -> dict:
        data = {"index": index, "model": self.model, "layer": self.layer, "transform": self.transform}
        if self.scale:
            data["scale"] = [asdict(rule) for rule in self.scale]
        if self.zero_output:
            data["zero_output"] = True
        if self.blend:
            data["blend"] = asdict(self.blend)
        data["new"] = self.new
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "OutputLayer":
        return cls(
            model=data["model"],
            layer=int(data["layer"]),
            scale=tuple(ScaleRule(**rule) for rule in data.get("scale", ())),
            zero_output=bool(data.get("zero_output", False)),
            blend=Blend(**data["blend"]) if data.get("blend") else None,
        )


@dataclass(frozen=True)
class NonLayerSource:
    """Where a non-layer tensor group comes from, with mergekit-style scale rules (a
    scale on the first slice also reaches the embeddings there)."""

    model: str
    scale: tuple[ScaleRule, ...] = ()


@dataclass
class LayerPlan:
    models: dict[str, str]  # name as written in the recipe -> local directory
    layers: list[OutputLayer]
    embeddings: NonLayerSource
    head: NonLayerSource  # final norm and lm_head
    config_from: str
    tokenizer_from: str
    dtype: str | None = None  # compute dtype (mergekit `dtype`); None keeps each tensor's own
    out_dtype: str | None = None  # output dtype; None means `dtype`, or the source's
    recipe_kind: str = "slices"
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def seams(self) -> list[int]:
        return find_seams(self.layers)

    @property
    def new_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.new]

    def to_dict(self) -> dict:
        return {
            "recipe_kind": self.recipe_kind,
            "models": dict(self.models),
            "num_layers": self.num_layers,
            "layers": [layer.to_dict(i) for i, layer in enumerate(self.layers)],
            "seams": self.seams,
            "new_layers": self.new_layers,
            "embeddings": _non_layer_dict(self.embeddings),
            "head": _non_layer_dict(self.head),
            "config_from": self.config_from,
            "tokenizer_from": self.tokenizer_from,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        return cls(
            models=dict(data["models"]),
            layers=[OutputLayer.from_dict(layer) for layer in data["layers"]],
            embeddings=_non_layer_from(data["embeddings"]),
            head=_non_layer_from(data["head"]),
            config_from=data["config_from"],
            tokenizer_from=data["tokenizer_from"],
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            recipe_kind=data.get("recipe_kind", "slices"),
            notes=list(data.get("notes", [])),
        )


def _non_layer_dict(source: NonLayerSource) -> dict:
    return {"model": source.model, "scale": [asdict(rule) for rule in source.scale]}


def _non_layer_from(data: dict) -> NonLayerSource:
    return NonLayerSource(data["model"], tuple(ScaleRule(**rule) for rule in data.get("scale", ())))


def find_seams(layers: list[OutputLayer]) -> list[int]:
    """Output indices i where layer i does not follow, in its source, the layer before it.

    New (zero-init) blocks are the identity until trained, so they are skipped: a seam
    compares each real layer with the previous real one. Layer 0 is never a seam."""
    seams = []
    previous: OutputLayer | None = None
    for index, layer in enumerate(layers):
        if layer.new:
            continue
        if previous is not None and not (
            layer.model == previous.model and layer.layer == previous.layer + 1
        ):
            seams.append(index)
        previous = layer
    return seams


def layers_near_seams(num_layers: int, seams: list[int], radius: int) -> list[int]:
    """Output layers within `radius` of a seam. A seam at i sits between layers i-1 and i,
    so radius 1 gives [i-1, i] and radius 2 gives [i-2 .. i+1]."""
    chosen: set[int] = set()
    for seam in seams:
        chosen.update(range(max(0, seam - radius), min(num_layers, seam + radius)))
    return sorted(chosen)
