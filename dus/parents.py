"""Two fine-tunes of one base, one child: how much each fine-tune moved each layer, and
the constructions of the `parents` preset that start at a parent.

A stack of two parents (the `stack` method) throws away A's upper and B's lower layers and
starts far behind both; the methods here keep what a parent knew:
- `gated`: A's whole stack with a run of B's layers inserted after A's copies of the same
  layers, behind output-projection scales of 0 (gates that start closed), so the child
  computes exactly A until a heal opens them; B's weights reach the heal intact (in memory
  they are the loaded source's own). The run defaults to a quarter of the depth (SOLAR's
  proportion), placed where B's fine-tune moved its layers most relative to A's.
- `swap` (layer swapping, arXiv 2410.01335): the parents' depth; each layer from the parent
  whose fine-tune changed it more against the base, each parent's change measured relative
  to its own mean change (a parent trained longer moves every layer more), runs shorter than
  `min_run` merged into their neighbours, and a linear blend of `blend` on the layers either
  side of each change of parent.
- `stack` and `interleave` as the references they were.

The change of a layer is ||parent - base|| / ||base|| over that layer's weight matrices (its
norms' vectors of ones would drown the change), read from the safetensors files one tensor
at a time (float32).
"""

from __future__ import annotations

import math

from dus.errors import DusError
from dus.recipe import SliceSpec

METHODS = ("gated", "swap", "stack", "interleave")
DEFAULT_METHOD = "swap"  # measured best on the dev texts (benchmarks/bench_two_parents.py, docs/two-parents.md)
# A fine-tune moves a layer's weights by a few percent at most; an unrelated model (another
# pretraining run) differs by about sqrt(2) of their norm. Beyond this the "base" is not one.
MAX_CHANGE = 0.5


def layer_changes(base, model) -> list[float]:
    """||model - base|| / ||base|| for each layer (SourceModels of equal shape)."""
    from dus.safetensors_io import read_tensor

    changes = []
    for index in range(base.num_layers):
        moved = norm = 0.0
        tensors = base.layer(index).items()
        matrices = [(name, info) for name, info in tensors if len(info.shape) >= 2]
        for name, info in matrices or tensors:  # the norms' ones would drown a matrix's change
            b = read_tensor(info).float()
            m = read_tensor(model.layer(index)[name]).float()
            moved += float((m - b).pow(2).sum())
            norm += float(b.pow(2).sum())
        changes.append(math.sqrt(moved / norm) if norm > 0 else 0.0)
    return changes


def check_base(spec: dict, places: dict, sources: dict) -> None:
    """The base must have the parents' architecture, depth and vocabulary."""
    base = sources[spec["base"]]
    for name in spec["models"]:
        parent = sources[name]
        if parent.model_type != base.model_type:
            raise DusError(f"{places['base']}: the base {spec['base']!r} is a {base.model_type}, parent {name!r} a "
                           f"{parent.model_type}; parents must be fine-tunes of the base")
        if parent.num_layers != base.num_layers:
            raise DusError(f"{places['base']}: the base {spec['base']!r} has {base.num_layers} layers, parent {name!r} "
                           f"{parent.num_layers}; parents must be fine-tunes of the base (same depth)")
        for key in ("vocab_size", "hidden_size"):
            if parent.config.get(key) != base.config.get(key):
                raise DusError(f"{places['base']}: the base {spec['base']!r} has {key} {base.config.get(key)}, parent "
                               f"{name!r} {parent.config.get(key)}; parents must be fine-tunes of the base")


def parent_changes(spec: dict, places: dict, sources: dict) -> dict[str, list[float]]:
    """Each parent's per-layer change against the base, refused where it is too far to be a fine-tune."""
    check_base(spec, places, sources)
    base = sources[spec["base"]]
    changes = {}
    for name in spec["models"]:
        moved = layer_changes(base, sources[name])
        median = sorted(moved)[len(moved) // 2]
        if median > MAX_CHANGE:
            raise DusError(f"{places['base']}: parent {name!r} is not a fine-tune of the base {spec['base']!r}: its layers "
                           f"differ from the base's by {100 * median:.0f}% of their norm (median; a fine-tune moves them a "
                           f"few percent, the limit is {100 * MAX_CHANGE:.0f}%); name the model both were tuned from")
        changes[name] = moved
    return changes


def relative(changes: list[float]) -> list[float]:
    mean = sum(changes) / len(changes)
    return [c / mean if mean > 0 else 0.0 for c in changes]


def gated_run(spec: dict, changes: dict[str, list[float]], n: int) -> tuple[int, int]:
    """[start, end) of B's layers to insert: `layers` if given, else a run of n/4 layers where
    B's relative change most exceeds A's."""
    if "layers" in spec:
        return tuple(spec["layers"])
    a, b = spec["models"]
    length = max(1, round(n / 4))
    gain = [rb - ra for ra, rb in zip(relative(changes[a]), relative(changes[b]))]
    start = max(range(n - length + 1), key=lambda s: (sum(gain[s:s + length]), -s))
    return start, start + length


def gated_slices(spec: dict, places: dict, n: int, changes) -> list[SliceSpec]:
    a, b = spec["models"]
    start, end = gated_run(spec, changes, n)
    if end > n:
        raise DusError(f"{places.get('layers', places['models'])}: parents.layers [{start}, {end}] is outside the "
                       f"parents' {n} layers; use 0 <= start < end <= {n}")
    closed = {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}]}
    slices = [SliceSpec(a, 0, end, places["models"]),
              SliceSpec(b, start, end, places["models"], slice_parameters=closed)]
    if end < n:
        slices.append(SliceSpec(a, end, n, places["models"]))
    return slices


