"""Pictures to read at a glance (matplotlib, Agg backend: no display needed).

Per-layer curves put every model on one figure, x = the model's own output layer index
(models of different depths each keep their own axis positions), one colour per model,
and the model's seams as dashed vertical lines in its colour, drawn between the two
layers that were not adjacent in their source. A second figure maps each model to
relative depth (0 = first layer, 1 = last) so a base and its up-scaled copies line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Curve:
    label: str
    values: list[float]  # one per output layer
    seams: list[int] = field(default_factory=list)


def _colors(count: int) -> list:
    plt = _pyplot()
    cycle = plt.get_cmap("tab10")
    return [cycle(i % 10) for i in range(count)]


def plot_layer_curves(curves: list[Curve], path: str | Path, title: str, ylabel: str, relative: bool = False, log_scale: bool | None = None) -> Path:
    """One line per model; seams dashed. `relative` puts layer l of an L-layer model at (l + 0.5) / L."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    seam_drawn = False
    for curve, color in zip(curves, _colors(len(curves))):
        depth = len(curve.values)
        xs = [(i + 0.5) / depth for i in range(depth)] if relative else list(range(depth))
        ax.plot(xs, curve.values, marker="o", markersize=3, linewidth=1.6, alpha=0.85, color=color, label=f"{curve.label} ({depth} layers)")
        for seam in curve.seams:
            x = seam / depth if relative else seam - 0.5
            ax.axvline(x, color=color, linestyle="--", linewidth=1.0, alpha=0.8, label=None if seam_drawn else "seam (dashed, model's colour)")
            seam_drawn = True
    positive = [v for curve in curves for v in curve.values if v > 0]
    if log_scale is None:
        log_scale = bool(positive) and max(positive) / min(positive) > 30
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("relative depth (layer + 0.5) / layers" if relative else "output layer index")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_perplexity(labels: list[str], values: dict[str, list[float]], path: str | Path, title: str = "Held-out perplexity per text (lower is better)") -> Path:
    """Grouped bars: one group per held-out text, one bar per model."""
    plt = _pyplot()
    domains = list(values)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(labels) * len(domains) + 2), 4.5))
    for i, (label, color) in enumerate(zip(labels, _colors(len(labels)))):
        xs = [d + (i - (len(labels) - 1) / 2) * width for d in range(len(domains))]
        bars = ax.bar(xs, [values[d][i] for d in domains], width, color=color, label=label)
        for bar in bars:
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_distance_heatmap(matrix: dict[int, list[float]], num_layers: int, path: str | Path, title: str) -> Path:
    """Gromov et al.'s picture: d(h_l, h_{l+n}) for every start l (x) and block size n (y)."""
    import numpy as np

    plt = _pyplot()
    grid = np.full((num_layers, num_layers), np.nan)
    for skip, values in matrix.items():
        grid[skip - 1, : len(values)] = values
    fig, ax = plt.subplots(figsize=(8, 6))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", extent=(-0.5, num_layers - 0.5, 0.5, num_layers + 0.5))
    fig.colorbar(image, ax=ax, label=r"angular distance $d(h_l, h_{l+n})$")
    ax.set_xlabel("first layer l of the block")
    ax.set_ylabel("block size n (layers)")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_scan_layers(distance: list[float], influence: list[float], path: str | Path, title: str, marked: list[int] = ()) -> Path:
    """Per-layer angular distance and block influence (both: how much the layer changes its input)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = list(range(len(distance)))
    ax.plot(xs, distance, marker="o", markersize=3, label="angular distance d(h_l, h_{l+1})")
    ax.plot(xs, influence, marker="s", markersize=3, label="block influence 1 - cos(h_l, h_{l+1})")
    for layer in marked:
        ax.axvline(layer, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("layer index")
    ax.set_ylabel("change of the residual stream")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
