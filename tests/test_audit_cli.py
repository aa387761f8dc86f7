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


# ----------------------------------------------------------------------------- what a user sees
def _cli(*argv, cwd=None):
    """``python -m stableflows`` in a subprocess (stdout and stderr are not terminals)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stableflows", *argv], capture_output=True, text=True,
                          cwd=cwd or root, env=env, timeout=300)


QUICK = ["--repeat", "0", "--spectra-points", "0", "--no-localize", "--threads", "1"]


def test_exit_status_usage_for_an_unknown_family_and_bad_options(run_dir, capsys):
    p = _cli("audit", str(run_dir), "--families", "test,bogus", *QUICK)
    assert p.returncode == 2, p.stderr
    assert "unknown audit family 'bogus'" in p.stderr and "Traceback" not in p.stderr
    assert main(["audit", str(run_dir), "--budget", "-3", *QUICK]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["audit", "--data", "digits", *QUICK]) == 2  # neither a run nor --model-spec
    assert "--model-spec" in capsys.readouterr().err


def test_exit_status_could_not_run_with_the_exception_as_headline(tmp_path):
    """A zuko MAF on 64 features given digits images (1, 8, 8): every data family raises a shape
    error. Exit status 3 (even without --fail-on-noninvertible), the unmasked exception text is the
    first line, no family is called not invertible, and the report says so too."""
    out = tmp_path / "rep"
    p = _cli("audit", "--model-spec", "tests/fixtures/spec_models.py:zuko_maf64", "--data", "digits",
             "--families", "test,samples_t1,constant", "--report", str(out), *QUICK)
    assert p.returncode == 3, (p.stdout, p.stderr)
    first = p.stdout.splitlines()[0]
    assert first.startswith("could not run: RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x8 and 64x16)")
    assert "not invertible" not in p.stdout and "NOT INVERTIBLE" not in p.stdout
    assert re.search(r"^test\s+could not run\s+360/360 errors", p.stdout, re.M)
    assert re.search(r"^samples_t1\s+invertible", p.stdout, re.M)  # samples of the 64-d base still work
    d = json.loads((out / "report.json").read_text())
    assert d["verdict"]["invertible"] is None and d["verdict"]["could_not_run"] == ["test", "constant"]
    assert d["families"]["test"]["verdict"]["error"] == first[len("could not run: "):]
    # the same flow with --flatten runs: exit 0 (the MODULE:CALLABLE form, imported from the current directory)
    import os
    from pathlib import Path

    old = os.getcwd()
    os.chdir(Path(__file__).resolve().parent.parent)
    try:
        assert main(["audit", "--model-spec", "tests.fixtures.spec_models:zuko_maf64", "--data", "digits", "--flatten",
                     "--families", "test", "--report", str(tmp_path / "ok"), *QUICK]) == 0
    finally:
        os.chdir(old)


def test_model_spec_with_weights_audits_a_protocol_flow_and_names_the_planted_layer(tmp_path, capsys):
    """A user's flow following the layer protocol, its weights from a state_dict: a planted
    scale exp(-18) in layer 1 loses float32 precision (cause floating point) and is named; exit 1
    under --fail-on-noninvertible."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("spec_models", Path(__file__).parent / "fixtures" / "spec_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    flow = mod.protocol_flow()
    with torch.no_grad():
        flow.layers[1].s.fill_(-18.0)
        flow.layers[1].t.fill_(0.5)
    torch.save(flow.state_dict(), tmp_path / "w.pt")
    x = torch.rand(40, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    p = _cli("audit", "--model-spec", "tests.fixtures.spec_models:protocol_flow", "--weights", str(tmp_path / "w.pt"),
             "--data", str(tmp_path / "x.pt"), "--families", "test", "--report", str(tmp_path / "r"),
             "--repeat", "0", "--spectra-points", "0", "--threads", "1", "--fail-on-noninvertible")
    assert p.returncode == 1, (p.stdout, p.stderr)
    d = json.loads((tmp_path / "r" / "report.json").read_text())
    v = d["verdict"]["families"]["test"]
    assert v["status"] == "not invertible" and v["cause"] == "floating point" and v["culprit"] == "layers.1"
    # the errors are the round trip of the loaded weights, recomputed here
    with torch.no_grad():
        ref = torch.linalg.norm(flow.layers[0].inverse(flow.layers[1].inverse(flow.layers[2].inverse(
            flow.layers[2](flow.layers[1](flow.layers[0](x)))))).double() - x.double(), dim=1)
    got = torch.tensor(v and d["families"]["test"]["errors"]["l2"], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-9)
    # weights that do not fit: a usage error naming the mismatch
    torch.save({"w": torch.zeros(3)}, tmp_path / "bad.pt")
    fixture = str(Path(__file__).parent / "fixtures" / "spec_models.py")
    assert main(["audit", "--model-spec", f"{fixture}:pair", "--weights", str(tmp_path / "bad.pt"),
                 "--data", str(tmp_path / "x.pt"), *QUICK]) == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_default_report_directories_never_overwrite_each_other(run_dir, capsys):
    """Two audits of the same run, the second with PGD: both reports stay (one directory each);
    an explicit --report that holds a report is replaced with a notice."""
    runs = []
    for extra in ([], ["--attack", "pgd", "--attack-examples", "2", "--attack-steps", "1"]):
        code = main(["audit", str(run_dir), "--families", "test", *QUICK, *extra])
        assert code == 0
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("report: ")][-1]
        runs.append(line[len("report: "):].split(",")[0])
    a, b = (json.loads(open(r).read()) for r in runs)
    assert runs[0] != runs[1] and a["attacks"] == {} and set(b["attacks"]) == {"pgd:cell", "pgd:linf", "pgd:range"}
    assert all(r.startswith(str(run_dir / "audit" / "best-")) for r in runs)
    code = main(["audit", str(run_dir), "--families", "test", "--report", str(__import__("pathlib").Path(runs[0]).parent),
                 *QUICK])
    assert code == 0 and "note: replacing report.json, report.html of an earlier audit" in capsys.readouterr().err


def test_progress_lines_when_not_a_terminal(run_dir, tmp_path, capsys):
    p = _cli("audit", str(run_dir), "--families", "test,constant", "--report", str(tmp_path / "r"), *QUICK)
    assert p.returncode == 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("audit [")]
    assert lines and "round trips" in lines[0] and "done in" in lines[-1] and "INVERTIBLE" in lines[-1]
    capsys.readouterr()
    assert main(["audit", str(run_dir), "--families", "test", "--report", str(tmp_path / "q"), "--no-progress",
                 *QUICK]) == 0
    assert "audit [" not in capsys.readouterr().err
