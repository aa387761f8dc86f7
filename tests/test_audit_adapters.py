"""Adapters of peer libraries (normflows, zuko, FrEIA, nflows): the audit of the adapted flow
reports the reconstruction error of the library's own forward/inverse, and its analytic log-det
agrees with ``slogdet`` of a brute-force float64 autograd Jacobian of the library's own map.

The peer libraries are in the ``test`` extras; each test only skips when its library is not
importable at all.
"""
import copy
import math

import pytest
import torch

from stableflows.audit import as_invertible, audit

D = 4
N = 16


def _perturb(module, scale=0.2, seed=0):
    """Move trainable parameters off the (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _data(seed=1):
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed))


def _ref_l2(x, fwd, inv):
    with torch.no_grad():
        xh = inv(fwd(x))
    return torch.linalg.norm(xh.double() - x.double(), dim=1)


def _brute_logdet(fwd64, x):
    """log|det dF/dx| per row of x, float64 autograd Jacobian of the library's own forward."""
    out = []
    for xi in x.double():
        J = torch.autograd.functional.jacobian(lambda v: fwd64(v[None])[0], xi)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def _check(model, fwd, inv, fwd64, logdet_native=None, *, kind):
    x = _data()
    rep = audit(model, x, families="test,samples_t1", spectra_points=N, repeat=0, localize=False)
    assert rep.meta["kind"] == kind and rep.meta["shadow"] is True, rep.notes
    # reconstruction error of the library's own maps, recomputed here
    ref = _ref_l2(x, fwd, inv)
    assert torch.allclose(rep.families["test"].errors["l2"], ref, rtol=1e-9, atol=1e-12)
    assert rep.verdict["test"].status == "invertible", rep.verdict.table()
    assert rep.verdict["samples_t1"].n == N
    # the adapter's forward is the library's forward (data -> latent)
    m = as_invertible(model)
    with torch.no_grad():
        assert torch.allclose(m.forward(x), fwd(x), rtol=1e-6, atol=1e-6)
    # analytic log-det (float64 shadow) vs slogdet of a brute-force float64 Jacobian
    sp = rep.families["test"].spectra
    brute = _brute_logdet(fwd64, x[sp.index])
    assert float(brute.abs().max()) > 1e-2  # a map with a non-trivial volume change
    assert torch.allclose(sp.logdet_analytic, brute, rtol=0, atol=1e-8)
    assert torch.allclose(sp.logdet_numeric, brute, rtol=0, atol=1e-10)
    assert float(sp.logdet_mismatch.max()) < 1e-8
    if logdet_native is not None:  # the library's own log-det agrees too
        with torch.no_grad():
            assert torch.allclose(logdet_native(x.double()).double(), brute, atol=1e-8)
    return rep


def test_zuko_adapter():
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(D, transforms=2, hidden_features=(16,))
    _perturb(flow)
    f64 = copy.deepcopy(flow).double()
    _check(flow, lambda x: flow().transform(x), lambda z: flow().transform.inv(z),
           lambda x: f64().transform(x), lambda x: f64().transform.call_and_ladj(x)[1], kind="zuko")


def test_normflows_adapter():
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 16, D], init_zeros=False)),
                  nf.flows.Permute(D, mode="swap")]
    nfm = nf.NormalizingFlow(nf.distributions.base.DiagGaussian(D), flows)
    _perturb(nfm, scale=0.1)
    f64 = copy.deepcopy(nfm).double()

    def gen(flow_list):  # normflows is generative: x = flows[-1](... flows[0](z))
        def inv(z):
            for f in flow_list:
                z, _ = f(z)
            return z
        return inv

    def native_fwd(m):
        def fwd(x):
            for f in reversed(m.flows):
                x, _ = f.inverse(x)
            return x
        return fwd

    # nfm.inverse is normflows' own data -> latent map
    with torch.no_grad():
        x = _data()
        assert torch.allclose(nfm.inverse(x), native_fwd(nfm)(x), atol=1e-6)
    _check(nfm, nfm.inverse, gen(nfm.flows), f64.inverse, kind="normflows")


def test_freia_adapter():
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)

    def sub(ci, co):
        return torch.nn.Sequential(torch.nn.Linear(ci, 16), torch.nn.Tanh(), torch.nn.Linear(16, co))

    inn = Ff.SequenceINN(D)
    for _ in range(2):
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=sub, clamp=2.0)
        inn.append(Fm.PermuteRandom, seed=0)
    _perturb(inn)
    f64 = copy.deepcopy(inn).double()
    _check(inn, lambda x: inn(x)[0], lambda z: inn(z, rev=True)[0], lambda x: f64(x)[0],
           lambda x: f64(x)[1], kind="FrEIA")


def test_nflows_adapter():
    pytest.importorskip("nflows")
    from nflows import distributions, flows, transforms

    torch.manual_seed(0)
    tr = transforms.CompositeTransform([transforms.MaskedAffineAutoregressiveTransform(D, 16),
                                        transforms.ReversePermutation(D),
                                        transforms.MaskedAffineAutoregressiveTransform(D, 16)])
    flow = flows.Flow(tr, distributions.StandardNormal([D]))
    _perturb(flow, scale=0.1)
    f64 = copy.deepcopy(flow).double()
    _check(flow, flow.transform_to_noise, lambda z: flow._transform.inverse(z)[0], f64.transform_to_noise,
           lambda x: f64._transform(x)[1], kind="nflows")


def test_planted_failure_in_a_peer_flow_is_found():
    """A zuko flow whose inverse is broken on purpose for some inputs: the audit counts exactly those."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(D, transforms=1, hidden_features=(8,))
    _perturb(flow)
    x = _data(2)
    m = as_invertible(flow)
    inv = m._inverse
    m._inverse = lambda z: torch.where(z[:, :1] > 0.0, torch.full_like(z, math.nan), inv(z))
    rep = audit(m, x, families="test", spectra_points=0, repeat=0)
    with torch.no_grad():
        bad = flow().transform(x)[:, 0] > 0.0
    assert 0 < int(bad.sum()) < N
    assert rep.verdict["test"].n_fail == rep.verdict["test"].n_nonfinite == int(bad.sum())
    assert torch.equal(~torch.isfinite(rep.families["test"].errors["l2"]), bad)
