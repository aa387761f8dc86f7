"""The benchmark: contender adapters (every library's model, pre-transform included) against
brute-force Jacobians, the measurements against independent computations, FLOP counts against
exact formulas, and one session in a child process writing its JSON + Markdown report."""
from __future__ import annotations

import json
import math
import time
import warnings

import pytest
import torch
from torch import nn

from stableflows.bench import flops, harness, models, session
from stableflows.bench.contender import EVENT_SHAPE, LEVELS, Contender, count_params, match_hidden
from stableflows.metrics import bits_per_dim
from stableflows.transforms.base import InputOutsideDomain

SMALL_HIDDEN = 8
LOGDET_ATOL = 1e-9  # float64: adapter log p(v) vs log N(F(v)) + log|det dF/dv| (relative to max(1, |ref|))
ROUNDTRIP_ATOL = 1e-9  # float64 inverse(forward(v)) for exactly invertible maps
# FrEIA's AllInOneBlock builds its soft permutation and that permutation's inverse in float32
# (orthogonal to ~1e-7 only, whatever the module's dtype); a wrong convention in an adapter
# (direction, sign of a log-det, a missing pre-transform term) is off by far more than this
FLOAT32_BUILT = {"FrEIA-allinone": 1e-5}
RESIDUAL_ROUNDTRIP_ATOL = 1e-4  # fixed-point inverses stop at their own tolerances
PERTURB = 0.05  # parameter noise so zero-initialised couplings are not the identity

CONTENDERS = sorted(models.available())


def _v(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *EVENT_SHAPE, generator=g, dtype=torch.float64) * 0.9 + 0.05)  # inside (0, 1)


def _ready(name: str) -> Contender:
    """Small float64 contender, data-dependent init done, parameters perturbed, eval mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = models.build(name, hidden=SMALL_HIDDEN)
        c.module.double()
        c.module.train()
        with torch.no_grad():
            c.log_prob(c.module, _v(32, seed=1))  # ActNorm initialisation of every library
            if c.family != "residual":  # a perturbed Lipschitz net could leave its constraint
                g = torch.Generator().manual_seed(2)
                for p in (q for q in c.module.parameters() if q.requires_grad):  # frozen ones pair with buffers
                    p.add_(PERTURB * torch.randn(p.shape, generator=g, dtype=p.dtype))
    c.module.eval()
    return c


@pytest.mark.parametrize("name", CONTENDERS)
def test_adapter_density_and_inverse(name):
    c = _ready(name)
    v = _v(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            z = c.forward(c.module, v)
            back = c.inverse(c.module, z)
            lp = c.log_prob(c.module, v)
        tol = RESIDUAL_ROUNDTRIP_ATOL if c.family == "residual" else FLOAT32_BUILT.get(name, ROUNDTRIP_ATOL)
        assert float((back - v).abs().max()) <= tol
        assert lp.shape == (2,) and torch.isfinite(lp).all()
        if c.family == "residual":
            return  # stochastic log-det estimators: only the round trip is exact
        for i in range(v.shape[0]):
            def f(x):
                return c.forward(c.module, x.reshape(1, *EVENT_SHAPE)).reshape(-1)

            jac = torch.autograd.functional.jacobian(f, v[i].reshape(-1))  # (64, 64)
            zi = f(v[i].reshape(-1))
            ref = -0.5 * float(zi.pow(2).sum()) - 0.5 * zi.numel() * math.log(2 * math.pi) \
                + float(torch.linalg.slogdet(jac).logabsdet)
            assert abs(float(lp[i]) - ref) <= FLOAT32_BUILT.get(name, LOGDET_ATOL) * max(1.0, abs(ref)), name


def test_every_library_is_benchmarked():
    libs = {models.available()[n](SMALL_HIDDEN, "logit").library for n in CONTENDERS}
    assert {"stableflows", "normflows", "zuko", "FrEIA", "nflows"} <= libs


def test_match_hidden_is_the_closest_width():
    def build(h):
        return nn.Linear(h, h)  # h^2 + h parameters

    for target in (1, 50, 1000, 12345):
        h = match_hidden(build, target, lo=2, hi=400)
        best = min(range(2, 401), key=lambda k: (abs(k * k + k - target), k))
        assert abs(h * h + h - target) == abs(best * best + best - target)
    assert count_params(nn.Linear(3, 4)) == 16


def test_bpd_matches_the_design_definition():
    c = _ready("stableflows-glow")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, LEVELS, (20, *EVENT_SHAPE), generator=g).double()
    u = torch.rand(x.shape, generator=g, dtype=torch.float64)
    got = harness.evaluate_bpd(c, c.module, x, u)
    with torch.no_grad():
        ref = float(bits_per_dim(c.module, x, LEVELS, u=u).mean())
    assert got["nonfinite_pct"] == 0.0
    assert abs(got["bpd"] - ref) <= 1e-12


class _Planted(nn.Module):
    """Identity map; inverse returns NaN for rows whose first entry > 0.8; forward refuses < 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))


