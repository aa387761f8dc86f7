"""Train and measure one contender on a benchmark task under a fixed wall-clock budget.

The recipe is the same for every model, stableflows' and the peers' (only the model differs):

* data (``BenchSettings.data``, :data:`~.contender.TASKS`): digits of docs/METRICS.md (1437 train = 1293
  train + 144 validation, 360 test; 8x8, L = 17), or Fashion-MNIST (54,000 train + 6,000 validation,
  10,000 test; 28x28, L = 256; the first 2,000 validation images score every evaluation),
  dequantised ``v = (x + u) / L`` with fresh ``u`` every batch, batch 64, epoch permutations;
* data-dependent initialisation: one forward pass in training mode on 512 training examples
  (every library's ActNorm initialises on it);
* AdamW (lr 1e-3, no weight decay; PyTorch's fused kernel for every model), linear warm-up over 100 steps, gradient-norm clipping at 50,
  an EMA of the weights (decay 0.999) used for every evaluation; a step with a non-finite loss or
  gradient is skipped and counted;
* training stops when the *training* time (the timed steps, ``after_step`` included; evaluation
  excluded) reaches the budget. Every ``eval_every`` steps the EMA weights are scored on the
  validation split; the best are kept (validation-selected) and scored on the test split once at
  the end, next to the end-of-budget weights. bits/dim use the fixed test noise (seed 0).

Measured on the selected weights: reconstruction ``||v - F^-1(F(v))||_2`` per example on test data
(Fashion-MNIST: the first 1,000 test images) and on OOD families (:func:`stableflows.data.ood.ood_family`): uniform and Gaussian noise, constant
images, out-of-range values; the share of non-finite reconstructions (failures, never dropped) and
of inputs the model refuses with :class:`~stableflows.transforms.base.InputOutsideDomain` (a logit
outside ``[0, 1]``); the time of one inverse pass (latents of 64 test images); peak memory of the
process up to the end of training, over its resident memory before the model was built (CPU: peak
RSS, which includes the allocator's slack; CUDA: ``max_memory_allocated``); the FLOP rate of a
training step against a large matmul (:mod:`.flops`).

Run one model in its own process: ``python -m stableflows.bench.harness NAME --out result.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import nats_to_bpd
from ..transforms.base import InputOutsideDomain
from .contender import LEVELS, PREPROCESS, TASKS, Contender, get_task

__all__ = ["BenchSettings", "run_one", "reconstruction", "evaluate_bpd", "OOD_BENCH_FAMILIES", "main"]

OOD_BENCH_FAMILIES = ("uniform", "gaussian", "constant", "out_of_range")
INIT_BATCH = 512  # examples of the data-dependent initialisation pass (as stableflows' loop)
INVERSE_BATCH = 64  # latents per timed inverse pass
INVERSE_REPEATS = 5  # timed inverse passes; the median is reported
OOD_N = 360  # examples per OOD family (the size of the test split)
RECON_BATCH = 64  # examples per round trip of the reconstruction measurements
EVAL_BATCH = 512
SEED_OFFSETS = {"sample": 1, "noise": 2, "init": 3}


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark session's settings (the same for every model)."""

    budget: float = 120.0  # seconds of training per model
    batch_size: int = 64
    threads: int = 2
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 50.0
    ema_decay: float = 0.999
    eval_every: int = 100
    seed: int = 0
    preprocess: str = "logit"  # logit | none: the pre-transform of every model
    match_params: bool = True  # match every model's parameter count to stableflows' Glow
    device: str = "cpu"
    max_steps: int | None = None  # optional cap on steps (tests)
    ood_n: int = OOD_N
    flops: bool = True
    paired_rounds: int = 9  # interleaved rounds of the paired step timing (:mod:`.paired`); 0: skip it
    data: str = "digits"  # the task (:data:`~.contender.TASKS`): digits | fashion-mnist
    # seconds for the round trips after training (test + OOD families, shared evenly; default: the
    # training budget); a family whose share runs out reports the examples measured so far
    measure_budget: float | None = None

    def __post_init__(self):
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number of seconds, got {self.budget}")
        if self.batch_size < 1 or self.threads < 1 or self.eval_every < 1:
            raise ValueError("batch_size, threads and eval_every must be >= 1")
        if self.measure_budget is not None and not (self.measure_budget > 0 and math.isfinite(self.measure_budget)):
            raise ValueError(f"measure_budget must be a positive number of seconds, got {self.measure_budget}")
        if self.paired_rounds < 0:
            raise ValueError(f"paired_rounds must be >= 0, got {self.paired_rounds}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        object.__setattr__(self, "data", get_task(self.data).data)  # canonical name; unknown names raise

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- measurements
def _rss_now_mb() -> float:
    """Current resident memory in MiB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return _rss_peak_mb()


def _rss_peak_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024.0


@torch.no_grad()
def evaluate_bpd(c: Contender, module: nn.Module, x: Tensor, u: Tensor, levels: int = LEVELS, *,
                 batch: int = EVAL_BATCH) -> dict[str, float]:
    """Mean bits/dim of integer data ``x`` with ``levels`` levels and the fixed noise ``u`` (both
    ``(N, *shape)``), and the share of examples whose bits/dim is not finite (they make the mean non-finite)."""
    was = module.training
    module.eval()
    per = []
    try:
        for i in range(0, x.shape[0], batch):
            v = (x[i:i + batch] + u[i:i + batch]) / levels  # v = (x + u) / L
            per.append(nats_to_bpd(c.log_prob(module, v), v[0].numel(), levels).double())
        bpd = torch.cat(per)
    except Exception as e:  # noqa: BLE001 - a model that fails to score counts as non-finite
        return {"bpd": math.nan, "nonfinite_pct": 100.0, "error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        module.train(was)
    finite = torch.isfinite(bpd)
    return {"bpd": float(bpd.mean()), "nonfinite_pct": 100.0 * float((~finite).double().mean())}


def _apply_rows(fn, x: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
    """``fn(x)``; if the batch raises, example by example. Returns (out with NaN rows for examples
    that raised, raised (B,), refused = raised InputOutsideDomain (B,))."""
    n = x.shape[0]
    raised = torch.zeros(n, dtype=torch.bool)
    refused = torch.zeros(n, dtype=torch.bool)
    try:
        return fn(x), raised, refused
    except Exception:  # noqa: BLE001 - redo one by one to attribute the failure
        pass
    rows: list[Tensor | None] = []
    for i in range(n):
        try:
            rows.append(fn(x[i:i + 1]))
        except Exception as e:  # noqa: BLE001 - counted per example
            rows.append(None)
            raised[i] = True
            refused[i] = isinstance(e, InputOutsideDomain)
    like = next((r for r in rows if r is not None), None)
    if like is None:
        return None, raised, refused
    out = torch.cat([r if r is not None else torch.full_like(like, math.nan) for r in rows])
    return out, raised, refused


@torch.no_grad()
def reconstruction(c: Contender, module: nn.Module, v: Tensor, *, batch: int = RECON_BATCH,
                   deadline: float | None = None) -> dict[str, Any]:
    """Round trip ``v -> z -> v_hat`` of every example: float64 L2 errors (inf when ``v_hat`` is
    not finite) and the shares of non-finite reconstructions and refused inputs, in % of the
    examples measured. Median and max are over the examples the model accepted (``None`` when it
    accepted none).

    The examples go through in chunks of ``batch``; ``deadline`` (a ``time.perf_counter()`` value)
    stops after the chunk during which it passes (at least one chunk is measured), so a slow inverse
    (a 784-d autoregressive flow inverts one dimension per pass) cannot hold the session: ``n`` is
    then smaller than ``n_requested`` and ``truncated`` is True."""
    was = module.training
    module.eval()
    errs, refs = [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # iterative inverses warn when they stop early; counted below
            for i in range(0, v.shape[0], batch):
                vb = v[i:i + batch]
                z, r1, ref1 = _apply_rows(lambda t: c.forward(module, t), vb)
                if z is None:
                    x_hat, r2 = None, torch.ones_like(r1)
                else:
                    x_hat, r2, _ = _apply_rows(lambda t: c.inverse(module, t), z)
                nb = vb.shape[0]
                if x_hat is None:
                    err = torch.full((nb,), math.inf, dtype=torch.float64)
                else:
                    d = (x_hat.double() - vb.double()).reshape(nb, -1)
                    err = d.norm(dim=1)
                    err[~torch.isfinite(d).all(dim=1)] = math.inf
                err[r1 | r2] = math.inf
                errs.append(err.cpu())
                refs.append(ref1.cpu())
                if deadline is not None and time.perf_counter() > deadline:
                    break
    finally:
        module.train(was)
    err, ref1 = torch.cat(errs), torch.cat(refs)
    n = err.shape[0]
    accepted = ~ref1
    nonfinite = ~torch.isfinite(err) & accepted
    e = err[accepted]
    fin = e[torch.isfinite(e)]
    return {
        "n": n,
        "n_requested": int(v.shape[0]),
        "truncated": n < v.shape[0],
        "median_l2": float(fin.median()) if fin.numel() else None,
        "max_l2": float(e.max()) if e.numel() else None,
        "nonfinite_pct": 100.0 * float(nonfinite.double().mean()),
        "refused_pct": 100.0 * float(ref1.double().mean()),
    }


def time_inverse(c: Contender, module: nn.Module, v: Tensor, device: torch.device) -> float | None:
    """Median seconds of one inverse pass on the latents of ``v`` (None if the inverse fails)."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z = c.forward(module, v)
            c.inverse(module, z)  # warm-up
            times = []
            for _ in range(INVERSE_REPEATS):
                t0 = time.perf_counter()
                c.inverse(module, z)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    except Exception:  # noqa: BLE001 - reported as missing
        return None
    finally:
        module.train(was)


# ----------------------------------------------------------------------------- training
class _Run:
    def __init__(self, c: Contender, splits, s: BenchSettings, device: torch.device):
        from ..train.ema import EMA
        from ..train.evaluate import fixed_noise
        from ..train.optim import adamw

        self.c, self.s, self.device = c, s, device
        self.levels = int(splits.levels)
        self.module = c.module.to(device)
        self.train_x = splits.train.to(device)
        val = splits.val[:get_task(s.data).val_n]  # (N_val, *shape); the task may cap it
        self.val_x, self.test_x = val.to(device), splits.test.to(device)
        self.val_u = fixed_noise(tuple(val.shape)).to(device)
        self.test_u = fixed_noise(tuple(splits.test.shape)).to(device)
        self.gens = {k: torch.Generator().manual_seed(s.seed + off) for k, off in SEED_OFFSETS.items()}
        self.perm, self.pos = None, 0
        self._init()
        self.ema = EMA(self.module, s.ema_decay) if s.ema_decay > 0 else None
        self.opt = adamw(self.module.parameters(), lr=s.lr)
        self.step = self.skipped = 0
        self.train_time = 0.0
        self.best: tuple[float, int, dict] | None = None
        self.history: list[dict] = []

    @property
    def eval_module(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.module

    def _dequantize(self, raw: Tensor, gen: torch.Generator) -> Tensor:
        u = torch.rand(raw.shape, generator=gen, dtype=raw.dtype).to(self.device)
        return (raw + u) / self.levels

    def _init(self) -> None:
        n = self.train_x.shape[0]
        idx = torch.randperm(n, generator=self.gens["init"])[:INIT_BATCH].to(self.device)
        v = self._dequantize(self.train_x[idx], self.gens["init"])
        self.module.train()
        with torch.no_grad():
            self.c.log_prob(self.module, v)

    def batch(self) -> Tensor:
        b, n = self.s.batch_size, self.train_x.shape[0]
        if self.perm is None or self.pos + b > n:
            self.perm, self.pos = torch.randperm(n, generator=self.gens["sample"]), 0
        idx = self.perm[self.pos:self.pos + b].to(self.device)
        self.pos += b
        return self._dequantize(self.train_x[idx], self.gens["noise"])

    def loss(self, v: Tensor) -> Tensor:
        return nats_to_bpd(self.c.log_prob(self.module, v), v[0].numel(), self.levels).mean()

    def train_step(self) -> None:
        s = self.s
        v = self.batch()
        lr = s.lr * min(1.0, (self.step + 1) / s.warmup) if s.warmup > 0 else s.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.module.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(v)
        if not bool(torch.isfinite(loss.detach())):
            self.skipped += 1
            return
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), s.grad_clip if s.grad_clip > 0 else math.inf)
        if not bool(torch.isfinite(norm)):
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return
        self.opt.step()
        if self.c.after_step is not None:
            self.c.after_step(self.module)
        if self.ema is not None:
            self.ema.update(self.module)

    def validate(self) -> None:
        val = evaluate_bpd(self.c, self.eval_module, self.val_x, self.val_u, self.levels,
                           batch=get_task(self.s.data).eval_batch)
        self.history.append({"step": self.step, "time": round(self.train_time, 3), "val_bpd": val["bpd"]})
        if math.isfinite(val["bpd"]) and (self.best is None or val["bpd"] < self.best[0]):
            state = {k: t.detach().clone() for k, t in self.eval_module.state_dict().items()}
            self.best = (val["bpd"], self.step, state)

    def train(self) -> None:
        s, dev = self.s, self.device
        while self.train_time < s.budget and (s.max_steps is None or self.step < s.max_steps):
            t0 = time.perf_counter()
            self.train_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.train_time += time.perf_counter() - t0
            self.step += 1
            if self.step % s.eval_every == 0:
                self.validate()
        if not self.history or self.history[-1]["step"] != self.step:
            self.validate()

    def selected(self) -> nn.Module:
        """A copy of the evaluation model with the validation-selected weights."""
        m = copy.deepcopy(self.eval_module)
        if self.best is not None:
            m.load_state_dict(self.best[2])
        return m


