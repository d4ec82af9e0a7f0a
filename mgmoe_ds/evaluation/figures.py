"""The report's figures: the routing heatmap and the t-SNE of backbone and fused features."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing_heatmap(mean_weight: np.ndarray, expert_names: Sequence[str], class_names: Sequence[str],
                         path: Path) -> None:
    """(E, classes) mean routing weight per expert and category."""
    plt = _pyplot()
    width = min(24.0, 4.0 + 0.35 * len(class_names))
    show_names = len(class_names) <= 60
    label_room = 0.075 * max(map(len, class_names)) if show_names else 0.3  # rotated species names
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.45 * len(expert_names) + label_room))
    image = ax.imshow(mean_weight, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(mean_weight.max())))
    ax.set_yticks(range(len(expert_names)), expert_names)
    if show_names:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_xlabel("species")
    ax.set_title("mean routing weight per expert and species")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