def _planted() -> Contender:
    def forward(m, v):
        if bool((v < 0).any()):
            raise InputOutsideDomain("negative input")
        return v * m.w

    def inverse(m, z):
        bad = z.reshape(z.shape[0], -1)[:, 0] > 0.8
        out = z / m.w + 1e-3  # a known error of 1e-3 per entry
        out[bad] = math.nan
        return out

    return Contender(name="planted", library="test", family="test", module=_Planted(), log_prob=None,
                     forward=forward, inverse=inverse)


def test_reconstruction_counts_failures_and_refusals():
    v = torch.full((10, *EVENT_SHAPE), 0.5, dtype=torch.float64)
    v[:3, 0, 0, 0] = 0.9  # 3 non-finite reconstructions
    v[3:5, 0, 0, 1] = -0.5  # 2 refused inputs
    r = harness.reconstruction(_planted(), _planted().module, v)
    assert r["nonfinite_pct"] == pytest.approx(30.0)
    assert r["refused_pct"] == pytest.approx(20.0)
    assert r["median_l2"] == pytest.approx(1e-3 * math.sqrt(64), rel=1e-5)
    assert r["max_l2"] == math.inf


def test_reconstruction_in_chunks_and_under_a_deadline():
    v = torch.full((10, *EVENT_SHAPE), 0.5, dtype=torch.float64)
    v[:3, 0, 0, 0] = 0.9  # rows 0-2 reconstruct non-finitely
    c = _planted()
    whole = harness.reconstruction(c, c.module, v)
    chunked = harness.reconstruction(c, c.module, v, batch=3)
    assert {k: chunked[k] for k in whole} == whole  # chunking does not change the figures
    assert whole["n"] == 10 and not whole["truncated"]
    # a deadline already passed: the first chunk is measured, then it stops
    cut = harness.reconstruction(c, c.module, v, batch=4, deadline=time.perf_counter())
    assert cut["n"] == 4 and cut["n_requested"] == 10 and cut["truncated"]
    assert cut["nonfinite_pct"] == pytest.approx(75.0)  # 3 of the 4 measured


def test_measure_budget_must_be_positive():
    with pytest.raises(ValueError, match="measure_budget"):
        harness.BenchSettings(measure_budget=0.0)


def test_flop_count_of_a_linear_training_step():
    b, i, o = 16, 24, 12
    lin = nn.Linear(i, o)
    x = torch.randn(b, i, requires_grad=True)

    def step():
        lin(x).sum().backward()

    # forward 2 b i o; backward: grad of input 2 b i o, grad of weight 2 b i o
    assert flops.count_flops(step) == 6 * b * i * o
    with flops._RegistryCounter() as plain:
        step()
    assert sum(plain.by_op.values()) == 6 * b * i * o


