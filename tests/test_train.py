"""The training loop: likelihood goes down, exact resumption, stopping rules, EMA, non-finite steps,
bad input before training, validation-based selection. A tiny flow defined here keeps these tests
independent of the model zoo (end-to-end runs on digits are in test_cli.py)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stableflows.config import ConfigError, RunConfig
from stableflows.metrics import bits_per_dim
from stableflows.models.flow import Flow
from stableflows.train import EMA, CheckpointError, MaximumLikelihood, TrainingDiverged, evaluate, load_checkpoint, train
from stableflows.train.loop import MAX_CONSECUTIVE_NONFINITE
from stableflows.transforms.base import Compose, InputOutsideDomain, NonFiniteInputError, ShapeError, Transform

LEVELS = 17
D = 16
UNIFORM_BPD = math.log2(LEVELS)  # 4.087
TIME_KEYS = ("time", "eval_time", "steps_per_s")


# ----------------------------------------------------------------------------- a tiny flow
class Affine(Transform):
    """``z = (x - b) exp(-s)``; in training mode ``s`` is jittered by global-RNG noise (like a
    stochastic log-det estimator), so exact resumption must restore the global RNG too."""

    def __init__(self, d: int, jitter: float = 0.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(d))
        self.shift = nn.Parameter(torch.zeros(d))
        self.jitter = jitter

    def _s(self):
        if self.training and self.jitter:
            return self.log_scale + self.jitter * torch.randn(self.log_scale.shape)
        return self.log_scale

    def _forward(self, x):
        s = self._s()
        return (x - self.shift) * torch.exp(-s), (-s.sum()).expand(x.shape[0])

    def _inverse(self, z):
        s = self._s()
        return z * torch.exp(s) + self.shift, s.sum().expand(z.shape[0])


class Linear(Transform):
    """``z = x W^T`` with a learnable well-conditioned ``W = I + A``; log-det from slogdet."""

    def __init__(self, d: int):
        super().__init__()
        self.a = nn.Parameter(0.1 * torch.randn(d, d) / math.sqrt(d))

    def _w(self):
        return torch.eye(self.a.shape[0], dtype=self.a.dtype) + self.a

    def _forward(self, x):
        w = self._w()
        return x @ w.T, torch.linalg.slogdet(w)[1].expand(x.shape[0])

    def _inverse(self, z):
        w = self._w()
        return torch.linalg.solve(w, z.T).T, (-torch.linalg.slogdet(w)[1]).expand(z.shape[0])


def tiny_flow(jitter: float = 0.0, seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    return Flow(Compose(Affine(D, jitter), Linear(D), Affine(D)), (D,))


def tiny_splits(n: int = 400, levels: int | None = LEVELS, seed: int = 0):
    """Correlated data (rank-3 Gaussian) quantised to ``levels`` levels: a linear flow can learn it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, 3, generator=g)

    def draw(m):
        x = 8.0 + 2.5 * torch.randn(m, 3, generator=g) @ a.T
        return x.round().clamp(0, levels - 1) if levels else x / 4.0

    return SimpleNamespace(train=draw(n), val=draw(80), test=draw(80), y_train=None, y_val=None, y_test=None,
                           levels=levels, shape=(D,), name="tiny")


def cfg_for(tmp_path, name="run", **train):
    base = dict(steps=40, eval_every=10, batch_size=32, lr=5e-3, warmup=5, ema_decay=0.9, progress=False,
                out_dir=str(tmp_path / name), seed=0)
    return RunConfig().replace("train", **{**base, **train})


