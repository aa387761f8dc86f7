"""Peak memory of one training step of the vector Residual Flow with many vs few power-series terms,
with the Neumann-series gradient + backward-in-forward (paper 002, sec. 3.2) ON and OFF.

    python -m benchmarks.resflow_memory                    # table + runs/benchmarks/resflow_memory.json
    python -m benchmarks.resflow_memory --terms 2 10 20 --estimators series

Model: ``resflow(shape=(64,), levels=1, steps_per_level=8, hidden=256)`` (digits as 64-d vectors, logit
pre-transform; 8 blocks ``Linear -> LipSwish -> Linear -> LipSwish -> Linear``), batch 64 of digits,
one step = ``-log_prob(x).mean()``, backward, AdamW step. The number of terms is made deterministic:
``series`` uses ``n_series_terms = N`` terms; ``roulette`` uses ``n_exact_terms = N`` plus the random
``Geom(0.5)`` tail drawn from a fixed seed (the same draw in every configuration).

Method (the one of ``benchmarks/memory_saving.py``): every configuration runs in a fresh
subprocess with glibc told to serve every block of 64 KiB or more by ``mmap``
(``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``) so that freed tensors leave the
resident set. After two warm-up steps (lazy initialisation, AdamW state), the kernel's high-water mark
``VmHWM`` is reset to the current RSS through ``/proc/self/clear_refs`` and one step is run;
``peak MB`` = ``VmHWM`` after the step - ``VmRSS`` before it: the memory the step itself needed on top
of what stays resident (model, optimizer state, data), i.e. graph, saved activations, transient
buffers and gradients. This is the peak of the real process, not a model of it.
``saved MB``: bytes autograd saved for backward during the step (``saved_tensors_hooks``, parameters
excluded, each storage once; with backward-in-forward it includes the graphs built and freed inside
the forward of each block, so it is a total, not a peak).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 65536
TARGET_RATIO_ON = 1.1  # peak(20 terms) / peak(2 terms) with Neumann gradient + backward-in-forward
ROOT = Path(__file__).resolve().parents[1]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(args) -> dict:
    import gc

    import torch

    from stableflows.config import DataConfig
    from stableflows.data import load_dataset
    from stableflows.models.residual import resflow

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    on = args.mode == "on"
    kw = dict(n_series_terms=args.n) if args.estimator == "series" else dict(n_exact_terms=args.n)
    model = resflow(shape=(64,), levels=1, steps_per_level=args.blocks, hidden=args.hidden,
                    estimator=args.estimator, neumann_grad=on, grad_in_forward=on, **kw)
    splits = load_dataset(DataConfig(name="digits", flatten=True), seed=0)
    g = torch.Generator().manual_seed(1)
    x = (splits.train[:args.batch] + torch.rand(args.batch, 64, generator=g)) / splits.levels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        torch.manual_seed(123)  # same probe and roulette draw in every configuration
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    gc.collect()
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    step()
    peak_kb = _status_kb("VmHWM")
    opt.zero_grad(set_to_none=True)
    seen, total = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += s.nbytes()
        return t

    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x).mean()
    loss.backward()
    terms = [b.estimator.stats.get("logdet_terms") for b in model.modules() if hasattr(b, "estimator")]
    return {"estimator": args.estimator, "n": args.n, "mode": args.mode, "peak_mb": (peak_kb - base_kb) / 1024,
            "rss_mb": peak_kb / 1024, "saved_mb": total[0] / 2 ** 20, "terms_per_block": terms[0],
            "threads": torch.get_num_threads()}


def _spawn(estimator: str, n: int, mode: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "benchmarks.resflow_memory", "--worker", "--estimator", estimator, "--n", str(n),
           "--mode", mode, "--batch", str(args.batch), "--hidden", str(args.hidden), "--blocks", str(args.blocks),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {estimator} n={n} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--estimator", default="series")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--mode", default="on")
    p.add_argument("--estimators", nargs="+", default=["series", "roulette"])
    p.add_argument("--terms", nargs="+", type=int, default=[2, 20])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="runs/benchmarks/resflow_memory.json")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for est in args.estimators:
        for mode in ("on", "off"):
            for n in args.terms:
                rows.append(_spawn(est, n, mode, args))
                r = rows[-1]
                print(f"  {est:8s} grad-modes {mode:3s} {n:3d} terms: peak {r['peak_mb']:7.2f} MB, "
                      f"saved {r['saved_mb']:7.2f} MB", flush=True)
    lo, hi = min(args.terms), max(args.terms)
    by = {(r["estimator"], r["mode"], r["n"]): r for r in rows}
    lines = [f"Residual Flow, D=64, {args.blocks} blocks x width {args.hidden}, batch {args.batch}: one training step",
             "", f"| estimator | Neumann + in-forward | peak MB ({lo} terms) | peak MB ({hi} terms) | ratio | "
             f"saved MB ({lo}) | saved MB ({hi}) |", "|---|---|---|---|---|---|---|"]
    ratios = {}
    for est in args.estimators:
        for mode in ("on", "off"):
            a, b = by[(est, mode, lo)], by[(est, mode, hi)]
            ratio = b["peak_mb"] / a["peak_mb"] if a["peak_mb"] > 0 else float("nan")
            ratios[f"{est}_{mode}"] = ratio
            lines.append(f"| {est} | {mode} | {a['peak_mb']:.2f} | {b['peak_mb']:.2f} | {ratio:.2f}x | "
                         f"{a['saved_mb']:.2f} | {b['saved_mb']:.2f} |")
    ok = all(ratios[f"{e}_on"] <= TARGET_RATIO_ON for e in args.estimators)
    lines.append("")
    lines.append(f"target: ratio <= {TARGET_RATIO_ON}x with Neumann + in-forward ON: {'met' if ok else 'NOT met'}")
    print("\n".join(lines))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "target_on": TARGET_RATIO_ON, "met": ok,
                               "settings": vars(args)}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
