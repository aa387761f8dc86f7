"""PNG figures of a run: the training curve, a grid of image samples, a scatter of 2-D samples.

Drawn with matplotlib's Agg canvas directly (no pyplot), so importing this module never changes
the backend of an interactive session.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["image_shape", "to_unit_images", "save_curve", "save_sample_grid", "save_scatter"]

GRID_PAD = 1  # pixels of padding between images of a grid


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def image_shape(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` for image data (also flattened square 1-channel images), else None."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape  # type: ignore[return-value]
    if len(shape) == 1 and shape[0] > 4:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return (1, side, side)
    return None


def to_unit_images(v: Tensor, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """Model-space samples (values in [0, 1)) as ``(n, H, W, C)`` in [0, 1]; non-finite -> 0.

    Returns the images and the number of samples that had any non-finite entry.
    """
    v = v.detach().to("cpu", torch.float64).reshape(v.shape[0], *shape)  # (n, C, H, W)
    bad = ~torch.isfinite(v)
    n_bad = int(bad.flatten(1).any(dim=1).sum())
    v = torch.where(bad, torch.zeros_like(v), v).clamp(0.0, 1.0)
    return v.permute(0, 2, 3, 1).numpy(), n_bad


def _tile(images: np.ndarray) -> np.ndarray:
    """``(n, H, W, C)`` -> one ``(rows*(H+p), cols*(W+p), C)`` mosaic."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.ones((rows * (h + GRID_PAD) + GRID_PAD, cols * (w + GRID_PAD) + GRID_PAD, c))
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + q * (w + GRID_PAD)
        out[y0:y0 + h, x0:x0 + w] = images[i]
    return out


def save_sample_grid(path: str | Path, panels: Mapping[str, np.ndarray]) -> None:
    """One tiled panel per entry (title -> ``(n, H, W, C)`` images in [0, 1])."""
    fig = _figure(3.2 * len(panels), 3.5)
    for i, (title, images) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        mosaic = _tile(images)
        if mosaic.shape[-1] == 1:
            ax.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(mosaic, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def save_scatter(path: str | Path, panels: Mapping[str, Tensor | np.ndarray]) -> None:
    """One scatter per entry (title -> ``(n, 2)`` points); non-finite points are dropped and counted."""
    fig = _figure(3.2 * len(panels), 3.4)
    first = None
    for i, (title, pts) in enumerate(panels.items()):
        pts = np.asarray(pts.detach().cpu() if torch.is_tensor(pts) else pts, dtype=np.float64)
        finite = np.isfinite(pts).all(axis=1)
        ax = fig.add_subplot(1, len(panels), i + 1, sharex=first, sharey=first)
        first = first or ax
        ax.scatter(pts[finite, 0], pts[finite, 1], s=2, alpha=0.5)
        dropped = int((~finite).sum())
        ax.set_title(title + (f" ({dropped} non-finite)" if dropped else ""), fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(path)


def save_curve(path: str | Path, history: Sequence[Mapping], metric: str, *, test: float | None = None,
               best_step: int | None = None) -> None:
    """Train and validation ``metric`` against step, the selected step and the test value."""
    evals = [r for r in history if r.get("kind") == "eval"]
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for key, style, label in ((f"train_{metric}", "-", "train (running mean)"), (f"val_{metric}", "o-", "validation (EMA)")):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label=label, markersize=3)
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"selected step {best_step}")
    if test is not None and math.isfinite(test):
        ax.axhline(test, color="black", linestyle="--", linewidth=0.8, label=f"test {test:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


SAMPLE_TEMPERATURES = (1.0, 0.7)  # samples.png panels (Glow, Kingma & Dhariwal 2018, sec. 5)
N_SAMPLES_IMAGE = 64
N_SAMPLES_TOY = 2000


def write_figures(out: str | Path, flow, splits, history: Sequence[Mapping], metric: str, *,
                  test: float | None = None, best_step: int | None = None) -> dict:
    """``curve.png`` and ``samples.png`` (image grid at T = 1.0 and 0.7, or a 2-D scatter) of a run.

    Returns what was written and how many samples were non-finite; a failure to sample is
    recorded (``samples_error``), never raised, so a finished run keeps its metrics.
    """
    from ..transforms.base import StableflowsError
    from .evaluate import draw_samples

    out = Path(out)
    info: dict = {}
    save_curve(out / "curve.png", history, metric, test=test, best_step=best_step)
    info["curve"] = "curve.png"
    img = image_shape(splits.shape) if splits.levels is not None else None
    if not callable(getattr(flow, "sample", None)):
        return info
    try:
        if img is not None:
            panels, bad = {}, {}
            for temp in SAMPLE_TEMPERATURES:
                v = draw_samples(flow, N_SAMPLES_IMAGE, temp)
                panels[f"T = {temp}"], bad[str(temp)] = to_unit_images(v, img)
            save_sample_grid(out / "samples.png", panels)
            info.update(samples="samples.png", samples_nonfinite=bad)
        elif tuple(splits.shape) == (2,):
            v = draw_samples(flow, N_SAMPLES_TOY, 1.0)
            save_scatter(out / "samples.png", {"data (test)": splits.test[:N_SAMPLES_TOY], "samples": v})
            info.update(samples="samples.png",
                        samples_nonfinite={"1.0": int((~torch.isfinite(v)).any(dim=1).sum())})
    except (StableflowsError, RuntimeError, ValueError) as e:
        info["samples_error"] = f"{type(e).__name__}: {e}"
    return info
