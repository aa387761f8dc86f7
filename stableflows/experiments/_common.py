"""Shared helpers of the experiments: data loading by name (``--data``), JSON that survives inf/NaN,
figures without a display, and the seed statistics of :mod:`stableflows.commands.reproduce`.

Seeds. An experiment run with several seeds (``stableflows reproduce NAME --seeds 0,1,2``) is
summarised per row (the row's key fields, e.g. ``model`` and ``reg``) by :func:`aggregate`: for every
numeric field the mean, the sample standard deviation over seeds (``ddof = 1``; 0 for one seed), the
values, and for booleans the count of seeds where it holds. A claim "A beats B" on a metric is
judged by :func:`paired`: the per-seed difference ``A - B`` (same seed, same data split, same
initialisation stream), its mean and standard deviation, and on how many seeds it has the claimed sign.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DEFAULT_DATA_DIRS", "load_data", "json_safe", "write_json", "figure", "levels_text", "aggregate",
           "paired", "Claim", "Report", "fmt", "seed_markdown", "Progress", "PROGRESS", "run_seeds"]

# data sets installed on the machines of this project (docs/METRICS.md): used when --data-dir is not given
DEFAULT_DATA_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}


def load_data(data: str = "digits", data_dir: str | None = None, seed: int = 0, *, flatten: bool = False, **kw):
    """:func:`stableflows.data.load_dataset` by name; ``fashion-mnist`` defaults to its installed folder."""
    from ..config import DataConfig
    from ..data import load_dataset

    data_dir = data_dir if data_dir is not None else DEFAULT_DATA_DIRS.get(data)
    return load_dataset(DataConfig(name=data, data_dir=data_dir, flatten=flatten, **kw), seed=seed)


def levels_text(levels: int | None) -> str:
    """How bits/dim are to be read: ``17 levels (uniform 4.087)`` / ``continuous``."""
    if levels is None:
        return "continuous data (nats)"
    return f"{levels} levels (uniform {math.log2(levels):.3f} bits/dim)"


def json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return json_safe(v.item())
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=2, default=str))


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if math.isfinite(v) else str(v)
    return str(v)


# ----------------------------------------------------------------------------- seeds
def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.floating, np.integer)):
        return float(v)
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return None


def _key(row: dict, keys: Sequence[str]) -> tuple:
    return tuple(row.get(k) for k in keys)


def aggregate(runs: Sequence[Sequence[dict]], keys: Sequence[str]) -> list[dict]:
    """Rows of several seeds (``runs[i]`` = the rows of seed ``i``) merged by ``keys``: per numeric
    field ``{"mean", "std", "n", "values"}`` (non-finite values are kept and make the mean non-finite;
    ``n_finite`` counts the finite ones), per boolean field ``{"true": k, "n": n}``."""
    order: list[tuple] = []
    groups: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            k = _key(r, keys)
            if k not in groups:
                order.append(k)
                groups[k] = []
            groups[k].append(r)
    out = []
    for k in order:
        rs = groups[k]
        row: dict = dict(zip(keys, k))
        for f in rs[0]:
            if f in keys:
                continue
            vals = [r.get(f) for r in rs]
            if all(isinstance(v, bool) for v in vals):
                row[f] = {"true": sum(vals), "n": len(vals)}
                continue
            nums = [_number(v) for v in vals]
            if any(x is None for x in nums):
                continue
            finite = [x for x in nums if math.isfinite(x)]
            mean = sum(nums) / len(nums) if len(finite) == len(nums) else (
                math.inf if any(x == math.inf for x in nums) else math.nan)
            std = statistics.stdev(nums) if len(finite) == len(nums) and len(nums) > 1 else (
                0.0 if len(nums) == 1 and finite else math.nan)
            row[f] = {"mean": mean, "std": std, "n": len(nums), "n_finite": len(finite), "values": nums}
        out.append(row)
    return out


@dataclass(frozen=True)
class Claim:
    """``a`` beats ``b`` on ``metric``: rows selected by ``{key: value}`` dicts; ``lower`` is better
    when True. ``text`` says what the paper claims."""

    text: str
    metric: str
    a: dict
    b: dict
    lower: bool = True


@dataclass(frozen=True)
class Report:
    """How ``reproduce --seeds`` summarises an experiment: the fields that identify a row of its
    ``summary["rows"]`` (``rows`` names another list), the claims to test on paired seeds, and the
    fields of the printed table."""

    keys: tuple
    claims: tuple = ()
    columns: tuple = ()
    rows: str = "rows"
    unit: str = ""
    notes: tuple = field(default_factory=tuple)
    extract: Any = None  # summary -> rows, for summaries that keep their rows in another form


def _select(rows: Sequence[dict], sel: dict) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in sel.items())), None)


def paired(runs: Sequence[Sequence[dict]], claim: Claim) -> dict:
    """Per-seed differences ``A - B`` of ``claim.metric``, their mean and std, and on how many seeds A
    beats B in the claimed direction. An infinite value on one side (an infinite reconstruction
    error, condition number) gives an infinite difference of that sign: it counts as a win or a loss
    and makes the mean infinite; seeds with a missing or NaN value (or inf on both sides) are skipped."""
    diffs, skipped = [], 0
    for rows in runs:
        ra, rb = _select(rows, claim.a), _select(rows, claim.b)
        va = _number(ra.get(claim.metric)) if ra else None
        vb = _number(rb.get(claim.metric)) if rb else None
        if va is None or vb is None or math.isnan(va) or math.isnan(vb) or (math.isinf(va) and math.isinf(vb)):
            skipped += 1
            continue
        diffs.append(va - vb)
    n = len(diffs)
    wins = sum(1 for d in diffs if (d < 0 if claim.lower else d > 0))
    finite = [d for d in diffs if math.isfinite(d)]
    if n and len(finite) < n:
        mean = math.inf if all(d > 0 for d in diffs if not math.isfinite(d)) else (
            -math.inf if all(d < 0 for d in diffs if not math.isfinite(d)) else math.nan)
        std = math.nan
    else:
        mean = sum(diffs) / n if n else math.nan
        std = statistics.stdev(diffs) if n > 1 else (0.0 if n == 1 else math.nan)
    return {"claim": claim.text, "metric": claim.metric, "a": claim.a, "b": claim.b, "lower_is_better": claim.lower,
            "diff_mean": mean, "diff_std": std, "n": n, "wins": wins, "skipped_seeds": skipped, "diffs": diffs,
            "holds_on_every_seed": n > 0 and wins == n,
            "beyond_spread": n > 1 and wins == n and (math.isinf(mean) or abs(mean) > 2 * std / math.sqrt(n))}


def _cell(v: Any) -> str:
    if isinstance(v, dict) and "mean" in v:
        if v["n"] == 1:
            return fmt(v["mean"], 4)
        return f"{fmt(v['mean'], 4)} ± {fmt(v['std'], 2)}"
    if isinstance(v, dict) and "true" in v:
        return f"{v['true']}/{v['n']}"
    return fmt(v)


def seed_markdown(title: str, agg: Sequence[dict], claims: Sequence[dict], columns: Sequence[str],
                  seeds: Sequence[int], notes: Sequence[str] = ()) -> str:
    """The seed table (mean ± std over seeds) and the paired claims, as Markdown."""
    cols = list(columns) or (list(agg[0]) if agg else [])
    lines = [f"# {title}", "", f"seeds {', '.join(str(s) for s in seeds)}: mean ± std over seeds "
             "(booleans: seeds where it holds / seeds)", ""]
    lines += [*notes, ""] if notes else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in agg]
    if claims:
        lines += ["", "| claim | metric | A - B per seed | mean ± std | A better on |", "|---|---|---|---|---|"]
        for c in claims:
            per = ", ".join(fmt(d, 3) for d in c["diffs"]) or "-"
            lines.append(f"| {c['claim']} | {c['metric']} | {per} | {fmt(c['diff_mean'], 3)} ± {fmt(c['diff_std'], 2)} | "
                         f"{c['wins']}/{c['n']} seeds |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- progress
class Progress:
    """Progress lines of long experiment phases (one shared instance, :data:`PROGRESS`).

    ``phase(label, total)`` starts a training phase of ``total`` steps; ``update(step, **metrics)``
    reports it, at most every ``every`` seconds: a line per update when stdout is not a terminal (batch
    jobs, logs), one line redrawn in place on a terminal. ``train_callback(label, total)`` is a
    :func:`stableflows.train.train` callback doing both. ``emit`` prints a line (experiments' own
    results); :attr:`last_output` lets the heartbeat of ``reproduce`` stay quiet while lines flow.
    """

    def __init__(self):
        self.every = 30.0
        self.prefix = ""
        self.last_output = time.monotonic()
        self._label, self._total, self._t0, self._last, self._live = "", None, 0.0, -math.inf, False
        self._lock = threading.Lock()

    def configure(self, *, every: float = 30.0, prefix: str = "") -> None:
        self.every, self.prefix = float(every), prefix

    @property
    def tty(self) -> bool:
        return bool(getattr(sys.stdout, "isatty", lambda: False)())

    def emit(self, text: str) -> None:
        with self._lock:
            if self._live:
                sys.stdout.write("\n")
                self._live = False
            print(text, flush=True)
            self.last_output = time.monotonic()

    def phase(self, label: str, total: int | None = None) -> None:
        self._label, self._total, self._t0, self._last = label, total, time.monotonic(), -math.inf

    def describe(self) -> str:
        return self._label or "setting up"

    def update(self, step: int, *, force: bool = False, **metrics: Any) -> None:
        if self.every <= 0:
            return
        now = time.monotonic()
        gap = min(self.every, 1.0) if self.tty else self.every
        if not force and now - self._last < gap:
            return
        self._last = now
        elapsed = now - self._t0
        parts = [f"step {step}" + (f"/{self._total} ({100 * step / self._total:.0f}%)" if self._total else "")]
        parts += [f"{k} {fmt(v, 4)}" for k, v in metrics.items() if v is not None]
        if step > 0 and elapsed > 0:
            parts.append(f"{step / elapsed:.1f} steps/s")
            if self._total:
                parts.append(f"ETA {_clock(elapsed / step * (self._total - step))}")
        text = f"[{self.prefix}] {self._label}: " + ", ".join(parts)
        with self._lock:
            if self.tty:
                sys.stdout.write("\r\x1b[2K" + text[:200])
                sys.stdout.flush()
                self._live = True
            else:
                print(text, flush=True)
            self.last_output = now

    def train_callback(self, label: str, total: int | None = None):
        """A :func:`stableflows.train.train` callback reporting this phase at every evaluation."""
        def cb(event: str, record: dict) -> None:
            if event == "start":
                self.phase(label, total)
            elif event == "eval":
                val = next((record[k] for k in record if k.startswith("val_")), None)
                self.update(int(record.get("step", 0)), loss=record.get("loss"), val=val)
        return cb


def _clock(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


PROGRESS = Progress()


def train_flow(label: str, flow, mcfg, splits, out: Path, tkw: dict, seed: int, data_cfg):
    """Train ``flow`` (built from ``mcfg``) with the library's loop under ``out`` (a re-run replaces
    it), with a progress line per phase; returns the validation-selected weights in eval mode and the
    loop's result."""
    from ..config import RunConfig, TrainConfig
    from ..train.checkpoint import load_checkpoint
    from ..train.loop import train

    cfg = RunConfig(model=mcfg, data=data_cfg, train=TrainConfig(**tkw, seed=seed, out_dir=str(out), progress=False))
    res = train(cfg, model=flow, splits=splits, callbacks=[PROGRESS.train_callback(label, tkw["steps"])],
                overwrite=True)
    best = Path(out) / "best.pt"
    if best.is_file():
        flow.load_state_dict(load_checkpoint(best)["model"])
    return flow.eval(), res


