"""Invertible classifiers and hybrid models: shapes, densities against brute-force Jacobians
(float64), memory-saving vs stored gradients of the supervised objectives, the registry, and a short
training run on digits."""
import math

import pytest
import torch
import torch.nn.functional as F

from stableflows.config import DataConfig, ModelConfig
from stableflows.memory import GradientGuard, gradient_angle, has_memory_saving
from stableflows.models.classifier import InvertibleClassifier, classifier, hybrid
from stableflows.models.registry import build_model
from stableflows.regularizers import FiniteDifferenceRegularizer, FlowObjectiveRegularizer
from stableflows.train.objectives import Batch
from stableflows.train.supervised import ClassificationObjective, HybridObjective, evaluate_classifier, make_objective

torch.set_num_threads(1)
LOG_2PI = math.log(2 * math.pi)


def _init(model, x, scale=0.2, seed=0):
    """ActNorm initialisation, then parameters moved off their zero initialisation."""
    model.train()
    with torch.no_grad():
        model.log_prob(x)
        g = torch.Generator().manual_seed(seed)
        for n, p in model.flow.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _brute_log_prob(model, x):
    """log N(F(x)) + log|det dF/dx| with the Jacobian from autograd (independent of logdet code)."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: model.flow(v[None])[0].reshape(-1), xi)
        j = j.reshape(xi.numel(), xi.numel())
        z = model.flow(xi[None])[0].reshape(-1)
        out.append(-0.5 * z.pow(2).sum() - 0.5 * z.numel() * LOG_2PI + torch.linalg.slogdet(j)[1])
    return torch.stack(out)


@pytest.mark.parametrize("kw", [
    dict(shape=(6,), coupling="additive", levels=1, steps_per_level=3),
    dict(shape=(6,), coupling="affine", scale="tanh_clamp", levels=1, steps_per_level=3, head="mlp"),
    dict(shape=(1, 4, 4), coupling="affine", levels=2, steps_per_level=1, head="bn_relu", logit_alpha=0.05),
    dict(shape=(2, 4, 4), coupling="additive", levels=1, steps_per_level=2, head="conv", permutation="shuffle"),
])
def test_classifier_shapes_and_density(kw):
    torch.manual_seed(0)
    m = classifier(n_classes=3, hidden=8, **kw).double()
    x = torch.rand(5, *kw["shape"], dtype=torch.float64) * 0.9 + 0.05
    _init(m, x)
    m.eval()
    assert isinstance(m, InvertibleClassifier) and m(x).shape == (5, 3)
    z, ld = m.features(x)
    assert z.shape == (5, *m.latent_shape) and math.prod(m.latent_shape) == math.prod(kw["shape"])
    torch.testing.assert_close(m.log_prob(x), _brute_log_prob(m, x), rtol=1e-9, atol=1e-9)
    x_rec = m.inverse(z)[0]
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-10)
    logits, lp = m.logits_and_log_prob(x)
    torch.testing.assert_close(logits, m(x))
    torch.testing.assert_close(lp, m.log_prob(x))


@pytest.mark.parametrize("block", ["coupling", "coupling_1x1", "residual"])
def test_hybrid_density_matches_brute_force(block):
    torch.manual_seed(0)
    extra = dict(estimator="exact") if block == "residual" else {}
    m = hybrid(shape=(1, 4, 4), n_classes=4, block=block, lam=0.5, levels=1, steps_per_level=2, hidden=8,
               **extra).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    _init(m, x, scale=0.05 if block == "residual" else 0.2)
    m.eval()
    assert m.lam == 0.5 and m(x).shape == (3, 4)
    torch.testing.assert_close(m.log_prob(x), _brute_log_prob(m, x), rtol=1e-7, atol=1e-7)


def _batch(shape, n=12, levels=17, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, levels, (n, *shape), generator=g).double()
    x = (raw + torch.rand(raw.shape, generator=g, dtype=torch.float64)) / levels
    return Batch(x=x, raw=raw, y=torch.randint(0, k, (n,), generator=g), levels=levels)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_objective_gradients_memory_saving_equal_stored(coupling):
    """Cross-entropy + NF + bi-directional FD, float64: the memory-saving gradient (recomputed
    activations) equals the stored-activation one for every parameter."""
    torch.manual_seed(0)
    m = classifier(shape=(1, 4, 4), n_classes=3, levels=2, steps_per_level=2, hidden=8, coupling=coupling,
                   scale="tanh_clamp", memory_saving=True).double()
    b = _batch((1, 4, 4))
    _init(m, b.x)
    obj = ClassificationObjective(fd=FiniteDifferenceRegularizer(weight_forward=0.1, weight_inverse=0.1, every=1),
                                  nf=FlowObjectiveRegularizer(weight=0.1))
    obj.set_step(0)
    angle, rel = gradient_angle(m, b, obj)
    assert angle < 1e-5 and rel < 1e-9
    hyb = HybridObjective(lam=1 / 16)
    angle, rel = gradient_angle(m, b, hyb)
    assert angle < 1e-5 and rel < 1e-9


def test_objectives_values_and_schedule():
    torch.manual_seed(0)
    m = classifier(shape=(6,), n_classes=3, levels=1, steps_per_level=2, hidden=8, coupling="affine").double()
    b = _batch((6,))
    _init(m, b.x)
    logits, lp = m.logits_and_log_prob(b.x)
    ce = F.cross_entropy(logits, b.y)
    nll_nats = -(lp - 6 * math.log(17))  # discrete correction D ln L
    bpd = nll_nats / (6 * math.log(2))
    lam = 0.3
    loss, logs = HybridObjective(lam=lam).loss(m, b)
    torch.testing.assert_close(loss, ce + lam * nll_nats.mean())
    assert logs["bpd"] == pytest.approx(float(bpd.mean().detach())) and logs["ce"] == pytest.approx(float(ce.detach()))
    m.lam = 0.0
    loss0, _ = HybridObjective().loss(m, b)  # lam from the model
    torch.testing.assert_close(loss0, ce)
    nf = ClassificationObjective(nf=FlowObjectiveRegularizer(weight=0.5))
    loss, logs = nf.loss(m, b)
    torch.testing.assert_close(loss, ce + 0.5 * bpd.mean())
    # FD every 3 steps, counted by the objective itself when no step is set
    fd = ClassificationObjective(fd=FiniteDifferenceRegularizer(every=3))
    seen = [("fd_forward" in fd.loss(m, b)[1]) for _ in range(6)]
    assert seen == [True, False, False, True, False, False]
    fd.set_step(9)
    assert "fd_inverse" in fd.loss(m, b)[1]
    with pytest.raises(ValueError):
        ClassificationObjective().loss(m, Batch(x=b.x, raw=b.raw, y=None, levels=17))


def test_evaluate_classifier_matches_manual():
    torch.manual_seed(0)
    m = classifier(shape=(6,), n_classes=3, levels=1, steps_per_level=2, hidden=8).double()
    b = _batch((6,), n=20)
    _init(m, b.x)
    res = evaluate_classifier(m, b.raw, b.y, 17, batch_size=7)
    u = torch.rand(b.raw.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = (b.raw + u) / 17
    m.eval()
    acc = float((m(v).argmax(1) == b.y).double().mean())
    assert res["acc"] == pytest.approx(acc) and res["error"] == pytest.approx(1 - acc)
    with torch.no_grad():
        bpd = -(m.log_prob(v) - 6 * math.log(17)) / (6 * math.log(2))
    assert res["bpd"] == pytest.approx(float(bpd.mean()))


def test_registry_and_switches():
    m = build_model(ModelConfig(model="classifier", levels=1, steps_per_level=1, hidden=8), (1, 4, 4))
    assert isinstance(m, InvertibleClassifier) and not m.memory_saving
    m.memory_saving = True
    assert has_memory_saving(m)
    h = build_model(ModelConfig(model="hybrid", levels=1, steps_per_level=1, hidden=8), (1, 4, 4))
    assert isinstance(h, InvertibleClassifier)
    # the flag does not change the parameters: a memory-saving model loads stored weights
    a = classifier(shape=(6,), levels=1, steps_per_level=2, memory_saving=True)
    a.load_state_dict(classifier(shape=(6,), levels=1, steps_per_level=2).state_dict())
    for bad in (dict(coupling="quadratic"), dict(head="deep"), dict(n_classes=1), dict(levels=3)):
        with pytest.raises(ValueError):
            classifier(shape=(1, 4, 4), **bad)
    with pytest.raises(ValueError):
        hybrid(shape=(6,), block="dense")


def test_short_training_on_digits_with_memory_saving():
    """60 AdamW steps of the additive classifier with memory-saving gradients, FD and NF, guarded:
    the training accuracy rises well above chance and no step falls back."""
    from stableflows.data import load_dataset

    s = load_dataset(DataConfig(name="digits"))
    torch.manual_seed(0)
    m = classifier(shape=s.shape, n_classes=10, levels=2, steps_per_level=2, hidden=16, coupling="additive",
                   memory_saving=True)
    g = torch.Generator().manual_seed(0)
    x_all, y_all = s.train, s.y_train
    _ = m.train() and m.log_prob((x_all[:256] + 0.5) / s.levels)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    obj = ClassificationObjective(fd=FiniteDifferenceRegularizer(every=10), nf=FlowObjectiveRegularizer(weight=0.01))
    guard = GradientGuard(every=20, max_angle=0.5)
    for step in range(60):
        idx = torch.randint(0, x_all.shape[0], (64,), generator=g)
        raw = x_all[idx]
        b = Batch(x=(raw + torch.rand(raw.shape, generator=g)) / s.levels, raw=raw, y=y_all[idx], levels=s.levels)
        opt.zero_grad()
        _, logs = guard.backward(m, obj, b, step)
        opt.step()
    res = evaluate_classifier(m, s.val, s.y_val, s.levels)
    assert res["acc"] > 0.7, res
    assert guard.n_fallbacks == 0 and len(guard.history) == 3
    assert max(h[1] for h in guard.history) < 0.01  # additive: memory-saving gradients are exact


def test_make_objective():
    o = make_objective("classification", fd_forward=1e-3, fd_inverse=0.0, fd_every=5, nf_weight=0.01)
    assert isinstance(o, ClassificationObjective) and o.fd.every == 5 and o.fd.weight_inverse == 0.0
    assert o.nf.weight == 0.01
    assert make_objective("classification").fd is None
    h = make_objective("hybrid", lam=0.5)
    assert isinstance(h, HybridObjective) and h.lam == 0.5
    for bad in (dict(kind="regression"), dict(kind="hybrid", nf_weight=0.1)):
        with pytest.raises(ValueError):
            make_objective(**bad)
