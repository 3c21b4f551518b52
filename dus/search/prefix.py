"""An exact prefix cache of hidden states for perplexity scoring.

Candidates that begin with the same output layers (same source, layer and scale, in
order) feed the same windows through the same computation up to the end of that shared
prefix, so the residual stream there is the same tensor, bit for bit. The evaluator keeps
it (keyed by the prefix and by the output config's values the prefix's layers can see)
and a later candidate runs only its remaining layers plus the norm and head.

The model's own forward still runs: embeddings, rotary tables and attention masks are
computed exactly as without the cache, and the prefix's layers are replaced by stand-ins
that hand back the kept state. Every supported family's decoder passes one tensor from
layer to layer and picks masks by output index, so this is family-agnostic; a family
whose layers read the total depth would have to be left out (none of dus's families do).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn as nn

DEFAULT_BUDGET = 512 * 2**20
STRIDE = 2  # keep the state after every other layer and at every segment boundary


class PrefixCache:
    """Hidden states (one per forward call of the scorer) after a prefix, least recently
    used dropped first once their bytes pass `budget`."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget, self.bytes = budget, 0
        self.entries: OrderedDict[tuple, tuple[list[torch.Tensor], int]] = OrderedDict()
        self.hits = self.misses = self.layers_skipped = self.layers_run = 0

    def longest(self, keys: list[tuple]) -> tuple[int, list[torch.Tensor] | None]:
        """(p, states) for the longest cached prefix; keys[q - 1] is prefix q's key."""
        for q in range(len(keys), 0, -1):
            entry = self.entries.get(keys[q - 1])
            if entry is not None:
                for shorter in keys[:q]:  # the path's shorter prefixes stay as fresh as it
                    if shorter in self.entries:
                        self.entries.move_to_end(shorter)
                return q, entry[0]
        return 0, None

    def put(self, key: tuple, states: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in states)
        if size > self.budget or key in self.entries:
            return
        self.entries[key] = (states, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "layers_skipped": self.layers_skipped,
                "layers_run": self.layers_run, "entries": len(self.entries), "bytes": self.bytes}


def prefix_keys(path: list[tuple], config: dict, adapter) -> list[tuple]:
    """keys[q - 1] for q = 1..len(path): the first q layers of `path` ((model, layer,
    scale) per output layer) and the config as those layers see it: per-layer fields cut
    to q entries, layer-index fields to indices below q, the depth left out. Thresholds
    (Qwen's max_window_layers) only derive layer_types when it is absent, so they count
    only then; any other field is kept whole and must match."""
    per_layer, layer_index = adapter.per_layer_fields, adapter.layer_index_fields
    ignored = {"num_hidden_layers", *per_layer, *layer_index}
    if isinstance(config.get("layer_types"), list):
        ignored.update(adapter.layer_threshold_fields)
    common = {k: v for k, v in config.items() if k not in ignored}
    common_text = json.dumps(common, sort_keys=True, default=str)
    keys = []
    for q in range(1, len(path) + 1):
        cut = {f: config[f][:q] for f in per_layer if isinstance(config.get(f), list)}
        cut.update({f: sorted(i for i in config[f] if i < q) for f in layer_index if isinstance(config.get(f), list)})
        keys.append((tuple(path[:q]), common_text, json.dumps(cut, sort_keys=True, default=str)))
    return keys


def store_points(path: list[tuple], start: int, stride: int = STRIDE) -> list[int]:
    """Prefix lengths worth keeping after a run that began at `start`: segment boundaries
    (where the next layer is not the continuation of the previous one), every `stride`-th
    length and the whole path; deepest first, so that shallow prefixes, shared by more
    candidates, are the most recently used."""
    points = {len(path)} | {q for q in range(1, len(path)) if q % stride == 0}
    for q in range(1, len(path)):
        (model, layer, scale), (next_model, next_layer, next_scale) = path[q - 1], path[q]
        if (next_model, next_layer, next_scale) != (model, layer + 1, scale):
            points.add(q)
    return sorted((q for q in points if q > start), reverse=True)


class _StandIn(nn.Module):
    """A prefix layer not run: the last one hands back the kept state of this forward call,
    the others pass their input on (nobody reads it)."""

    def __init__(self, states: list[torch.Tensor] | None):
        super().__init__()
        self.states, self.calls = states, 0

    def forward(self, hidden_states, *args, **kwargs):
        if self.states is None:
            return hidden_states
        if self.calls >= len(self.states):
            raise RuntimeError("the prefix cache holds fewer forward calls than this scoring made")
        state = self.states[self.calls]
        self.calls += 1
        if state.shape != hidden_states.shape:
            raise RuntimeError(f"a kept prefix state has shape {tuple(state.shape)}, the forward {tuple(hidden_states.shape)}")
        return state.clone()  # a layer may write into its input; the kept state stays intact


@contextmanager
def run_from(layers: nn.ModuleList, skip: int, states: list[torch.Tensor] | None, capture: list[int]):
    """Within the block, layers [0, skip) are stand-ins replaying `states`, and the output
    of layer q - 1 is collected for each q in `capture`; yields {q: [state per call]}."""
    originals = list(layers)
    captured: dict[int, list[torch.Tensor]] = {q: [] for q in capture}
    handles = []
    replay = _StandIn(states) if skip else None
    try:
        for index in range(skip):
            layers[index] = replay if index == skip - 1 else _StandIn(None)
        for q in capture:
            handles.append(originals[q - 1].register_forward_hook(_collector(captured[q])))
        yield captured
        if replay is not None and replay.calls != len(states):
            raise RuntimeError(f"the scoring made {replay.calls} forward calls; the prefix cache holds {len(states)}")
    finally:
        for handle in handles:
            handle.remove()
        for index, layer in enumerate(originals):
            layers[index] = layer


class NotCacheable(RuntimeError):
    """A layer returned something other than the hidden-state tensor: no stand-in can."""


def _collector(into: list):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise NotCacheable(f"{type(module).__name__} returns {type(output).__name__}, not the hidden states")
        into.append(output.detach().clone())

    return hook
