"""Cost of the 28x28 Residual Flow with and without ``squeeze_first`` (002's ImageNet architecture):
``configs/resflow_fashion.toml`` (the MNIST architecture, first scale at 28x28) against
``configs/resflow_fast_fashion.toml`` (the same with a squeeze before the first scale).

    python -m benchmarks.resflow_squeeze_first                 # table + runs/benchmarks/resflow_squeeze_first.json
    python -m benchmarks.resflow_squeeze_first --rounds 5 --steps 10

Per round, in one process and alternating which goes first: ``--steps`` training steps of each
(``-log p(x)`` of a dequantised Fashion-MNIST batch of 64 in training mode, backward, AdamW) and
``--eval-batches`` evaluation batches of each (``log p(x)`` in evaluation mode: the configs' 10 exact
series terms + roulette, no graph). Reported: the median time per step / per image of each round,
and per round the ratio full / squeeze-first; the summary is the median ratio over rounds with its
min and max (the spread). Models start from the same seed with ActNorm initialised on the same 512
images; neither is trained, and the fixed-point iterations of an inverse are not timed. The
absolute times run above a training run's (2026-12-07: 348 ms per step here against 219-267 ms in
`stableflows train`, which holds one model per process); the ratio, both measured in one process
in alternation, is the figure this reports.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = {"full (resflow_fashion)": "configs/resflow_fashion.toml",
           "squeeze_first (resflow_fast_fashion)": "configs/resflow_fast_fashion.toml"}


def build(path: str, splits):
    """The config's model, built from seed 0."""
    import torch

    from stableflows.config import load_config
    from stableflows.models.registry import build_model

    torch.manual_seed(0)
    return build_model(load_config(path).model, splits.shape)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="training steps of each model per round")
    p.add_argument("--eval-batches", type=int, default=2, help="evaluation batches of each model per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="runs/benchmarks/resflow_squeeze_first.json")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.eval_batches, args.batch, args.threads) < 1 or args.warmup < 0:
        p.error("--rounds, --steps, --eval-batches, --batch, --threads must be >= 1 and --warmup >= 0")
    import torch

    from stableflows.config import DataConfig
    from stableflows.data import load_dataset

    torch.set_num_threads(args.threads)
    splits = load_dataset(DataConfig(name="fashion-mnist", val_size=0.02), seed=0)
    g = torch.Generator().manual_seed(1)

    def batch():
        x = splits.train[torch.randint(0, splits.train.shape[0], (args.batch,), generator=g)]
        return (x + torch.rand(x.shape, generator=g)) / splits.levels

    models, opts = {}, {}
    init = batch() if args.batch >= 512 else torch.cat([batch() for _ in range(-(-512 // args.batch))])[:512]
    for name, path in CONFIGS.items():
        m = build(path, splits)
        m.train()
        with torch.no_grad():  # data-dependent ActNorm initialisation on the same images
            m.log_prob(init)
        models[name] = m
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-3)
    params = {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, m in models.items()}

    def train_step(name, x):
        m, opt = models[name], opts[name]
        m.train()
        opt.zero_grad(set_to_none=True)
        loss = -m.log_prob(x).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    def eval_batch(name, x):
        m = models[name]
        m.eval()
        with torch.no_grad():
            return m.log_prob(x)

    for name in models:  # warm-up (allocator, lazy convolutions)
        for _ in range(args.warmup):
            train_step(name, batch())
    rounds = []
    names = list(models)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        xs = [batch() for _ in range(args.steps)]
        xe = [batch() for _ in range(args.eval_batches)]
        row = {}
        for name in order:
            ts = []
            for x in xs:
                t0 = time.perf_counter()
                train_step(name, x)
                ts.append(time.perf_counter() - t0)
            te = []
            for x in xe:
                t0 = time.perf_counter()
                eval_batch(name, x)
                te.append((time.perf_counter() - t0) / x.shape[0])
            row[name] = {"train_s_per_step": statistics.median(ts), "eval_s_per_image": statistics.median(te)}
        full, fast = (row[n] for n in names)
        row["train_ratio"] = full["train_s_per_step"] / fast["train_s_per_step"]
        row["eval_ratio"] = full["eval_s_per_image"] / fast["eval_s_per_image"]
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: train {row['train_ratio']:.2f}x, eval {row['eval_ratio']:.2f}x", flush=True)

    def spread(key):
        v = [r[key] for r in rounds]
        return statistics.median(v), min(v), max(v)

    lines = [f"Residual Flow at 28x28 (Fashion-MNIST), batch {args.batch}, {args.threads} threads, {args.rounds} "
             f"rounds of {args.steps} training steps + {args.eval_batches} evaluation batches per model, alternating", "",
             "| model | params | ms / training step (median over rounds) | ms / evaluated image |", "|---|---:|---:|---:|"]
    for name in names:
        tr = statistics.median(r[name]["train_s_per_step"] for r in rounds)
        ev = statistics.median(r[name]["eval_s_per_image"] for r in rounds)
        lines.append(f"| {name} | {params[name]:,} | {1e3 * tr:.1f} | {1e3 * ev:.2f} |")
    tm, tlo, thi = spread("train_ratio")
    em, elo, ehi = spread("eval_ratio")
    lines += ["", f"full / squeeze_first: training step {tm:.2f}x (rounds {tlo:.2f}-{thi:.2f}), "
              f"evaluation {em:.2f}x (rounds {elo:.2f}-{ehi:.2f})"]
    print("\n".join(lines))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "params": params, "train_ratio": [tm, tlo, thi],
                               "eval_ratio": [em, elo, ehi], "settings": vars(args), "configs": CONFIGS,
                               "torch": torch.__version__}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
