"""The public audit API: ``audit(model, data)`` on a stableflows flow and on a (forward, inverse)
pair, the report's JSON and HTML, verdict semantics against the tolerance, and non-finite /
raising examples counted (never dropped).

Every number is checked against a recomputation done here (``torch.linalg.norm`` of
``x - inverse(forward(x))``), or against values planted by construction.
"""
import base64
import json
import math
import re

import pytest
import torch
from torch import nn

from stableflows.audit import audit
from stableflows.audit.verdict import COULD_NOT_RUN, INVERTIBLE

D = 6


def _realnvp():
    from stableflows.models import realnvp

    torch.manual_seed(0)
    flow = realnvp(shape=(D,), steps_per_level=3, hidden=16)
    with torch.no_grad():
        flow.train()(torch.rand(256, D, generator=torch.Generator().manual_seed(0)))  # ActNorm initialisation
        for p in flow.parameters():  # leave the identity initialisation: a non-trivial map
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def _ref_errors(x, fwd, inv):
    """float64 errors of the float32 round trip, computed independently of the audit."""
    with torch.no_grad():
        xh = inv(fwd(x))
    d = (xh.double() - x.double()).reshape(x.shape[0], -1)
    l2 = torch.linalg.norm(d, dim=1)
    linf = torch.linalg.norm(d, ord=math.inf, dim=1)
    rel = l2 / torch.linalg.norm(x.double().reshape(x.shape[0], -1), dim=1)
    bad = ~torch.isfinite(d).all(dim=1)  # docs/METRICS.md: a non-finite reconstruction has error inf
    for e in (l2, linf, rel):
        e[bad] = math.inf
    return l2, linf, rel


def test_audit_of_a_stableflows_flow_matches_a_recomputed_round_trip():
    flow = _realnvp()
    x = torch.rand(50, D, generator=torch.Generator().manual_seed(1))
    rep = audit(flow, x, families="test,samples", spectra_points=4, repeat=3)
    l2, linf, rel = _ref_errors(x, lambda t: flow(t)[0], lambda z: flow.inverse(z)[0])
    e = rep.families["test"].errors
    assert torch.equal(e["l2"], l2) and torch.equal(e["linf"], linf)
    assert torch.allclose(e["rel"], rel, rtol=1e-12)
    assert float(l2.max()) > 0  # a non-trivial float32 round trip
    # the float64 shadow is the same flow in float64
    f64 = __import__("copy").deepcopy(flow).double()
    l2_64, _, _ = _ref_errors(x.double(), lambda t: f64(t)[0], lambda z: f64.inverse(z)[0])
    assert torch.allclose(rep.families["test"].shadow_errors["l2"], l2_64, rtol=0, atol=1e-15)
    assert float(l2_64.max()) < 1e-12
    v = rep.verdict["test"]
    assert v.status == "invertible" and v.n == 50 and v.n_checked == 50 and v.n_fail == 0
    assert v.max_error == pytest.approx(float(l2.max()), rel=1e-12)
    # repeated passes: x_j = F^-1(F(x_{j-1})), recomputed for the examples the audit picked
    rp = rep.families["test"].repeated
    rows = (~torch.isnan(rp[:, 0])).nonzero().flatten()
    assert rows.numel() > 0
    cur = x[rows]
    with torch.no_grad():
        for j in range(3):
            cur = flow.inverse(flow(cur)[0])[0]
            ref = torch.linalg.norm((cur.double() - x[rows].double()), dim=1)
            assert torch.allclose(rp[rows, j], ref, rtol=1e-9, atol=1e-15)
    # samples: x = F^-1(z), z ~ N(0, T^2): the sample families are audited through the model's inverse
    for name in ("samples_t1", "samples_t0.7", "samples_t0"):
        assert rep.verdict[name].status == "invertible"
    assert rep.verdict["samples_t0"].n == 1  # z = 0: one sample
    assert rep.verdict.invertible


