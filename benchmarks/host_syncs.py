"""Host synchronisations per training step of every benchmarked model (stableflows' and the peers').

    python benchmarks/host_syncs.py                    # table + runs/benchmarks/host_syncs.json
    python benchmarks/host_syncs.py --models stableflows-glow,FrEIA-allinone --out syncs.json

Counts of ``aten::_local_scalar_dense`` (the op behind ``float(t)``, ``int(t)``, ``bool(t)``,
``t.item()``) in one profiled step (:mod:`stableflows.bench.syncs`): the digits bench models
(``stableflows bench``'s builders, default widths), batch 64 of dequantised digits, after one
warm-up step. Columns:

* ``train``: a training step as stableflows' loop runs it (validation off after checking the data
  once; forward, backward, clipping, after-step projection, and the loop's own finiteness read);
* ``train, validated``: the same with the input checks on (a user's own loop calling ``log_prob``);
  peers run stableflows' ``Logit(0.01)`` pre-transform, whose entry check reads its domain flag;
* ``eval``: one ``log_prob`` without gradients in evaluation mode, validation off.

The optimizer's update is not counted (see :func:`stableflows.bench.syncs.training_step_syncs`).
The counts do not depend on the machine's load: they are measured and recorded on any CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def measure(names=None, batch: int = 64, seed: int = 0) -> list[dict]:
    from stableflows.bench.models import available, build
    from stableflows.bench.syncs import eval_syncs, training_step_syncs

    table = available()
    rows = []
    for name in names or list(table):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = build(name)
            v = 0.05 + 0.9 * torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
            after = (lambda c=c: c.after_step(c.module)) if c.after_step is not None else None

            def lp(t, c=c):
                return c.log_prob(c.module, t)

            row = {"name": name, "library": c.library, "params": c.n_params,
                   "train": training_step_syncs(c.module, lp, v, after_step=after),
                   "train_validated": training_step_syncs(c.module, lp, v, after_step=after, validate=True),
                   "eval": eval_syncs(c.module, lp, v)}
        rows.append(row)
        print(f"{name:24s} train {row['train']:4d}   validated {row['train_validated']:4d}   eval {row['eval']:4d}",
              flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | library | host syncs per training step | with input validation | evaluation |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['library']} | {r['train']} | {r['train_validated']} | {r['eval']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated bench model names (default: every available one)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/benchmarks/host_syncs.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = measure(a.models.split(",") if a.models else None, batch=a.batch)
    print()
    print(markdown(rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "batch": a.batch, "op": "aten::_local_scalar_dense",
                               "models": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
