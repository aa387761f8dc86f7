"""Figures of the audit report (matplotlib, Agg backend) and the self-contained HTML page."""
from __future__ import annotations

import math

import torch

from .report import NONFINITE_COLOR, STATUS_COLORS, esc, png_base64
from .verdict import _fmt

__all__ = ["render_html", "fig_errors", "fig_repeated", "fig_spectra", "fig_localization", "fig_attacks",
           "fig_images"]

TINY = 1e-300  # floor before log10 of an error of exactly 0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log10(t: torch.Tensor) -> torch.Tensor:
    return torch.log10(t.double().clamp_min(TINY))


def fig_errors(report):
    """Per-example L2 reconstruction error per family (model dtype and float64 shadow)."""
    plt = _plt()
    names = list(report.families) + list(report.attacks)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    g = torch.Generator().manual_seed(0)
    hi = -1.0
    rows = [(nm, r.errors["l2"], None if r.shadow_errors is None else r.shadow_errors["l2"])
            for nm, r in report.families.items()]
    rows += [(nm, a.errors["l2"], None) for nm, a in report.attacks.items()]
    for e, sh in ((r[1], r[2]) for r in rows):
        fin = e[torch.isfinite(e)]
        if fin.numel():
            hi = max(hi, float(_log10(fin).max()))
    top = max(hi, math.log10(report.verdict.tolerance)) + 1
    for i, (nm, e, sh) in enumerate(rows):
        y = i + 0.15 * (torch.rand(e.shape[0], generator=g, dtype=torch.float64) - 0.5)
        fin = torch.isfinite(e)
        ax.scatter(_log10(e[fin]), y[fin], s=6, color="tab:blue", alpha=0.6, label="model dtype" if i == 0 else None)
        bad = torch.isinf(e)
        if bool(bad.any()):
            ax.scatter(torch.full((int(bad.sum()),), top), y[bad], s=10, color=NONFINITE_COLOR,
                       label="non-finite" if not getattr(ax, "_nf", False) else None)
            ax._nf = True
        if sh is not None:
            f2 = torch.isfinite(sh)
            ax.scatter(_log10(sh[f2]), y[f2] + 0.3, s=4, color="gray", alpha=0.4,
                       label="float64 shadow" if i == 0 else None)
    ax.axvline(math.log10(report.verdict.tolerance), color="red", lw=1, ls="--", label="tolerance")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xlabel("log10 ||x - F^-1(F(x))||_2  (non-finite at the right edge)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    return fig


def fig_repeated(report):
    """Error after k forward/inverse passes (paper 000 Fig. 4): median (solid) and max (dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for nm, r in report.families.items():
        if r.repeated is None:
            continue
        k = r.repeated.shape[1]
        med, mx = [], []
        for j in range(k):
            c = r.repeated[:, j]
            c = c[~torch.isnan(c)]
            cf = c[torch.isfinite(c)]
            med.append(float(cf.median()) if cf.numel() else math.nan)
            mx.append(float(cf.max()) if cf.numel() else math.nan)
        line = ax.plot(range(1, k + 1), med, marker="o", ms=3, label=nm)[0]
        ax.plot(range(1, k + 1), mx, ls="--", color=line.get_color(), lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("forward/inverse passes")
    ax.set_ylabel("||x_k - x||_2")
    ax.legend(fontsize=6, ncol=3)
    return fig


def fig_spectra(report):
    """Singular values of J_F and J_F^-1 at the sampled points, per family."""
    plt = _plt()
    names = [nm for nm, r in report.families.items() if r.spectra is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * max(len(names), 3) + 1.2), sharey=True)
    for ax, side in zip(axes, ("fwd", "inv")):
        for i, nm in enumerate(names):
            s = report.families[nm].spectra
            for what, color in (("smin", "tab:blue"), ("smax", "tab:red")):
                v = getattr(s, f"{side}_{what}")
                v = v[torch.isfinite(v) & (v > 0)]
                ax.scatter(_log10(v), torch.full((v.numel(),), float(i)), s=8, color=color, alpha=0.6,
                           label=f"sigma_{what[1:]}" if i == 0 else None)
        ax.set_title("forward J_F(x)" if side == "fwd" else "inverse J_F^-1(z)", fontsize=9)
        ax.set_xlabel("log10 singular value")
        ax.legend(fontsize=7)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    return fig


def fig_localization(name, loc):
    """Per-layer inverse gain and largest activation on the inverse path; the culprit in red."""
    plt = _plt()
    n = len(loc.layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * n + 2), 3.2))
    gains = [r.gain if r.gain and math.isfinite(r.gain) else math.nan for r in loc.layers]
    colors = ["tab:red" if r.name == loc.culprit else "tab:blue" for r in loc.layers]
    ax.bar(range(n), [math.log10(max(g, TINY)) if not math.isnan(g) else 0 for g in gains], color=colors)
    ax.set_ylabel("log10 gain of layer inverse")
    ax2 = ax.twinx()
    ax2.plot(range(n), [math.log10(max(r.inv_absmax, TINY)) if math.isfinite(r.inv_absmax) else math.nan
                        for r in loc.layers], color="black", marker=".", lw=0.8)
    ax2.set_ylabel("log10 max |activation|")
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{r.index}:{r.kind}" for r in loc.layers], rotation=90, fontsize=6)
    ax.set_title(f"{name}: inverse path (first applied on the left); culprit: {loc.culprit or 'none'}", fontsize=9)
    return fig


def fig_attacks(report):
    """Best error per example: PGD vs the same number of random points vs the unperturbed start."""
    plt = _plt()
    k = len(report.attacks)
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3.2), squeeze=False)
    for ax, (nm, a) in zip(axes[0], report.attacks.items()):
        series = [("PGD", a.pgd.best_err, "tab:red"), ("start", a.pgd.start_err, "gray")]
        if a.random is not None:
            series.insert(1, ("random", a.random.best_err, "tab:blue"))
        for label, e, color in series:
            e = e[~torch.isnan(e)]
            if not e.numel():
                continue
            fin = torch.sort(e[torch.isfinite(e)]).values
            ax.plot(range(fin.numel()), fin.clamp_min(TINY), color=color, label=f"{label} ({int(torch.isinf(e).sum())} inf)")
        ax.axhline(report.verdict.tolerance, color="red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{nm} ({a.pgd.status})", fontsize=9)
        ax.set_xlabel("examples (sorted)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("reconstruction error (L2)")
    return fig


def fig_images(title, rows):
    """Thumbnails: one row per (label, images (k, C, H, W)); non-finite pixels shown in orange."""
    plt = _plt()
    rows = [(lbl, t) for lbl, t in rows if t is not None and t.dim() == 4]
    if not rows:
        return None
    k = max(t.shape[0] for _, t in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k, 1.2 * len(rows)), squeeze=False)
    for i, (lbl, t) in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            ax.axis("off")
            if j >= t.shape[0]:
                continue
            img = t[j].double()
            bad = ~torch.isfinite(img).all(dim=0)
            img = torch.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1).permute(1, 2, 0)
            if img.shape[2] == 1:
                img = img.expand(-1, -1, 3).clone()
            img[bad] = torch.tensor([1.0, 0.55, 0.0], dtype=img.dtype)
            ax.imshow(img.numpy(), interpolation="nearest")
        axes[i][0].set_title(lbl, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- HTML
_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#f0f0f0}img{max-width:100%}
.bad{background:#f8d0d0}.na{background:#eee}h2{border-bottom:1px solid #ccc}code{background:#f4f4f4}"""


def _img(fig) -> str:
    return "" if fig is None else f'<img src="data:image/png;base64,{png_base64(fig)}"/>'


def _verdict_table(report) -> str:
    head = ["family", "status", "failures", "non-finite", "outside domain", "max error", "median error",
            "max error float64", "cause", "first exploding layer"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for v in report.verdict.families.values():
        color = STATUS_COLORS.get(v.status, "")
        style = f' style="background:{color}"' if color else ""
        cells = [v.name, v.status, f"{v.n_fail}/{v.n_checked}", v.n_nonfinite, v.n_outside_domain, _fmt(v.max_error),
                 _fmt(v.median_error), _fmt(v.shadow_max_error), v.cause or "-",
                 (v.culprit or "-") + (f" <small>({esc(v.culprit_reason)})</small>" if v.culprit else "")]
        out.append(f"<tr{style}>" + "".join(f"<td>{c if i == 9 else esc(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _layer_table(loc, limit: int = 60) -> str:
    head = ["#", "layer", "kind", "gain", "max|act| inv", "max|act| fwd", "non-finite", "rel err in", "rel err out",
            "own round trip", "stats (inverse)"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in loc.layers[:limit]:
        stats = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r.stats_inverse.items())
        cls = ' class="bad"' if r.name == loc.culprit else ""
        cells = [r.index, r.name, r.kind, _fmt(r.gain), _fmt(r.inv_absmax), _fmt(r.fwd_absmax), r.inv_nonfinite,
                 _fmt(r.rel_in), _fmt(r.rel_out), _fmt(r.roundtrip), stats]
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _family_section(report, name) -> str:
    r = report.families[name]
    parts = [f"<h3>{esc(name)}: {esc(r.description)}</h3>", f"<p>status <b>{esc(r.verdict.status)}</b>; "
             f"counts {esc(r.recon.counts())}</p>"]
    if r.recon.messages:
        parts.append(f"<p>exceptions: {esc(r.recon.messages)}</p>")
    if r.generation:
        parts.append(f"<p>generation x = F<sup>-1</sup>(z): {esc(r.generation)}</p>")
    if r.spectra is not None:
        s = r.spectra
        def q(t):
            t = t[torch.isfinite(t)]
            return f"{_fmt(float(t.min()))} .. {_fmt(float(t.max()))}" if t.numel() else "-"
        mm = s.logdet_mismatch
        parts.append(f"<p>spectra ({s.method}, {s.dtype}, {s.index.numel()} points): forward sigma_min {q(s.fwd_smin)}, "
                     f"sigma_max {q(s.fwd_smax)}, cond {q(s.fwd_cond)}; inverse sigma_min {q(s.inv_smin)}, "
                     f"sigma_max {q(s.inv_smax)}, cond {q(s.inv_cond)}"
                     + (f"; |analytic - numerical log-det| max {q(mm)}" if mm is not None else "") + "</p>")
    if r.localization is not None:
        loc = r.localization
        parts.append(f"<p>localisation ({loc.mode}, {loc.n_examples} worst examples): culprit "
                     f"<b>{esc(loc.culprit or 'none')}</b> {esc(loc.reason)}; largest gain: {esc(loc.max_gain_layer)}</p>")
        parts.append(_img(fig_localization(name, loc)))
        parts.append(f"<details><summary>per-layer table</summary>{_layer_table(loc)}</details>")
    if r.preview is not None:
        parts.append(_img(fig_images(f"{name}: inputs and reconstructions",
                                     [("x", r.preview["x"]), ("F^-1(F(x))", r.preview["x_hat"])])))
    return "\n".join(parts)


def render_html(report) -> str:
    m = report.meta
    overall = "INVERTIBLE" if report.verdict.invertible else "NOT INVERTIBLE"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>stableflows audit</title><style>{_CSS}</style>"
             "</head><body>", f"<h1>Invertibility audit: {overall}</h1>",
             f"<p>model <code>{esc(m.get('model'))}</code>, dtype {esc(m.get('dtype'))}, float64 shadow "
             f"{esc(m.get('shadow'))}; tolerance {report.verdict.tolerance:g} ({esc(report.verdict.criterion)} error)</p>",
             _verdict_table(report)]
    if report.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<p>timings: " + esc(", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())) + "</p>")
    parts += ["<h2>Reconstruction errors</h2>", _img(fig_errors(report))]
    if any(r.repeated is not None for r in report.families.values()):
        parts += ["<h2>Repeated forward/inverse passes</h2>", _img(fig_repeated(report))]
    if any(r.spectra is not None for r in report.families.values()):
        parts += ["<h2>Jacobian spectra</h2>", _img(fig_spectra(report))]
    if report.attacks:
        parts += ["<h2>PGD attack</h2>", _img(fig_attacks(report))]
        for nm, a in report.attacks.items():
            parts.append(f"<p>{esc(nm)}: {esc(a.pgd.status)} {esc(a.pgd.message)}; % non-finite "
                         f"{a.pgd.pct_nonfinite:.1f}; settings {esc(a.pgd.settings)}</p>")
            if a.preview is not None:
                parts.append(_img(fig_images(f"{nm}: start, PGD input, its reconstruction",
                                             [("x", a.preview["x"]), ("x'", a.preview["x_adv"]),
                                              ("F^-1(F(x'))", a.preview["x_hat"])])))
    parts.append("<h2>Families</h2>")
    parts += [_family_section(report, nm) for nm in report.families]
    parts.append(f"<h2>Settings</h2><pre>{esc(m)}</pre></body></html>")
    return "\n".join(p for p in parts if p)
