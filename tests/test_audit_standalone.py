"""The audit on standalone Glow / RealNVP implementations written in the style of popular public
repositories (tests/fixtures/standalone_*.py: their module structure and calling conventions,
written from scratch), each trained briefly on digits: it runs through the callable-pair mode and
the layer protocol, names the layer that explodes when one is planted, and raises no false alarm
when none is. References: the models' own round trips recomputed here, planted layers known by
construction."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from stableflows.audit import audit
from stableflows.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fixtures import standalone_glow as G  # noqa: E402
from fixtures import standalone_realnvp as R  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
IN_DOMAIN = "test,samples,uniform,constant,grayed,inverted,patches"  # inputs in [0, 1] (RealNVP's logit domain)
KW = dict(spectra_points=2, repeat=2, budget=None)


@pytest.fixture(scope="module")
def glow():
    return G.train_on_digits(G.Glow(n_flow=2, hidden=16), steps=30)


@pytest.fixture(scope="module")
def realnvp():
    return R.train_on_digits(R.RealNVP(hidden=16), steps=30)


def _l2(x, xh):
    return torch.linalg.norm((xh.double() - x.double()).flatten(1), dim=1)


def test_glow_through_the_layer_protocol_no_false_alarm(glow):
    x = G.digits_in_model_space(64)
    view = G.AuditView(glow)
    rep = audit(view, x, families=IN_DOMAIN, **KW)
    assert rep.verdict.invertible is True, rep.summary()
    assert all(v.culprit is None for v in rep.verdict.families.values())
    with torch.no_grad():  # the Glow's own round trip: reverse(forward(x), reconstruct=True)
        ref = _l2(x, glow.reverse(glow(x)[2], reconstruct=True))
    assert torch.allclose(rep.families["test"].errors["l2"], ref, rtol=0, atol=1e-9)
    loc = rep.families["test"].localization
    names = [r.name for r in loc.layers]
    assert rep.meta["localization"] == "AuditView.layers (layer protocol)" and not loc.note
    assert names[0] == "glow.blocks.1.flows.1.coupling" and names[-1] == "layers.0"  # inverse order; the squeeze
    assert {"glow.blocks.0.flows.1.actnorm", "glow.blocks.0.flows.0.invconv"} <= set(names)


def test_glow_planted_actnorm_is_named_through_the_protocol_and_cli(glow, tmp_path, capsys):
    """ActNorm of block 0, flow 1 scales one channel by 1e-9: the next 1x1 convolution adds it to
    the other channels in float32, which keeps no digit of it (float64 keeps ~7), and the reverse
    divides by 1e-9 again. The audit names that ActNorm and says floating point."""
    bad = copy.deepcopy(glow)
    with torch.no_grad():
        bad.blocks[0].flows[1].actnorm.scale[0, 1] = 1e-9
    x = G.digits_in_model_space(64)
    rep = audit(G.AuditView(bad), x, families="test", **KW)
    v = rep.verdict["test"]
    assert v.status == "not invertible" and v.cause == "floating point", rep.summary()
    assert v.culprit == "glow.blocks.0.flows.1.actnorm", v.culprit_reason
    # the same through the command line: --model-spec (the view), --weights, a tensor file of data
    view = G.glow_view()
    view.glow.load_state_dict(bad.state_dict())
    torch.save(view.state_dict(), tmp_path / "w.pt")
    torch.save(x, tmp_path / "x.pt")
    code = main(["audit", "--model-spec", f"{FIXTURES / 'standalone_glow.py'}:glow_view", "--weights",
                 str(tmp_path / "w.pt"), "--data", str(tmp_path / "x.pt"), "--families", "test", "--repeat", "0",
                 "--spectra-points", "0", "--budget", "none", "--report", str(tmp_path / "r"),
                 "--fail-on-noninvertible", "--no-progress"])
    assert code == 1
    d = json.loads((tmp_path / "r" / "report.json").read_text())["verdict"]["families"]["test"]
    assert d["culprit"] == "glow.blocks.0.flows.1.actnorm" and d["n_fail"] == v.n_fail


def test_glow_through_a_plain_callable_pair(glow):
    """Plain functions: verdicts and errors, but no float64 copy and no layers, said so."""
    bad = copy.deepcopy(glow)
    with torch.no_grad():
        bad.blocks[0].flows[1].actnorm.scale[0, 1] = 1e-9
    shapes = G._latent_shapes(bad)
    x = G.digits_in_model_space(48)
    rep = audit((lambda t: G._pack(bad(t)[2]), lambda z: bad.reverse(G._unpack(z, shapes))), x,
                families="test,samples_t1", **KW)
    v = rep.verdict["test"]
    assert v.status == "not invertible" and v.cause == "unknown (no float64 shadow)" and v.culprit is None
    assert any("no float64 shadow" in n for n in rep.notes)
    assert any("no per-layer localisation" in n for n in rep.notes)
    with torch.no_grad():
        ref = _l2(x, bad.reverse(bad(x)[2]))
    assert torch.allclose(rep.families["test"].errors["l2"], ref, rtol=0, atol=1e-9)


def test_realnvp_with_reverse_flags_is_audited_as_it_is(realnvp):
    """``layers`` + ``reverse=True``: the protocol without glue. In-domain families pass; inputs
    beyond [0, 1] are non-finite at the logit pre-processing (layers.0), which the audit names."""
    from stableflows.config import DataConfig
    from stableflows.data import load_dataset

    splits = load_dataset(DataConfig(name="digits"))
    rep = audit(realnvp, splits.test[:64], levels=17, families=IN_DOMAIN + ",out_of_range", **KW)
    for name, v in rep.verdict.families.items():
        if name == "out_of_range":
            assert v.status == "not invertible" and v.n_nonfinite == v.n and v.culprit == "layers.0", v
        else:
            assert v.status == "invertible" and v.culprit is None, (name, v)
    assert rep.meta["localization"] == "RealNVP.layers (layer protocol)"
    # the model's own maps: model(x) and model(z, reverse=True)
    v = rep.families["test"]
    u = torch.rand(splits.test[:64].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = ((splits.test[:64].double() + u) / 17).float()
    with torch.no_grad():
        ref = _l2(x, realnvp(realnvp(x)[0], reverse=True)[0])
    assert torch.allclose(v.errors["l2"], ref, rtol=0, atol=1e-9)


def test_realnvp_planted_coupling_is_named(realnvp, tmp_path):
    """Coupling layers.2 with log-scale -20 everywhere it acts (bias of s at +10, tanh = 1, weight
    -20): its output is ~2e-9 x, which the next coupling adds to O(1) shifts in float32."""
    bad = copy.deepcopy(realnvp)
    with torch.no_grad():
        last = bad.layers[2].st.body[-1]
        last.bias[: last.bias.shape[0] // 2] = 10.0
        bad.layers[2].weight.fill_(-20.0)
    torch.save(bad.state_dict(), tmp_path / "w.pt")
    code = main(["audit", "--model-spec", f"{FIXTURES / 'standalone_realnvp.py'}:realnvp", "--weights",
                 str(tmp_path / "w.pt"), "--data", "digits", "--families", "test", "--n", "64", "--repeat", "0",
                 "--spectra-points", "0", "--budget", "none", "--report", str(tmp_path / "r"), "--no-progress"])
    assert code == 0  # a verdict without --fail-on-noninvertible
    d = json.loads((tmp_path / "r" / "report.json").read_text())["verdict"]["families"]["test"]
    assert d["status"] == "not invertible" and d["cause"] == "floating point" and d["culprit"] == "layers.2", d
