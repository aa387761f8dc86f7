"""Time of an invertibility audit (issues 4 and 15), with the spread over repeated rounds.

Two modes:

* the **full audit of a digits Glow** (default): 360 test examples, every family, PGD with 50 steps
  on 64 examples (three constraint sets, each with its random-search baseline), exact Jacobian
  spectra on 32 points per family, float64 shadow, 5 repeated passes, per-layer localisation, no
  time budget (every part at full size). Target: under 2 minutes on 2 threads.
* ``--peers all`` (or a list): every peer model of ``stableflows bench`` (normflows, zuko, FrEIA,
  nflows; built by ``stableflows/bench/peers.py``), trained briefly, audited with the audit's
  **defaults** (its time budget included). Target: each under 2 minutes on 2 threads. Per model the
  report lists what the budget cut and how many forward / inverse calls (and examples) the audit
  made, which lets a loaded machine's figures be checked for plausibility.

    python benchmarks/audit_speed.py                               # demo Glow trained 300 steps, 3 rounds
    python benchmarks/audit_speed.py --run runs/demo --rounds 5    # an existing run
    python benchmarks/audit_speed.py --peers all --rounds 1        # every bench peer, audit defaults

Each round audits with another seed (families, spectra points, attack starts). Training time is
not counted. The JSON goes to runs/bench/audit_speed.json (--peers: runs/bench/audit_speed_peers.json)
unless --json says otherwise: per model the wall time of every round, its median / min / max, the
same per part, the load average before and after each round. Timings depend on the machine's load:
run it on an otherwise idle machine (the load averages are printed and stored).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 120.0
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
DEFAULT_JSON = Path("runs") / "bench" / "audit_speed.json"
DEFAULT_PEERS_JSON = Path("runs") / "bench" / "audit_speed_peers.json"


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def _train_demo(steps: int, out_dir: Path, hidden: int | None, threads: int) -> Path:
    from stableflows.config import load_config
    from stableflows.train import train

    cfg = load_config(DEMO_CONFIG)
    if hidden is not None:
        cfg = cfg.replace("model", hidden=hidden)
    cfg = cfg.replace("train", steps=steps, time_budget=None, eval_every=steps, out_dir=str(out_dir), progress=False,
                      threads=threads)
    train(cfg)
    return out_dir


class _Counter:
    """Counts the calls and examples of a Contender's forward and inverse."""

    def __init__(self, c):
        self.calls = {"forward": 0, "inverse": 0}
        self.examples = {"forward": 0, "inverse": 0}
        fwd, inv = c.forward, c.inverse

        def forward(m, v):
            self.calls["forward"] += 1
            self.examples["forward"] += v.shape[0]
            return fwd(m, v)

        def inverse(m, z):
            self.calls["inverse"] += 1
            self.examples["inverse"] += z.shape[0]
            return inv(m, z)
        c.forward, c.inverse = forward, inverse

    def reset(self) -> dict:
        out = {"calls": dict(self.calls), "examples": dict(self.examples)}
        for d in (self.calls, self.examples):
            for k in d:
                d[k] = 0
        return out


