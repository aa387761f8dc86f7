"""InvertibilityTracker: the per-step reconstruction errors and Jacobian singular values it records
during training equal a recomputation on a snapshot of the model taken at the same step."""
import copy
import math

import torch

from stableflows.audit import InvertibilityTracker

D = 8


def _flow():
    from stableflows.models import realnvp

    torch.manual_seed(0)
    return realnvp(shape=(D,), steps_per_level=2, hidden=16, logit_alpha=0.0)


def _ref(snapshot, x, p):
    snapshot = snapshot.eval()
    with torch.no_grad():
        xh = snapshot.inverse(snapshot(x)[0])[0]
    err = torch.linalg.norm((xh.double() - x.double()), dim=1)
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    s64 = copy.deepcopy(snapshot).double()
    smin, smax = [], []
    for xi in x[:p].double():
        J = torch.autograd.functional.jacobian(lambda v: s64(v[None])[0][0], xi)
        s = torch.linalg.svdvals(J)
        smax.append(s[0])
        smin.append(s[-1])
    return err, torch.stack(smin), torch.stack(smax)


def test_tracker_records_equal_a_recomputation(tmp_path):
    flow = _flow()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(512, D, generator=g) * torch.linspace(0.2, 2.0, D)
    x_fixed = data[:24].clone()
    tracker = InvertibilityTracker(x_fixed, every=5, spectra_points=4, spectra_method="exact")
    opt = torch.optim.Adam(flow.parameters(), 1e-2)
    snapshots = {}
    flow.train()
    flow(data[:256])  # ActNorm initialisation
    for step in range(16):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = -flow.log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker(step, flow)
        if step % 5 == 0:
            snapshots[step] = copy.deepcopy(flow)
    assert flow.training  # the tracker restores the training mode
    h = tracker.history()
    assert h["steps"].tolist() == [0, 5, 10, 15] == sorted(snapshots)
    assert h["errors"].shape == (4, 24) and h["sigma_min"].shape == (4, 4)
    for t, step in enumerate(h["steps"].tolist()):
        err, smin, smax = _ref(snapshots[step], x_fixed, 4)
        assert torch.allclose(h["errors"][t], err, rtol=1e-9, atol=1e-15), step
        assert torch.allclose(h["sigma_min"][t], smin, rtol=1e-8), step
        assert torch.allclose(h["sigma_max"][t], smax, rtol=1e-8), step
        assert torch.allclose(h["cond"][t], smax / smin, rtol=1e-8), step
    # the training changed the model, so the records differ between steps
    assert not torch.allclose(h["sigma_max"][0], h["sigma_max"][-1])
    d = tracker.to_dict()
    assert d["steps"] == [0, 5, 10, 15] and len(d["errors"]) == 4
    p = tracker.plot(tmp_path / "stability.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracker_counts_a_nonfinite_reconstruction():
    """A planted non-finite example stays in the record as inf (drawn in orange), never dropped."""
    flow = _flow().eval()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    x[2, 0] = math.inf
    tracker = InvertibilityTracker(x, every=1, spectra_points=0)
    tracker(0, flow)
    e = tracker.history()["errors"][0]
    assert e.shape == (6,) and math.isinf(float(e[2]))
    assert bool(torch.isfinite(e[[0, 1, 3, 4, 5]]).all())


def test_tracker_as_a_train_loop_callback(tmp_path):
    """With stableflows.train.train: one record per evaluation, at the evaluation's step."""
    from stableflows.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from stableflows.train import train

    cfg = RunConfig(model=ModelConfig(model="realnvp", hidden=16, levels=1, steps_per_level=2, logit_alpha=0.0),
                    data=DataConfig(name="moons", n_toy=512),
                    train=TrainConfig(steps=20, eval_every=10, batch_size=64, out_dir=str(tmp_path / "run"),
                                      progress=False, time_budget=None, threads=1))
    from stableflows.models.registry import build_model

    model = build_model(cfg.model, (2,))
    tracker = InvertibilityTracker(torch.randn(16, 2, generator=torch.Generator().manual_seed(2)),
                                   spectra_points=2, spectra_method="exact")
    train(cfg, model=model, callbacks=[tracker.loop_callback(model)])
    steps = tracker.history()["steps"].tolist()
    assert steps and steps == sorted(steps) and steps[-1] == 20 and 10 in steps
    # the last record is the final model's: recompute it
    err, smin, smax = _ref(copy.deepcopy(model), tracker.x, 2)
    h = tracker.history()
    assert torch.allclose(h["errors"][-1], err, rtol=1e-9, atol=1e-15)
    assert torch.allclose(h["sigma_max"][-1], smax, rtol=1e-8)
