"""Write an :class:`~stableflows.ood.analysis.OODResult` as ``ood.json`` and a self-contained
``ood.html`` (tables + PNG figures embedded as base64; no external files or scripts).

Figures (paper 004): bits/dim histograms of train / test / OOD sets (Fig. 2), the decomposition
into ``log p(z)`` and log-det (Fig. 4) and per scale / layer, constant inputs and graying
(App. D, Fig. 6b), the second-order predictions next to the measured gaps (sec. 5), the AUROC of
every score, and the ensemble (App. E).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["write_report", "figures", "to_json"]

IN_COLORS = {"train": "black", "val": "gray", "test": "tab:blue"}
HIST_BINS = 40
ZOOM_MARGIN_BPD = 1.0  # bits/dim around the in-distribution range in the zoomed histogram


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """Non-finite floats -> None (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.bool_, np.ndarray)):
        return _clean(_json_default(o))
    return o


def to_json(summary: dict) -> str:
    return json.dumps(_clean(summary), indent=2, sort_keys=False, default=_json_default)


# ----------------------------------------------------------------------------- figures
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(names):
    """One colour per set, the same in every figure (and the same family as in the audit report)."""
    from ..audit.fmt import family_colors

    return family_colors(list(names))


def _finite(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a)]


def _hist(ax, data: dict, colors: dict, lo: float, hi: float, xlabel: str) -> None:
    bins = np.linspace(lo, hi, HIST_BINS + 1)
    for name, a in data.items():
        a = _finite(a)
        a = a[(a >= lo) & (a <= hi)]
        if a.size:
            ax.hist(a, bins=bins, density=True, histtype="step" if name in IN_COLORS else "stepfilled",
                    alpha=1.0 if name in IN_COLORS else 0.35, color=colors[name], lw=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")


def _range(data: dict) -> tuple[float, float]:
    vals = np.concatenate([_finite(a) for a in data.values()] or [np.zeros(1)])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.quantile(vals, [0.005, 0.995])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 1, float(hi) + 1)


def _sets_in_order(arrays: dict, key: str) -> dict:
    d = arrays[key]
    order = [k for k in ("train", "test") if k in d] + [k for k in d if k not in ("train", "val", "test")]
    return {k: d[k] for k in order}


