"""``stableflows ood`` as a user runs it: exit statuses, progress lines, report directories that
never overwrite each other, and findings that never call a set without likelihoods invertible."""
from __future__ import annotations

import json
import re

import pytest
import torch

from stableflows.cli import main
from stableflows.ood.cli import _exit_status
from stableflows.train.checkpoint import save_checkpoint

QUICK = ["--ood", "uniform,out_of_range", "--n", "40", "--n-train", "200", "--bootstrap", "50", "--typicality-m", "1",
         "--no-second-order"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ood_cli") / "run"
    code = main(["train", "--model", "glow", "--data", "digits", "--hidden", "8", "--levels", "2",
                 "--steps-per-level", "1", "--steps", "25", "--eval-every", "25", "--out-dir", str(out),
                 "--no-progress", "--threads", "1"])
    assert code == 0 and (out / "best.pt").exists()
    return out


def test_default_report_directories_are_new_per_invocation_and_progress_is_printed(run_dir, capsys):
    dirs = []
    for _ in range(2):
        assert main(["ood", str(run_dir), *QUICK]) == 0
        cap = capsys.readouterr()
        line = [ln for ln in cap.out.splitlines() if ln.startswith("report: ")][-1]
        dirs.append(line.split(" and ")[0][len("report: "):].rsplit("/", 1)[0])
        # not a terminal: periodic progress lines on stderr, the first one and the last one at least
        lines = [ln for ln in cap.err.splitlines() if ln.startswith("ood [")]
        assert len(lines) >= 2 and "likelihoods of" in lines[0] and lines[-1].endswith("done: 2 OOD families")
    assert dirs[0] != dirs[1] and all(d.startswith(str(run_dir / "ood" / "best-")) for d in dirs)
    for d in dirs:
        assert json.loads(open(f"{d}/ood.json").read())["checkpoint"].endswith("best.pt")
    assert main(["ood", str(run_dir), *QUICK, "--report", dirs[0], "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: replacing ood.json, ood.html of an earlier analysis" in err and "ood [" not in err


def test_fail_on_noninvertible_exits_1_for_a_planted_checkpoint(run_dir, tmp_path, capsys):
    """An ActNorm log-scale planted at -20 in one channel: float32 loses x there (scale 2e-9), so
    the audit finds the test family not invertible; with the flag the status is 1, without it 0."""
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    state = ckpt["ema"]["module"] if ckpt.get("ema") else ckpt["model"]
    keys = [k for k in state if re.search(r"log_?scale|logs$", k) and torch.is_floating_point(state[k])]
    assert keys, list(state)
    state[keys[0]] = state[keys[0]].clone()
    state[keys[0]].view(-1)[0] = -20.0
    save_checkpoint(tmp_path / "planted.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    argv = ["ood", str(tmp_path / "planted.pt"), *QUICK, "--report", str(tmp_path / "r"), "--no-progress"]
    assert main(argv + ["--fail-on-noninvertible"]) == 1
    out = capsys.readouterr().out
    audit = next(ln for ln in out.splitlines() if ln.startswith("audit: "))
    assert "NOT invertible on" in audit and "test" in audit.split(";")[0]
    assert main(argv) == 0


def test_exit_status_and_findings_of_families_the_audit_could_not_judge():
    au = {"test": {"status": "invertible"}, "out_of_range": {"status": "outside domain"}}
    assert _exit_status({"audit": au}, True) == 0
    assert _exit_status({"audit": {**au, "uniform": {"status": "not invertible"}}}, True) == 1
    assert _exit_status({"audit": {**au, "uniform": {"status": "not invertible"}}}, False) == 0
    assert _exit_status({"audit": {**au, "uniform": {"status": "could not run", "error": "E"}}}, True) == 3
    assert _exit_status({"audit": {"error": "RuntimeError: x"}}, False) == 3
