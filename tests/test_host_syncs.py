"""The hot path reads no device value (issue 16): host syncs (``aten::_local_scalar_dense``) per
training step, counted with ``torch.profiler``, for every model of ``registry_models.py`` /
``registry_resflow.py`` and every stableflows bench model. The only read allowed is the training
loop's own finiteness check of the loss; evaluation reads nothing; validation at the entry reads a
fixed number of values however deep the model is; tracing reads nothing until its stats are read."""
import pytest
import torch

from registry import ENTRIES
from stableflows.bench.models import CONTENDERS
from stableflows.bench.syncs import count_syncs, eval_syncs, training_step_syncs
from stableflows.models import glow
from stableflows.models.flow import standard_normal_log_prob
from stableflows.transforms.base import trace, validation

MODEL_ENTRIES = [n for n in sorted(ENTRIES) if n.startswith(("glow", "realnvp", "nice", "cv_glow", "resflow",
                                                             "iresnet"))]
BATCH = 8


def _log_prob(module):
    if callable(getattr(module, "log_prob", None)):
        return module.log_prob

    def lp(x):  # a bare Transform: standard-normal base on its output
        z, ld = module(x)
        return standard_normal_log_prob(z) + ld
    return lp


def _batch(entry, n=BATCH):
    return 0.05 + 0.9 * torch.rand(n, *entry.shape) if entry.domain == "unit" else torch.randn(n, *entry.shape)


def test_every_model_family_is_counted():
    assert {"glow_img_affine", "realnvp_img", "nice_vec", "cv_glow_img", "resflow_img", "iresnet_vec"} <= set(
        MODEL_ENTRIES)


@pytest.mark.parametrize("name", MODEL_ENTRIES)
def test_registry_model_training_step_reads_once(name):
    entry = ENTRIES[name]
    module = entry.build()
    x = _batch(entry)
    assert training_step_syncs(module, _log_prob(module), x) == 1  # the loop's finiteness check
    assert eval_syncs(module, _log_prob(module), x) == 0


@pytest.mark.parametrize("name", sorted(CONTENDERS))
def test_bench_model_training_step_reads_once(name):
    c = CONTENDERS[name](32, "logit")  # the bench architecture, narrower
    v = 0.05 + 0.9 * torch.rand(16, 1, 8, 8)
    after = (lambda: c.after_step(c.module)) if c.after_step is not None else None
    assert training_step_syncs(c.module, lambda t: c.log_prob(c.module, t), v, after_step=after) == 1
    assert eval_syncs(c.module, lambda t: c.log_prob(c.module, t), v) == 0


def test_validation_reads_at_the_entry_only():
    """With validation on, the entry reads the finiteness flag and the Logit's domain flag: two
    values, the same for one level as for three (no layer checks again)."""
    x = 0.05 + 0.9 * torch.rand(4, 1, 8, 8)
    counts = []
    for levels in (1, 3):
        flow = glow(shape=(1, 8, 8), levels=levels, steps_per_level=2, hidden=4)
        counts.append(eval_syncs(flow, flow.log_prob, x, validate=True))
    assert counts == [2, 2]
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=4)
    assert training_step_syncs(flow, flow.log_prob, x, validate=True) == 3  # + the loop's check


def test_tracing_records_tensors_and_reads_them_once_asked():
    flow = glow(shape=(1, 8, 8), levels=2, steps_per_level=2, hidden=4).eval()
    x = 0.05 + 0.9 * torch.rand(4, 1, 8, 8)
    with validation(False):
        with torch.no_grad(), trace(flow) as t:
            n = count_syncs(lambda: flow(x))
    assert n == 0
    raw = [r.raw_stats for r in t.records if "min_scale" in r.raw_stats]
    assert len(raw) == 4 and all(torch.is_tensor(s["min_scale"]) for s in raw)
    stats = [r.stats for r in t.records if "min_scale" in r.raw_stats]  # read now, all records at once
    assert all(type(s["min_scale"]) is float and 0 < s["min_scale"] < 1 for s in stats)
    assert all(type(r.raw_stats["min_scale"]) is float for r in t.records if "min_scale" in r.raw_stats)


@pytest.mark.parametrize("norm", ["spectral", "inf", "one", "mixed"])
def test_residual_flow_of_every_norm_reads_once(norm):
    from stableflows.models import resflow
    from stableflows.transforms.lipschitz import NORMS

    assert norm in NORMS
    flow = resflow(shape=(4,), levels=1, steps_per_level=2, hidden=8, norm=norm)
    x = 0.05 + 0.9 * torch.rand(BATCH, 4)
    assert training_step_syncs(flow, flow.log_prob, x) == 1
    assert eval_syncs(flow, flow.log_prob, x) == 0
