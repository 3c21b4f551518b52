"""Per-layer diagnostics from hidden states: how far each layer turns its input
(angular distance), how large the residual stream grows (norm), and for `dus scan`
the distance between a layer's input and the input n layers later.

Notation: h_0 is the input of layer 0 (the embeddings as the model scales them), h_l
the input of layer l, h_L the output of the last layer *before* the final norm. The
states are read with hooks on the decoder blocks rather than `output_hidden_states`,
because transformers reports the last state after the final norm, which would make the
last layer look like it turns its input far more than it does.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from dus.compare.loading import decoder_layers


@contextmanager
def capture_layer_states(model):
    """While active, every forward pass appends h_0 .. h_L (each [batch, seq, hidden])
    to the yielded list; clear it between passes."""
    layers = decoder_layers(model)
    states: list = []

    def before_first(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def after(module, args, kwargs, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [layer.register_forward_hook(after, with_kwargs=True) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def angular_distance(a, b):
    """arccos(cos(a, b)) / pi along the last axis, in [0, 1]. Computed as
    2 atan2(|â - b̂|, |â + b̂|) / pi, which stays exact for nearly parallel vectors
    (arccos of a rounded cosine does not: an identity layer would read ~1e-4, not 0)."""
    import torch

    unit_a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return 2 * torch.atan2((unit_a - unit_b).norm(dim=-1), (unit_a + unit_b).norm(dim=-1)) / math.pi


class LayerStats:
    """Token sums of per-layer quantities over any number of windows, read out as means.

    `max_skip` = 1 keeps what `dus compare` plots (consecutive states); `dus scan` asks
    for every skip n up to the depth, d(h_l, h_{l+n}) for all l, n."""

    def __init__(self, max_skip: int | None = 1):
        self.max_skip = max_skip
        self.tokens = 0
        self.num_layers: int | None = None
        self._norm_sum = None
        self._angle_sum: dict[int, object] = {}
        self._cos_sum = None

    def update(self, states) -> None:
        """Add the tokens of one window: `states` is h_0 .. h_L, each [tokens, hidden]."""
        import torch

        with torch.no_grad():
            h = torch.stack([state.float() for state in states])  # [L+1, T, H]
            depth = h.shape[0] - 1
            if self.num_layers is None:
                self.num_layers = depth
                self._norm_sum = torch.zeros(depth + 1, dtype=torch.float64)
                self._cos_sum = torch.zeros(depth, dtype=torch.float64)
            elif depth != self.num_layers:
                raise ValueError(f"got {depth} layers after {self.num_layers}")
            self._norm_sum += h.norm(dim=-1).sum(-1).double().cpu()
            unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            self._cos_sum += (unit[:-1] * unit[1:]).sum(-1).sum(-1).double().cpu()
            for skip in range(1, min(self.max_skip or depth, depth) + 1):
                angles = angular_distance(h[:-skip], h[skip:]).sum(-1).double().cpu()
                if skip in self._angle_sum:
                    self._angle_sum[skip] += angles
                else:
                    self._angle_sum[skip] = angles
            self.tokens += h.shape[1]

    def _mean(self, tensor) -> list[float]:
        if not self.tokens:
            raise ValueError("no tokens seen")
        return [float(value) / self.tokens for value in tensor]

    def distance(self, skip: int = 1) -> list[float]:
        """d(h_l, h_{l+skip}) for l = 0 .. L-skip: mean angular distance over tokens."""
        if skip not in self._angle_sum:
            raise ValueError(f"skip {skip} not measured (max_skip={self.max_skip}, layers={self.num_layers})")
        return self._mean(self._angle_sum[skip])

    def distance_matrix(self) -> dict[int, list[float]]:
        return {skip: self.distance(skip) for skip in sorted(self._angle_sum)}

    def block_influence(self) -> list[float]:
        """ShortGPT's BI_l = 1 - E[cos(h_l, h_{l+1})]: how much layer l changes its input."""
        return [1.0 - value for value in self._mean(self._cos_sum)]

    def state_norms(self) -> list[float]:
        """Mean L2 norm of h_0 .. h_L."""
        return self._mean(self._norm_sum)

    def summary(self) -> dict:
        """The per-layer curves `dus compare` reports; index l is output layer l."""
        norms = self.state_norms()
        return {
            "tokens": self.tokens,
            "angular_distance": self.distance(1),
            "block_influence": self.block_influence(),
            "output_norm": norms[1:],
            "embedding_norm": norms[0],
        }
