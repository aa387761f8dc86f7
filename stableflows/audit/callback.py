"""Track invertibility during training (paper 000 Fig. 2 and 5; Fig. 10-20 of its appendix).

For a fixed minibatch, every ``every`` steps: the per-example reconstruction errors
``||x - F^-1(F(x))||_2`` (non-finite ones kept and drawn in orange), and the condition number and
min/max singular values of the forward Jacobian at the first ``spectra_points`` examples::

    tracker = InvertibilityTracker(x_batch, every=50)
    for step in range(steps):
        ...optimiser step...
        tracker(step, flow)
    tracker.plot("stability.png")

With :func:`stableflows.train.train`, whose callbacks are ``cb(event, record)`` after each evaluation,
pass ``tracker.loop_callback(flow)`` (it runs on every ``"eval"`` event, whatever ``every`` says).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import as_invertible
from .reconstruction import reconstruct
from .spectra import spectra

__all__ = ["InvertibilityTracker"]


class InvertibilityTracker:
    """A callable ``(step, model) -> None`` recording invertibility on a fixed minibatch.

    Args:
        x: the fixed minibatch in model space ``(B, *shape)``; integer levels when ``levels`` is
            given (dequantised once with noise of seed ``seed``).
        every: record when ``step % every == 0``.
        spectra_points: examples whose Jacobian spectrum is computed (0 disables).
        spectra_method: ``"exact"``, ``"iterative"`` or ``"auto"``.
        float64: compute the spectra on a float64 copy of the model (exact but a copy per record).
    """

    def __init__(self, x: Tensor, *, every: int = 100, spectra_points: int = 8, spectra_method: str = "auto",
                 levels: int | None = None, seed: int = 0, float64: bool = True, tolerance: float = 1e-3):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if levels is not None:
            g = torch.Generator().manual_seed(seed)
            x = (x.double() + torch.rand(x.shape, generator=g, dtype=torch.float64)) / levels
        self.x = x.detach().clone()
        self.every, self.spectra_points, self.spectra_method = int(every), int(spectra_points), spectra_method
        self.float64, self.tolerance = float64, float(tolerance)
        self.steps: list[int] = []
        self.errors: list[Tensor] = []  # (B,) float64, inf = non-finite
        self.smin: list[Tensor] = []  # (P,)
        self.smax: list[Tensor] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        self.record(step, model)

    def record(self, step: int, model: nn.Module) -> None:
        """Record now, whatever ``every`` says."""
        m = as_invertible(model)
        with m.eval_mode():
            x = self.x.to(m.dtype)
            rec = reconstruct(m, x, keep=False)
            e = rec.err_l2.clone()
            e[rec.raised | torch.isnan(e)] = math.inf
            p = min(self.spectra_points, x.shape[0])
            smin = smax = torch.full((p,), math.nan, dtype=torch.float64)
            if p > 0:
                target = m.shadow(torch.float64) if self.float64 else None
                target = target if target is not None else m
                s = spectra(target, x[:p].to(target.dtype), torch.arange(p), method=self.spectra_method)
                smin, smax = s.fwd_smin, s.fwd_smax
        self.steps.append(int(step))
        self.errors.append(e)
        self.smin.append(smin)
        self.smax.append(smax)

    def loop_callback(self, model: nn.Module):
        """A ``cb(event, record)`` for :func:`stableflows.train.train`: records ``model`` on every
        ``"eval"`` event, at ``record["step"]``."""
        def cb(event: str, record: dict) -> None:
            if event == "eval":
                self.record(int(record.get("step", len(self.steps))), model)
        return cb

    # ------------------------------------------------------------------ results
    def history(self) -> dict:
        """``steps (T,)``, ``errors (T, B)``, ``sigma_min / sigma_max / cond (T, P)``; float64."""
        if not self.steps:
            return {"steps": torch.zeros(0), "errors": torch.zeros(0, self.x.shape[0])}
        smin, smax = torch.stack(self.smin), torch.stack(self.smax)
        return {"steps": torch.tensor(self.steps), "errors": torch.stack(self.errors), "sigma_min": smin,
                "sigma_max": smax, "cond": smax / smin}

    def to_dict(self) -> dict:
        from .report import jsonable

        return jsonable(self.history())

    def plot(self, path: str | Path) -> Path:
        """Paper 000 Fig. 2/5: per-example errors per step (non-finite in orange at the top),
        condition number, max and min singular value (median over the points, range shaded)."""
        from .plots import _plt
        from .report import NONFINITE_COLOR

        plt = _plt()
        h = self.history()
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
        steps = h["steps"].double()
        if len(self.steps):
            err = h["errors"]
            fin = torch.isfinite(err)
            top = float(err[fin].max()) * 10 if bool(fin.any()) else 1.0
            s_rep = steps[:, None].expand_as(err)
            axes[0].scatter(s_rep[fin], err[fin].clamp_min(1e-300), s=4, alpha=0.5)
            if bool((~fin).any()):
                axes[0].scatter(s_rep[~fin], torch.full((int((~fin).sum()),), top), s=8, color=NONFINITE_COLOR,
                                label="inf / nan")
                axes[0].legend(fontsize=7)
            axes[0].axhline(self.tolerance, color="red", ls="--", lw=0.8)
            axes[0].set_yscale("log")
            for ax, key, title in ((axes[1], "cond", "condition number"), (axes[2], "sigma_max", "max singular value"),
                                   (axes[3], "sigma_min", "min singular value")):
                v = h[key]
                med = torch.nanmedian(v, dim=1).values if v.numel() else v
                ax.plot(steps, med, marker="o", ms=3)
                if v.shape[1] > 1:
                    lo = torch.nan_to_num(v, nan=math.inf).min(dim=1).values
                    hi = torch.nan_to_num(v, nan=-math.inf).max(dim=1).values
                    ax.fill_between(steps.numpy(), lo.numpy(), hi.numpy(), alpha=0.2)
                ax.set_yscale("log")
                ax.set_title(title, fontsize=9)
        axes[0].set_title("reconstruction error per example", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return p
