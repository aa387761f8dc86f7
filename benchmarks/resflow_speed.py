"""Time of one training step: stableflows' vector Residual Flow vs the residual flow of ``normflows``
(the published code: ``nf.flows.Residual`` around ``nf.nets.LipschitzMLP``), same size.

    python -m benchmarks.resflow_speed                  # table + runs/benchmarks/resflow_speed.json
    python -m benchmarks.resflow_speed --steps 60 --threads 2

Both models: D = 64 (digits as vectors, already logit-transformed so neither needs a pre-transform),
``--blocks`` residual blocks, each ``Linear(64, h) -> LipSwish -> Linear(h, h) -> LipSwish ->
Linear(h, 64)`` with Lipschitz bound 0.98 per layer, ActNorm after every block (stableflows also has
one before the first), Russian roulette with 2 exact terms + ``Geom(0.5)``, Neumann gradient and
backward-in-forward (normflows: ``reduce_memory=True``), batch 64, AdamW.

* stableflows: ``resflow(shape=(64,), levels=1, steps_per_level=blocks, hidden=h, logit_alpha=0)``
  with ``n_power_iter`` (default 1) power iterations per step, continued adaptively to the default
  tolerance.
* normflows: its own power iteration in every forward (``LipschitzMLP`` defaults) plus
  ``nf.utils.update_lipschitz(model, n)`` after each optimizer step as its residual-flow example
  and the ``stableflows bench`` contender do (``n`` = ``--nf-lipschitz-iters``, 50 there; timed as
  part of the step).

The steps are interleaved (one of each, alternately, in one process) so that load from other
processes hits both alike; median over ``--steps`` steps after ``--warmup`` steps each.
ratio = stableflows / normflows (target <= 1.0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TARGET_RATIO = 1.0


def build(args):
    import normflows as nf
    import torch

    from stableflows.config import DataConfig
    from stableflows.data import load_dataset
    from stableflows.models.residual import resflow

    torch.manual_seed(0)
    D, h = 64, args.hidden
    sf = resflow(shape=(D,), levels=1, steps_per_level=args.blocks, hidden=h, logit_alpha=0.0,
                 n_power_iter=args.n_power_iter, estimator="roulette", n_exact_terms=2)
    flows = []
    for _ in range(args.blocks):
        net = nf.nets.LipschitzMLP([D, h, h, D], init_zeros=True, lipschitz_const=0.98)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(D)]
    nfm = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(D, trainable=False), flows=flows)
    splits = load_dataset(DataConfig(name="digits", flatten=True), seed=0)
    g = torch.Generator().manual_seed(1)
    v = (splits.train + torch.rand(splits.train.shape, generator=g)) / splits.levels
    a = 0.05
    data = torch.logit(a + (1 - 2 * a) * v)  # the same logit-space data for both
    return sf, nfm, data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-power-iter", type=int, default=1)
    p.add_argument("--nf-lipschitz-iters", type=int, default=50)
    p.add_argument("--json", default="runs/benchmarks/resflow_speed.json")
    args = p.parse_args(argv)
    import normflows as nf
    import torch

    torch.set_num_threads(args.threads)
    sf, nfm, data = build(args)
    n = data.shape[0]
    opt_sf = torch.optim.AdamW(sf.parameters(), lr=1e-3)
    opt_nf = torch.optim.AdamW(nfm.parameters(), lr=1e-3)
    with torch.no_grad():  # data-dependent ActNorm initialisation of both
        sf.train()
        sf.log_prob(data[:512])
        nfm.log_prob(data[:512])
    sf.train()
    nfm.train()

    def step_sf(x):
        opt_sf.zero_grad(set_to_none=True)
        loss = -sf.log_prob(x).mean()
        loss.backward()
        opt_sf.step()
        return float(loss.detach())

    def step_nf(x):
        opt_nf.zero_grad(set_to_none=True)
        loss = nfm.forward_kld(x)
        loss.backward()
        opt_nf.step()
        nf.utils.update_lipschitz(nfm, args.nf_lipschitz_iters)
        return float(loss.detach())

    times = {"stableflows": [], "normflows": []}
    losses = {"stableflows": [], "normflows": []}
    g = torch.Generator().manual_seed(2)
    for i in range(args.warmup + args.steps):
        x = data[torch.randint(0, n, (args.batch,), generator=g)]
        order = [("stableflows", step_sf), ("normflows", step_nf)]
        if i % 2:
            order.reverse()
        for name, fn in order:
            t0 = time.perf_counter()
            loss = fn(x)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
                losses[name].append(loss)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["stableflows"] / med["normflows"]
    lines = [f"Residual flow training step, D=64, {args.blocks} blocks x width {args.hidden}, batch {args.batch}, "
             f"{args.threads} threads, interleaved, median of {args.steps}", "",
             "| library | ms / step (median) | ms (min) | steps/s |", "|---|---|---|---|"]
    for k in ("stableflows", "normflows"):
        lines.append(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(times[k]):.1f} | {1 / med[k]:.2f} |")
    lines += ["", f"ratio stableflows / normflows = {ratio:.2f} (target <= {TARGET_RATIO}: "
              f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})"]
    print("\n".join(lines))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"median_s": med, "min_s": {k: min(v) for k, v in times.items()}, "ratio": ratio,
                               "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO, "settings": vars(args),
                               "torch": torch.__version__, "nf_version": getattr(nf, "__version__", None)},
                              indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
