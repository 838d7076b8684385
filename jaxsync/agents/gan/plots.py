"""PNG pictures of GAN samples: a scatter over the modes (toys) and an image grid (digits)."""

from __future__ import annotations

import os

import numpy as np

from jaxsync import ConfigError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ConfigError naming the extra if missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plots need matplotlib: pip install -e '.[plots]' (or --plot_dir='')"
        ) from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def scatter_png(
    path: str, samples: np.ndarray, means: np.ndarray, sigma: float, title: str = ""
) -> str:
    """Generated 2-D samples (dots) over the mode centres (red crosses, 3σ circles)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.3, c="black")
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="red", s=30)
    for m in means:
        ax.add_patch(plt.Circle(m, 3 * sigma, fill=False, color="red", lw=0.5))
    lim = 1.3 * float(np.abs(means).max())
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    out = _save(fig, path)
    plt.close(fig)
    return out


def digits_grid_png(path: str, images: np.ndarray, title: str = "", rows: int = 10) -> str:
    """The first ``rows²`` images (n, 8, 8) in [0, 1] tiled into one grey picture."""
    plt = pyplot()
    images = np.asarray(images)[: rows * rows]
    pad = np.zeros((rows * rows, 9, 9), np.float32)
    pad[: len(images), :8, :8] = images
    tiled = pad.reshape(rows, rows, 9, 9).transpose(0, 2, 1, 3).reshape(rows * 9, rows * 9)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(tiled, cmap="gray_r", vmin=0, vmax=1)
    ax.set(xticks=[], yticks=[], title=title)
    out = _save(fig, path)
    plt.close(fig)
    return out