def figures(result) -> dict[str, str]:
    """``{name: base64 PNG}`` of every figure of the report."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s, a = result.summary, result.arrays
    figs: dict[str, str] = {}
    bpd = _sets_in_order(a, "bpd")
    colors = _colors(bpd)

    # Fig. 2: bits/dim histograms, all sets and zoomed on the in-distribution range
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _hist(axes[0], bpd, colors, *_range(bpd), "bits/dim")
    axes[0].set_title("bits/dim of every set")
    axes[0].legend(fontsize=7)
    ind = np.concatenate([_finite(bpd[k]) for k in ("train", "test") if k in bpd])
    lo, hi = float(ind.min()) - ZOOM_MARGIN_BPD, float(ind.max()) + ZOOM_MARGIN_BPD
    _hist(axes[1], bpd, colors, lo, hi, "bits/dim")
    none = [k for k, v in bpd.items() if not np.isfinite(np.asarray(v, dtype=float)).any()]
    if none:
        axes[0].text(0.01, 0.98, "no likelihood: " + ", ".join(none), transform=axes[0].transAxes, va="top",
                     fontsize=7)
    axes[1].set_title("zoom on the in-distribution range")
    axes[1].legend(fontsize=7)
    figs["bpd_histograms"] = _png(fig)

    # Fig. 4: log p(z) and log-det per dimension
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, lab in ((axes[0], "log_pz_per_dim", "log p(z) / D (nats)"),
                         (axes[1], "logdet_per_dim", "log|det dz/dx| / D (nats)")):
        d = _sets_in_order(a, key)
        lo, hi = _range(d)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        _hist(ax, d, colors, lo, hi, lab)
    axes[0].set_title("latent term")
    axes[1].set_title("volume term")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    figs["decomposition"] = _png(fig)

    # per scale and per layer
    dec = {k: v for k, v in s["decomposition"].items() if v and k != "val"}
    if dec:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        names = list(dec)
        scales = [r["scale"] for r in next(iter(dec.values()))["scales"]]
        w = 0.8 / max(len(names), 1)
        x = np.arange(len(scales))
        for i, n in enumerate(names):
            ld = [r["logdet_mean"] + r["log_pz_mean"] for r in dec[n]["scales"]]
            axes[0].bar(x + i * w, ld, w, color=colors.get(n, "gray"), label=n)
        axes[0].set_xticks(x + w * (len(names) - 1) / 2, scales)
        axes[0].set_ylabel("mean log p(z_k) + logdet_k (nats)")
        axes[0].set_title("contribution of each scale to log p(x)")
        for n in names:
            axes[1].plot([r["logdet_mean"] for r in dec[n]["layers"]], marker=".", color=colors.get(n, "gray"), label=n)
        axes[1].set_xlabel("layer (forward order)")
        axes[1].set_ylabel("mean log-det (nats)")
        axes[1].set_title("log-det per layer")
        axes[1].legend(fontsize=7)
        figs["decomposition_layers"] = _png(fig)

    # App. D and Fig. 6b
    p = s["probes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lv, bc = a["constant_bpd"]
    axes[0].plot(lv, bc, "o-", color=colors.get("constant", "tab:red"), label="constant image at level l")
    if s["sets"]["test"]["bpd"].get("mean") is not None:
        axes[0].axhline(s["sets"]["test"]["bpd"]["mean"], color=colors["test"], ls="--", label="test mean")
    if p["random"].get("mean") is not None:
        axes[0].axhline(p["random"]["mean"], color="dimgray", ls=":", label="random images mean")
    axes[0].set_xlabel("level l")
    axes[0].set_ylabel("bits/dim")
    axes[0].set_title("constant and random inputs")
    axes[0].legend(fontsize=7)
    g = p["graying"]
    for n, row in g.items():
        if n == "factors":
            continue
        axes[1].plot(g["factors"], [np.nan if v is None else v for v in row["mean"]], "o-", label=n,
                     color=colors.get(n, _colors(list(colors) + [n])[n]))
    axes[1].set_xlabel("contrast factor a (1 = original, 0 = constant)")
    axes[1].set_ylabel("mean bits/dim")
    axes[1].set_title("graying: x -> round(m + a (x - m)), m = mid level, then dequantised")
    axes[1].invert_xaxis()
    axes[1].legend(fontsize=7)
    figs["probes"] = _png(fig)

    # sec. 5: second order
    so = s.get("second_order") or {}
    fam = {k: v for k, v in so.get("families", {}).items() if "measured" in v}
    if fam:
        fig, ax = plt.subplots(figsize=(12, 4))
        keys = [("measured", "measured"), ("eq4", "Eq. 4"), ("eq5", "Eq. 5"), ("gauss_newton_diag", "Gauss-Newton diag"),
                ("paper_eq6", "paper Eq. 6 (literal)")]
        x = np.arange(len(fam))
        w = 0.8 / len(keys)
        for i, (k, lab) in enumerate(keys):
            ax.bar(x + i * w, [np.nan if fam[f].get(k) is None else fam[f][k] for f in fam], w, label=lab)
        ax.set_xticks(x + w * (len(keys) - 1) / 2, list(fam))
        ax.set_yscale("symlog")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("E_q log p - E_train log p (nats)")
        ax.set_title("second-order prediction vs measured likelihood gap")
        ax.legend(fontsize=7)
        figs["second_order"] = _png(fig)

    # AUROC heatmap
    sc = {f: v for f, v in s["scores"].items() if v is not None}  # sets without a likelihood have no AUROC
    if sc:
        fams = list(sc)
        names = list(next(iter(sc.values())))
        typ = [k for k in s["typicality"] if k != "M=1"]
        mat = np.array([[sc[f][n]["auroc"] for n in names] + [(s["typicality"][m].get(f) or {}).get("auroc", np.nan)
                                                               for m in typ] for f in fams], dtype=float)
        cols = names + [f"typicality {m} (batches)" for m in typ]
        fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 0.5 * len(fams) + 2))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="RdYlGn")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(fams)), fams)
        for i in range(len(fams)):
            for j in range(len(cols)):
                ax.text(j, i, "n/a" if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}", ha="center", va="center",
                        fontsize=7)
        fig.colorbar(im, ax=ax, label="AUROC (OOD = positive)")
        ax.set_title("OOD detection: AUROC of each score against the test split")
        figs["auroc"] = _png(fig)

    if "ensemble_bpd" in a:
        eb = _sets_in_order(a, "ensemble_bpd")
        fig, ax = plt.subplots(figsize=(7, 4))
        ind = np.concatenate([_finite(eb[k]) for k in ("train", "test") if k in eb])
        _hist(ax, eb, colors, float(ind.min()) - ZOOM_MARGIN_BPD, float(ind.max()) + ZOOM_MARGIN_BPD, "bits/dim")
        ax.set_title(f"ensemble of {s['ensemble']['members']} flows")
        ax.legend(fontsize=7)
        figs["ensemble"] = _png(fig)
    return figs


# ----------------------------------------------------------------------------- HTML
def _f(v, nd: int = 3) -> str:
    """bits/dim, AUROC and the like with ``nd`` decimals; see :func:`_e` for errors."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list, tuple)):
        from ..audit.fmt import settings_text

        return html.escape(settings_text(v) if isinstance(v, dict) else ", ".join(map(str, v)))
    return html.escape(str(v))


