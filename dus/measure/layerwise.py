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

from dus.errors import DusError


def decoder_layers(model):
    """The list of decoder blocks (`<prefix>.layers`), found without a per-family table."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DusError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers); this architecture is not supported")
    return layers


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


TOKEN_CHUNK = 256  # tokens per Gram-matrix batch: bounds the float64 working memory


class LayerStats:
    """Token sums of per-layer quantities over any number of windows, read out as means.

    For every token, the cosines between all pairs of states h_0 .. h_L come from one
    Gram matrix in float64, so every distance d(h_l, h_{l+n}) that `dus scan` needs
    costs about as much as the consecutive ones `dus compare` plots, and an identity
    layer reads < 1e-7 (arccos of a float32 cosine would read ~1e-4)."""

    def __init__(self, max_skip: int | None = 1):
        self.max_skip = max_skip  # largest n reported by distance_matrix(); None: all
        self.tokens = 0
        self.num_layers: int | None = None
        self._norm_sum = None  # [L+1]
        self._cos_sum = None  # [L+1, L+1]
        self._angle_sum = None  # [L+1, L+1], in units of pi

    def update(self, states) -> None:
        """Add the tokens of one window: `states` is h_0 .. h_L, each [tokens, hidden]."""
        import torch

        with torch.no_grad():
            depth = len(states) - 1
            if self.num_layers is None:
                self.num_layers = depth
                self._norm_sum = torch.zeros(depth + 1, dtype=torch.float64)
                self._cos_sum = torch.zeros(depth + 1, depth + 1, dtype=torch.float64)
                self._angle_sum = torch.zeros(depth + 1, depth + 1, dtype=torch.float64)
            elif depth != self.num_layers:
                raise ValueError(f"got {depth} layers after {self.num_layers}")
            tokens = states[0].shape[0]
            for begin in range(0, tokens, TOKEN_CHUNK):
                h = torch.stack([state[begin : begin + TOKEN_CHUNK].float() for state in states])  # [L+1, t, H]
                norms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float64)  # [L+1, t]
                self._norm_sum += norms.sum(-1).cpu()
                if self.max_skip is None:  # every pair (scan): one Gram matrix per token, in float64
                    unit = (h.double() / norms.clamp_min(1e-300).unsqueeze(-1)).transpose(0, 1)  # [t, L+1, H]
                    gram = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)  # [t, L+1, L+1]
                    self._cos_sum += gram.sum(0).cpu()
                    self._angle_sum += (torch.arccos(gram) / math.pi).sum(0).cpu()
                    continue
                # Only the diagonals reported (compare), from chords between unit vectors:
                # angle = 2 asin(|u - v| / 2) and 1 - cos = |u - v|^2 / 2 stay exact in float32
                # for nearly equal states (an identity layer reads 0), where arccos(cos) would not.
                unit = h / norms.float().clamp_min(1e-30).unsqueeze(-1)
                for skip in range(1, min(self.max_skip, depth) + 1):
                    chord = torch.linalg.vector_norm(unit[skip:] - unit[:-skip], dim=-1, dtype=torch.float64)
                    chord = chord.clamp(0.0, 2.0)
                    rows = torch.arange(depth + 1 - skip)
                    self._cos_sum[rows, rows + skip] += (1.0 - chord.square() / 2).sum(-1).cpu()
                    self._angle_sum[rows, rows + skip] += (2 * torch.asin(chord / 2) / math.pi).sum(-1).cpu()
            self.tokens += tokens

    def _mean(self, values) -> list[float]:
        if not self.tokens:
            raise ValueError("no tokens seen")
        return [float(value) / self.tokens for value in values]

    def distance(self, skip: int = 1) -> list[float]:
        """d(h_l, h_{l+skip}) = E[arccos(cos(h_l, h_{l+skip}))] / pi for l = 0 .. L-skip."""
        if self.num_layers is None or not 1 <= skip <= self.num_layers:
            raise ValueError(f"skip {skip} not measured (layers={self.num_layers})")
        return self._mean(self._angle_sum.diagonal(skip))

    def distance_matrix(self) -> dict[int, list[float]]:
        largest = self.num_layers if self.max_skip is None else min(self.max_skip, self.num_layers)
        return {skip: self.distance(skip) for skip in range(1, largest + 1)}

    def block_influence(self) -> list[float]:
        """ShortGPT's BI_l = 1 - E[cos(h_l, h_{l+1})]: how much layer l changes its input."""
        return [1.0 - value for value in self._mean(self._cos_sum.diagonal(1))]

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