class _Linear(nn.Module):
    """z = A x + b with an explicit inverse by solve; log|det| = log|det A|."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.A = nn.Parameter(torch.eye(D) + 0.3 * torch.randn(D, D, generator=g))
        self.b = nn.Parameter(torch.randn(D, generator=g))

    def fwd(self, x):
        return x @ self.A.T + self.b

    def inv(self, z):
        return torch.linalg.solve(self.A, (z - self.b).T).T


def test_audit_of_a_callable_pair_matches_a_recomputed_round_trip():
    lin = _Linear()
    x = torch.rand(40, D, generator=torch.Generator().manual_seed(2))
    # bound methods of a module: a float64 shadow is built
    rep = audit((lin.fwd, lin.inv), x, families="test", spectra_points=5, repeat=0)
    l2, linf, rel = _ref_errors(x, lin.fwd, lin.inv)
    e = rep.families["test"].errors
    assert torch.equal(e["l2"], l2) and torch.equal(e["linf"], linf)
    assert torch.allclose(e["rel"], rel, rtol=1e-12)
    assert rep.meta["shadow"] is True and rep.meta["kind"] == "callables"
    # spectra of the exact float64 Jacobian A
    sv = torch.linalg.svdvals(lin.A.detach().double())
    sp = rep.families["test"].spectra
    assert torch.allclose(sp.fwd_smax, sv[0].expand(5), rtol=1e-10)
    assert torch.allclose(sp.fwd_smin, sv[-1].expand(5), rtol=1e-10)
    assert torch.allclose(sp.inv_smax, (1 / sv[-1]).expand(5), rtol=1e-10)
    # plain lambdas: no shadow, said in the notes, and the audit still works
    rep2 = audit((lambda t: lin.fwd(t), lambda t: lin.inv(t)), x, families="test", spectra_points=0, repeat=0)
    assert rep2.meta["shadow"] is False and rep2.notes
    assert torch.equal(rep2.families["test"].errors["l2"], l2)
    # the same through inverse=
    rep3 = audit(lin.fwd, x, inverse=lin.inv, families="test", spectra_points=0, repeat=0, shadow=False)
    assert torch.equal(rep3.families["test"].errors["l2"], l2)


# ------------------------------------------------------------------ planted errors
STEP = 1.0 / 64  # data on a 1/64 grid: x + OFFSET is exact in float32
OFFSET = 0.0625


def _planted_pair():
    """forward = identity; the inverse adds OFFSET to coordinate 0 of the examples with
    x[:, 1] >= 0.5, so their error is exactly OFFSET (L2, L-inf) and 0 elsewhere."""
    def fwd(x):
        return x.clone()

    def inv(z):
        out = z.clone()
        out[:, 0] += OFFSET * (z[:, 1] >= 0.5).to(z.dtype)
        return out
    return fwd, inv


def _grid_data(n, seed):
    return torch.randint(1, 64, (n, D), generator=torch.Generator().manual_seed(seed)).float() * STEP


def test_verdict_semantics_against_the_tolerance():
    x = _grid_data(60, 3)
    bad = x[:, 1] >= 0.5
    assert 0 < int(bad.sum()) < 60
    fwd, inv = _planted_pair()
    for tol, status, n_fail in ((0.1, "invertible", 0), (OFFSET, "invertible", 0),  # error <= tolerance passes
                                (OFFSET * (1 - 1e-6), "not invertible", int(bad.sum()))):
        rep = audit((fwd, inv), x, families="test", tolerance=tol, spectra_points=0, repeat=0)
        v = rep.verdict["test"]
        assert v.status == status and v.n_fail == n_fail, (tol, v)
        assert v.n_nonfinite == 0 and v.n_raised == 0
        assert v.max_error == OFFSET
        assert rep.verdict.invertible == (status == "invertible")
        assert bool(rep.verdict) == (status == "invertible")
        assert rep.verdict.failing == ([] if status == "invertible" else ["test"])
    e = rep.families["test"].errors
    assert torch.equal(e["l2"], torch.where(bad, OFFSET, 0.0).double())
    # the L-inf criterion: same here; the relative criterion divides by ||x||
    rel_ref = torch.where(bad, OFFSET, 0.0).double() / torch.linalg.norm(x.double(), dim=1)
    assert torch.allclose(e["rel"], rel_ref, rtol=1e-12)
    tol = float(rel_ref.max()) * 0.999
    rep = audit((fwd, inv), x, families="test", tolerance=tol, criterion="rel", spectra_points=0, repeat=0)
    assert rep.verdict["test"].n_fail == int((rel_ref > tol).sum()) >= 1


def test_nonfinite_and_raising_examples_are_counted_never_dropped(tmp_path):
    x = _grid_data(48, 4)
    fwd_inf = x[:, 0] < 0.2  # forward gives inf
    raises = (x[:, 3] < 0.1) & ~fwd_inf  # inverse raises
    inv_nan = (x[:, 2] > 0.8) & (x[:, 3] >= 0.1) & ~fwd_inf  # inverse gives nan
    assert fwd_inf.sum() and inv_nan.sum() and raises.sum()

    def fwd(t):
        out = t.clone()
        out[t[:, 0] < 0.2, 4] = math.inf
        return out

    def inv(z):
        if bool(((z[:, 3] < 0.1) & torch.isfinite(z).all(dim=1)).any()):
            raise FloatingPointError("planted failure")  # a numerical failure: part of the verdict
        out = z.clone()
        out[(z[:, 2] > 0.8) & (z[:, 3] >= 0.1), 5] = math.nan
        return out

    rep = audit((fwd, inv), x, families="test", spectra_points=0, repeat=0)
    r = rep.families["test"]
    failed = fwd_inf | inv_nan | raises
    assert torch.equal(~torch.isfinite(r.errors["l2"]), failed)
    assert torch.equal(r.errors["l2"][~failed], torch.zeros(int((~failed).sum()), dtype=torch.float64))
    c = r.recon.counts()
    assert c["n"] == 48
    assert c["nonfinite_forward"] == int(fwd_inf.sum())
    assert c["nonfinite_inverse"] == int((inv_nan | raises).sum())
    assert c["nonfinite_reconstruction"] == int(failed.sum())
    assert c["raised"] == int(raises.sum())
    v = rep.verdict["test"]
    assert v.n == v.n_checked == 48 and v.n_outside_domain == 0
    assert v.n_fail == int(failed.sum())
    assert v.n_raised == int(raises.sum())
    assert v.n_nonfinite == int((fwd_inf | inv_nan).sum())
    assert v.max_error == math.inf and v.status == "not invertible"
    assert any("planted failure" in m for m in r.recon.messages)
    # in the JSON too: every example is there, non-finite ones as the string "inf"
    d = json.loads(rep.to_json())
    l2 = d["families"]["test"]["errors"]["l2"]
    assert len(l2) == 48 and sum(v == "inf" for v in l2) == int(failed.sum())
    s = d["families"]["test"]["error_summary"]["l2"]
    assert s["n"] == 48 and s["nonfinite"] == int(failed.sum()) and s["max"] == "inf"
    assert d["verdict"]["families"]["test"]["n_fail"] == int(failed.sum())


# ------------------------------------------------------------------ report files
def test_report_json_round_trips_with_the_documented_fields(tmp_path):
    flow = _realnvp()
    x = torch.rand(30, D, generator=torch.Generator().manual_seed(5))
    rep = audit(flow, x, families="test,uniform", spectra_points=3, repeat=2, tolerance=1e-3)
    text = rep.to_json(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == text
    d = json.loads(text)  # strict JSON: no NaN / Infinity tokens
    assert not re.search(r"\bNaN\b|\bInfinity\b", text)
    assert set(d) >= {"verdict", "meta", "timings", "notes", "families", "attacks"}
    assert d["verdict"]["tolerance"] == 1e-3 and d["verdict"]["criterion"] == "l2"
    assert d["verdict"]["invertible"] is rep.verdict.invertible
    assert set(d["families"]) == {"test", "uniform"}
    f = d["families"]["test"]
    assert set(f) >= {"kind", "description", "verdict", "counts", "errors", "shadow_errors", "error_summary",
                      "repeated", "spectra", "localization"}
    assert set(f["verdict"]) >= {"status", "n", "n_fail", "n_nonfinite", "n_raised", "max_error", "cause",
                                 "culprit", "invertible"}
    l2, linf, rel = _ref_errors(x, lambda t: flow(t)[0], lambda z: flow.inverse(z)[0])
    assert f["errors"]["l2"] == l2.tolist() and f["errors"]["linf"] == linf.tolist()
    assert len(f["repeated"]["per_example"]) == 30 and len(f["repeated"]["median"]) == 2
    sp = f["spectra"]
    assert set(sp) >= {"fwd_smin", "fwd_smax", "fwd_cond", "inv_smin", "inv_smax", "inv_cond",
                       "logdet_analytic", "logdet_numeric", "logdet_mismatch", "index"}
    assert len(sp["fwd_cond"]) == 3
    # spectra agree with an autograd Jacobian of the float64 flow at the listed points
    f64 = __import__("copy").deepcopy(flow).double()
    for i, k in enumerate(sp["index"]):
        J = torch.autograd.functional.jacobian(lambda v: f64(v[None])[0][0], x[k].double())
        s = torch.linalg.svdvals(J)
        assert sp["fwd_smax"][i] == pytest.approx(float(s[0]), rel=1e-9)
        assert sp["fwd_cond"][i] == pytest.approx(float(s[0] / s[-1]), rel=1e-9)
    loc = f["localization"]
    assert loc["layers"] and {"name", "gain", "inv_absmax"} <= set(loc["layers"][0])
    assert d["meta"]["n_test"] == 30 and d["meta"]["event_shape"] == [D]
    assert d["timings"]["total"] > 0


def test_report_html_is_self_contained_with_embedded_images(tmp_path):
    from stableflows.models import glow

    torch.manual_seed(0)
    flow = glow(shape=(1, 4, 4), levels=1, steps_per_level=2, hidden=8).eval()
    x = torch.randint(0, 17, (12, 1, 4, 4), generator=torch.Generator().manual_seed(6)).float()
    rep = audit(flow, x, levels=17, families="test,samples_t1,constant", spectra_points=2, repeat=2,
                attack="pgd", attack_kwargs=dict(examples=4, steps=3, constraints=("linf",)))
    p = rep.to_html(tmp_path / "sub" / "report.html")
    text = p.read_text()
    assert text.lstrip().lower().startswith("<!doctype html") or text.lstrip().lower().startswith("<html")
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) >= 4
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing loaded from elsewhere
    srcs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert all(s.startswith("data:") or s.startswith("#") for s in srcs), [s[:40] for s in srcs]
    assert "<link" not in text.lower() and "@import" not in text
    for name in ("test", "samples_t1", "constant", "pgd:linf"):
        assert name in text


def test_audit_of_an_invertible_classifier_audits_its_invertible_part():
    """A classifier's forward gives logits; the audit must round-trip x -> z -> x through its flow
    (the 28x28 classifier runs could not be audited at all before), here with memory-saving on."""
    from stableflows.models.classifier import classifier

    torch.manual_seed(0)
    model = classifier(shape=(1, 8, 8), n_classes=10, levels=2, steps_per_level=2, hidden=8, coupling="affine",
                       actnorm=True, logit_alpha=0.0, head="bn_relu", memory_saving=True)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train().flow(x)  # ActNorm initialisation
        for p in model.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    rep = audit(model, x, families="test,samples", spectra_points=2, repeat=2)
    l2, linf, _ = _ref_errors(x, lambda t: model.flow(t)[0], lambda z: model.flow.inverse(z)[0])
    e = rep.families["test"].errors
    assert torch.equal(e["l2"], l2) and torch.equal(e["linf"], linf)
    assert float(l2.max()) > 0 and rep.families["test"].verdict.status == INVERTIBLE
    s = rep.families["samples_t1"].verdict  # latents of the flow's shape (16, 2, 2), not the 10 logits
    assert s.status != COULD_NOT_RUN and s.n_checked > 0