def evals(path):
    recs = [json.loads(line) for line in open(path / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs if r["kind"] == "eval"]


# ----------------------------------------------------------------------------- learning
def test_training_lowers_bpd_and_reports_selected_weights(tmp_path):
    cfg = cfg_for(tmp_path, steps=150, eval_every=30, lr=1e-2)
    splits = tiny_splits()
    model = tiny_flow()
    with torch.no_grad():
        before = float(bits_per_dim(model, splits.test, LEVELS, seed=0).mean())
    res = train(cfg, model=model, splits=splits)
    assert res.metric == "bpd" and res.steps == 150
    assert res.test < before - 0.5 and res.test < UNIFORM_BPD - 0.3, (before, res.test)
    # the selected weights are those of best.pt: the minimum validation bpd over evaluations
    recs = evals(tmp_path / "run")
    best = min(recs, key=lambda r: r["val_bpd"])
    assert res.best_step == best["step"] and res.best_val == pytest.approx(best["val_bpd"], abs=1e-12)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["step"] == res.best_step
    ref = tiny_flow()
    ref.load_state_dict(ckpt["model"])
    ref.eval().requires_grad_(False)
    # independent reference: docs/METRICS.md bits/dim of the best weights with fixed noise (seed 0)
    assert res.test == pytest.approx(float(bits_per_dim(ref, splits.test, LEVELS, seed=0).double().mean()), abs=1e-5)
    assert res.best_val == pytest.approx(float(bits_per_dim(ref, splits.val, LEVELS, seed=0).double().mean()), abs=1e-5)
    # outputs
    out = tmp_path / "run"
    for f in ("metrics.json", "metrics.jsonl", "best.pt", "last.pt", "samples.png", "curve.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["test"] == pytest.approx(res.test) and summary["steps"] == 150
    assert summary["peak_rss_mb"] > 0 and summary["steps_per_s"] > 0
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["kind"] == "test" and last["test_bpd"] == pytest.approx(res.test)
    for r in recs:
        assert {"step", "train_bpd", "val_bpd", "grad_norm", "lr"} <= set(r)


def test_continuous_data_uses_nats(tmp_path):
    splits = tiny_splits(levels=None)
    res = train(cfg_for(tmp_path, steps=20), model=tiny_flow(), splits=splits)
    assert res.metric == "nll" and res.test_bpd is None
    ref = tiny_flow()
    ref.load_state_dict(load_checkpoint(tmp_path / "run" / "best.pt")["model"])
    ref.eval().requires_grad_(False)
    assert res.test == pytest.approx(float(-ref.log_prob(splits.test).double().mean()), abs=1e-5)
    assert "val_nll" in evals(tmp_path / "run")[0]


def test_evaluate_is_batch_independent_and_matches_metric():
    flow, splits = tiny_flow().requires_grad_(False), tiny_splits()
    ref = float(bits_per_dim(flow, splits.val, LEVELS, seed=0).double().mean())
    for bs in (7, 80, 512):
        assert evaluate(flow, splits.val, LEVELS, batch_size=bs) == pytest.approx(ref, abs=1e-6)
    state = torch.get_rng_state()
    evaluate(flow, splits.val, LEVELS)
    assert torch.equal(state, torch.get_rng_state())  # evaluation leaves the training RNG alone


# ----------------------------------------------------------------------------- exact resumption
def _final_state(out):
    s = load_checkpoint(out / "last.pt")
    return s["model"], s["ema"]["module"], s["optimizer"]["state"]


@pytest.mark.parametrize("stop", [20, 15])
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, stop):
    splits = tiny_splits()
    full = train(cfg_for(tmp_path, "full"), model=tiny_flow(jitter=0.05), splits=splits)
    train(cfg_for(tmp_path, "split", steps=stop), model=tiny_flow(jitter=0.05), splits=splits)
    res = train(cfg_for(tmp_path, "split"), model=tiny_flow(jitter=0.05, seed=123), splits=splits, resume=True)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "split")
    for da, db in zip(a[:2], b[:2]):
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), k
    for i in a[2]:
        for k in a[2][i]:
            assert torch.equal(a[2][i][k], b[2][i][k])
    ea, eb = evals(tmp_path / "full"), evals(tmp_path / "split")
    if stop == 20:  # same evaluation points: identical records
        assert ea == eb
    else:  # the interrupted run evaluated once more, at step 15: validation values agree at shared steps
        vb = {r["step"]: (r["val_bpd"], r["lr"]) for r in eb}
        assert sorted(vb) == [10, 15, 20, 30, 40]
        assert all(vb[r["step"]] == (r["val_bpd"], r["lr"]) for r in ea)
        assert eb[-2:] == ea[-2:]  # steps 30 and 40: identical records, running means included
    assert res.steps == full.steps == 40
    assert res.test == full.test and res.best_step == full.best_step


