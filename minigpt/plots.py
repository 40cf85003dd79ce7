"""Every chart minigpt draws: gradient flow, attention maps, loss curves and sweep comparisons.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, never through pyplot: no GUI
backend is picked, no global figure state is kept, so drawing works the same on a headless server, in a test,
and inside a notebook that uses another backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

# Characters that would be invisible or break the line on an axis
VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def to_array(figure: Figure) -> np.ndarray:
    """The figure's pixels as an (H, W, 3) uint8 array, the image TensorBoard's `add_image` takes."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(path, dpi=figure.dpi)
    return path


def gradient_flow(layers: list, title: str) -> Figure:
    """Mean and max |grad| of each layer (`gradient_health.LayerStats`), input side on the left: a healthy network
    has bars of similar height."""
    width, height = max(6.0, 0.45 * len(layers) + 2), 4.5
    figure = Figure(figsize=(width, height))
    # fixed margins (inches) with room for the rotated layer names: a layout engine measuring every label's
    # extent took more than half of the time this chart, drawn at every validation, cost
    figure.subplots_adjust(left=0.9 / width, right=1 - 0.2 / width, bottom=1.0 / height, top=1 - 0.8 / height)
    ax = figure.add_subplot()
    x = np.arange(len(layers))
    # zeros cannot be drawn on a log axis: a vanished gradient shows as a missing bar, which is the point
    ax.bar(x, [s.max_abs for s in layers], width=0.8, color="tab:cyan", alpha=0.5, label="max |grad|")
    ax.bar(x, [s.mean_abs for s in layers], width=0.8, color="tab:blue", label="mean |grad|")
    ax.set_yscale("log")
    ax.set_xticks(x, [s.name for s in layers], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("|gradient|")
    figure.suptitle(title)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False, fontsize=9)  # above the bars
    return figure


def attention_heads(weights: np.ndarray, tokens: list[str], title: str) -> Figure:
    """One heatmap per head of a layer, `weights` (nh, T, T): row = the query's token, column = the key's."""
    n_head, T, _ = weights.shape
    labels = ["".join(VISIBLE.get(c, c) for c in token) for token in tokens]
    side = 0.13 * T  # inches per head: room for one short label per row and column
    # BPE tokens are words and pieces of words: upright under the maps they would run into each other, so
    # they stand on end, and the margins grow with the longest (a 7-point monospace character is ~0.06 inch)
    longest = max(map(len, labels), default=1)
    label_inches = 0.06 * longest
    margin_left, margin_bottom, margin_top, colorbar = 0.55 + label_inches, 0.55 + label_inches, 0.5, 0.9
    width = margin_left + n_head * (side + 0.15) + colorbar
    height = margin_bottom + side + margin_top
    # Fixed margins and the characters as plain text, not tick labels: a tick is two markers, two texts and a
    # grid line, and building and laying out hundreds of them was 80% of the time this figure took to draw.
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=margin_left / width,
        right=1 - colorbar / width,
        bottom=margin_bottom / height,
        top=1 - margin_top / height,
        wspace=0.15 / side,
    )
    axes = figure.subplots(1, n_head, squeeze=False)[0]
    label_style = dict(fontsize=7, family="monospace", clip_on=False)
    for h, ax in enumerate(axes):
        # fixed, so that maps of different steps compare, and square-root: a query spreads its one unit of attention
        # over up to T keys, so most weights are small (1/T if even), and on a linear scale they drown in the dark
        # beside the first row's 1.0 (it can only attend to itself). The colour bar is marked in weights as they are.
        image = ax.imshow(weights[h], cmap="viridis", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
        ax.set_xticks([])
        ax.set_yticks([])
        for i, label in enumerate(labels):  # keys under each map; y grows downwards in an image
            ax.text(i, T - 0.5 + 0.4, label, ha="center", va="top", rotation=90 if longest > 1 else 0, **label_style)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=8, labelpad=8 + 72 * label_inches)
    for i, label in enumerate(labels):  # queries left of the first map, shared by the heads to its right
        axes[0].text(-0.5 - 0.4, i, label, ha="right", va="center", **label_style)
    axes[0].set_ylabel("query (attending)", fontsize=8, labelpad=8 + 72 * label_inches)
    colorbar_axes = figure.add_axes(
        (1 - colorbar / width + 0.15 / width, margin_bottom / height, 0.12 / width, side / height)
    )
    figure.colorbar(image, cax=colorbar_axes, label="attention weight")
    figure.suptitle(title)
    return figure


def loss_curve(
    train: tuple[list, list],
    val: tuple[list, list],
    lr: tuple[list, list] | None,
    title: str,
    lr_label: str = "learning rate",
) -> Figure:
    """Train and validation loss against step, each a (steps, values) pair; the learning rate on a second axis."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(*train, color="tab:blue", alpha=0.8, label="train/loss")
    ax.plot(*val, color="tab:orange", marker="o", label="val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr is not None and lr[0]:
        ax_lr = ax.twinx()
        ax_lr.plot(*lr, color="tab:gray", linestyle="--", label=lr_label)
        ax_lr.set_ylabel(lr_label)
        ax_lr.set_ylim(bottom=0)
        more_handles, more_labels = ax_lr.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    return figure


def sweep_comparison(curves: dict[str, tuple[list, list]], title: str) -> Figure:
    """Each job's validation loss against step, labelled by what sets it apart from the other jobs."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    finite = [v for _, values in curves.values() for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) > 10 * min(finite):  # a blown-up job would flatten the others on a linear axis
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return figure