def swap_choice(spec: dict, changes: dict[str, list[float]], n: int) -> list[str]:
    """The parent of each layer: the one whose relative change is larger, short runs merged."""
    a, b = spec["models"]
    ra, rb = relative(changes[a]), relative(changes[b])
    chosen = [b if rb[i] > ra[i] else a for i in range(n)]
    min_run = spec.get("min_run", 2)
    changed = True
    while changed:
        changed = False
        runs = _runs(chosen)
        if len(runs) == 1:
            break
        for start, end, owner in runs:
            if end - start < min_run:
                other = b if owner == a else a
                chosen[start:end] = [other] * (end - start)
                changed = True
                break
    return chosen


def _runs(chosen: list[str]) -> list[tuple[int, int, str]]:
    runs, start = [], 0
    for i in range(1, len(chosen) + 1):
        if i == len(chosen) or chosen[i] != chosen[start]:
            runs.append((start, i, chosen[start]))
            start = i
    return runs


def swap_slices(spec: dict, places: dict, n: int, changes) -> list[SliceSpec]:
    return [SliceSpec(owner, start, end, places["models"]) for start, end, owner in _runs(swap_choice(spec, changes, n))]


def swap_blends(layers: list, spec: dict) -> list:
    """A linear blend where the parent changes: the last layer of a run moves `blend` of the
    way towards the other parent's same layer, and so does the first layer of the next run."""
    from dataclasses import replace

    from dus.plan import Blend

    t = spec.get("blend", 0.3)
    if t == 0:
        return layers
    result = list(layers)
    for i in range(1, len(layers)):
        left, right = layers[i - 1], layers[i]
        if left.model != right.model:
            result[i - 1] = replace(left, blend=Blend(right.model, left.layer, t))
            result[i] = replace(right, blend=Blend(left.model, right.layer, t))
    return result


def change_table(spec: dict, changes: dict[str, list[float]]) -> list[str]:
    """Lines for `dus build --dry-run`: each parent's change per layer, and which is larger."""
    a, b = spec["models"]
    ra, rb = relative(changes[a]), relative(changes[b])
    lines = [f"change against the base {spec['base']} (||parent - base|| / ||base||; relative = / the parent's mean)",
             f"  layer  {'A':>9} {'rel':>5}  {'B':>9} {'rel':>5}  more"]
    for i, (ca, cb) in enumerate(zip(changes[a], changes[b])):
        lines.append(f"  {i:5d}  {ca:9.2e} {ra[i]:5.2f}  {cb:9.2e} {rb[i]:5.2f}  {'B' if rb[i] > ra[i] else 'A'}")
    return lines


def plot_changes(changes: dict[str, list[float]], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, values in changes.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("||parent - base|| / ||base||")
    ax.set_title(title or "how much each fine-tune moved each layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expand_parents(spec: dict, places: dict, sources: dict):
    """(slices, notes for the dry run, a function applied to the resolved layers, the model
    giving the non-layer tensors or None for the slices' default) for the `parents` preset. Everything is checked here, before anything is written."""
    from dus.presets import _interleave, _stack

    changes = parent_changes(spec, places, sources)
    n = sources[spec["base"]].num_layers
    method = spec.get("method", DEFAULT_METHOD)
    notes = [f"parents: method {method}"] + change_table(spec, changes)
    after = None
    depth = lambda model: sources[model].num_layers  # noqa: E731
    if method == "gated":
        slices = gated_slices(spec, places, n, changes)
        start, end = slices[1].start, slices[1].end
        notes.append(f"gated: B's layers [{start}, {end}) inserted after A's layer {end - 1}, output projections x0 "
                     "(the child computes A exactly until a heal opens the gates)")
    elif method == "swap":
        slices = swap_slices(spec, places, n, changes)
        notes.append("swap: " + " ".join(f"{s.model}[{s.start},{s.end})" for s in slices))
        after = lambda layers: swap_blends(layers, spec)  # noqa: E731
    elif method == "stack":
        slices = _stack({"models": spec["models"], "trim": spec.get("trim", max(1, round(n / 4)))},
                        {"models": places["models"], "trim": places.get("trim", places["models"])}, depth)
    else:
        block = spec.get("block", max(1, round(n / 3)))
        step = spec.get("step", max(1, round(block * 3 / 4)))
        slices = _interleave({"models": spec["models"], "block": block, "step": step},
                             {k: places.get(k, places["models"]) for k in ("models", "block", "step", "last")}, depth)
    # the gated child is A: its embeddings, final norm and head too, wherever B's run goes
    non_layer = spec["models"][0] if method == "gated" else None
    return slices, notes, after, non_layer
