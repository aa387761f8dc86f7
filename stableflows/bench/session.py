"""A benchmark session: every model in its own process, one after the other, one report.

One process per model keeps the measurements apart (peak memory, thread pools, libraries'
global state); the session runs them sequentially in a single invocation, so all numbers come
from the same machine at the same time. Results go to ``OUT_DIR/<UTC time>/bench.json`` and
``bench.md``, copied to ``OUT_DIR/latest.json`` and ``latest.md``.

The report checks the targets of the benchmark issue on the numbers it holds:

1. the lowest validation-selected test bpd of all models is a stableflows model's;
2. stableflows' Glow is at least as fast per training step as every Glow-like peer (parameter counts
   matched to stableflows' Glow), judged on the *paired* timing (:mod:`.paired`: the Glow-like models
   in one process, interleaved rounds, median ms/step), which a noisy shared machine cannot tilt;
   the steps/s of the per-model processes are reported next to it;
3. for every input family where a peer model has non-finite reconstructions, which stableflows
   models have none (reported either way: the audit decides whether a model is stable).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .harness import OOD_BENCH_FAMILIES, BenchSettings

__all__ = ["run_session", "write_report", "markdown", "check_targets", "machine_info", "CHILD_TIMEOUT_FACTOR"]

CHILD_TIMEOUT_FACTOR = 4.0  # a model's process is stopped after factor x budget + CHILD_TIMEOUT_EXTRA_S
CHILD_TIMEOUT_EXTRA_S = 600.0
RECON_FAMILIES = ("test",) + OOD_BENCH_FAMILIES


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for dist in ("stableflows", "normflows", "zuko", "FrEIA", "nflows"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _run_module(module: str, args: list[str], s: BenchSettings, target: int | None, out: Path,
                timeout: float) -> dict[str, Any]:
    """``python -m module *args --settings S --out OUT [--target-params T]`` with ``s.threads`` threads;
    its JSON record, or ``{"error": ...}`` (timeout, or no output: the last lines of its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", module, *args, "--settings", json.dumps(dataclasses.asdict(s)), "--out", str(out)]
    if target is not None:
        cmd += ["--target-params", str(target)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {time.perf_counter() - t0:.0f} s"}
    if out.is_file():
        return json.loads(out.read_text())
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"error": f"exit status {proc.returncode}: {' | '.join(tail)}"[:500]}


def _child(name: str, s: BenchSettings, target: int | None, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    rec = _run_module("stableflows.bench.harness", [name], s, target, out,
                      CHILD_TIMEOUT_FACTOR * s.budget + CHILD_TIMEOUT_EXTRA_S)
    rec.setdefault("name", name)
    rec["process_wall_s"] = time.perf_counter() - t0
    return rec


def _paired_child(names: Sequence[str], s: BenchSettings, target: int | None, out: Path) -> dict[str, Any]:
    return _run_module("stableflows.bench.paired", [",".join(names), "--rounds", str(s.paired_rounds)], s, target,
                       out, 2 * CHILD_TIMEOUT_EXTRA_S)


def paired_names(results: list[dict]) -> list[str]:
    """stableflows' Glow first, then every Glow-like peer that trained without error ([] if either is missing)."""
    ok = [r for r in results if "error" not in r]
    glow = [r["name"] for r in ok if r["name"] == "stableflows-glow"]
    peers = [r["name"] for r in ok if r.get("library") != "stableflows" and r.get("family") == "glow-like"]
    return glow + peers if glow and peers else []


def run_session(names: Sequence[str], settings: BenchSettings, out_dir: str | Path = "runs/bench", *,
                log: Callable[[str], None] = print) -> tuple[dict[str, Any], Path]:
    """Benchmark ``names`` one process each; returns ``(report dict, directory written)``."""
    from .contender import TASKS
    from .flops import matmul_rate
    from .models import reference_params

    import torch

    torch.set_num_threads(settings.threads)
    target = reference_params(settings.preprocess, TASKS[settings.data].shape) if settings.match_params else None
    started = _dt.datetime.now(_dt.timezone.utc)
    session = {"started_utc": started.isoformat(timespec="seconds"), "machine": machine_info(),
               "libraries": library_versions(), "settings": dataclasses.asdict(settings),
               "target_params": target, "matmul_at_start": matmul_rate(device=settings.device), "results": []}
    with tempfile.TemporaryDirectory(prefix="stableflows-bench-") as tmp:
        for i, name in enumerate(names):
            log(f"[{i + 1}/{len(names)}] {name}: training for {settings.budget:g} s ...")
            rec = _child(name, settings, target, Path(tmp) / f"{i}.json")
            session["results"].append(rec)
            log(f"    {_one_line(rec)}")
        pair = paired_names(session["results"]) if settings.paired_rounds > 0 else []
        if pair:
            log(f"paired step timing ({settings.paired_rounds} interleaved rounds): {', '.join(pair)} ...")
            session["paired"] = _paired_child(pair, settings, target, Path(tmp) / "paired.json")
            log(f"    {_paired_line(session['paired'])}")
    session["matmul_at_end"] = matmul_rate(device=settings.device)
    session["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    session["targets"] = check_targets(session["results"], session.get("paired"))
    return session, write_report(session, out_dir, stamp=started.strftime("%Y%m%dT%H%M%SZ"))


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):  # non-finite floats are stored as strings ("inf", "nan")
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _one_line(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return (f"{r['params']} params, {r['steps']} steps ({_fmt(r['steps_per_s'], '.1f')}/s), test bpd "
            f"{_fmt(r['test_bpd_selected'], '.3f')} selected / {_fmt(r['test_bpd_end'], '.3f')} end")


def _paired_line(p: dict) -> str:
    if "error" in p:
        return f"failed: {p['error']}"
    return "; ".join(f"{m['name']} {_fmt(m['ms_per_step'], '.1f')} ms/step" for m in p["models"])


def _task_line(data: str) -> str:
    from .contender import get_task

    t = get_task(data)
    return f"{t.data} ({t.shape[-2]}x{t.shape[-1]}, {t.levels} levels)"


def _fmt(v, spec: str = ".3g") -> str:
    x = _num(v)
    if x is None:
        return "–" if v is None else str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def check_targets(results: list[dict], paired: dict | None = None) -> dict[str, Any]:
    """The issue's targets evaluated on one session's results and its paired timing (see the
    module docstring); without a paired timing the Glow speed is judged on the per-model steps/s."""
    ok = [r for r in results if "error" not in r]
    ours = [r for r in ok if r["library"] == "stableflows"]
    peers = [r for r in ok if r["library"] != "stableflows"]
    out: dict[str, Any] = {}

    def bpd(r):
        v = _num(r.get("test_bpd_selected"))
        return v if v is not None and math.isfinite(v) else math.inf

    if ok:
        best = min(ok, key=bpd)
        out["lowest_test_bpd"] = {"model": best["name"], "bpd": bpd(best), "met": best["library"] == "stableflows"}
    glow = next((r for r in ours if r["name"] == "stableflows-glow"), None)
    glow_peers = [r for r in peers if r.get("family") == "glow-like"]
    if glow and glow_peers:
        pms = {m["name"]: m for m in paired["models"]} if paired and "error" not in paired else {}
        judged = "paired" if glow["name"] in pms and all(r["name"] in pms for r in glow_peers) else "processes"
        rows = []
        for r in glow_peers:
            row = {"peer": r["name"], "peer_params": r["params"], "peer_steps_per_s": r["steps_per_s"],
                   "ratio": glow["steps_per_s"] / r["steps_per_s"] if r["steps_per_s"] else None}
            if judged == "paired":  # peer ms / our ms: > 1 when ours is faster
                row["peer_ms_per_step"] = pms[r["name"]]["ms_per_step"]
                row["paired_ratio"] = pms[r["name"]]["ms_per_step"] / pms[glow["name"]]["ms_per_step"]
            rows.append(row)
        key = "paired_ratio" if judged == "paired" else "ratio"
        out["glow_speed"] = {"stableflows_params": glow["params"], "stableflows_steps_per_s": glow["steps_per_s"],
                             "judged_on": judged, "peers": rows,
                             "met": all(x[key] is not None and x[key] >= 1.0 for x in rows)}
        if judged == "paired":
            out["glow_speed"]["stableflows_ms_per_step"] = pms[glow["name"]]["ms_per_step"]
    fam_rows = []
    for fam in RECON_FAMILIES:
        bad_peers = [r["name"] for r in peers if (_num(r["reconstruction"][fam]["nonfinite_pct"]) or 0) > 0]
        if bad_peers:
            clean = [r["name"] for r in ours if (_num(r["reconstruction"][fam]["nonfinite_pct"]) or 0) == 0]
            fam_rows.append({"family": fam, "peers_with_nonfinite": bad_peers, "stableflows_all_finite": clean,
                             "met": len(clean) == len(ours)})
    out["nonfinite"] = {"families": fam_rows, "met": all(r["met"] for r in fam_rows)}
    return out


def markdown(session: dict[str, Any]) -> str:
    """The session as Markdown: a quality/speed table, a stability table and the targets."""
    m, s = session["machine"], session["settings"]
    lines = [
        f"# stableflows bench — {session['started_utc']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "") + (f", load average at start {m['load_average']}"
                                                             if m.get("load_average") else ""),
        f"Task: {_task_line(s.get('data', 'digits'))}, batch {s['batch_size']}, {s['threads']} threads, {s['budget']:g} s of "
        f"training per model, pre-transform `{s['preprocess']}`, parameters matched to "
        f"{session.get('target_params') or 'nothing (own widths)'}, device {s['device']}.",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in session['libraries'].items() if v)}.",
        f"Reference matmul ({int(session['matmul_at_start']['n'])}^2, float32): "
        f"{session['matmul_at_start']['flops_per_s'] / 1e9:.1f} GFLOP/s at start, "
        f"{session['matmul_at_end']['flops_per_s'] / 1e9:.1f} at end." if "matmul_at_end" in session else "",
        "",
        "| model | family | params (width) | steps/s | test bpd (val-selected @ step) | test bpd (end) "
        "| peak memory MiB | inverse ms (64) | GFLOP/step | % of matmul | matmul GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = session["results"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        fl = r.get("flops") or {}
        frac = _num(fl.get("fraction_of_matmul"))
        lines.append(
            f"| {r['name']} | {r['family']} | {r['params']:,} ({r.get('hidden')}) | {_fmt(r['steps_per_s'], '.1f')} "
            f"| {_fmt(r['test_bpd_selected'], '.3f')} @ {r.get('selected_step')} | {_fmt(r['test_bpd_end'], '.3f')} "
            f"| {_fmt(r['memory'].get('cuda_peak_allocated_training_mb', r['memory']['peak_rss_training_delta_mb']), '.0f')} "
            f"| {_fmt(_num(r['inverse_s']) * 1e3 if _num(r['inverse_s']) is not None else None, '.1f')} "
            f"| {_fmt((_num(fl.get('step_flops')) or math.nan) / 1e9, '.2f')} "
            f"| {_fmt(100 * frac if frac is not None else None, '.1f')} "
            f"| {_fmt((_num(fl.get('matmul_flops_per_s')) or math.nan) / 1e9, '.1f')} |")
    lines += ["", "steps/s: training steps per second of training time (evaluation excluded). Peak memory: peak RSS "
              "up to the end of training minus RSS before the model was built (CUDA: max_memory_allocated). "
              "% of matmul: "
              "FLOPs of a training step's matrix products and convolutions (FlopCounterMode) x steps/s, over the "
              "rate of a 1024^2 float32 matmul measured in the same process (its last column; it also shows how "
              "busy the machine was while that model ran).",
              "", "Reconstruction ||v - F^-1(F(v))||_2 of the selected weights: median (max) over accepted inputs; "
              "`nf` = % non-finite, `ref` = % refused by the model (input outside its domain); `on n/N`: the "
              "measurement time (`--measure-budget`) ran out after n of N inputs.", "",
              "| model | " + " | ".join(RECON_FAMILIES) + " |", "|---|" + "---|" * len(RECON_FAMILIES)]
    for r in results:
        if "error" in r:
            continue
        cells = []
        for fam in RECON_FAMILIES:
            e = r["reconstruction"][fam]
            cut = f" on {e['n']}/{e['n_requested']}" if e.get("truncated") else ""
            cells.append(f"{_fmt(e['median_l2'], '.1e')} ({_fmt(e['max_l2'], '.1e')}) nf {_fmt(e['nonfinite_pct'], '.0f')}"
                         f" ref {_fmt(e['refused_pct'], '.0f')}{cut}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + _target_lines(session.get("targets", {}))
    return "\n".join(lines) + "\n"


def _target_lines(t: dict[str, Any]) -> list[str]:
    out = []
    if "lowest_test_bpd" in t:
        x = t["lowest_test_bpd"]
        out.append(f"- Lowest validation-selected test bpd: {x['model']} ({_fmt(x['bpd'], '.3f')}) — "
                   f"{'met' if x['met'] else 'NOT met'}.")
    if "glow_speed" in t:
        g = t["glow_speed"]
        peers = "; ".join(f"{p['peer']} ({p['peer_params']:,} params) {_fmt(p['peer_steps_per_s'], '.1f')}/s, "
                          f"ratio {_fmt(p['ratio'], '.2f')}"
                          + (f"; paired {_fmt(p['peer_ms_per_step'], '.1f')} ms/step, ratio {_fmt(p['paired_ratio'], '.2f')}"
                             if "paired_ratio" in p else "") for p in g["peers"])
        ours = f"{_fmt(g['stableflows_steps_per_s'], '.1f')} steps/s" + (
            f" (paired: {_fmt(g['stableflows_ms_per_step'], '.1f')} ms/step)" if "stableflows_ms_per_step" in g else "")
        out.append(f"- stableflows Glow ({g['stableflows_params']:,} params) {ours} vs {peers} — judged on the "
                   f"{'paired timing (one process, interleaved rounds)' if g.get('judged_on') == 'paired' else 'per-model processes'}: "
                   f"{'met' if g['met'] else 'NOT met'}.")
    nf = t.get("nonfinite", {})
    if nf.get("families"):
        for f in nf["families"]:
            out.append(f"- {f['family']}: peers with non-finite reconstructions {', '.join(f['peers_with_nonfinite'])}; "
                       f"stableflows models with none: {', '.join(f['stableflows_all_finite']) or 'none'} — "
                       f"{'met' if f['met'] else 'NOT met'}.")
    elif nf:
        out.append("- No peer model had non-finite reconstructions on any family (nothing to compare).")
    return out


def write_report(session: dict[str, Any], out_dir: str | Path, *, stamp: str) -> Path:
    """Write ``bench.json`` and ``bench.md`` under ``out_dir/stamp`` and copy them to ``latest.*``."""
    from .harness import _json_safe

    d = Path(out_dir) / stamp
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench.json").write_text(json.dumps(_json_safe(session), indent=1) + "\n")
    (d / "bench.md").write_text(markdown(session))
    shutil.copyfile(d / "bench.json", Path(out_dir) / "latest.json")
    shutil.copyfile(d / "bench.md", Path(out_dir) / "latest.md")
    return d