def _flops(run: _Run, s: BenchSettings, steps_per_s: float, device: torch.device) -> dict[str, Any]:
    from .flops import count_flops, matmul_rate

    out: dict[str, Any] = {}
    try:
        v = run.batch()
        run.module.train()

        def step():
            run.module.zero_grad(set_to_none=True)
            run.loss(v).backward()

        out["step_flops"] = count_flops(step)
        run.module.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["error"] = f"{type(e).__name__}: {e}"[:200]
        return out
    mm = matmul_rate(device=device)
    out["matmul_flops_per_s"] = mm["flops_per_s"]
    out["matmul_n"] = int(mm["n"])
    out["achieved_flops_per_s"] = out["step_flops"] * steps_per_s
    out["fraction_of_matmul"] = out["achieved_flops_per_s"] / mm["flops_per_s"] if mm["flops_per_s"] > 0 else None
    return out


def run_one(name: str, settings: BenchSettings | None = None, *, splits=None, target_params: int | None = None,
            contender: Contender | None = None) -> dict[str, Any]:
    """Train and measure contender ``name`` in this process; returns a JSON-safe record.

    ``target_params``: the parameter count to match (default: stableflows' Glow when
    ``settings.match_params``). ``contender`` replaces the registry's model (tests).
    """
    from ..config import DataConfig
    from ..data import load_dataset, ood_family
    from ..train.distributed import resolve_device
    from .models import build, reference_params

    s = settings or BenchSettings()
    task = TASKS[s.data]
    torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    if splits is None:
        splits = load_dataset(DataConfig(name=task.data), seed=s.seed)
    if tuple(splits.shape) != task.shape or splits.levels != task.levels:
        raise ValueError(f"the benchmark task is {task.data} {task.shape} with {task.levels} levels, got "
                         f"{tuple(splits.shape)} with {splits.levels}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _rss_now_mb()
    torch.manual_seed(s.seed)
    if contender is None:
        if s.match_params and target_params is None:
            target_params = reference_params(s.preprocess, task.shape)
        torch.manual_seed(s.seed)
        contender = build(name, match=target_params if s.match_params else None, preprocess=s.preprocess,
                          shape=task.shape)
    c = contender
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' deprecation warnings (e.g. torch.lu) are not results
        run = _Run(c, splits, s, device)
        run.train()
        peak_train = _rss_peak_mb()  # before the measurements below allocate their own
        cuda_train = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
        steps_per_s = run.step / run.train_time if run.train_time > 0 else 0.0
        end = evaluate_bpd(c, run.eval_module, run.test_x, run.test_u, task.levels, batch=task.eval_batch)
        best = run.selected()
        sel = evaluate_bpd(c, best, run.test_x, run.test_u, task.levels, batch=task.eval_batch)
        v_test = (run.test_x + run.test_u) / task.levels
        sets = ("test", *OOD_BENCH_FAMILIES)
        t_end = time.perf_counter() + (s.measure_budget if s.measure_budget is not None else s.budget)
        recon = {}
        for k, fam in enumerate(sets):
            if fam == "test":
                x = v_test[:task.recon_n]
            else:
                ref = v_test[: s.ood_n] if fam == "out_of_range" else v_test
                x = ood_family(fam, ref.cpu(), min(s.ood_n, ref.shape[0]), seed=s.seed, levels=task.levels).to(device)
            now = time.perf_counter()  # an even share of the time left for each family still to measure
            recon[fam] = reconstruction(c, best, x, deadline=now + max(0.0, t_end - now) / (len(sets) - k))
        inv_s = time_inverse(c, best, v_test[:INVERSE_BATCH], device)
        flops = _flops(run, s, steps_per_s, device) if s.flops else {}
    mem: dict[str, Any] = {"rss_before_model_mb": rss0, "peak_rss_training_mb": peak_train,
                           "peak_rss_training_delta_mb": peak_train - rss0, "peak_rss_mb": _rss_peak_mb()}
    if cuda_train is not None:
        mem["cuda_peak_allocated_training_mb"] = cuda_train
    return {
        "name": c.name, "library": c.library, "family": c.family, "description": c.description,
        "hidden": c.hidden, "params": c.n_params, "target_params": target_params,
        "steps": run.step, "skipped_steps": run.skipped, "train_time_s": run.train_time,
        "steps_per_s": steps_per_s,
        "test_bpd_selected": sel["bpd"], "selected_step": run.best[1] if run.best else None,
        "val_bpd_selected": run.best[0] if run.best else None,
        "test_bpd_end": end["bpd"], "test_nonfinite_pct_end": end["nonfinite_pct"],
        "test_nonfinite_pct_selected": sel["nonfinite_pct"],
        "reconstruction": recon, "inverse_s": inv_s, "memory": mem, "flops": flops,
        "device": str(device), "threads": torch.get_num_threads(), "history": run.history,
        "settings": dataclasses.asdict(s),
    }


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: ``python -m stableflows.bench.harness NAME --settings JSON --out FILE``."""
    p = argparse.ArgumentParser(prog="python -m stableflows.bench.harness")
    p.add_argument("name")
    p.add_argument("--settings", default="{}", help="BenchSettings as JSON")
    p.add_argument("--target-params", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    s = BenchSettings.from_dict(json.loads(a.settings))
    try:
        rec = run_one(a.name, s, target_params=a.target_params)
    except Exception as e:  # noqa: BLE001 - the session records the failure and goes on
        rec = {"name": a.name, "error": f"{type(e).__name__}: {e}"[:500]}
    with open(a.out, "w") as f:
        json.dump(_json_safe(rec), f, indent=1)
    return 0 if "error" not in rec else 1


if __name__ == "__main__":
    sys.exit(main())
