"""The audit on flows built with the peer libraries as their users build them (issue 15).

Every structure a user of normflows, zuko, FrEIA or nflows commonly writes: the audit reports the
errors of the library's own maps (recomputed here from the library's public calls), errors of the
model or adapter are "could not run" (never a verdict), and the per-layer localisation walks the
library's own sequence of transforms and names the layer planted to destroy precision, with no
false alarm on the same model without the plant. The plant maps ``x -> 1e-10 x + 1`` towards the
latent (values stay of order 1 for the layers after it): float32 keeps no digit of ``x`` there
(its spacing at 1 is 1.2e-7), float64 keeps about 6, so float64 reconstructs within 1e-3 and the
cause is floating point.

Tiny models (D = 4..6, tens of examples); each test runs in about a second.
"""
import math
import warnings

import pytest
import torch
from torch import nn

from stableflows.audit import as_invertible, audit

warnings.filterwarnings("ignore", category=UserWarning)

PLANT_SCALE, PLANT_SHIFT = 1e-10, 1.0  # the planted layer: x -> PLANT_SCALE x + PLANT_SHIFT towards the latent
TOL = 1e-3
N = 24


def _x(n=N, d=6, seed=1):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def _perturb(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and torch.is_floating_point(p):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _l2(x, x_hat):
    d = (x_hat.double() - x.double()).reshape(x.shape[0], -1)
    e = d.norm(dim=1)
    e[~torch.isfinite(d).all(dim=1)] = math.inf
    return e


def _check_planted(rep, culprit):
    v = rep.verdict["test"]
    assert v.status == "not invertible" and v.n_fail == v.n_checked, rep.verdict.table()
    assert v.cause == "floating point", v  # float64 reconstructs: a precision failure
    assert v.culprit == culprit, (v.culprit, v.culprit_reason)
    assert "error jumps" in v.culprit_reason


def _check_healthy(rep, names):
    v = rep.verdict["test"]
    assert v.status == "invertible" and v.culprit is None, rep.verdict.table()
    loc = rep.families["test"].localization
    assert loc is not None and [r.name for r in loc.layers] == names[::-1]  # inverse order
    assert loc.culprit is None and not loc.note


# ----------------------------------------------------------------------------- normflows
def _nf_flow(plant: bool):
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = []
    for i in range(3):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([3, 16, 6], init_zeros=False)),
                  nf.flows.Permute(6, mode="swap")]
    shift = nf.flows.AffineConstFlow((6,))
    flows.insert(2, shift)
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(6, trainable=False), flows)
    _perturb(model, 0.05)
    if plant:  # normflows' data -> latent map of AffineConstFlow is its inverse: (x - t) exp(-s)
        with torch.no_grad():
            shift.s.fill_(-math.log(PLANT_SCALE))
            shift.t.fill_(-PLANT_SHIFT / PLANT_SCALE)
    return model


