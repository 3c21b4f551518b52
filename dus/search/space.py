"""The search space: a path over source layers as a few contiguous segments, each with a
scale on its output projections, decoded deterministically from a vector in [0, 1]^n.

A path is what `dus build` can build: mergekit passthrough slices. SOLAR's trim is two
segments ([0, L-m) then [m, L)), a duplicated range three, a graft three over two models.
Each segment has genes in [0, 1]:

    length weight -> the segments' lengths, apportioned to the depth (each >= 1)
    start         -> start = round(u * (depth of its model - length))
    model         -> which source (only with several models)
    scale         -> o_proj/down_proj factor, snapped to a grid within [min, max]

plus one depth gene when the depth is a range. Anchored paths (the default) start at
source layer 0 and end at the top layer, as every DUS recipe does (a path that skips
layer 0 or the last layer loses orders of magnitude of perplexity, and the optimizer
would spend its budget learning that): the first segment has no start gene (it starts
at 0) and the last none (it ends at the top). The other segments are sorted by start (a
later segment may still start below where an earlier one ends: that is a repeat), and
contiguous ones merge, so many vectors decode to one candidate: the candidate's
canonical recipe is the cache key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dus.errors import DusError

MIN_SCALE = 0.5  # calibration's floor (dus.heal.calibrate.MIN_FACTOR): never below half the source's norm
SCALE_STEP = 0.05
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Segment:
    """Layers [start, end) of `model`, their output projections scaled by `scale`."""

    model: str
    start: int
    end: int
    scale: float = 1.0

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"model": self.model, "start": self.start, "end": self.end, "scale": self.scale}


@dataclass(frozen=True)
class Candidate:
    segments: tuple[Segment, ...]

    @property
    def depth(self) -> int:
        return sum(segment.length for segment in self.segments)

    def layers(self) -> list[tuple[str, int]]:
        """(model, source layer) for each output layer."""
        return [(s.model, layer) for s in self.segments for layer in range(s.start, s.end)]

    def recipe(self) -> dict:
        """mergekit passthrough slices; scales as filtered `parameters: scale`."""
        slices = []
        for segment in self.segments:
            entry = {"sources": [{"model": segment.model, "layer_range": [segment.start, segment.end]}]}
            if segment.scale != 1.0:
                entry["parameters"] = {"scale": [{"filter": name, "value": segment.scale} for name in OUTPUT_PROJECTIONS]}
            slices.append(entry)
        return {"merge_method": "passthrough", "slices": slices}

    def key(self) -> str:
        return json.dumps(self.recipe(), sort_keys=True)

    def describe(self, names: dict[str, str] | None = None) -> str:
        """Short text: `A[0:24) A[8:32)x0.8`."""
        names = names or {}
        return " ".join(
            f"{names.get(s.model, s.model)}[{s.start}:{s.end})" + (f"x{s.scale:g}" if s.scale != 1.0 else "")
            for s in self.segments
        )

    def to_dict(self) -> dict:
        return {"depth": self.depth, "segments": [s.to_dict() for s in self.segments]}

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(tuple(Segment(s["model"], int(s["start"]), int(s["end"]), float(s["scale"])) for s in data["segments"]))


def canonical(segments: list[Segment]) -> Candidate:
    """Merge neighbours that continue each other in one source with one scale."""
    merged: list[Segment] = []
    for segment in segments:
        last = merged[-1] if merged else None
        if last and last.model == segment.model and last.end == segment.start and last.scale == segment.scale:
            merged[-1] = Segment(last.model, last.start, segment.end, last.scale)
        else:
            merged.append(segment)
    return Candidate(tuple(merged))


@dataclass(frozen=True)
class SearchSpace:
    """Paths over `models` (directory strings, as the plan names them) of `depths` layers."""

    models: tuple[str, ...]
    depths: tuple[int, ...]
    depth_min: int
    depth_max: int
    segments: int = 3
    scale_min: float = 1.0
    scale_max: float = 1.0
    keep: frozenset[int] = field(default_factory=frozenset)
    anchored: bool = True  # the first segment starts at layer 0, the last ends at the top

    def __post_init__(self):
        check_space(self)

    @property
    def searches_scale(self) -> bool:
        return self.scale_max > self.scale_min

    @property
    def genes_per_segment(self) -> int:
        return 2 + (len(self.models) > 1) + self.searches_scale

    @property
    def dimension(self) -> int:
        return len(self.gene_names())

    def _has_start(self, k: int) -> bool:
        return not (self.anchored and k in (0, self.segments - 1))

    def gene_names(self) -> list[str]:
        names = ["depth"] if self.depth_max > self.depth_min else []
        for k in range(self.segments):
            names += [f"s{k}.length"] + ([f"s{k}.start"] if self._has_start(k) else [])
            if len(self.models) > 1:
                names.append(f"s{k}.model")
            if self.searches_scale:
                names.append(f"s{k}.scale")
        return names

    def scale_levels(self) -> list[float]:
        steps = round((self.scale_max - self.scale_min) / SCALE_STEP)
        return [round(self.scale_min + i * SCALE_STEP, 4) for i in range(steps + 1)] or [self.scale_min]

    def decode(self, vector) -> Candidate:
        """The candidate of a vector (clipped to [0, 1]); the same vector, the same candidate."""
        x = [min(1.0, max(0.0, float(v))) for v in vector]
        if len(x) != self.dimension:
            raise ValueError(f"vector of {len(x)} genes for a space of {self.dimension}")
        position = 0
        depth = self.depth_min
        if self.depth_max > self.depth_min:
            depth = self.depth_min + _round(x[0] * (self.depth_max - self.depth_min))
            position = 1
        genes = []
        for k in range(self.segments):
            width = self.genes_per_segment - (not self._has_start(k))
            gene = x[position : position + width]
            if not self._has_start(k):  # anchored ends: 0 for the bottom, 1 for the top
                gene = gene[:1] + [0.0 if k == 0 else 1.0] + gene[1:]
            genes.append(gene)
            position += width
        lengths = apportion(depth, [0.05 + 0.95 * g[0] for g in genes], min(self.depths))
        levels = self.scale_levels()
        parts = []
        for gene, length in zip(genes, lengths):
            rest = gene[2:]
            model = 0
            if len(self.models) > 1:
                model = min(len(self.models) - 1, int(rest[0] * len(self.models)))
                rest = rest[1:]
            scale = levels[min(len(levels) - 1, _round(rest[0] * (len(levels) - 1)))] if self.searches_scale else self.scale_min
            start = _round(gene[1] * (self.depths[model] - length))
            parts.append((start, model, length, scale))
        if self.anchored and len(parts) > 1:  # the ends stay in place; the middle is sorted
            parts = parts[:1] + sorted(parts[1:-1]) + parts[-1:]
        else:
            parts.sort()
        return canonical([Segment(self.models[m], s, s + n, c) for s, m, n, c in parts])

    def centre(self) -> list[float]:
        """Where the optimizers start: equal lengths, starts spread from the bottom to the
        top of the source (for 30 -> 44 layers in 3 segments: [0,15) [8,23) [16,30)),
        models taken in turn, scales near the top of their range."""
        x = [0.5] if self.depth_max > self.depth_min else []
        for k in range(self.segments):
            x += [0.5] + ([k / (self.segments - 1) if self.segments > 1 else 0.5] if self._has_start(k) else [])
            if len(self.models) > 1:
                x.append((k % len(self.models) + 0.5) / len(self.models))
            if self.searches_scale:
                x.append(0.8)
        return x

    def missing(self, candidate: Candidate) -> list[int]:
        """Kept source layers the candidate leaves out (any model's layer of that index counts)."""
        present = {layer for _, layer in candidate.layers()}
        return sorted(self.keep - present)

    def size(self) -> int:
        """An upper bound on the number of distinct candidates: ordered segment tuples of
        every allowed depth (sorting and merging make the real number smaller)."""
        levels = len(self.scale_levels())
        cap = min(self.depths)
        free = [0] + [sum(d - n + 1 for d in self.depths) * levels for n in range(1, cap + 1)]
        fixed = [0] + [len(self.depths) * levels] * cap  # an anchored end: one start per model
        counts = [1]  # counts[d]: ways to fill depth d with the segments so far
        for k in range(self.segments):
            per_length = free if self._has_start(k) else fixed
            nxt = [0] * (len(counts) + cap)
            for d, ways in enumerate(counts):
                if ways:
                    for n in range(1, cap + 1):
                        nxt[d + n] += ways * per_length[n]
            counts = nxt
        return sum(counts[d] for d in range(self.depth_min, min(self.depth_max, len(counts) - 1) + 1))

    def describe(self) -> dict:
        return {
            "models": list(self.models), "source_depths": list(self.depths),
            "depth": [self.depth_min, self.depth_max], "segments": self.segments,
            "scale": [self.scale_min, self.scale_max], "scale_levels": self.scale_levels(),
            "keep": sorted(self.keep), "anchored": self.anchored, "genes": self.gene_names(), "size_at_most": self.size(),
        }


def check_space(space: SearchSpace) -> None:
    """Every constraint the user can get wrong, as one line each."""
    if not space.models:
        raise DusError("no source models; name at least one model directory")
    if space.segments < 1:
        raise DusError(f"--segments {space.segments}: use at least 1")
    if space.depth_min < 1 or space.depth_min > space.depth_max:
        raise DusError(f"--depth {space.depth_min}:{space.depth_max} is not a depth range; use N or MIN:MAX with 1 <= MIN <= MAX")
    if space.depth_max < space.segments:
        raise DusError(f"--depth {space.depth_max} is below --segments {space.segments} (each segment has at least one layer); "
                       "use fewer segments or a greater depth")
    cap = min(space.depths)
    if space.depth_min > space.segments * cap:
        raise DusError(f"--depth {space.depth_min} needs more than {space.segments} segments of at most {cap} layers; "
                       f"use --segments {math.ceil(space.depth_min / cap)} or more")
    if not (math.isfinite(space.scale_min) and math.isfinite(space.scale_max)):
        raise DusError(f"--scale {space.scale_min:g}:{space.scale_max:g}: a scale must be a finite number; give a factor S "
                       f"or a range MIN:MAX with {MIN_SCALE} <= MIN <= MAX, e.g. 0.5:1")
    if space.scale_min < MIN_SCALE or space.scale_max < space.scale_min:
        raise DusError(f"--scale {space.scale_min:g}:{space.scale_max:g}: a scale range MIN:MAX with "
                       f"{MIN_SCALE} <= MIN <= MAX (calibration's floor is half the source's norm)")
    outside = sorted(layer for layer in space.keep if not 0 <= layer < max(space.depths))
    if outside:
        raise DusError(f"--keep {outside[0]}: no such source layer (the sources have {max(space.depths)}); use 0..{max(space.depths) - 1}")
    if len(space.keep) > space.depth_max:
        raise DusError(f"--keep names {len(space.keep)} layers but the depth is at most {space.depth_max}; "
                       "keep fewer layers or allow a greater depth")


def apportion(total: int, weights: list[float], cap: int) -> list[int]:
    """Integer lengths in [1, cap] summing to `total`, proportional to `weights`
    (largest remainder; ties to the lower index). The caller keeps total in range."""
    raw = [total * w / sum(weights) for w in weights]
    lengths = [min(cap, max(1, math.floor(r))) for r in raw]
    while sum(lengths) < total:
        room = [i for i, n in enumerate(lengths) if n < cap]
        i = max(room, key=lambda i: (raw[i] - lengths[i], -i))
        lengths[i] += 1
    while sum(lengths) > total:
        room = [i for i, n in enumerate(lengths) if n > 1]
        i = min(room, key=lambda i: (raw[i] - lengths[i], i))
        lengths[i] -= 1
    return lengths


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def parse_depth(text: str | None, default: int) -> tuple[int, int]:
    """`N` or `MIN:MAX`."""
    if text is None:
        return default, default
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise DusError(f"--depth {text!r}: give a number of layers N or a range MIN:MAX") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise DusError(f"--depth {text!r}: give a number of layers N or a range MIN:MAX")


def parse_scale(text: str | None) -> tuple[float, float]:
    """`S` (fixed) or `MIN:MAX`; default 1 (no scale searched)."""
    if text is None:
        return 1.0, 1.0
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise DusError(f"--scale {text!r}: give a factor S or a range MIN:MAX, e.g. 0.5:1") from None
    if len(parts) not in (1, 2):
        raise DusError(f"--scale {text!r}: give a factor S or a range MIN:MAX, e.g. 0.5:1")
    if not all(math.isfinite(p) for p in parts):
        raise DusError(f"--scale {text!r}: a scale must be a finite number; give a factor S or a range MIN:MAX "
                       f"with {MIN_SCALE} <= MIN <= MAX, e.g. 0.5:1")
    return parts[0], parts[-1]


def parse_keep(text: str | None) -> frozenset[int]:
    """`0,1,28:30` (half-open ranges) -> {0, 1, 28, 29}. A range that keeps nothing
    (`3:1`, `3:3`) or an empty option is refused, never read as "keep nothing"."""
    if text is None:
        return frozenset()
    usage = "give source layers like 0,1,28:30 (ranges are half-open: LOW:HIGH with LOW < HIGH)"
    kept: set[int] = set()
    for part in str(text).split(","):
        try:
            if ":" in part:
                low, high = (int(p) for p in part.split(":"))
                if low >= high:
                    raise DusError(f"--keep {text!r}: the range {part.strip()} holds no layer; {usage}")
                kept.update(range(low, high))
            else:
                kept.add(int(part))
        except ValueError:
            raise DusError(f"--keep {text!r}: {usage}") from None
    return frozenset(kept)


def parse_count(text: str | None) -> int | None:
    """`135M`, `1.5B`, `800000` -> an integer parameter count."""
    if text is None:
        return None
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    body, unit = (str(text)[:-1], units[str(text)[-1].upper()]) if str(text)[-1:].upper() in units else (str(text), 1)
    try:
        return int(float(body) * unit)
    except ValueError:
        raise DusError(f"--max-params {text!r}: give a parameter count like 200M or 1.5B") from None