def _train_peer(c, splits, steps: int, seed: int) -> None:
    """A few AdamW steps of maximum likelihood on dequantised digits (not timed)."""
    import torch

    from stableflows.bench.contender import LEVELS

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = splits.train.float()

    def batch(n):
        idx = torch.randint(0, x.shape[0], (n,), generator=g)
        return (x[idx] + torch.rand(x[idx].shape, generator=g)) / LEVELS

    c.module.train()
    with torch.no_grad():  # every library's data-dependent initialisation (ActNorm) on one batch
        c.log_prob(c.module, batch(512))
    opt = torch.optim.AdamW(c.module.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = -c.log_prob(c.module, batch(64)).mean()
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(c.module.parameters(), 50.0)
            opt.step()
            if c.after_step is not None:
                c.after_step(c.module)
    c.module.eval()


def _rounds(make_report, rounds: int) -> dict:
    walls, parts, loads, reports = [], {}, [], []
    for r in range(rounds):
        before = _load()
        t0 = time.perf_counter()
        report = make_report(r)
        wall = time.perf_counter() - t0
        after = _load()
        walls.append(wall)
        loads.append({"before": before, "after": after})
        for k, v in report.timings.items():
            parts.setdefault(k, []).append(v)
        reports.append(report)
        print(f"  round {r + 1}/{rounds}: {wall:.1f}s ({report.verdict.headline()}); load {before} -> {after}",
              flush=True)
    return {"wall": _spread(walls), "parts": {k: _spread(v) for k, v in parts.items()}, "load": loads,
            "reports": reports}


def _print_parts(res: dict) -> None:
    print(f"  {'part':<20} {'median':>8} {'min':>8} {'max':>8}  (seconds)")
    for k, s in res["parts"].items():
        print(f"  {k:<20} {s['median']:8.2f} {s['min']:8.2f} {s['max']:8.2f}")


def run_glow(args) -> dict:
    import torch

    from stableflows.audit import audit
    from stableflows.config import RunConfig
    from stableflows.data import load_dataset
    from stableflows.train import load_flow

    tmp = None
    run = args.run
    if run is None:
        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        run = _train_demo(args.train_steps, Path(tmp.name) / "demo", args.hidden, args.threads)
        print(f"trained the demo Glow for {args.train_steps} steps in {time.perf_counter() - t0:.1f}s (not counted)",
              flush=True)
    flow, ckpt = load_flow(run)
    cfg = RunConfig.from_dict(ckpt["config"])
    splits = load_dataset(cfg.data, seed=cfg.train.seed)
    n_params = sum(p.numel() for p in flow.parameters())
    print(f"model {cfg.model.model} hidden={cfg.model.hidden} levels={cfg.model.levels} "
          f"steps_per_level={cfg.model.steps_per_level} ({n_params} parameters); {len(splits.test)} test examples; "
          f"{torch.get_num_threads()} threads; full audit without a time budget", flush=True)

    def one(r):
        return audit(flow, splits.test, levels=splits.levels, train=splits.train, families="all", attack="pgd",
                     attack_kwargs=dict(examples=64, steps=50, seed=r), spectra_points=32, spectra_method="exact",
                     seed=r, budget=None)
    res = _rounds(one, args.rounds)
    last = res.pop("reports")[-1]
    print(last.verdict.table())
    _print_parts(res)
    med = res["wall"]["median"]
    print(f"\nfull audit: median {med:.1f}s (min {res['wall']['min']:.1f}s, max {res['wall']['max']:.1f}s over "
          f"{args.rounds} rounds; {'within' if med < TARGET_SECONDS else 'OVER'} the {TARGET_SECONDS:.0f}s target)")
    if args.html:
        last.to_html(args.html)
    if tmp is not None:
        tmp.cleanup()
    return {"mode": "glow", "wall_s": med, "target_s": TARGET_SECONDS, "n_params": n_params, **res,
            "timings": {k: s["median"] for k, s in res["parts"].items()}}


def run_peers(args) -> dict:
    from stableflows.audit import audit
    from stableflows.bench.peers import PEERS, available
    from stableflows.config import DataConfig
    from stableflows.data import load_dataset

    names = list(available()) if args.peers == "all" else [n.strip() for n in args.peers.split(",") if n.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise SystemExit(f"unknown peer model(s) {', '.join(bad)}; known: {', '.join(PEERS)}")
    splits = load_dataset(DataConfig(name="digits"), seed=0)
    out = {"mode": "peers", "target_s": TARGET_SECONDS, "budget_s": args.budget, "models": {}}
    for name in names:
        c = PEERS[name][1]()
        t0 = time.perf_counter()
        _train_peer(c, splits, args.train_steps, seed=0)
        print(f"{name}: trained {args.train_steps} steps in {time.perf_counter() - t0:.1f}s (not counted)", flush=True)
        counter = _Counter(c)
        counts = []

        def one(r):
            counter.reset()
            kw = {} if args.budget == "default" else {"budget": args.budget}
            rep = audit(c, splits, seed=r, **kw)
            counts.append(counter.reset())
            return rep
        res = _rounds(one, args.rounds)
        last = res.pop("reports")[-1]
        _print_parts(res)
        cuts = (last.meta.get("budget") or {}).get("cuts", [])
        med = res["wall"]["median"]
        print(f"  {name}: median {med:.1f}s ({'within' if med < TARGET_SECONDS else 'OVER'} the "
              f"{TARGET_SECONDS:.0f}s target); localisation: {last.meta['localization']}; "
              f"{len(cuts)} cuts; calls {counts[-1]}", flush=True)
        for cut in cuts:
            print(f"    cut: {cut}")
        out["models"][name] = {"wall_s": med, **res, "cuts": cuts, "counts": counts,
                               "verdict": last.verdict.headline(), "verdict_table": last.verdict.table(),
                               "localization": last.meta["localization"],
                               "notes": last.notes, "n_params": sum(p.numel() for p in c.module.parameters())}
    worst = max((m["wall_s"] for m in out["models"].values()), default=0.0)
    out["wall_s"] = worst
    print(f"\nslowest peer audit: {worst:.1f}s ({'within' if worst < TARGET_SECONDS else 'OVER'} the "
          f"{TARGET_SECONDS:.0f}s target)")
    return out


def _budget(text: str):
    if text == "default":
        return "default"
    return None if text.lower() == "none" else float(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run directory or checkpoint (default: train the demo model)")
    p.add_argument("--peers", default=None, metavar="all|NAME,...",
                   help="audit the peer models of 'stableflows bench' with the audit's defaults instead")
    p.add_argument("--train-steps", type=int, default=300, help="training steps before the audit (default: 300)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden width of the demo Glow trained here (default: configs/demo.toml, 128)")
    p.add_argument("--rounds", type=int, default=3, help="audits per model, with seeds 0, 1, ... (default: 3)")
    p.add_argument("--budget", type=_budget, default="default",
                   help="--peers: the audit's time budget in seconds, 'none', or 'default' (the audit's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help=f"where the results go (default: {DEFAULT_JSON}, "
                                                f"--peers: {DEFAULT_PEERS_JSON})")
    p.add_argument("--html", default=None, help="also write the HTML report of the last round here (not timed)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_before": _load(), "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"load average before: {meta['load_before']}", flush=True)
    res = run_peers(args) if args.peers else run_glow(args)
    res["meta"] = {**meta, "load_after": _load()}
    path = Path(args.json) if args.json else (DEFAULT_PEERS_JSON if args.peers else DEFAULT_JSON)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str))
    print(f"results: {path}")
    return 0 if res["wall_s"] < TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
