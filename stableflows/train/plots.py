"""PNG figures of a run: the training curve, a grid of image samples, a scatter of 2-D samples.

Drawn with matplotlib's Agg canvas directly (no pyplot), so importing this module never changes
the backend of an interactive session. Every PNG is written atomically (a kill leaves the previous
file or the new one).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["image_shape", "to_unit_images", "save_curve", "curve_figure", "save_sample_grid", "save_scatter",
           "write_figures"]

GRID_PAD = 1  # pixels of padding between images of a grid
SCATTER_QUANTILE = 0.005  # the scatter's view spans the 0.5 %..99.5 % quantiles of all points (+ margin)
SCATTER_MARGIN = 0.05


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


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
    _save(fig, path)


def _square_view(points: list[np.ndarray]) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Common square limits of the panels: quantiles of all finite points, plus a margin."""
    pts = np.concatenate([p for p in points if len(p)]) if any(len(p) for p in points) else np.empty((0, 2))
    if not len(pts):
        return None
    lo = np.quantile(pts, SCATTER_QUANTILE, axis=0)
    hi = np.quantile(pts, 1.0 - SCATTER_QUANTILE, axis=0)
    centre, half = (lo + hi) / 2.0, max(float(np.max(hi - lo)) / 2.0, 1e-6) * (1.0 + SCATTER_MARGIN)
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def save_scatter(path: str | Path, panels: Mapping[str, Tensor | np.ndarray]) -> None:
    """One scatter per entry (title -> ``(n, 2)`` points) on the same square view; non-finite points
    are dropped and counted, points outside the view are counted."""
    fig = _figure(3.2 * len(panels), 3.4)
    clouds = {}
    for title, pts in panels.items():
        pts = np.asarray(pts.detach().cpu() if torch.is_tensor(pts) else pts, dtype=np.float64).reshape(-1, 2)
        clouds[title] = (pts[np.isfinite(pts).all(axis=1)], int((~np.isfinite(pts).all(axis=1)).sum()))
    view = _square_view([c for c, _ in clouds.values()])
    for i, (title, (pts, dropped)) in enumerate(clouds.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        notes = [f"{dropped} non-finite"] if dropped else []
        if view is not None:
            (x0, x1), (y0, y1) = view
            outside = int(((pts[:, 0] < x0) | (pts[:, 0] > x1) | (pts[:, 1] < y0) | (pts[:, 1] > y1)).sum())
            if outside:
                notes.append(f"{outside} outside the view")
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(title + (f" ({', '.join(notes)})" if notes else ""), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_curve(path: str | Path, history: Sequence[Mapping], metric: str, *, test: float | None = None,
               best_step: int | None = None, ema: bool = True) -> None:
    """Train and validation ``metric`` against step, the selected step and the test value
    (validation of the EMA weights when ``ema``, else of the live weights)."""
    _save(curve_figure(history, metric, test=test, best_step=best_step, ema=ema), path)


def curve_figure(history: Sequence[Mapping], metric: str, *, test: float | None = None,
                 best_step: int | None = None, ema: bool = True):
    """The figure of :func:`save_curve`."""
    evals = [r for r in history if r.get("kind") == "eval"]
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    val_label = "validation (EMA weights)" if ema else "validation"
    for key, style, label in ((f"train_{metric}", "-", "train (running mean)"), (f"val_{metric}", "o-", val_label)):
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
    return fig


SAMPLE_TEMPERATURES = (1.0, 0.7)  # samples.png panels (Glow, Kingma & Dhariwal 2018, sec. 5)
N_SAMPLES_IMAGE = 64
N_SAMPLES_TOY = 2000


def write_figures(out: str | Path, flow, splits, history: Sequence[Mapping], metric: str, *,
                  test: float | None = None, best_step: int | None = None, density: bool = True,
                  ema: bool = True) -> dict:
    """``curve.png`` and ``samples.png`` (image grid at T = 1.0 and 0.7, or a 2-D scatter) of a run.

    Returns the files written (``curve``, ``samples``) and how many samples were non-finite. A
    failure is recorded (``curve_error``, ``samples_error``), never raised, so a finished run keeps
    its metrics; a ``samples.png`` of an earlier session is then removed, so what the directory holds
    is what this call wrote. ``density=False`` (a classifier trained without a density term, whose
    samples would be noise) draws none and says why (``samples_skipped``).
    """
    from ..transforms.base import StableflowsError
    from .evaluate import draw_samples

    out = Path(out)
    info: dict = {}
    try:
        save_curve(out / "curve.png", history, metric, test=test, best_step=best_step, ema=ema)
        info["curve"] = "curve.png"
    except (OSError, RuntimeError, ValueError) as e:
        info["curve_error"] = f"{type(e).__name__}: {e}"
    img = image_shape(splits.shape) if splits.levels is not None else None
    try:
        if not density:
            info["samples_skipped"] = "the objective does not fit p(x) (classification without --nf-weight)"
        elif not callable(getattr(flow, "sample", None)):
            info["samples_skipped"] = f"{type(flow).__name__} has no sample()"
        elif img is not None:
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
        else:
            info["samples_skipped"] = f"no picture for data of shape {tuple(splits.shape)}"
    except (StableflowsError, RuntimeError, ValueError, OSError) as e:
        info["samples_error"] = f"{type(e).__name__}: {e}"
    if "samples" not in info:
        (out / "samples.png").unlink(missing_ok=True)
    return info