def test_flop_count_survives_autograd_grad_inside_forward():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def step():  # as backward-in-forward: a gradient taken during the forward pass
        y = lin(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (y.sum() + g.sum()).backward()

    assert flops.count_flops(step) > 0


def test_matmul_rate_is_positive():
    r = flops.matmul_rate(64, repeats=2)
    assert r["flops_per_s"] == pytest.approx(2 * 64 ** 3 / r["seconds"])


def test_targets_are_read_off_the_results():
    def row(name, lib, fam, bpd, sps, nf):
        rec = {f: {"nonfinite_pct": 0.0} for f in session.RECON_FAMILIES}
        rec["uniform"]["nonfinite_pct"] = nf
        return {"name": name, "library": lib, "family": fam, "params": 100, "test_bpd_selected": bpd,
                "steps_per_s": sps, "reconstruction": rec}

    results = [row("stableflows-glow", "stableflows", "glow-like", 2.0, 50.0, 0.0),
               row("peer-glow", "peer", "glow-like", 2.5, 40.0, 10.0),
               row("peer-nsf", "peer", "spline", 1.9, 70.0, 0.0),
               {"name": "broken", "error": "boom"}]
    t = session.check_targets(results)
    assert t["lowest_test_bpd"] == {"model": "peer-nsf", "bpd": 1.9, "met": False}
    assert t["glow_speed"]["met"] and t["glow_speed"]["peers"][0]["ratio"] == pytest.approx(1.25)
    fam = t["nonfinite"]["families"]
    assert [f["family"] for f in fam] == ["uniform"] and fam[0]["met"]
    md = session.markdown({"started_utc": "t", "machine": {"cpu": "x", "cores": 2, "torch": "2"}, "libraries": {},
                           "settings": {"batch_size": 64, "threads": 2, "budget": 1, "preprocess": "logit",
                                        "device": "cpu"}, "matmul_at_start": {"n": 8, "flops_per_s": 1e9},
                           "results": [results[-1]], "targets": t})
    assert "NOT met" in md and "failed: boom" in md


def test_glow_speed_is_judged_on_the_paired_timing_when_there_is_one():
    rec = {f: {"nonfinite_pct": 0.0} for f in session.RECON_FAMILIES}
    results = [{"name": "stableflows-glow", "library": "stableflows", "family": "glow-like", "params": 100,
                "test_bpd_selected": 2.0, "steps_per_s": 13.0, "reconstruction": rec},
               {"name": "peer-glow", "library": "peer", "family": "glow-like", "params": 100,
                "test_bpd_selected": 2.1, "steps_per_s": 12.0, "reconstruction": rec}]
    paired = {"models": [{"name": "stableflows-glow", "ms_per_step": 80.0}, {"name": "peer-glow", "ms_per_step": 72.0}]}
    t = session.check_targets(results, paired)["glow_speed"]
    assert t["judged_on"] == "paired" and not t["met"]  # faster as processes, slower when paired
    assert t["peers"][0]["paired_ratio"] == pytest.approx(0.9) and t["peers"][0]["ratio"] == pytest.approx(13 / 12)
    assert session.check_targets(results, {"error": "boom"})["glow_speed"]["judged_on"] == "processes"
    assert session.paired_names(results) == ["stableflows-glow", "peer-glow"]
    assert session.paired_names(results[1:]) == []


def test_paired_timing_sees_a_planted_delay():
    import dataclasses
    import time

    from stableflows.bench.paired import paired_step_times

    delay = 0.05  # seconds slept in every log_prob of the slow copy: a lower bound on its extra cost

    def slow_log_prob(m, v, _f=None):
        time.sleep(delay)
        return fast.log_prob(m, v)

    torch.manual_seed(0)
    fast = models.build("stableflows-realnvp", hidden=SMALL_HIDDEN)
    torch.manual_seed(0)
    slow = dataclasses.replace(models.build("stableflows-realnvp", hidden=SMALL_HIDDEN), name="slow",
                               log_prob=slow_log_prob)
    s = harness.BenchSettings(threads=1, match_params=False, ema_decay=0.9)
    out = paired_step_times(["fast", "slow"], s, rounds=2, steps=2, warmup=1, contenders={"fast": fast, "slow": slow})
    f, sl = out["models"]
    assert out["rounds"] == 2 and len(f["rounds_ms"]) == len(sl["rounds_ms"]) == 2
    # the sleep is a lower bound; the margin absorbs the fast copy's own jitter on a loaded host
    assert sl["ms_per_step"] - f["ms_per_step"] >= 0.6 * 1e3 * delay
    assert f["ratio_to_first"] == 1.0 and sl["ratio_to_first"] == pytest.approx(f["ms_per_step"] / sl["ms_per_step"])
    with pytest.raises(ValueError):
        paired_step_times([], s)


def test_session_times_the_glow_like_models_paired(tmp_path):
    s = harness.BenchSettings(budget=0.3, eval_every=2, threads=1, ood_n=8, match_params=False, flops=False,
                              paired_rounds=1)
    report, _ = session.run_session(["stableflows-glow", "FrEIA-allinone"], s, tmp_path, log=lambda _: None)
    assert all("error" not in r for r in report["results"]), report["results"]
    p = report["paired"]
    assert "error" not in p, p
    assert [m["name"] for m in p["models"]] == ["stableflows-glow", "FrEIA-allinone"] and p["rounds"] == 1
    assert report["targets"]["glow_speed"]["judged_on"] == "paired"
    assert "paired" in (tmp_path / "latest.md").read_text()


def test_session_runs_a_model_in_its_own_process(tmp_path):
    s = harness.BenchSettings(budget=0.5, eval_every=2, threads=1, ood_n=8, match_params=False)
    report, where = session.run_session(["zuko-realnvp"], s, tmp_path, log=lambda _: None)
    (r,) = report["results"]
    assert "error" not in r, r
    assert r["library"] == "zuko" and r["steps"] >= 1 and r["params"] == count_params(
        models.build("zuko-realnvp").module)
    assert set(r["reconstruction"]) == set(session.RECON_FAMILIES)
    assert 0 < r["flops"]["fraction_of_matmul"]
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["results"][0]["name"] == "zuko-realnvp"
    md = (where / "bench.md").read_text()
    assert "| zuko-realnvp |" in md and (tmp_path / "latest.md").read_text() == md


def test_cli_rejects_unknown_models(capsys):
    from stableflows.cli import main

    assert main(["bench", "--models", "no-such-model", "--budget", "1"]) == 2
    assert "no-such-model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 28x28 (Fashion-MNIST)
FM_SHAPE = (1, 28, 28)
FM_LEVELS = 256
AUTOREGRESSIVE = {"zuko-maf", "zuko-nsf"}  # inverses of 784 sequential passes (~15 s here): forward only
CONV = ("stableflows-glow", "normflows-glow", "FrEIA-glow", "FrEIA-allinone")  # reshape to (4, 14, 14)


def test_fashion_mnist_task_and_settings():
    from stableflows.bench.contender import TASKS, get_task

    t = TASKS["fashion-mnist"]
    assert (t.shape, t.levels) == (FM_SHAPE, FM_LEVELS) and get_task("fmnist") is t
    assert harness.BenchSettings(data="fmnist").data == "fashion-mnist"
    with pytest.raises(ValueError, match="unknown benchmark data"):
        harness.BenchSettings(data="cifar100")


def _ready28(name: str) -> Contender:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = models.build(name, hidden=SMALL_HIDDEN, shape=FM_SHAPE)
        c.module.double().train()
        with torch.no_grad():
            c.log_prob(c.module, _v28(16, seed=1))
            if c.family != "residual":
                g = torch.Generator().manual_seed(2)
                for p in (q for q in c.module.parameters() if q.requires_grad):
                    p.add_(PERTURB * torch.randn(p.shape, generator=g, dtype=p.dtype))
    c.module.eval()
    return c


def _v28(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *FM_SHAPE, generator=g, dtype=torch.float64) * 0.9 + 0.05


@pytest.mark.parametrize("name", CONTENDERS)
def test_adapters_at_28x28(name):
    c = _ready28(name)
    v = _v28(2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        z = c.forward(c.module, v)
        lp = c.log_prob(c.module, v)
        assert z.shape[0] == 2 and z[0].numel() == 784 and lp.shape == (2,) and torch.isfinite(lp).all()
        if name in AUTOREGRESSIVE:
            return
        back = c.inverse(c.module, z)
    tol = RESIDUAL_ROUNDTRIP_ATOL if c.family == "residual" else FLOAT32_BUILT.get(name, ROUNDTRIP_ATOL)
    assert back.shape == v.shape and float((back - v).abs().max()) <= tol
    if name in CONV:  # the squeezed (4, 14, 14) layouts: log-det against a brute-force 784 x 784 Jacobian
        def f(x):
            return c.forward(c.module, x.reshape(1, *FM_SHAPE)).reshape(-1)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap falls back to a loop for some FrEIA ops
            jac = torch.autograd.functional.jacobian(f, v[0].reshape(-1), vectorize=True)  # (784, 784)
        with torch.no_grad():
            z0 = f(v[0].reshape(-1))
        ref = -0.5 * float(z0.pow(2).sum()) - 392 * math.log(2 * math.pi) + float(torch.linalg.slogdet(jac).logabsdet)
        assert abs(float(lp[0]) - ref) <= FLOAT32_BUILT.get(name, LOGDET_ATOL) * max(1.0, abs(ref))


def _splits28(n_train=96, n_val=16, n_test=24):
    """Random 8-bit 28x28 splits (the harness's shape and level handling, not the data, is tested)."""
    from stableflows.data.splits import Splits

    g = torch.Generator().manual_seed(0)

    def lv(n):
        return torch.randint(0, FM_LEVELS, (n, *FM_SHAPE), generator=g).float()

    return Splits(train=lv(n_train), val=lv(n_val), test=lv(n_test), y_train=None, y_val=None, y_test=None,
                  levels=FM_LEVELS, shape=FM_SHAPE, name="fashion-mnist")


def test_run_one_at_28x28_with_a_tiny_budget():
    s = harness.BenchSettings(data="fashion-mnist", budget=30, max_steps=3, eval_every=2, threads=1, ood_n=8,
                              match_params=False, flops=False, paired_rounds=0)
    splits = _splits28()
    torch.manual_seed(0)
    c = models.build("stableflows-glow", hidden=4, shape=FM_SHAPE)
    r = harness.run_one("stableflows-glow", s, splits=splits, contender=c)
    assert r["steps"] == 3 and r["settings"]["data"] == "fashion-mnist"
    assert [h["step"] for h in r["history"]] == [2, 3]
    assert math.isfinite(r["test_bpd_selected"]) and 0 < r["test_bpd_selected"] < 16
    assert r["reconstruction"]["test"]["n"] == 24 and all(r["reconstruction"][f]["n"] == 8 for f in
                                                         harness.OOD_BENCH_FAMILIES)
    # the selected weights' test bpd is the docs/METRICS.md bits/dim with 256 levels and the fixed noise
    from stableflows.train.evaluate import fixed_noise

    x, u = splits.test.double(), fixed_noise(tuple(splits.test.shape)).double()
    got = harness.evaluate_bpd(c, c.module.double(), x, u, FM_LEVELS)
    with torch.no_grad():
        ref = float(bits_per_dim(c.module.eval(), x, FM_LEVELS, u=u).mean())
    assert abs(got["bpd"] - ref) <= 1e-9
    with pytest.raises(ValueError, match="digits"):
        harness.run_one("stableflows-glow", harness.BenchSettings(max_steps=1), splits=splits, contender=c)


def test_paired_timing_and_report_at_28x28(tmp_path):
    from stableflows.bench.paired import paired_step_times

    s = harness.BenchSettings(data="fashion-mnist", threads=1, match_params=False)
    cs = {n: models.build(n, hidden=4, shape=FM_SHAPE) for n in ("stableflows-glow", "FrEIA-glow")}
    out = paired_step_times(list(cs), s, rounds=1, steps=1, warmup=0, splits=_splits28(), contenders=cs)
    assert [m["name"] for m in out["models"]] == list(cs) and all(m["ms_per_step"] > 0 for m in out["models"])
    md = session.markdown({"started_utc": "t", "machine": {"cpu": "x", "cores": 2, "torch": "2"}, "libraries": {},
                           "settings": {"batch_size": 64, "threads": 2, "budget": 1, "preprocess": "logit",
                                        "device": "cpu", "data": "fashion-mnist"},
                           "matmul_at_start": {"n": 8, "flops_per_s": 1e9}, "results": [], "targets": {}})
    assert "Task: fashion-mnist (28x28, 256 levels)" in md


def test_cli_bench_data_option(capsys):
    from stableflows.cli import main

    assert main(["bench", "--data", "cifar100", "--list"]) == 2
    capsys.readouterr()
    assert main(["bench", "--data", "fashion-mnist", "--list"]) == 0
    assert "stableflows-glow" in capsys.readouterr().out

