"""The report's figures: routing share tables (species by expert) and the t-SNE of backbone and fused features."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


DPI = 100
MAX_HEIGHT_PIXELS = 16000  # a routing figure is never taller than this
MIN_LABEL_FONT = 4.0  # below this size the species names are left out (about 2,000 classes)
CHAR_WIDTH = 0.62  # a character's width in DejaVu Sans, in units of the font size (a safe average)
LINE_HEIGHT = 1.35  # a tick-label row's height, in units of the font size
MIN_WIDTH = 5.0  # inches


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def order_by_dominant_expert(share: np.ndarray) -> np.ndarray:
    """(C, E) share table -> (C,) row order: grouped by dominant expert, largest share first.

    The dominant expert of a class is its row's argmax (the lowest expert index on a tie). Rows go
    by dominant expert ascending, then by that share descending, then by class index; zero rows
    (classes with no images) come last.
    """
    dominant = share.argmax(axis=1)  # (C,)
    top_share = share.max(axis=1)  # (C,)
    group = np.where(top_share > 0, dominant, share.shape[1])  # (C,) empty rows form a group after the last expert
    # lexsort sorts by the last key first: group, then share descending, then class index
    return np.lexsort((np.arange(share.shape[0]), -top_share, group))


def _label_font(num_classes: int) -> float:
    """Species-name font size: 10 pt up to 32 classes, 0.6 pt smaller per doubling (7 pt at 1,000), 6 pt at least."""
    return float(np.clip(10.0 - 0.6 * np.log2(max(num_classes, 1) / 32), 6.0, 10.0))


def _save_small_png(fig, path: Path) -> None:
    """Saves with an adaptive 256-colour palette: a tall routing figure is about 8x smaller than in RGBA."""
    import io

    from PIL import Image  # a matplotlib dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256).save(path, format="PNG", optimize=True)


def plot_routing_share(share: np.ndarray, class_names: Sequence[str], expert_names: Sequence[str], title: str,
                       path: Path) -> list[str]:
    """Draws a (classes, experts) routing share table with one row per species, sorted by dominant expert.

    Species run down the long axis with their names as tick labels, experts across (named at the
    top and the bottom), colours on a fixed 0-1 scale so figures of different layers compare; thin
    white lines separate the dominant-expert groups. Font size and height grow with the number of
    classes: 2 to 1,000 classes are readable and the image stays under ``MAX_HEIGHT_PIXELS`` tall
    (past about 2,000 classes the names are left out).

    Args:
        share: (C, E) each species' share of its routing mass per expert (``class_expert_share``).
        class_names: C species names.
        expert_names: E expert names.
        title: the figure's title (wrapped to the figure's width).
        path: where the PNG goes.

    Returns:
        The y tick labels as drawn, top to bottom (empty when the names were left out).
    """
    import textwrap

    share = np.asarray(share, dtype=np.float64)
    num_classes, num_experts = share.shape
    if len(class_names) != num_classes or len(expert_names) != num_experts:
        raise ValueError(f"plot_routing_share: share is {share.shape} but there are {len(class_names)} class names "
                         f"and {len(expert_names)} expert names")
    plt = _pyplot()
    order = order_by_dominant_expert(share)  # (C,)
    rows = share[order]  # (C, E)

    # layout in inches: [title][top expert names][heatmap][bottom expert names][x label]
    expert_font, title_font = 9.0, 11.0
    title_line = LINE_HEIGHT * title_font / 72

    def wrapped(width: float) -> list[str]:
        return textwrap.wrap(title, width=max(20, int(width * 72 / (CHAR_WIDTH * title_font)))) or [""]

    expert_room = 0.1 + CHAR_WIDTH * expert_font * max(map(len, expert_names)) / 72
    bottom = expert_room + 0.35  # expert names, then the x label
    most_top = 0.15 + len(wrapped(MIN_WIDTH)) * title_line + expert_room  # the title wraps most at the least width
    budget = MAX_HEIGHT_PIXELS / DPI - most_top - bottom - 0.05  # room for the heatmap, a few pixels spare
    font = min(_label_font(num_classes), budget * 72 / (LINE_HEIGHT * max(num_classes, 1)))
    show_names = font >= MIN_LABEL_FONT
    row_height = LINE_HEIGHT * font / 72 if show_names else budget / num_classes
    heat_height = max(1.2, num_classes * row_height)
    label_room = 0.15 + (CHAR_WIDTH * font * max(map(len, class_names)) / 72 if show_names else 0.0)
    left = label_room + 0.3  # names, then the "species" axis label
    heat_width = max(1.6, 0.45 * num_experts)
    colourbar_room = 0.15 + 0.15 + 0.75  # gap, bar, its tick labels and label
    width = max(MIN_WIDTH, left + heat_width + colourbar_room)
    title_lines = wrapped(width)
    top = 0.15 + len(title_lines) * title_line + expert_room
    height = top + heat_height + bottom

    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, heat_width / width, heat_height / height))
    image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(num_experts), list(expert_names), rotation=90, fontsize=expert_font)
    ax.tick_params(axis="x", top=True, labeltop=True)
    ax.set_xlabel("expert")
    if show_names:
        ax.set_yticks(range(num_classes), [class_names[c] for c in order], fontsize=font)
        ax.tick_params(axis="y", length=2, pad=1)
        long_enough = heat_height >= 3.0  # inches: room along the axis for the whole label
        ax.set_ylabel(f"species ({num_classes}), grouped by dominant expert" if long_enough else "species")
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{num_classes} species, grouped by dominant expert (too many to name)")
    group = np.where(rows.max(axis=1) > 0, rows.argmax(axis=1), num_experts)  # (C,) sorted, non-decreasing
    for boundary in np.flatnonzero(np.diff(group)) + 1:
        ax.axhline(boundary - 0.5, color="white", linewidth=0.8)
    bar_height = min(heat_height, 3.0)  # a fixed-size bar at the top of a tall heatmap
    bar_ax = fig.add_axes(((left + heat_width + 0.15) / width, (bottom + heat_height - bar_height) / height,
                           0.15 / width, bar_height / height))
    fig.colorbar(image, cax=bar_ax).set_label("routing share", fontsize=8)
    fig.suptitle("\n".join(title_lines), fontsize=title_font, y=1 - 0.1 / height, va="top")
    drawn = [label.get_text() for label in ax.get_yticklabels()]
    _save_small_png(fig, path)
    plt.close(fig)
    return drawn


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(M, D) -> (M, 2) t-SNE (sklearn), perplexity capped for small M."""
    from sklearn.manifold import TSNE

    m = features.shape[0]
    if m < 3:
        return np.zeros((m, 2))
    perplexity = float(min(30.0, max(1.0, (m - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features.astype(np.float32))


def plot_tsne(backbone: np.ndarray, fused: np.ndarray, labels: np.ndarray, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, points, title in zip(axes, (backbone, fused), ("backbone (pooled) features", "fused (routed) logits")):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab20", s=6)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(np.unique(labels)) <= 20:
        axes[1].legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of {len(labels)} images, coloured by species")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
