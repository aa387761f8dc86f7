"""Fault injection: what a crash, a signal, a second training, a damaged or hostile file, or a full /
read-only disk does to a run (issue 14). Each case is a short run of the command line, in a
subprocess where the fault is a signal or a kill; the reference of every "bit-exact" check is an
uninterrupted run of the same configuration, compared tensor by tensor with ``torch.equal``.

Where a fault needs its own file system (a full or read-only disk) the test mounts a small tmpfs,
which needs root; elsewhere those cases are skipped, saying so.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stableflows.cli import main
from stableflows.exitcodes import COULD_NOT_RUN, INTERRUPTED, USAGE
from stableflows.train.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data", "digits", "--model", "glow", "--hidden", "8", "--levels", "1", "--steps-per-level", "2",
        "--batch-size", "32", "--lr", "5e-3", "--warmup", "5", "--eval-every", "10", "--no-progress", "--threads", "1"]
STEPS = 30  # the reference run
CHILD_TIMEOUT = 120
SLOW = """
import time
from stableflows.train import loop
real = loop._Trainer.train_step
def slow(self):  # a slow step, so that a signal arrives within the first few dozen
    time.sleep(0.02)
    return real(self)
loop._Trainer.train_step = slow
"""


def child(args: list[str], prelude: str = "", **kw) -> subprocess.Popen:
    """``stableflows ARGS`` in a fresh interpreter, after ``prelude`` (fault injection) ran there."""
    code = f"import sys\n{prelude}\nfrom stableflows.cli import main\nsys.exit(main({args!r}))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=CHILD_TIMEOUT)
    return p.returncode, out, err


def wait_for(path: Path, p: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if p.poll() is not None:
            raise AssertionError(f"child ended early ({p.returncode}): {p.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def same_state(a: Path, b: Path) -> None:
    """Two last.pt hold bit-identical weights, EMA, optimizer state, step and evaluation records."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"]
    for key in ("model",):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), k
    for k in sa["ema"]["module"]:
        assert torch.equal(sa["ema"]["module"][k], sb["ema"]["module"][k]), k
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time", "eval_time", "steps_per_s")}
                       for r in h if r["kind"] == "eval"]
    assert strip(sa["history"]) == strip(sb["history"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    d = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *TINY, "--steps", str(STEPS), "--out-dir", str(d)]) == 0
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- reused / shared run directory
def test_reused_run_dir_is_refused_and_overwrite_keeps_the_old_run_until_the_new_checkpoint(reference, tmp_path,
                                                                                           capsys):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    before = snapshot(d)
    assert main(["train", *TINY, "--steps", "20", "--out-dir", str(d)]) == USAGE
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(d) == before  # nothing touched
    # an --overwrite run killed before its first checkpoint: the old run comes back on the next start
    p = child(["train", *TINY, "--steps", "100000", "--eval-every", "100000", "--out-dir", str(d), "--overwrite"])
    wait_for(d / ".replaced" / "last.pt", p)
    wait_for(d / "config.yaml", p)  # the new run's config: it is under way
    p.send_signal(signal.SIGKILL)
    assert finish(p)[0] == -signal.SIGKILL
    assert (d / ".replaced").is_dir() and not (d / "last.pt").exists()
    assert main(["train", "--resume", "--out-dir", str(d), "--no-progress"]) == 0  # the finished old run
    out, err = capsys.readouterr()
    assert "restored the earlier run" in err and "already finished at step 30" in out
    after = snapshot(d)
    for name in ("best.pt", "last.pt"):
        assert after[name] == before[name], name
    assert not (d / ".replaced").exists()
    # a successful overwrite: the earlier run goes once the new one has its first checkpoint
    assert main(["train", *TINY, "--steps", "10", "--seed", "1", "--out-dir", str(d), "--overwrite"]) == 0
    assert load_checkpoint(d / "last.pt")["config"]["train"]["seed"] == 1 and not (d / ".replaced").exists()
    assert sorted(json.loads((d / "metrics.json").read_text())["outputs"]) == sorted(
        p.name for p in d.iterdir() if not p.name.startswith("."))


def test_a_folder_that_holds_no_run_is_never_overwritten(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    assert main(["train", *TINY, "--steps", "5", "--out-dir", str(d), "--overwrite"]) == USAGE
    assert "holds no stableflows run" in capsys.readouterr().err
    assert sorted(os.listdir(d)) == ["thesis.tex"]


def test_shared_run_dir_sigint_and_resume_bit_exact(tmp_path, capsys):
    """A second training of a directory in use is refused; Ctrl-C saves last.pt and exits 130;
    --resume then follows the uninterrupted trajectory bit for bit."""
    d = tmp_path / "run"
    p = child(["train", *TINY, "--steps", "100000", "--out-dir", str(d)], prelude=SLOW)
    wait_for(d / "last.pt", p)  # first checkpoint written: training is under way
    assert main(["train", *TINY, "--steps", "20", "--out-dir", str(d), "--overwrite"]) == USAGE
    assert "in use by another training" in capsys.readouterr().err
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p)
    assert rc == INTERRUPTED, err
    assert "saved" in err and "--resume" in err
    stopped = load_checkpoint(d / "last.pt")["step"]
    target = stopped + 13  # not a multiple of the evaluation interval either
    ref = tmp_path / "ref"
    assert main(["train", *TINY, "--steps", str(target), "--out-dir", str(ref)]) == 0
    assert main(["train", "--resume", "--out-dir", str(d), "--steps", str(target), "--no-progress"]) == 0
    same_state(ref / "last.pt", d / "last.pt")
    assert json.loads((ref / "metrics.json").read_text())["test"] == json.loads((d / "metrics.json").read_text())["test"]


def test_sigterm_before_the_first_evaluation_is_resumable(tmp_path):
    d = tmp_path / "run"
    args = ["train", *TINY, "--eval-every", "100000", "--out-dir", str(d)]
    p = child(args + ["--steps", "100000"], prelude=SLOW)
    wait_for(d / "config.yaml", p)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == INTERRUPTED, err
    s = load_checkpoint(d / "last.pt")
    assert 0 < s["step"] < 100000 and not [r for r in s["history"] if r["kind"] == "eval"]
    target = s["step"] + 7
    ref = tmp_path / "ref"
    assert main(["train", *args[1:-2], "--steps", str(target), "--out-dir", str(ref)]) == 0
    assert main(["train", "--resume", "--out-dir", str(d), "--steps", str(target), "--no-progress"]) == 0
    same_state(ref / "last.pt", d / "last.pt")