def test_normflows_flows_are_localised_and_the_planted_layer_is_named():
    x = _x()
    rep = audit(_nf_flow(True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "flows.2")  # data -> latent walks flows backwards: the plant is met after flows 3..6
    healthy = _nf_flow(False)
    rep = audit(healthy, x, families="test", spectra_points=0, repeat=0)
    # every elementary flow, the composite AffineCouplingBlock expanded into Split / AffineCoupling / Merge
    names = []
    for i in range(len(healthy.flows) - 1, -1, -1):
        f = healthy.flows[i]
        if type(f).__name__ == "AffineCouplingBlock":
            names += [f"flows.{i}.flows.{j}" for j in (2, 1, 0)]
        else:
            names.append(f"flows.{i}")
    _check_healthy(rep, names)
    # the errors are those of normflows' own maps (NormalizingFlow.inverse: data -> latent)
    with torch.no_grad():
        ref = _l2(x, healthy.forward(healthy.inverse(x)))
    assert torch.equal(rep.families["test"].errors["l2"], ref)


def _nf_multiscale(plant: bool = False):
    """normflows' Glow for images: MultiscaleFlow, 2 levels on (1, 8, 8), a split between them."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    L, K, shape = 2, 1, (1, 8, 8)
    q0, merges, flows = [], [], []
    for i in range(L):
        level = [nf.flows.GlowBlock(shape[0] * 2 ** (L + 1 - i), 8, split_mode="channel", scale=True)
                 for _ in range(K)] + [nf.flows.Squeeze()]
        flows.append(level)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (shape[0] * 2 ** (L - i), shape[1] // 2 ** (L - i), shape[2] // 2 ** (L - i))
        else:
            latent = (shape[0] * 2 ** (L + 1), shape[1] // 2 ** L, shape[2] // 2 ** L)
        q0.append(nf.distributions.GlowBase(latent))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    with torch.no_grad():  # ActNorm's data-dependent initialisation, done before the audit
        model.inverse_and_log_det(torch.rand(64, *shape, generator=torch.Generator().manual_seed(9)))
    _perturb(model, 0.05)
    if plant:  # the ActNorm of level 1's GlowBlock
        act = model.flows[1][0].flows[2]
        with torch.no_grad():
            act.s.fill_(-math.log(PLANT_SCALE))
            act.t.fill_(-PLANT_SHIFT / PLANT_SCALE)
    return model


def test_normflows_multiscale_flow_is_audited_with_samples_and_localised():
    model = _nf_multiscale()
    x = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rep = audit(model, x, families="test,samples,constant", spectra_points=2, repeat=2)
    # every family ran (the latent shape of both levels is known), the model is invertible
    assert rep.verdict.invertible is True, rep.verdict.table()
    assert set(rep.verdict.families) == {"test", "samples_t1", "samples_t0.7", "samples_t0", "constant"}
    assert rep.meta["latent_shape"] == [8 * 2 * 2 + 2 * 4 * 4]  # z[0] (8, 2, 2) and z[1] (2, 4, 4) concatenated
    # the errors are those of normflows' own inverse_and_log_det / forward_and_log_det
    with torch.no_grad():
        z, _ = model.inverse_and_log_det(x)
        ref = _l2(x, model.forward_and_log_det(z)[0])
    assert torch.equal(rep.families["test"].errors["l2"], ref)
    # the analytic log-det (float64 shadow) against slogdet of a brute-force float64 Jacobian
    m64 = __import__("copy").deepcopy(model).double()
    sp = rep.families["test"].spectra
    for i, k in enumerate(sp.index.tolist()):
        def f(v):
            zz, _ = m64.inverse_and_log_det(v.reshape(1, 1, 8, 8))
            return torch.cat([t.reshape(-1) for t in zz])
        J = torch.autograd.functional.jacobian(f, x[k].double().reshape(-1))
        assert float(sp.logdet_analytic[i]) == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-8)
    loc = rep.families["test"].localization
    assert loc.culprit is None and {"merges.0", "flows.1.0.flows.2", "flows.0.1"} <= {r.name for r in loc.layers}
    # samples at T = 0 are the bases' modes: GlowBase's loc is 0 at initialisation, perturbed here
    assert rep.families["samples_t0"].verdict.n == 1


def test_normflows_multiscale_flow_names_a_planted_layer():
    x = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rep = audit(_nf_multiscale(plant=True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "flows.1.0.flows.2")


def test_normflows_residual_flow_with_a_float64_parameter_is_audited_in_float32():
    """normflows' Residual keeps ``geom_p`` as a float64 parameter: the model's dtype is the one of
    most of its entries (float32), so the audit feeds float32 inputs (not float64 ones that raise)."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        net = nf.nets.LipschitzMLP([6, 16, 16, 6], init_zeros=False, lipschitz_const=0.9)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(6)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(6, trainable=False), flows)
    assert next(model.parameters()).dtype == torch.float64  # the first parameter is geom_p
    assert as_invertible(model).dtype == torch.float32
    x = _x()
    rep = audit(model, x, families="test", spectra_points=0, repeat=0)
    assert rep.meta["dtype"] == "float32"
    v = rep.verdict["test"]
    assert v.status == "invertible" and v.n_raised == 0 and v.n_error == 0, rep.verdict.table()
    with torch.no_grad():
        ref = _l2(x, model.forward(model.inverse(x)))
    assert torch.equal(rep.families["test"].errors["l2"], ref)


# ----------------------------------------------------------------------------- zuko
def _zuko_flow(plant: bool):
    zuko = pytest.importorskip("zuko")
    from zuko.flows import Flow, MaskedAutoregressiveTransform, UnconditionalDistribution, UnconditionalTransform
    from zuko.transforms import MonotonicAffineTransform

    torch.manual_seed(0)
    # zuko soft-clips the log-scale a: log s = a / (1 + |a / log slope|); solve for log s = log PLANT_SCALE
    slope = 1e-12
    target = math.log(PLANT_SCALE) if plant else 0.2
    a = target / (1 - abs(target / math.log(slope)))
    shift = UnconditionalTransform(MonotonicAffineTransform, torch.full((6,), PLANT_SHIFT if plant else 0.3),
                          torch.full((6,), a), slope=slope, buffer=True)
    flow = Flow([MaskedAutoregressiveTransform(6, hidden_features=(16,)), shift,
                 MaskedAutoregressiveTransform(6, hidden_features=(16,))],
                UnconditionalDistribution(zuko.distributions.DiagNormal, torch.zeros(6), torch.ones(6), buffer=True))
    return _perturb(flow, 0.1)


def test_zuko_transforms_are_localised_and_the_planted_layer_is_named():
    x = _x()
    rep = audit(_zuko_flow(True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "transform.transforms.1")
    healthy = _zuko_flow(False)
    rep = audit(healthy, x, families="test", spectra_points=0, repeat=0)
    _check_healthy(rep, [f"transform.transforms.{i}" for i in range(3)])
    with torch.no_grad():
        t = healthy().transform
        ref = _l2(x, t.inv(t(x)))
    assert torch.equal(rep.families["test"].errors["l2"], ref)


def test_an_exception_is_could_not_run_never_a_verdict():
    """zuko flow for 64 features given images (360, 1, 8, 8): every data example raises a shape
    error. The family is "could not run" with the unmasked message; nothing says "not invertible";
    the errors are NaN (not inf: no non-finite dots); the overall verdict is unknown."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(64, transforms=1, hidden_features=(8,))
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rep = audit(flow, x, families="test,uniform", spectra_points=2, repeat=2)
    for name in ("test", "uniform"):
        v = rep.verdict[name]
        assert v.status == "could not run" and v.n_error == 12 and v.n_fail == 0 and v.invertible is None
        assert "mat1 and mat2 shapes cannot be multiplied (8x8 and 64x8)" in v.error, v.error  # digits kept
        assert torch.isnan(rep.families[name].errors["l2"]).all()
        assert v.cause == ""
    assert rep.verdict.invertible is None and not rep.verdict.failing
    assert rep.verdict.could_not_run == ["test", "uniform"]
    head = rep.verdict.headline()
    assert head.startswith("COULD NOT RUN 2 of 2 families: RuntimeError: mat1 and mat2 shapes")
    table = rep.verdict.table()
    assert "not invertible" not in table and "NOT INVERTIBLE" not in table
    html = __import__("stableflows.audit.plots", fromlist=["render_html"]).render_html(rep)
    assert "COULD NOT RUN" in html and "mat1 and mat2 shapes cannot be multiplied (8x8 and 64x8)" in html
    assert "NOT INVERTIBLE" not in html


def test_a_bug_raising_in_some_examples_is_could_not_run_and_the_rest_is_still_measured():
    lin = nn.Linear(4, 4)

    def fwd(x):
        if bool((x[:, 0] > 0.8).any()):
            raise KeyError("a bug in the user's code")
        return lin(x)

    def inv(z):
        return torch.linalg.solve(lin.weight, (z - lin.bias).T).T

    x = _x(d=4)
    bad = x[:, 0] > 0.8
    assert 0 < int(bad.sum()) < N
    rep = audit((fwd, inv), x, families="test", spectra_points=0, repeat=0, shadow=False)
    v = rep.verdict["test"]
    assert v.status == "could not run" and v.n_error == int(bad.sum()) and v.n_checked == N - int(bad.sum())
    assert v.error == "KeyError: \"a bug in the user's code\""
    e = rep.families["test"].errors["l2"]
    assert torch.isnan(e[bad]).all() and torch.isfinite(e[~bad]).all()
    with torch.no_grad():  # the audit's batches differ from this one: float32 rounding differs by ~1e-8
        ref = _l2(x[~bad], inv(lin(x[~bad])))
    assert float(ref.max()) < 1e-5 and torch.allclose(e[~bad], ref, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- FrEIA
def _subnet(ci, co):
    return nn.Sequential(nn.Linear(ci, 16), nn.Tanh(), nn.Linear(16, co))


def _freia_sequence(plant: bool):
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    inn = Ff.SequenceINN(6)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_subnet, clamp=2.0)
    inn.append(Fm.FixedLinearTransform, M=torch.eye(6) * (PLANT_SCALE if plant else 1.5),
               b=torch.full((6,), PLANT_SHIFT if plant else 0.3))
    inn.append(Fm.PermuteRandom, seed=0)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_subnet, clamp=2.0)
    return _perturb(inn, 0.1)


def test_freia_sequence_inn_is_localised_and_the_planted_layer_is_named():
    x = _x()
    rep = audit(_freia_sequence(True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "module_list.1")
    rep = audit(_freia_sequence(False), x, families="test", spectra_points=0, repeat=0)
    _check_healthy(rep, [f"module_list.{i}" for i in range(4)])


def _freia_graph(plant: bool):
    """A GraphINN with two output nodes: a Split sends 2 dimensions straight out, 4 on."""
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    inp = Ff.InputNode(6, name="in")
    c1 = Ff.Node(inp, Fm.GLOWCouplingBlock, {"subnet_constructor": _subnet, "clamp": 2.0}, name="c1")
    sp = Ff.Node(c1, Fm.Split, {"section_sizes": [2, 4], "dim": 0}, name="split")
    sh = Ff.Node(sp.out1, Fm.FixedLinearTransform, {"M": torch.eye(4) * (PLANT_SCALE if plant else 1.5),
                                                    "b": torch.full((4,), PLANT_SHIFT if plant else 0.2)}, name="shift")
    c2 = Ff.Node(sh, Fm.GLOWCouplingBlock, {"subnet_constructor": _subnet, "clamp": 2.0}, name="c2")
    inn = Ff.GraphINN([inp, c1, sp, sh, c2, Ff.OutputNode(sp.out0, name="o1"), Ff.OutputNode(c2, name="o2")])
    return _perturb(inn, 0.1)


def test_freia_graph_inn_with_two_outputs_passes_both_back_and_is_localised():
    inn = _freia_graph(False)
    x = _x()
    rep = audit(inn, x, families="test,samples", spectra_points=2, repeat=2)
    assert rep.verdict.invertible is True, rep.verdict.table()
    assert rep.meta["latent_shape"] == [6]  # outputs of 2 and 4 dimensions concatenated
    with torch.no_grad():
        z, _ = inn(x)
        assert isinstance(z, (tuple, list)) and len(z) == 2
        ref = _l2(x, inn(list(z), rev=True)[0])
    assert torch.equal(rep.families["test"].errors["l2"], ref)
    loc = rep.families["test"].localization
    assert [r.name for r in loc.layers] == ["module_list.3 (c2)", "module_list.2 (shift)", "module_list.1 (split)",
                                            "module_list.0 (c1)"]
    rep = audit(_freia_graph(True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "module_list.2 (shift)")


# ----------------------------------------------------------------------------- nflows
def _nflows_flow(plant: bool):
    pytest.importorskip("nflows")
    from nflows import distributions, flows, transforms

    torch.manual_seed(0)
    inner = transforms.CompositeTransform([
        transforms.PointwiseAffineTransform(shift=PLANT_SHIFT if plant else 0.3, scale=PLANT_SCALE if plant else 1.5),
        transforms.ReversePermutation(6)])
    tr = transforms.CompositeTransform([transforms.MaskedAffineAutoregressiveTransform(6, 16), inner,
                                        transforms.MaskedAffineAutoregressiveTransform(6, 16)])
    return _perturb(flows.Flow(tr, distributions.StandardNormal([6])), 0.05)


def test_nflows_composite_transforms_are_localised_and_the_planted_layer_is_named():
    x = _x()
    rep = audit(_nflows_flow(True), x, families="test", spectra_points=0, repeat=0)
    _check_planted(rep, "_transform._transforms.1._transforms.0")  # nested composites expanded
    rep = audit(_nflows_flow(False), x, families="test", spectra_points=0, repeat=0)
    _check_healthy(rep, ["_transform._transforms.0", "_transform._transforms.1._transforms.0",
                         "_transform._transforms.1._transforms.1", "_transform._transforms.2"])


def test_nflows_multiscale_transform_is_audited_and_says_it_is_not_localised():
    """nflows' MultiscaleCompositeTransform: the model's own map is audited (errors as recomputed
    here), and the report says why no layer can be named instead of naming none silently."""
    pytest.importorskip("nflows")
    from nflows import distributions, flows, transforms

    torch.manual_seed(0)
    ms = transforms.MultiscaleCompositeTransform(num_transforms=2, split_dim=1)
    ms.add_transform(transforms.MaskedAffineAutoregressiveTransform(6, 16), transform_output_shape=[6])
    ms.add_transform(transforms.MaskedAffineAutoregressiveTransform(3, 16), transform_output_shape=[3])
    model = _perturb(flows.Flow(ms, distributions.StandardNormal([6])), 0.05)
    x = _x()
    rep = audit(model, x, families="test", spectra_points=0, repeat=0)
    with torch.no_grad():
        ref = _l2(x, ms.inverse(ms(x)[0])[0])
    assert torch.equal(rep.families["test"].errors["l2"], ref)
    assert rep.verdict["test"].status == "invertible"
    text = rep.to_json()
    assert "MultiscaleCompositeTransform: its splits are not walked, no per-layer localisation" in text


def test_conditional_peer_flows_are_refused_with_the_way_out():
    """Conditional zuko / FrEIA flows and multi-input FrEIA graphs: the audit cannot guess a context.
    FrEIA's are refused with an error naming the (forward, inverse) pair as the way to audit them."""
    from stableflows.audit import AdapterError

    zuko = pytest.importorskip("zuko")
    Ff, Fm = pytest.importorskip("FrEIA.framework"), pytest.importorskip("FrEIA.modules")
    # zuko's lazy flows do not record a context size: called without one, the flow raises, and that
    # is "could not run" with the exception's text, never a verdict
    rep = audit(zuko.flows.MAF(4, context=2, transforms=1, hidden_features=[8]), torch.rand(8, 4), families="test",
                spectra_points=0, repeat=0)
    assert rep.verdict.could_not_run == ["test"] and rep.verdict.invertible is None
    assert "mat1 and mat2 shapes cannot be multiplied (1x4 and 6x8)" in rep.verdict.table()

    def sub(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 8), nn.ReLU(), nn.Linear(8, c_out))

    seq = Ff.SequenceINN(4)
    seq.append(Fm.AllInOneBlock, cond=0, cond_shape=(2,), subnet_constructor=sub)
    with pytest.raises(AdapterError, match="conditional FrEIA SequenceINN"):
        as_invertible(seq)
    a, b = Ff.InputNode(2, name="a"), Ff.InputNode(2, name="b")
    cat = Ff.Node([a.out0, b.out0], Fm.Concat, {}, name="cat")
    graph = Ff.GraphINN([a, b, cat, Ff.OutputNode(cat, name="out")])
    with pytest.raises(AdapterError, match="GraphINN with 2 input nodes"):
        as_invertible(graph)


# ----------------------------------------------------------------------------- PGD and the shadow
def test_pgd_families_get_the_cause_from_the_float64_replay():
    """PGD points replayed in float64: the planted shift fails in float32 only, so every pgd:*
    family says "floating point" (not "unknown (no float64 shadow)"), and its float64 errors are
    those of a float64 copy of the library's maps at the adversarial points."""
    model = _zuko_flow(True)
    x = _x()
    rep = audit(model, x, families="test", spectra_points=0, repeat=0, localize=False, attack="pgd",
                attack_kwargs=dict(examples=6, steps=3, constraints=("linf", "range"), baseline=False))
    m64 = __import__("copy").deepcopy(model).double()
    for name in ("pgd:linf", "pgd:range"):
        v = rep.verdict[name]
        assert v.status == "not invertible" and v.cause == "floating point", v
        x_adv = rep.attacks[name].pgd.best_x.double()
        with torch.no_grad():
            t = m64().transform
            ref = _l2(x_adv, t.inv(t(x_adv)))
        assert v.shadow_max_error == pytest.approx(float(ref.max()), rel=1e-9)
        assert float(ref.max()) < TOL < v.max_error