def test_resume_checks(tmp_path):
    splits = tiny_splits()
    with pytest.raises(CheckpointError, match="last.pt"):
        train(cfg_for(tmp_path), model=tiny_flow(), splits=splits, resume=True)
    train(cfg_for(tmp_path, steps=10), model=tiny_flow(), splits=splits)
    with pytest.raises(ConfigError, match="train.lr"):
        train(cfg_for(tmp_path, lr=1e-4), model=tiny_flow(), splits=splits, resume=True)
    (tmp_path / "run" / "last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg_for(tmp_path), model=tiny_flow(), splits=splits, resume=True)


# ----------------------------------------------------------------------------- stopping, schedule
def test_time_budget_stops_training_and_excludes_eval_time(tmp_path):
    res = train(cfg_for(tmp_path, steps=10**6, time_budget=0.4, eval_every=5), model=tiny_flow(), splits=tiny_splits())
    assert 0.4 <= res.train_time < 2.0
    assert 0 < res.steps < 10**6
    assert res.eval_time > 0


def test_warmup_learning_rate(tmp_path):
    train(cfg_for(tmp_path, steps=30, eval_every=5, warmup=20, lr=1e-2), model=tiny_flow(), splits=tiny_splits())
    lrs = {r["step"]: r["lr"] for r in evals(tmp_path / "run")}
    # lr of step t (1-based) is lr * min(1, t / warmup)
    assert lrs == pytest.approx({5: 2.5e-3, 10: 5e-3, 15: 7.5e-3, 20: 1e-2, 25: 1e-2, 30: 1e-2})


def test_one_step_trains_and_evaluates(tmp_path):
    res = train(cfg_for(tmp_path, steps=1), model=tiny_flow(), splits=tiny_splits())
    assert res.steps == 1 and res.session_steps == 1 and math.isfinite(res.test)


# ----------------------------------------------------------------------------- EMA
def test_ema_of_spectrally_normalised_weights_stays_within_the_lipschitz_bound():
    """The EMA copies power-iteration vectors instead of averaging them, and a residual hybrid
    re-converges them on eval(): every normalised layer of the averaged model then has an exact
    operator norm (dense matrix, svdvals) <= c. Averaging the vectors, as a plain EMA would, gives
    vectors shorter than 1 here, i.e. an underestimated norm and an under-normalised weight."""
    from stableflows.models.classifier import hybrid
    from stableflows.transforms.lipschitz import LipschitzConv2d, LipschitzLinear, operator_matrix

    torch.manual_seed(0)
    model = hybrid(shape=(1, 4, 4), n_classes=3, block="residual", lam=1.0, levels=1, steps_per_level=2,
                   hidden=8).double()
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    model.train()
    early = EMA(model, decay=0.9)  # before the first forward: conv vectors not sized yet
    model.log_prob(x)  # sizes the conv vectors, ActNorm init
    early.update(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in early.module.state_dict().items()
               if k.endswith((".u", ".v")))
    ema = EMA(model, decay=0.9)
    naive = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LipschitzLinear, LipschitzConv2d))}
    assert layers
    for t in range(20):
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.add_(0.5 * torch.randn_like(m.weight))
        model.log_prob(x)  # train mode: power iteration for the new weights
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for n, m in layers.items():
            naive[n] = m.u.clone() if t == 0 else d * naive[n] + (1 - d) * m.u
    assert min(float(u.norm()) for u in naive.values()) < 0.9  # the planted failure of averaging is real
    avg = ema.module.eval()
    for n, m in avg.named_modules():
        if isinstance(m, (LipschitzLinear, LipschitzConv2d)):
            assert abs(float(m.u.norm()) - 1.0) < 1e-9
            exact = float(torch.linalg.svdvals(operator_matrix(m))[0])
            assert exact <= m.coeff * (1 + 1e-6), (n, exact, m.coeff)