def _e(v) -> str:
    """An error or a small positive number: 4 significant digits in any magnitude (never 0.000000)."""
    from ..audit.fmt import num

    return "n/a" if v is None else html.escape(num(float(v)) if isinstance(v, (int, float, np.floating)) else str(v))


def _table(header: list, rows: list) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _html(result, figs: dict, title: str) -> str:
    s = result.summary
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>data: {html.escape(s['data']['name'])} {s['data']['shape']}, {s['data']['levels']} levels; "
             f"model parameters: {s['model']['n_params']}; constant volume: {_f(s['model']['constant_volume'])}; "
             f"training entropy estimate H = {_f(s['entropy_bpd_train'])} bits/dim</p>",
             "<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in s["findings"]) + "</ul>"]
    rows = []
    for k, v in s["sets"].items():
        inv = v.get("invertibility") or {}
        rows.append([html.escape(k), html.escape(s["data"]["descriptions"].get(k, "")), _f(v["bpd"]["n"]),
                     _f(v["bpd"].get("mean")), _f(v["bpd"].get("std")), _f(v["log_pz_per_dim"].get("mean")),
                     _f(v["logdet_per_dim"].get("mean")), _f(v["status"]["outside_domain"]),
                     _f(v["status"]["nonfinite"] + v["status"]["error"]), _f(inv.get("verdict")),
                     _f(inv.get("n_meaningless")), _e(inv.get("max_err"))])
    parts += ["<h2>Sets</h2>", _table(["set", "what", "n", "bpd mean", "bpd std", "log p(z)/D", "logdet/D",
                                        "outside domain", "non-finite", "inverse", "meaningless", "max round-trip err"],
                                       rows)]
    au = s.get("audit") or {}
    if au:
        parts.append("<h2>Invertibility audit (stableflows.audit): where a likelihood can be trusted</h2>")
        if "error" in au:
            parts.append(f"<p>audit failed: {html.escape(str(au['error']))}</p>")
        else:
            rows = [[html.escape(k), html.escape(v["status"]), f"{v['n_fail']}/{v['n_checked']}", _f(v["n_nonfinite"]),
                     _f(v["n_outside_domain"]), _e(v["max_error"]), _e(v["shadow_max_error"]),
                     html.escape(v.get("cause") or "-"),
                     html.escape(v.get("error") if v.get("status") == "could not run" else (v.get("culprit") or "-"))]
                    for k, v in au.items()]
            parts.append(_table(["family", "verdict", "fail", "non-finite", "outside domain", "max err",
                                 "max err float64", "cause", "first failing layer / error"], rows))
    if "bpd_histograms" in figs:
        parts.append("<h2>Bits/dim (paper 004 Fig. 2)</h2>" + _img(figs["bpd_histograms"]))
    sc = s["scores"]
    if any(v is not None for v in sc.values()):
        names = list(next(v for v in sc.values() if v is not None))
        rows = [[html.escape(f)] + ([f"{_f(sc[f][n]['auroc'])} / {_f(sc[f][n]['aupr_out'])}" for n in names] +
                                    [html.escape(s["best_score"][f]["score"])] if sc[f] is not None else
                                    ["no likelihood: no AUROC"] + [""] * len(names)) for f in sc]
        parts += ["<h2>OOD scores: AUROC / AUPR (OOD positive, test split negative)</h2>",
                  _table(["family"] + names + ["best"], rows)]
        typ = s["typicality"]
        rows = [[m, _f(r["threshold"]), _f(r["false_alarm_test"])] +
                [f"{_f(r[f]['auroc'])} / {_f(r[f]['detection_rate'])}" if r.get(f) else "n/a" for f in sc]
                for m, r in typ.items()]
        parts += ["<h3>Typicality test (Nalisnick et al. 2019b): batch AUROC / detection rate at the threshold "
                  f"(alpha = {s['config']['alpha']})</h3>",
                  _table(["batch size", "threshold (bpd)", "false alarms on test"] + list(sc), rows)]
        if "auroc" in figs:
            parts.append(_img(figs["auroc"]))
    parts.append("<h2>Decomposition log p(x) = log p(z) + log-det (paper 004 Fig. 4)</h2>")
    for key in ("decomposition", "decomposition_layers"):
        if key in figs:
            parts.append(_img(figs[key]))
    dec = s["decomposition"]
    rows = []
    for k, v in dec.items():
        if v:
            rows.append([html.escape(k)] + [f"{_f(r['log_pz_mean'], 2)} + {_f(r['logdet_mean'], 2)}" for r in v["scales"]]
                        + [f"{v['max_abs_sum_error']:.1e}"])
    if rows:
        scales = [r["scale"] for r in next(v for v in dec.values() if v)["scales"]]
        parts.append(_table(["set"] + [f"{n}: log p(z_k) + logdet_k" for n in scales] + ["sum check"], rows))
    parts.append("<h2>Constant and random inputs (App. D), graying (Fig. 6b)</h2>")
    if "probes" in figs:
        parts.append(_img(figs["probes"]))
    so = s.get("second_order")
    if so:
        parts.append("<h2>Second-order analysis (paper 004 sec. 5)</h2>")
        if "skipped" in so:
            parts.append(f"<p>skipped: {html.escape(so['skipped'])}</p>")
        else:
            rows = [[html.escape(f)] + ([_f(r.get(k), 2) for k in ("measured", "eq4", "eq5", "eq5_diag",
                                                                   "gauss_newton_diag", "paper_eq6", "trace_var_q")]
                                        if "measured" in r else [html.escape(r.get("skipped", ""))] + [""] * 6)
                    for f, r in so["families"].items()]
            if so.get("note"):
                parts.append(f"<p><b>note:</b> {html.escape(so['note'])}</p>")
            parts.append("<p>E_q[log p] - E_train[log p] in nats, expanded around the training mean; "
                         f"trace of the training variance {_f(next((r['trace_var_p'] for r in so['families'].values() if 'trace_var_p' in r), None), 2)}.</p>")
            parts.append(_table(["set", "measured", "Eq. 4", "Eq. 5", "Eq. 5 diag", "Gauss-Newton diag",
                                 "paper Eq. 6", "Tr var q"], rows))
            if "second_order" in figs:
                parts.append(_img(figs["second_order"]))
    if s.get("ensemble"):
        e = s["ensemble"]
        parts.append(f"<h2>Ensemble of {e['members']} flows (App. E)</h2>")
        rows = [[html.escape(f), _f(e["auroc"][f])] + [_f(m[f]) for m in e["member_auroc"]] for f in e["auroc"]]
        parts.append(_table(["family", "ensemble AUROC"] + [f"member {i}" for i in range(e["members"])], rows))
        if "ensemble" in figs:
            parts.append(_img(figs["ensemble"]))
    style = ("body{font-family:sans-serif;max-width:1250px;margin:auto}table{border-collapse:collapse;font-size:12px;"
             "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _img(b64: str) -> str:
    return f"<p><img src='data:image/png;base64,{b64}'></p>"


def write_report(result, out_dir, *, title: str = "stableflows OOD report") -> dict[str, Path]:
    """Write ``ood.json`` and ``ood.html`` into ``out_dir``; returns their paths."""
    from ..train.checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(result)
    paths = {"json": out / "ood.json", "html": out / "ood.html"}
    atomic_write_text(paths["json"], to_json(result.summary) + "\n")
    atomic_write_text(paths["html"], _html(result, figs, title))
    return paths
