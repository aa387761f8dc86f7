"""``make bench``: every benchmark of the README's "Benchmarks" section, one after the other.

    python -m benchmarks.run                      # all of them (about an hour on 2 cores, most of it
                                                  # the 13 x 120 s of `stableflows bench`)
    python -m benchmarks.run --list               # what runs, with the command of each
    python -m benchmarks.run --only quality,audit_speed
    python -m benchmarks.run --skip peers
    python -m benchmarks.run --quick              # every benchmark at a smoke-test size: checks that
                                                  # they run (the audit stays full size); no figures
    make bench ARGS="--only memory_saving"

Each benchmark is its own process (the commands of the README, with their JSON written under
``--out-dir``, default ``runs/benchmarks``; ``--quick`` writes under ``runs/benchmarks/quick``), its
output shown and kept in ``<out-dir>/logs/<name>.log``. ``<out-dir>/summary.json`` is rewritten
after every benchmark: command, exit status, wall time, the files it wrote and its headline figures.
A failing benchmark does not stop the others. Exit status: 0 when every benchmark ran and met its
target, 1 when one ran but reported a missed target (its own exit status 1), 3 when one could not
run (any other status), 2 for a usage error.

Timings depend on the machine's load: run it on an otherwise idle machine (``benchmarks/README.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OK, MISSED, USAGE, COULD_NOT_RUN = 0, 1, 2, 3  # as stableflows.exitcodes (OK, NOT met, USAGE, COULD_NOT_RUN)


@dataclass(frozen=True)
class Bench:
    """One benchmark: ``argv(out, quick)`` is its command (after the Python interpreter)."""

    name: str
    group: str
    what: str
    argv: Callable[[Path, bool], list[str]]
    outputs: Callable[[Path], list[Path]] = field(default=lambda out: [])
    figures: Callable[[Path], dict] = field(default=lambda out: {})


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _train(config: str, run: str) -> Bench:
    def argv(out: Path, quick: bool) -> list[str]:
        a = ["-m", "stableflows", "train", "--config", config, "--out-dir", str(out / "quality" / run),
             "--no-progress"]
        return a + (["--steps", "20", "--time-budget", "none", "--eval-every", "10"] if quick else [])

    def figures(out: Path) -> dict:
        m = _json(out / "quality" / run / "metrics.json")
        return {k: m.get(k) for k in ("metric", "test", "best_step", "steps", "steps_per_s", "n_params") if k in m}

    return Bench(f"quality-{run}", "quality", f"train {config} (120 s budget), test bpd of the validation-selected "
                                              "EMA weights", argv, lambda out: [out / "quality" / run / "metrics.json"],
                 figures)


def _script(name: str, module: str, what: str, full: list[str], quick: list[str], keys: tuple[str, ...]) -> Bench:
    def argv(out: Path, q: bool) -> list[str]:
        return ["-m", module, *(quick if q else full), "--json", str(out / f"{name}.json")]

    def figures(out: Path) -> dict:
        d = _json(out / f"{name}.json")
        return {k: d[k] for k in keys if k in d}

    return Bench(name, name, what, argv, lambda out: [out / f"{name}.json"], figures)


def _peers() -> Bench:
    def argv(out: Path, quick: bool) -> list[str]:
        a = ["-m", "stableflows", "bench", "--out-dir", str(out / "bench")]
        if quick:
            return a + ["--budget", "5", "--models", "stableflows-glow,zuko-nsf", "--paired-rounds", "1",
                        "--no-flops"]
        return a + ["--budget", "120", "--threads", "2"]

    return Bench("peers", "peers", "stableflows bench: every model against normflows / zuko / FrEIA / nflows, "
                                   "120 s each, and the paired Glow step timing", argv,
                 lambda out: [out / "bench" / "latest.json"])


BENCHMARKS: list[Bench] = [
    _train("configs/demo.toml", "glow"),
    _train("configs/resflow_digits.toml", "resflow"),
    _train("configs/glow_spline_digits.toml", "splineglow"),
    _script("memory_saving", "benchmarks.memory_saving",
            "memory-saving backward vs stored activations (vs memcnn when installed), depths 4 and 32",
            [], ["--depths", "2", "4", "--steps", "2", "--methods", "stored", "stableflows"], ()),
    _script("resflow_memory", "benchmarks.resflow_memory",
            "Residual Flow step memory with 2 vs 20 series terms, Neumann gradient + backward-in-forward on / off",
            [], ["--terms", "2", "4", "--estimators", "series", "--hidden", "32", "--blocks", "2"], ("ratios", "met")),
    _script("resflow_speed", "benchmarks.resflow_speed",
            "Residual Flow training step vs normflows' residual flow (interleaved, one process)",
            [], ["--steps", "3", "--warmup", "1", "--blocks", "2", "--hidden", "32", "--nf-lipschitz-iters", "2"],
            ("median_s", "ratio")),
    _script("resflow_squeeze_first", "benchmarks.resflow_squeeze_first",
            "28x28 Residual Flow: training step and evaluation cost without / with squeeze_first (Fashion-MNIST)",
            [], ["--rounds", "1", "--steps", "1", "--eval-batches", "1", "--warmup", "0", "--batch", "4"],
            ("train_ratio", "eval_ratio")),
    _script("audit_speed", "benchmarks.audit_speed", "time of every part of the full audit of a digits Glow",
            ["--train-steps", "20"], ["--train-steps", "5", "--hidden", "16"], ("wall_s", "target_s")),
    _peers(),
]
GROUPS = tuple(dict.fromkeys(b.group for b in BENCHMARKS))


def select(only: str | None, skip: str | None) -> list[Bench]:
    """Benchmarks named (by name or group) in ``only`` minus those in ``skip``; ValueError for unknown names."""
    def names(text):
        out = [t.strip() for t in (text or "").split(",") if t.strip()]
        known = {b.name for b in BENCHMARKS} | set(GROUPS)
        bad = [t for t in out if t not in known]
        if bad:
            raise ValueError(f"unknown benchmark(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return set(out)

    keep, drop = names(only), names(skip)
    return [b for b in BENCHMARKS if (not keep or {b.name, b.group} & keep) and not ({b.name, b.group} & drop)]


def _show(cmd: list[str]) -> str:
    """The command as a user would type it: ``python``, paths relative to the working directory."""
    def rel(a: str) -> str:
        return os.path.relpath(a) if os.path.isabs(a) and a.startswith(str(Path.cwd())) else a

    return shlex.join(["python", *(rel(a) for a in cmd)])


def _run_one(b: Bench, out: Path, quick: bool) -> dict:
    cmd = [sys.executable, *b.argv(out, quick)]
    log = out / "logs" / f"{b.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    print(f"\n=== {b.name}: {b.what}\n$ {_show(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:  # shown and kept
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    files = [str(p) for p in b.outputs(out) if p.is_file()]
    status = "ok" if rc == OK else ("target missed" if rc == MISSED else "failed")
    return {"name": b.name, "what": b.what, "command": _show(cmd[1:]), "exit_status": rc,
            "status": status, "wall_s": round(wall, 1), "log": str(log), "files": files, "figures": b.figures(out)}


def _finite(v):
    """JSON-safe: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _write_summary(path: Path, rows: list[dict], quick: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    doc = _finite({"quick": quick, "python": sys.executable, "benchmarks": rows})
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the benchmarks and their commands, run nothing")
    p.add_argument("--only", default=None, metavar="NAMES", help=f"comma-separated names or groups ({', '.join(GROUPS)})")
    p.add_argument("--skip", default=None, metavar="NAMES", help="comma-separated names or groups to leave out")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (checks that everything runs; no figures)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where the JSON, logs and summary.json go (default: runs/benchmarks, --quick: "
                        "runs/benchmarks/quick)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return USAGE if e.code else OK
    try:
        chosen = select(args.only, args.skip)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    if not chosen:
        print("error: --only / --skip leave no benchmark to run", file=sys.stderr)
        return USAGE
    out = Path(args.out_dir or ("runs/benchmarks/quick" if args.quick else "runs/benchmarks"))
    out = out if out.is_absolute() else Path.cwd() / out
    if args.list:
        for b in chosen:
            print(f"{b.name:18s} {b.what}\n{'':18s} $ {_show(b.argv(out, args.quick))}")
        return OK
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for b in chosen:
        rows.append(_run_one(b, out, args.quick))
        _write_summary(out / "summary.json", rows, args.quick)
    print(f"\n{'benchmark':18s} {'status':14s} {'wall s':>8s}  files")
    for r in rows:
        print(f"{r['name']:18s} {r['status']:14s} {r['wall_s']:8.1f}  {', '.join(r['files']) or '-'}")
    print(f"summary: {out / 'summary.json'}; logs: {out / 'logs'}")
    if any(r["exit_status"] not in (OK, MISSED) for r in rows):
        return COULD_NOT_RUN
    return MISSED if any(r["exit_status"] == MISSED for r in rows) else OK


if __name__ == "__main__":
    raise SystemExit(main())