# ----------------------------------------------------------------------------- seeds driver
def run_seeds(fn, name: str, out: Path, seeds: Sequence[int], *, report: "Report | None", quick: bool = False,
              reuse: bool = False, **kw) -> dict:
    """Run experiment ``fn`` once per seed under ``out/seed_K`` and write ``seeds.json`` / ``seeds.md``
    (:func:`aggregate` of its rows, :func:`paired` for its claims). A seed with a finished
    ``summary.json`` is taken as it is when ``reuse``."""
    summaries = []
    for i, s in enumerate(seeds):
        d = out / f"seed_{s}"
        done = d / "summary.json"
        if reuse and done.is_file():
            PROGRESS.emit(f"[{name}] seed {s} ({i + 1}/{len(seeds)}): reusing {done}")
            summaries.append(json.loads(done.read_text()))
            continue
        PROGRESS.emit(f"[{name}] seed {s} ({i + 1}/{len(seeds)}){' (quick)' if quick else ''}: results under {d}")
        fn(d, quick=quick, seed=s, **kw)
        summaries.append(json.loads(done.read_text()) if done.is_file() else {})
    result = {"experiment": name, "seeds": list(seeds), "quick": quick}
    if report is not None:
        runs = [report.extract(sm) if report.extract else _rows(sm, report.rows) for sm in summaries]
        result["rows"] = aggregate(runs, report.keys)
        # a claim about rows that no seed has (a model only some data sets get) does not apply here
        result["claims"] = [paired(runs, c) for c in report.claims
                            if any(_select(r, c.a) and _select(r, c.b) for r in runs)]
        title = f"{name}: {len(seeds)} seed{'s' if len(seeds) > 1 else ''}" + (f" ({report.unit})" if report.unit else "")
        notes = list(report.notes) + [s for s in (summaries[0].get("levels_note"),) if s] if summaries else []
        (out / "seeds.md").write_text(seed_markdown(title, result["rows"], result["claims"], report.columns, seeds,
                                                    notes))
    write_json(out / "seeds.json", result)
    return result


def _rows(summary: dict, key: str) -> list[dict]:
    rows = summary.get(key, [])
    if isinstance(rows, dict):  # {name: row} -> rows with a "name" field
        rows = [{"name": k, **v} for k, v in rows.items()]
    return list(rows)
