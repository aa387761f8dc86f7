"""Training steps per second: stableflows' Glow eager vs ``torch.compile``d, and against FrEIA's
AllInOne and normflows' Glow at an equal parameter count, on the digits (8x8) and Fashion-MNIST (28x28).

    python benchmarks/compile_speed.py                          # both data sets, table + JSON
    python benchmarks/compile_speed.py --data fashion-mnist --rounds 9 --steps 10
    python benchmarks/compile_speed.py --data digits --profile  # + where the time goes, per model

Every model is stableflows' reference Glow architecture (2 levels x 4 steps, hidden 128: 217,036
parameters at both sizes) or a peer matched to it (:mod:`stableflows.bench.speed`): one process,
interleaved rounds (``A B C D A B C D ...``), median ms per step, ratios to stableflows' eager Glow.
The compiled model's first steps (the compilation, minutes on a CPU) are warm-up and not timed.
Targets (issue 16): compiled >= 1.3x eager; stableflows' Glow no slower than any Glow-like peer.

Timings depend on the machine's load: run on an otherwise idle machine, 2 threads. ``--profile``
prints, per model, the ``torch.profiler`` table of one step's top operators by self CPU time
(robust to load: shares of one step, not absolute times).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DATA = {"digits": dict(name="digits"),
        "fashion-mnist": dict(name="fashion-mnist", data_dir="/usr/share/datasets/fashion-mnist")}
TARGET_COMPILED = 1.3  # compiled / eager steps per second
TARGET_PEERS = 1.0  # stableflows' Glow vs the fastest Glow-like peer


def _data(name: str, data_dir: str | None):
    from stableflows.config import DataConfig
    from stableflows.data import load_dataset

    kw = dict(DATA[name])
    if data_dir is not None:
        kw["data_dir"] = data_dir
    return load_dataset(DataConfig(**kw), seed=0)


def profile_table(stepper, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        stepper.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            stepper.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(data: str, *, data_dir=None, rounds=9, steps=10, warmup=5, batch=64, compile_options=None,
        profile=False, eager=True, peers=True) -> dict:
    from stableflows.bench.speed import GLOW_PEERS, Stepper, glow_contenders, paired_ms

    splits = _data(data, data_dir)
    shape = tuple(splits.shape)
    models = glow_contenders(shape, compiled=compile_options, eager=eager, peers=GLOW_PEERS if peers else ())
    t0 = time.perf_counter()
    steppers = {n: Stepper(m, splits.train, splits.levels, batch_size=batch) for n, m in models.items()}
    res = paired_ms(steppers, rounds=rounds, steps=steps, warmup=warmup)
    res.update({"data": data, "shape": list(shape), "batch": batch, "wall_s": time.perf_counter() - t0})
    med = {m["name"]: m["ms_per_step"] for m in res["models"]}
    checks = {}
    if "stableflows-glow" in med and "stableflows-glow-compiled" in med:
        r = med["stableflows-glow"] / med["stableflows-glow-compiled"]
        checks["compiled_over_eager"] = {"ratio": r, "target": TARGET_COMPILED, "met": r >= TARGET_COMPILED}
    peer_ms = [med[p] for p in GLOW_PEERS if p in med]
    for ours in ("stableflows-glow", "stableflows-glow-compiled"):
        if ours in med and peer_ms:
            r = min(peer_ms) / med[ours]
            checks[f"{ours}_vs_fastest_peer"] = {"ratio": r, "target": TARGET_PEERS, "met": r >= TARGET_PEERS}
    res["checks"] = checks
    if profile:
        res["profiles"] = {n: profile_table(s) for n, s in steppers.items()}
    return res


def markdown(res: dict) -> str:
    lines = [f"**{res['data']}** {tuple(res['shape'])}, batch {res['batch']}, {res['threads']} threads, "
             f"{res['rounds']} rounds x {res['steps']} steps",
             "", "| model | params | ms / step | steps / s | ratio to stableflows' eager Glow |", "| --- | --- | --- | --- | --- |"]
    for m in res["models"]:
        lines.append(f"| {m['name']} | {m['params']:,} | {m['ms_per_step']:.1f} | {m['steps_per_s']:.1f} | "
                     f"{m['ratio_to_reference']:.2f} |")
    for k, c in res["checks"].items():
        lines.append(f"\n{k}: {c['ratio']:.2f} (target >= {c['target']}: {'met' if c['met'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits,fashion-mnist", help="comma-separated: digits, fashion-mnist")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (the compilation)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--no-compile", action="store_true", help="only the eager models")
    p.add_argument("--no-peers", action="store_true", help="only stableflows' Glow")
    p.add_argument("--profile", action="store_true", help="print each model's top operators of one step")
    p.add_argument("--out", default="runs/benchmarks/compile_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    options = None
    if not a.no_compile:
        options = {k: v for k, v in (("mode", a.mode), ("backend", a.backend)) if v is not None}
    results = []
    for data in a.data.split(","):
        res = run(data, data_dir=a.data_dir, rounds=a.rounds, steps=a.steps, warmup=a.warmup, batch=a.batch,
                  compile_options=options, profile=a.profile, peers=not a.no_peers)
        results.append(res)
        print(markdown(res), flush=True)
        for name, table in res.get("profiles", {}).items():
            print(f"\n--- {name}: top operators of 3 steps (self CPU time)\n{table}")
        print()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