def test_ema_matches_the_recursion():
    model = nn.Linear(3, 2).double()
    ema = EMA(model, decay=0.9)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        ref = {k: d * ref[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-12, rtol=0)
    clone = EMA(model, decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert clone.num_updates == 30 and all(torch.equal(clone.module.state_dict()[k], v)
                                           for k, v in ema.module.state_dict().items())
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


# ----------------------------------------------------------------------------- optimizer
def _adamw_reference(theta, grads, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW written out (Loshchilov & Hutter 2019, Alg. 2 with PyTorch's eps placement), float64."""
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


def test_fused_adamw_follows_the_written_out_update():
    from stableflows.train.optim import adamw

    torch.manual_seed(0)
    theta0 = torch.randn(7, 5, dtype=torch.float64)
    grads = [torch.randn(7, 5, dtype=torch.float64) for _ in range(15)]
    p = nn.Parameter(theta0.clone())
    opt = adamw([p], lr=1e-2, weight_decay=0.1)
    assert opt.param_groups[0]["fused"] is True
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _adamw_reference(theta0, grads, lr=1e-2, wd=0.1)
    assert float((p.detach() - ref).abs().max()) < 1e-12


def test_loading_an_unfused_state_keeps_the_fused_kernel():
    from stableflows.train.optim import adamw, load_optimizer_state

    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    slow = torch.optim.AdamW([p], lr=1e-3)  # a checkpoint written before fusing: fused=None
    p.grad = torch.ones(3)
    slow.step()
    fast = adamw([q], lr=1e-3)
    load_optimizer_state(fast, slow.state_dict())
    assert fast.param_groups[0]["fused"] is True
    assert torch.equal(fast.state[q]["exp_avg"], slow.state[p]["exp_avg"])


# ----------------------------------------------------------------------------- non-finite steps
class FlakyObjective(MaximumLikelihood):
    """NaN loss on the calls listed in ``bad`` (1-based), else maximum likelihood."""

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0

    def loss(self, model, batch):
        self.calls += 1
        loss, logs = super().loss(model, batch)
        return (loss * math.nan, logs) if self.calls in self.bad or "all" in self.bad else (loss, logs)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    res = train(cfg_for(tmp_path, steps=20), model=tiny_flow(), splits=tiny_splits(), objective=FlakyObjective({3, 4, 11}))
    assert res.nonfinite_steps == 3 and res.steps == 20 and math.isfinite(res.test)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [3, 4, 11]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["ema"]["num_updates"] == 17  # skipped steps do not update


def test_divergence_aborts_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match=f"{MAX_CONSECUTIVE_NONFINITE} consecutive"):
        train(cfg_for(tmp_path, steps=100), model=tiny_flow(), splits=tiny_splits(), objective=FlakyObjective({"all"}))


class PoisonObjective(MaximumLikelihood):
    """Sets one weight to inf at call ``at`` (as an overflowing update would)."""

    def __init__(self, at):
        self.calls, self.at = 0, at

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            with torch.no_grad():
                next(iter(model.parameters())).view(-1)[0] = math.inf
        return super().loss(model, batch)


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite by step 20 .*last good checkpoint is .*last.pt \(step 10\)"):
        train(cfg_for(tmp_path, steps=40), model=tiny_flow(), splits=tiny_splits(), objective=PoisonObjective(15))
    for name in ("last.pt", "best.pt"):
        s = load_checkpoint(tmp_path / "run" / name)
        assert s["step"] == 10 and all(bool(torch.isfinite(t).all()) for t in s["model"].values())
    import fcntl

    with open(tmp_path / "run" / ".lock") as f:  # the run directory's lock was released on the error path
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # poisoned before the first checkpoint: nothing is written and nothing is called good
    with pytest.raises(TrainingDiverged, match="No checkpoint of this run was written"):
        train(cfg_for(tmp_path, "early", steps=40), model=tiny_flow(), splits=tiny_splits(), objective=PoisonObjective(3))
    assert not (tmp_path / "early" / "last.pt").exists() and not (tmp_path / "early" / "best.pt").exists()


class ScoredObjective(MaximumLikelihood):
    """Brings its own evaluation: selection must follow ``metric`` (here minus the bits/dim)."""

    metric = "score"

    def __init__(self):
        self.steps = []

    def set_step(self, step):
        self.steps.append(step)

    def evaluate(self, model, x, y, levels):
        with torch.no_grad():
            bpd = float(bits_per_dim(model, x, levels, seed=0).double().mean())
        return {"score": -bpd, "bpd": bpd}


def test_objective_with_its_own_evaluation(tmp_path):
    obj = ScoredObjective()
    res = train(cfg_for(tmp_path, steps=30, lr=1e-2), model=tiny_flow(), splits=tiny_splits(), objective=obj)
    assert obj.steps == list(range(30))
    recs = evals(tmp_path / "run")
    assert all(r["val_score"] == pytest.approx(-r["val_bpd"]) for r in recs)
    worst = max(recs, key=lambda r: r["val_bpd"])  # lowest score = highest bits/dim
    assert res.metric == "score" and res.best_step == worst["step"] and res.best_val == pytest.approx(worst["val_score"])
    assert res.test_bpd == pytest.approx(-res.test) and res.test_metrics.keys() == {"score", "bpd"}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("corrupt, error", [
    (lambda s: s.train.__setitem__((0, 0), math.nan), NonFiniteInputError),
    (lambda s: s.val.__setitem__((0, 0), LEVELS), InputOutsideDomain),
    (lambda s: s.test.__setitem__((0, 0), 0.5), InputOutsideDomain),
    (lambda s: setattr(s, "train", s.train[:, :8]), ShapeError),
])
def test_bad_data_is_rejected_before_training(tmp_path, corrupt, error):
    splits = tiny_splits()
    corrupt(splits)
    with pytest.raises(error):
        train(cfg_for(tmp_path), model=tiny_flow(), splits=splits)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, match", [
    ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"ema_decay": 1.0}, "ema_decay"),
    ({"eval_every": 0}, "eval_every"), ({"time_budget": -1.0}, "time_budget"), ({"batch_size": 10**5}, "batch size"),
    ({"steps": 0}, "train.steps must be >= 1"), ({"weight_decay": math.inf}, "weight_decay must be a finite"),
    ({"seed": -1}, "train.seed must be >= 0"), ({"seed": 2**32}, r"train.seed must lie in \[0, 2\*\*32\)"),
    ({"grad_clip": math.nan}, "grad_clip must be a finite"), ({"time_budget": math.inf}, "time_budget must be a finite"),
    ({"lr": math.inf}, "lr must be a finite"), ({"log_every": 0.0}, "log_every"),
])
def test_bad_options_are_rejected_before_training(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        train(cfg_for(tmp_path, **changes), model=tiny_flow(), splits=tiny_splits())
    assert not (tmp_path / "run").exists()


def test_model_and_data_shapes_must_agree(tmp_path):
    with pytest.raises(ShapeError, match="does not match"):
        train(cfg_for(tmp_path), model=Flow(Compose(Affine(8)), (8,)), splits=tiny_splits())
