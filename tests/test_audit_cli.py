"""``stableflows audit RUN`` end to end: train a tiny run with ``stableflows train``, audit it, check
the report files, the printed verdict table and the exit status of ``--fail-on-noninvertible``.
"""
import json
import math
import re

import pytest
import torch

from stableflows.cli import main
from stableflows.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_cli") / "run"
    code = main(["train", "--model", "nice", "--data", "digits", "--flatten", "--hidden", "16",
                 "--steps-per-level", "2", "--steps", "30", "--eval-every", "30", "--out-dir", str(out),
                 "--no-progress", "--threads", "1", "--time-budget", "120"])
    assert code == 0 and (out / "best.pt").exists()
    return out


COMMON = ["--families", "test,samples,constant,noise", "--repeat", "2", "--spectra-points", "2",
          "--attack", "pgd", "--attack-examples", "4", "--attack-steps", "2", "--threads", "1"]


def _recompute_test_errors(run_dir):
    """The test family's errors from the checkpoint, independently of the audit: dequantise the
    digits test split with fixed noise (seed 0, as documented) and round-trip through the flow."""
    from stableflows.config import RunConfig
    from stableflows.data import load_dataset
    from stableflows.train.evaluate import load_flow

    flow, ckpt = load_flow(run_dir / "best.pt")
    cfg = RunConfig.from_dict(ckpt["config"])
    splits = load_dataset(cfg.data, seed=cfg.train.seed)
    u = torch.rand(splits.test.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = ((splits.test.double() + u) / splits.levels).float()
    flow.eval()
    with torch.no_grad():
        xh = flow.inverse(flow(x)[0])[0]
    return torch.linalg.norm((xh.double() - x.double()).reshape(x.shape[0], -1), dim=1)


def test_audit_cli_writes_reports_and_a_table_and_passes_a_healthy_run(run_dir, tmp_path, capsys):
    out = tmp_path / "rep"
    capsys.readouterr()
    code = main(["audit", str(run_dir), *COMMON, "--report", str(out), "--tolerance", "1e-2",
                 "--fail-on-noninvertible"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    # the verdict table: header, one row per family (and attack), the overall line
    assert re.search(r"^family\s+status\s+fail", printed, re.M)
    for fam in ("test", "samples_t1", "samples_t0.7", "samples_t0", "constant", "uniform", "gaussian",
                "pgd:cell", "pgd:linf", "pgd:range"):
        assert re.search(rf"^{re.escape(fam)}\s+(invertible|not invertible|outside domain)\s", printed, re.M), fam
    assert "overall: INVERTIBLE" in printed
    d = json.loads((out / "report.json").read_text())
    assert d["verdict"]["invertible"] is True and d["verdict"]["tolerance"] == 1e-2
    assert d["meta"]["data"] == "digits" and d["meta"]["n_test"] == 360
    # the test family's errors are the round trip of the checkpoint's flow, recomputed here
    ref = _recompute_test_errors(run_dir)
    got = torch.tensor([math.inf if v == "inf" else v for v in d["families"]["test"]["errors"]["l2"]],
                       dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-15)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "http://" not in html and "https://" not in html


def test_audit_cli_fails_when_not_invertible_within_the_tolerance(run_dir, tmp_path, capsys):
    out = tmp_path / "strict"
    capsys.readouterr()
    # float32 round trips are not exact: nothing passes a tolerance of 1e-30
    code = main(["audit", str(run_dir), "--families", "test", "--repeat", "0", "--spectra-points", "0",
                 "--no-localize", "--report", str(out), "--tolerance", "1e-30", "--fail-on-noninvertible",
                 "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "overall: NOT INVERTIBLE" in printed
    d = json.loads((out / "report.json").read_text())
    ref = _recompute_test_errors(run_dir)
    assert d["verdict"]["families"]["test"]["n_fail"] == int((ref > 1e-30).sum()) > 0
    # without the flag the same audit exits 0 (the report still says not invertible)
    code = main(["audit", str(run_dir), "--families", "test", "--repeat", "0", "--spectra-points", "0",
                 "--no-localize", "--report", str(out), "--tolerance", "1e-30", "--threads", "1"])
    assert code == 0


def test_audit_cli_planted_tiny_scale_checkpoint_fails(run_dir, tmp_path, capsys):
    """A checkpoint whose final diagonal log-scale is planted at -120 in one coordinate: the layer
    divides by exp(-120) and the float32 forward overflows to inf for every example, so the test
    family is not invertible (non-finite) at a loose tolerance, float64 reconstructs, and the
    planted layer is named."""
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    state = ckpt["model"] if "model" in ckpt else ckpt["state_dict"]
    keys = [k for k in state if re.search(r"(log_?s|logs|scale)", k) and state[k].dim() >= 1
            and torch.is_floating_point(state[k])]
    assert keys, list(state)
    k = keys[-1]
    state[k] = state[k].clone()
    state[k].view(-1)[0] = -120.0
    bad = tmp_path / "planted.pt"
    save_checkpoint(bad, ckpt)  # re-sealed: the checksums of the original would (rightly) refuse the edit
    capsys.readouterr()
    code = main(["audit", str(bad), "--families", "test", "--repeat", "0", "--spectra-points", "0",
                 "--report", str(tmp_path / "planted"), "--tolerance", "1e-2", "--fail-on-noninvertible",
                 "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    d = json.loads((tmp_path / "planted" / "report.json").read_text())
    v = d["verdict"]["families"]["test"]
    assert v["status"] == "not invertible" and v["n_fail"] == v["n_nonfinite"] == 360
    assert v["cause"] == "floating point"
    assert v["culprit"] == k.rsplit(".", 1)[0], (k, v["culprit"])  # e.g. transform.layers.5
