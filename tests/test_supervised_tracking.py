"""000 Fig. 2/5 in the supervised experiments: the reconstruction error of every element of a fixed
minibatch over training, and the singular values / condition number of J_F there, checked against
brute-force float64 Jacobians."""
from __future__ import annotations

import json
import math

import torch

from stableflows.config import DataConfig
from stableflows.data import load_dataset
from stableflows.experiments import exploding_inverses as E
from stableflows.models.classifier import classifier
from stableflows.train.supervised import ClassificationObjective


def _brute_sv(flow, x: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of the float64 Jacobian of ``flow``'s forward at each point."""
    import copy

    f64 = copy.deepcopy(flow).double().eval()
    out = []
    for xi in x.double():
        j = torch.autograd.functional.jacobian(lambda t: f64(t[None])[0].reshape(-1), xi)
        out.append(torch.linalg.svdvals(j.reshape(j.shape[0], -1)))
    return torch.stack(out)


def test_tracked_errors_and_spectra_match_brute_force():
    s = load_dataset(DataConfig(name="digits"))
    torch.manual_seed(0)
    m = classifier(shape=s.shape, n_classes=10, levels=1, steps_per_level=2, hidden=16, coupling="affine",
                   memory_saving=True)
    h = E.train_classifier(m, s, ClassificationObjective(), steps=12, batch_size=32, lr=1e-3, track_every=5,
                           cond_every=5, cond_points=3, angle_every=100)
    assert [st for st, _ in h["recon_all"]] == [0, 5, 10, 11] == h["step"]
    x = E._fixed_points(s.val, s.levels, 64)
    for (st, errs), (_, med, mx, nbad) in zip(h["recon_all"], h["recon"]):
        e = torch.tensor(errs, dtype=torch.float64)
        assert e.shape == (64,) and nbad == int((~torch.isfinite(e)).sum())
        assert mx == float(e.max()) and med == float(e.median())
    assert [t for t, *_ in h["spectra"]] == [0, 5, 10, 11]
    # the last entry was taken from the final weights: compare with float64 brute force
    m.eval()
    sv = _brute_sv(m.flow, x[:3])
    _, smin, smax, cond = h["spectra"][-1]
    assert math.isclose(smax, float(sv[:, 0].max()), rel_tol=1e-4)
    assert math.isclose(smin, float(sv[:, -1].min()), rel_tol=1e-4)
    assert math.isclose(cond, float((sv[:, 0] / sv[:, -1]).max()), rel_tol=1e-4)
    # the final round trip of the fixed minibatch: recomputed independently
    with torch.no_grad():
        z = m.flow(x)[0]
        err = (m.flow.inverse(z)[0] - x).reshape(64, -1).double().norm(dim=1)
    assert torch.allclose(torch.tensor(h["recon_all"][-1][1], dtype=torch.float64), err, rtol=1e-6, atol=1e-12)


def test_tracked_spectra_above_the_exact_limit_use_lanczos():
    """784 dimensions (> COND_EXACT_MAX_DIM): the Lanczos estimate with sigma_min sharpened through
    the inverse agrees with the exact SVD of an untrained 28x28 classifier."""
    torch.manual_seed(1)
    m = classifier(shape=(1, 28, 28), n_classes=10, levels=1, steps_per_level=2, hidden=8, coupling="affine",
                   memory_saving=True)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        m.train()
        m.log_prob(torch.rand(64, 1, 28, 28))  # ActNorm's data-dependent initialisation
    m.eval()
    smin, smax, cond = E._tracked_spectra(m, x)
    sv = _brute_sv(m.flow, x)
    assert math.isclose(smax, float(sv[:, 0].max()), rel_tol=1e-3)
    assert math.isclose(smin, float(sv[:, -1].min()), rel_tol=1e-2)
    assert math.isclose(cond, float((sv[:, 0] / sv[:, -1]).max()), rel_tol=2e-2)


def test_quick_supervised_table_writes_fig_2_5(tmp_path):
    s = E.supervised_table(tmp_path, quick=True, couplings=("affine",), regs=("none",))
    (row,) = s["rows"]
    hist = json.loads((tmp_path / "histories.json").read_text())["affine/none"]
    conds = [c for *_, c in hist["spectra"]]
    assert len(conds) == 5 and row["max_cond_train"] == max(conds) and max(conds) >= 1.0
    assert all(len(e) == 64 for _, e in hist["recon_all"])
    assert (tmp_path / "stability.png").stat().st_size > 10_000
    assert "max_cond_train" in (tmp_path / "table.md").read_text()


def test_assess_spectra_match_brute_force_and_do_not_depend_on_timing():
    """The supervised table's min / max singular value: the audit without a time budget, exact
    Jacobians at 64-d, so every test point's value equals the float64 brute-force SVD, and two calls
    give the same figures (under the default budget the method and points followed timings)."""
    import dataclasses

    s = load_dataset(DataConfig(name="digits"))
    s = dataclasses.replace(s, test=s.test[:40], y_test=s.y_test[:40])
    torch.manual_seed(0)
    m = classifier(shape=s.shape, n_classes=10, levels=1, steps_per_level=2, hidden=16, coupling="affine",
                   memory_saving=True)
    E.train_classifier(m, s, ClassificationObjective(), steps=10, batch_size=32, lr=1e-3, track_every=100,
                       cond_every=0, angle_every=100)
    a = E.assess(m, s, spectra_points=64)  # 64 >= 40: every test point
    b = E.assess(m, s, spectra_points=64)
    assert a == b and a["spectra_method"] == "exact" and a["sv_unresolved"] == 0
    assert m.training  # assess hands the model back in training mode
    m.eval()
    from stableflows.audit.core import _to_model_space

    sv = _brute_sv(m.flow, _to_model_space(s.test, s.levels, 0))  # the audit's fixed dequantisation noise
    assert math.isclose(a["min_sv"], float(sv[:, -1].min()), rel_tol=1e-4)
    assert math.isclose(a["max_sv"], float(sv[:, 0].max()), rel_tol=1e-4)


def test_resolved_extreme_skips_unresolved_points():
    v = torch.tensor([math.nan, 3e-9, 0.5, math.nan], dtype=torch.float64)
    assert E._resolved_extreme(v, largest=False) == 3e-9 and E._resolved_extreme(v, largest=True) == 0.5
    assert math.isnan(E._resolved_extreme(torch.full((3,), math.nan), largest=False))
    assert math.isnan(E._resolved_extreme(None, largest=True))


def test_spectra_of_a_memory_saving_model_use_exact_products_not_finite_differences():
    """The memory-saving backward is once differentiable: outside the audit's eval mode the
    double-backward JVP fails and Lanczos fell back to float32 central differences (step 5e-3 of
    ||x||), which on a trained 28x28 affine classifier gave sigma_max(J^-1) = 5e16 where the exact
    Jacobian has 219. Inside it memory saving is off, the JVP is exact, and it is restored after."""
    from stableflows.audit import autodiff as ad
    from stableflows.audit.adapters import as_invertible
    from stableflows.audit.spectra import _flat, jacobians
    from stableflows.memory import memory_saving_modules

    torch.manual_seed(2)
    m = classifier(shape=(1, 8, 8), n_classes=10, levels=1, steps_per_level=2, hidden=8, coupling="affine",
                   memory_saving=True)
    m.eval()
    inv = as_invertible(m)
    x = torch.rand(3, 1, 8, 8) * 0.9 + 0.05
    f = _flat(inv.forward, (1, 8, 8))
    outside = ad.jvp_fn(f, x.reshape(3, -1))
    v = torch.randn(3, 64)
    outside(v)
    assert outside.method() == "finite_difference"  # the failure mode this guards against
    with inv.eval_mode():
        assert not any(mod.enabled for mod in memory_saving_modules(m))
        jvp = ad.jvp_fn(f, x.reshape(3, -1))
        jv = jvp(v)
        assert jvp.method() == "double_backward"
        jac = jacobians(inv.forward, x)  # (3, 64, 64), reverse mode
    assert torch.allclose(jv, torch.einsum("bij,bj->bi", jac, v), rtol=1e-5, atol=1e-6)
    assert all(mod.enabled for mod in memory_saving_modules(m))
    # spectra() enters the eval mode itself (every caller: the audit, its training callback, the
    # tracked spectra): Lanczos called on the memory-saving model directly matches the exact SVD
    from stableflows.audit.spectra import spectra

    sv = torch.linalg.svdvals(jac.double())
    it = spectra(inv, x, torch.arange(3), method="iterative", steps=64)
    # 1e-6: exact products give ~1e-7 here, finite differences 4e-6 / 6e-6 (checked when written)
    assert torch.allclose(it.fwd_smax, sv[:, 0], rtol=1e-6, atol=0)
    assert torch.allclose(it.fwd_smin, sv[:, -1], rtol=1e-6, atol=0)
    assert all(mod.enabled for mod in memory_saving_modules(m))
