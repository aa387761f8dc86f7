"""Figures of the audit report (matplotlib, Agg backend) and the self-contained HTML page."""
from __future__ import annotations

import math

import torch

from .fmt import family_colors, num, settings_items
from .report import NONFINITE_COLOR, STATUS_COLORS, esc, png_base64
from .verdict import COULD_NOT_RUN, _fmt

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


def _colors(report) -> dict[str, str]:
    return family_colors(list(report.families) + list(report.attacks))


def fig_errors(report):
    """Per-example L2 reconstruction error per family (model dtype in the family's colour, float64
    shadow in gray, non-finite in orange at the right edge; families that could not run say so)."""
    plt = _plt()
    names = list(report.families) + list(report.attacks)
    colors = _colors(report)
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
    lo_tol = math.log10(report.verdict.tolerance)
    top = max(hi, lo_tol) + 1
    seen = set()
    for i, (nm, e, sh) in enumerate(rows):
        v = report.verdict.families.get(nm)
        y = i + 0.15 * (torch.rand(e.shape[0], generator=g, dtype=torch.float64) - 0.5)
        fin = torch.isfinite(e)
        ax.scatter(_log10(e[fin]), y[fin], s=6, color=colors[nm], alpha=0.7)
        bad = torch.isinf(e)
        if bool(bad.any()):
            ax.scatter(torch.full((int(bad.sum()),), top), y[bad], s=14, marker="x", color=NONFINITE_COLOR,
                       label="non-finite" if "nf" not in seen else None)
            seen.add("nf")
        if sh is not None:
            f2 = torch.isfinite(sh)
            ax.scatter(_log10(sh[f2]), y[f2] + 0.3, s=4, color="gray", alpha=0.4,
                       label="float64 shadow" if "sh" not in seen and bool(f2.any()) else None)
            if bool(f2.any()):
                seen.add("sh")
        if v is not None and v.status == COULD_NOT_RUN:
            ax.text(lo_tol, i, f"could not run {v.n_error}/{v.n or v.n_error} examples", fontsize=7,
                    va="center", color="black", bbox=dict(facecolor="#fff3c4", edgecolor="none"))
    ax.axvline(lo_tol, color="red", lw=1, ls="--", label="tolerance")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    for lbl, (nm, _, _) in zip(ax.get_yticklabels(), rows):
        lbl.set_color(colors[nm])
    ax.set_xlabel("log10 ||x - F^-1(F(x))||_2  (dots in the family's colour; non-finite at the right edge)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    return fig


def fig_repeated(report):
    """Error after k forward/inverse passes (paper 000 Fig. 4): median (solid) and max (dashed)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    colors = _colors(report)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    handles = []
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
        ax.plot(range(1, k + 1), med, marker="o", ms=3, color=colors[nm], label=nm)
        ax.plot(range(1, k + 1), mx, ls="--", color=colors[nm], lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("forward/inverse passes")
    ax.set_ylabel("||x_k - x||_2")
    fams = ax.legend(fontsize=6, ncol=3, loc="upper left", title="family", title_fontsize=6)
    ax.add_artist(fams)
    handles = [Line2D([], [], color="black", marker="o", ms=3, label="median over the examples"),
               Line2D([], [], color="black", ls="--", lw=0.8, label="max over the examples")]
    ax.legend(handles=handles, fontsize=6, loc="lower right")
    return fig


def fig_spectra(report):
    """Singular values of J_F and J_F^-1 at the sampled points, per family."""
    plt = _plt()
    names = [nm for nm, r in report.families.items() if r.spectra is not None]
    colors = _colors(report)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * max(len(names), 3) + 1.2), sharey=True)
    for ax, side in zip(axes, ("fwd", "inv")):
        for i, nm in enumerate(names):
            s = report.families[nm].spectra
            for what, marker in (("smin", "<"), ("smax", ">")):
                v = getattr(s, f"{side}_{what}")
                v = v[torch.isfinite(v) & (v > 0)]
                ax.scatter(_log10(v), torch.full((v.numel(),), float(i)), s=14, marker=marker, color=colors[nm],
                           alpha=0.7, label=(f"sigma_{what[1:]}" if i == 0 else None))
        ax.set_title("forward J_F(x)" if side == "fwd" else "inverse J_F^-1(z)", fontsize=9)
        ax.set_xlabel("log10 singular value")
        leg = ax.legend(fontsize=7)
        for h in leg.legend_handles:
            h.set_color("black")
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names, fontsize=8)
    for lbl, nm in zip(axes[0].get_yticklabels(), names):
        lbl.set_color(colors[nm])
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
    colors = _colors(report)
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3.2), squeeze=False)
    for ax, (nm, a) in zip(axes[0], report.attacks.items()):
        series = [("PGD", a.pgd.best_err, colors[nm], "-"), ("unperturbed start", a.pgd.start_err, "gray", "-")]
        if a.random is not None:
            series.insert(1, ("random points", a.random.best_err, colors[nm], ":"))
        for label, e, color, ls in series:
            e = e[~torch.isnan(e)]
            if not e.numel():
                continue
            fin = torch.sort(e[torch.isfinite(e)]).values
            ax.plot(range(fin.numel()), fin.clamp_min(TINY), color=color, ls=ls,
                    label=f"{label} ({int(torch.isinf(e).sum())} non-finite)")
        ax.axhline(report.verdict.tolerance, color="red", ls="--", lw=0.8, label="tolerance")
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
.bad{background:#f8d0d0}.na{background:#eee}.err{background:#fff3c4}h2{border-bottom:1px solid #ccc}
code{background:#f4f4f4;overflow-wrap:anywhere}.headline{font-size:15px;padding:6px;background:#fff3c4}
dl.settings{display:grid;grid-template-columns:max-content auto;gap:1px 12px;font-size:12px}
dl.settings dt{font-weight:bold}dl.settings dd{margin:0;overflow-wrap:anywhere}"""

STATUS_STYLE = {**STATUS_COLORS, COULD_NOT_RUN: "#fff3c4"}


def _img(fig) -> str:
    return "" if fig is None else f'<img src="data:image/png;base64,{png_base64(fig)}"/>'


def _dot(color: str) -> str:
    return f'<span style="color:{color}">&#9679;</span> '


def _verdict_table(report) -> str:
    head = ["family", "status", "failures", "non-finite", "outside domain", "max error", "median error",
            "max error float64", "cause", "first exploding layer / error"]
    colors = _colors(report)
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for v in report.verdict.families.values():
        color = STATUS_STYLE.get(v.status, "")
        style = f' style="background:{color}"' if color else ""
        name = _dot(colors.get(v.name, "black")) + esc(v.name)
        if v.status == COULD_NOT_RUN:
            cells = [name, esc(v.status), esc(f"{v.n_error}/{v.n} could not run"), "-", "-", "-", "-", "-", "-",
                     f"<code>{esc(v.error)}</code>"]
        else:
            checked = f"{v.n_fail}/{v.n_checked}" + (f" (of {v.n_total}: time budget)" if v.n_total else "")
            cells = [name, esc(v.status), esc(checked), esc(v.n_nonfinite), esc(v.n_outside_domain),
                     esc(_fmt(v.max_error)), esc(_fmt(v.median_error)),
                     esc(_fmt(v.shadow_max_error)) + (f" <small>({v.n_shadow} examples)</small>"
                                                      if v.n_shadow is not None and v.n_shadow < v.n_checked else ""),
                     esc(v.cause or "-"),
                     esc(v.culprit or "-") + (f" <small>({esc(v.culprit_reason)})</small>" if v.culprit else "")]
        out.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _stats_text(stats: dict) -> str:
    return ", ".join(f"{k} {num(v)}" for k, v in stats.items())


def _layer_table(loc, limit: int = 60) -> str:
    head = ["#", "layer", "kind", "gain", "max|act| inv", "max|act| fwd", "non-finite", "rel err in", "rel err out",
            "own round trip", "stats (inverse)"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in loc.layers[:limit]:
        cls = ' class="bad"' if r.name == loc.culprit else ""
        cells = [r.index, r.name, r.kind, _fmt(r.gain), _fmt(r.inv_absmax), _fmt(r.fwd_absmax), r.inv_nonfinite,
                 _fmt(r.rel_in), _fmt(r.rel_out), _fmt(r.roundtrip), _stats_text(r.stats_inverse)]
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    if len(loc.layers) > limit:
        out.append(f"<tr><td colspan='{len(head)}'>... {len(loc.layers) - limit} more layers in report.json</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())


def _messages_list(msgs: dict) -> str:
    return "<ul>" + "".join(f"<li>{c} &times; <code>{esc(m)}</code></li>" for m, c in msgs.items()) + "</ul>"


def _family_section(report, name) -> str:
    r = report.families[name]
    color = _colors(report).get(name, "black")
    parts = [f"<h3>{_dot(color)}{esc(name)}: {esc(r.description)}</h3>", f"<p>status <b>{esc(r.verdict.status)}</b>; "
             f"{esc(_counts_text(r.recon.counts()))}</p>"]
    if r.verdict.status == COULD_NOT_RUN:
        parts.append(f"<p class='headline'>could not run: <code>{esc(r.verdict.error)}</code></p>")
    if r.recon.messages:
        parts.append("<p>exceptions:</p>" + _messages_list(r.recon.messages))
    if r.generation:
        g = r.generation
        text = _counts_text({k: v for k, v in g.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        extra = ""
        if g.get("clipped_entries"):
            extra += "; clipped entries per layer: " + esc(", ".join(f"{k} {v}" for k, v in g["clipped_entries"].items()))
        if g.get("note"):
            extra += f"; {esc(g['note'])}"
        parts.append(f"<p>generation x = F<sup>-1</sup>(z): {esc(text)}{extra}</p>")
        if g.get("messages"):
            parts.append(_messages_list(g["messages"]))
    if r.spectra is not None:
        s = r.spectra

        def q(t):
            t = t[torch.isfinite(t)]
            return f"{_fmt(float(t.min()))} .. {_fmt(float(t.max()))}" if t.numel() else "-"
        mm = s.logdet_mismatch
        how = s.method + (f", {s.steps} Lanczos steps" if s.method == "iterative" and s.steps else "")
        parts.append(f"<p>spectra ({esc(how)}, {s.dtype}, {s.index.numel()} points): forward sigma_min {q(s.fwd_smin)}, "
                     f"sigma_max {q(s.fwd_smax)}, cond {q(s.fwd_cond)}; inverse sigma_min {q(s.inv_smin)}, "
                     f"sigma_max {q(s.inv_smax)}, cond {q(s.inv_cond)}"
                     + (f"; |analytic - numerical log-det| max {q(mm)}" if mm is not None else "") + "</p>")
    if r.localization is not None:
        loc = r.localization
        if loc.note and not loc.layers:
            parts.append(f"<p>localisation: {esc(loc.note)}</p>")
        else:
            parts.append(f"<p>localisation through {esc(loc.path)} ({loc.mode}, {loc.n_examples} worst examples): "
                         f"culprit <b>{esc(loc.culprit or 'none')}</b> {esc(loc.reason)}; largest gain: "
                         f"{esc(loc.max_gain_layer)}" + (f"; {esc(loc.note)}" if loc.note else "") + "</p>")
            parts.append(_img(fig_localization(name, loc)))
            parts.append(f"<details><summary>per-layer table</summary>{_layer_table(loc)}</details>")
    if r.preview is not None:
        parts.append(_img(fig_images(f"{name}: inputs and reconstructions",
                                     [("x", r.preview["x"]), ("F^-1(F(x))", r.preview["x_hat"])])))
    return "\n".join(parts)


def _settings(d: dict) -> str:
    return ("<dl class='settings'>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in settings_items(d))
            + "</dl>")


def render_html(report) -> str:
    m = report.meta
    v = report.verdict
    overall = "COULD NOT RUN" if v.could_not_run else ("NOT INVERTIBLE" if v.failing else "INVERTIBLE")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>stableflows audit: {overall}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>Invertibility audit: {overall}</h1>"]
    if v.could_not_run:
        parts.append(f"<p class='headline'>could not run {len(v.could_not_run)} of {len(v.families)} families "
                     f"({esc(', '.join(v.could_not_run))}): <code>{esc(v.first_error)}</code>"
                     + (f"; not invertible: {esc(', '.join(v.failing))}" if v.failing else "") + "</p>")
    parts += [f"<p>model <code>{esc(m.get('model'))}</code>, dtype {esc(m.get('dtype'))}, float64 shadow "
              f"{'yes' if m.get('shadow') else 'no'}; tolerance {num(v.tolerance)} ({esc(v.criterion)} error); "
              f"localisation: {esc(m.get('localization', '-'))}</p>",
              _verdict_table(report)]
    if report.notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    budget = m.get("budget") or {}
    if budget.get("seconds") is not None:
        cuts = budget.get("cuts") or []
        parts.append(f"<p>time budget {num(budget['seconds'])} s" + ("; cut to keep it:" if cuts else ": nothing cut")
                     + "</p>" + ("<ul>" + "".join(f"<li>{esc(c)}</li>" for c in cuts) + "</ul>" if cuts else ""))
    parts.append("<p>timings: " + esc(", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())) + "</p>")
    parts += ["<h2>Reconstruction errors</h2>", _img(fig_errors(report))]
    if any(r.repeated is not None for r in report.families.values()):
        parts += ["<h2>Repeated forward/inverse passes</h2>", _img(fig_repeated(report))]
    if any(r.spectra is not None for r in report.families.values()):
        parts += ["<h2>Jacobian spectra</h2>", _img(fig_spectra(report))]
    if report.attacks:
        parts += ["<h2>PGD attack</h2>", _img(fig_attacks(report))]
        for nm, a in report.attacks.items():
            pct = a.pgd.pct_nonfinite
            parts.append(f"<p><b>{esc(nm)}</b>: {esc(a.pgd.status)}"
                         + (f" ({esc(a.pgd.message)})" if a.pgd.message else "")
                         + f"; non-finite reconstructions {num(pct)} % (PGD's points)"
                         + (f"; the random baseline found the worse point for {int(a.from_random.sum())} of "
                            f"{a.from_random.numel()} examples, and the verdict judges those"
                            if a.from_random is not None and bool(a.from_random.any()) else "")
                         + "</p>" + _settings(a.pgd.settings))
            if a.preview is not None:
                parts.append(_img(fig_images(f"{nm}: start, attacked input (the worse of PGD and random), "
                                             "its reconstruction",
                                             [("x", a.preview["x"]), ("x'", a.preview["x_adv"]),
                                              ("F^-1(F(x'))", a.preview["x_hat"])])))
    parts.append("<h2>Families</h2>")
    parts += [_family_section(report, nm) for nm in report.families]
    parts.append(f"<h2>Settings</h2>{_settings(m)}</body></html>")
    return "\n".join(p for p in parts if p)
