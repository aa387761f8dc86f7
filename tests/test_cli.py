"""The command line end to end on the embedded digits: train -> eval -> sample, resume, exit codes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from stableflows.cli import main
from stableflows.config import RunConfig
from stableflows.data import load_dataset
from stableflows.metrics import bits_per_dim
from stableflows.models.registry import build_model
from stableflows.train.checkpoint import load_checkpoint

TINY = ["--data", "digits", "--model", "glow", "--hidden", "8", "--levels", "1", "--steps-per-level", "2",
        "--batch-size", "32", "--lr", "5e-3", "--warmup", "5", "--eval-every", "10", "--no-progress", "--threads", "1"]
UNIFORM_BPD = math.log2(17)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "30", "--out-dir", str(d)]) == 0
    return d


def test_train_writes_a_complete_run(run_dir, capsys):
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 30 and summary["data"] == "digits" and summary["shape"] == [1, 8, 8]
    assert summary["test"] < UNIFORM_BPD - 0.3  # a short run already beats the uniform model
    assert summary["config"]["model"]["hidden"] == 8
    for f in ("best.pt", "last.pt", "samples.png", "curve.png", "metrics.jsonl"):
        assert (run_dir / f).is_file()
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_recomputes_the_test_bpd(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    assert "test bpd" in capsys.readouterr().out
    step = load_checkpoint(run_dir / "best.pt")["step"]
    res = json.loads((run_dir / f"eval-best-step{step}-test.json").read_text())  # named after what it evaluated
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert res["bpd"] == pytest.approx(summary["test"], abs=1e-9) and res["n"] == 360
    # independent reference: rebuild from the stored config, docs/METRICS.md bits/dim with seed-0 noise
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg = RunConfig.from_dict(ckpt["config"])
    flow = build_model(cfg.model, (1, 8, 8))
    flow.load_state_dict(ckpt["model"])
    flow.eval()
    test = load_dataset(cfg.data, seed=cfg.train.seed).test
    with torch.no_grad():
        ref = float(bits_per_dim(flow, test, 17, seed=0).double().mean())
    assert res["bpd"] == pytest.approx(ref, abs=1e-5)
    assert main(["eval", str(run_dir / "last.pt"), "--split", "val", "--out", str(run_dir / "v.json")]) == 0
    assert json.loads((run_dir / "v.json").read_text())["n"] == 144


@pytest.mark.parametrize("suffix", [".png", ".npy", ".pt"])
def test_sample_formats(run_dir, tmp_path, suffix, capsys):
    out = tmp_path / f"s{suffix}"
    assert main(["sample", str(run_dir), "--n", "16", "--temperature", "0.7", "--out", str(out)]) == 0
    assert out.is_file() and "16 samples" in capsys.readouterr().out
    if suffix == ".png":
        return
    x = np.load(out) if suffix == ".npy" else torch.load(out, weights_only=True).numpy()
    assert x.shape == (16, 1, 8, 8)
    finite = x[np.isfinite(x)]
    assert finite.min() >= 0 and finite.max() <= 16 and np.all(finite == np.round(finite))


def test_sample_model_space_and_seed(run_dir, tmp_path):
    a, b, c = (tmp_path / f"{k}.pt" for k in "abc")
    for path, seed in ((a, 0), (b, 0), (c, 1)):
        assert main(["sample", str(run_dir), "--n", "8", "--space", "model", "--seed", str(seed), "--out", str(path)]) == 0
    ta, tb, tc = (torch.load(p, weights_only=True) for p in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    assert not torch.equal(ta, ta.round())  # model space: continuous values


def test_resume_from_the_command_line(run_dir, tmp_path):
    d = tmp_path / "resumed"
    assert main(["train", *TINY, "--steps", "20", "--out-dir", str(d)]) == 0
    # --resume without --config reuses the stored config; --steps extends the run
    assert main(["train", "--resume", "--out-dir", str(d), "--steps", "30", "--no-progress"]) == 0
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(d / "last.pt")
    assert a["step"] == b["step"] == 30
    for key in ("model",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    ea = [r for r in a["history"] if r["kind"] == "eval"]
    eb = [r for r in b["history"] if r["kind"] == "eval"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "eval_time", "steps_per_s")} for r in rs]
    assert strip(ea) == strip(eb)


def test_bad_input_exit_codes(run_dir, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    (tmp_path / "corrupt.pt").write_bytes(b"junk")
    assert main(["sample", str(tmp_path / "corrupt.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "x.gif")]) == 2
    assert main(["sample", str(run_dir), "--n", "0"]) == 2
    assert main(["train", "--resume", "--out-dir", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert main(["train", "--data", "mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "m")]) == 2
    assert "mnist" in capsys.readouterr().err.lower()
    assert not (tmp_path / "m").exists()
    # continuous 2-D data through the default logit pre-transform: rejected with the remedy, nothing written
    assert main(["train", "--data", "moons", "--n-toy", "500", "--out-dir", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "--logit-alpha 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_failure_after_start_exits_could_not_run(monkeypatch, tmp_path, capsys):
    from stableflows.train import loop

    def diverging_train(cfg, *, resume=False, overwrite=False, callbacks=()):
        for cb in callbacks:
            cb("start", {"out_dir": cfg.train.out_dir, "step": 0})
        raise loop.TrainingDiverged("20 consecutive steps had a non-finite loss")

    monkeypatch.setattr(loop, "train", diverging_train)
    assert main(["train", "--out-dir", str(tmp_path / "d")]) == 3  # exitcodes.COULD_NOT_RUN
    err = capsys.readouterr().err
    assert "TrainingDiverged" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "stableflows", "train", "--no-such-option"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--no-such-option" in r.stderr


# ----------------------------------------------------------------------------- what a user sees (issue 17)
def test_eval_and_sample_reports_never_overwrite_each_other(run_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    best, last = load_checkpoint(d / "best.pt")["step"], load_checkpoint(d / "last.pt")["step"]
    assert main(["eval", str(d)]) == 0 and main(["eval", str(d / "last.pt")]) == 0
    assert main(["eval", str(d / "last.pt"), "--split", "val"]) == 0
    a = json.loads((d / f"eval-best-step{best}-test.json").read_text())
    b = json.loads((d / f"eval-last-step{last}-test.json").read_text())
    c = json.loads((d / f"eval-last-step{last}-val.json").read_text())
    assert a["checkpoint"].endswith("best.pt") and b["checkpoint"].endswith("last.pt") and c["split"] == "val"
    # an explicit --out that exists is refused, unless --overwrite
    target = tmp_path / "report.json"
    target.write_text("mine")
    assert main(["eval", str(d), "--out", str(target)]) == 2 and target.read_text() == "mine"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", str(d), "--out", str(target), "--overwrite"]) == 0 and json.loads(target.read_text())["n"] == 360
    # sample: the default name fixes the contents; an existing --out is refused
    assert main(["sample", str(d), "--n", "4", "--temperature", "0.5"]) == 0
    assert (d / f"samples-best-step{best}-T0.5-n4-seed0.png").is_file()
    assert main(["sample", str(d), "--n", "4", "--out", str(target)]) == 2  # wrong suffix is refused first anyway
    png = tmp_path / "s.png"
    png.write_bytes(b"mine")
    assert main(["sample", str(d), "--n", "4", "--out", str(png)]) == 2 and png.read_bytes() == b"mine"
    assert main(["sample", str(d), "--n", "4", "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *args, "--steps", "60", "--log-every", "1e-9", "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out  # pytest's stdout is not a terminal
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) >= 10  # one line per step at this interval
    first = lines[0].split(" | ")
    assert first[0] == "step 1/60" and first[1].startswith("loss ") and first[2].startswith("train bpd ")
    assert first[-2].endswith(" steps/s") and first[-1].startswith("ETA ")
    assert any(" | val bpd " in ln for ln in lines)  # after the first evaluation
    assert main(["train", *TINY, "--steps", "5", "--out-dir", str(tmp_path / "quiet")]) == 0
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]  # --no-progress


def test_progress_bar_total_is_the_budget_that_stops_the_run(monkeypatch):
    import io

    monkeypatch.delenv("CI", raising=False)  # CI=1 turns the bar off by design; this test is about the bar

    from stableflows.train.progress import Progress, format_seconds

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err, clock = Tty(), [0.0]
    p = Progress(steps=100000, time_budget=120.0, start_step=0, enabled=True, log_every=30.0, metric="bpd",
                 stdout=Tty(), stderr=err, clock=lambda: clock[0])
    assert p.bar is not None and p.bar.total is None  # unknown until the rate of steps is known
    for step in range(1, 21):  # 20 steps in 2 s of training: 10 steps/s, 118 s left -> 1180 steps to go
        p.step(step, step * 0.1, 10.0, ("bpd", 3.0), 2.0)
    assert p.bar.total == 20 + 1180
    assert p.eta(20, 2.0, 10.0) == 118.0 and format_seconds(118.0) == "1 min 58 s"
    p.close()
    q = Progress(steps=500, time_budget=3600.0, start_step=100, enabled=True, log_every=30.0, metric="bpd",
                 stdout=Tty(), stderr=Tty(), clock=lambda: 0.0)
    assert q.target(110, 1.0, 10.0) == 500 and q.eta(110, 1.0, 10.0) == 39.0  # --steps stops it first
    q.close()


def test_resume_of_a_finished_run_says_so(run_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(d), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 30" in out and "steps/s" not in out


def test_toy_run_draws_its_scatter_and_lists_only_written_files(tmp_path, capsys):
    d = tmp_path / "toy"
    assert main(["train", "--model", "realnvp", "--data", "moons", "--n-toy", "400", "--logit-alpha", "0",
                 "--hidden", "8", "--steps-per-level", "2", "--steps", "10", "--eval-every", "5", "--batch-size",
                 "50", "--no-progress", "--threads", "1", "--out-dir", str(d)]) == 0
    summary = json.loads((d / "metrics.json").read_text())
    assert "samples_error" not in summary["figures"] and (d / "samples.png").read_bytes()[:4] == b"\x89PNG"
    listed = capsys.readouterr().out.splitlines()[-1]
    assert listed.startswith("outputs:") and "samples.png" in listed
    assert all((d / name).is_file() for name in summary["outputs"])


def test_scatter_of_diverged_samples(tmp_path):
    from stableflows.train.plots import save_scatter

    pts = torch.randn(500, 2)
    bad = torch.cat([pts, torch.tensor([[math.inf, 0.0], [math.nan, 1.0], [1e30, -1e30]])])
    save_scatter(tmp_path / "s.png", {"data": pts, "samples": bad})  # the set_aspect RuntimeError is gone
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_classifier_run_reports_what_it_measured(tmp_path, capsys):
    from stableflows.train.plots import curve_figure

    d = tmp_path / "cls"
    assert main(["train", "--model", "classifier", "--objective", "classification", "--data", "digits",
                 "--logit-alpha", "0", "--hidden", "8", "--levels", "1", "--steps-per-level", "2", "--steps", "6",
                 "--eval-every", "3", "--batch-size", "32", "--ema-decay", "0", "--no-progress", "--threads", "1",
                 "--out-dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "test error" in out and "bpd" not in out  # a cross-entropy run measured no density
    assert not (d / "samples.png").exists() and "samples.png not written" in out
    assert "samples.png" not in out.splitlines()[-1]
    history = load_checkpoint(d / "last.pt")["history"]
    labels = [t.get_text() for t in curve_figure(history, "error", ema=False).axes[0].get_legend().get_texts()]
    assert "validation" in labels and not any("EMA" in t for t in labels)


def test_model_help_names_every_model():
    from stableflows.commands.options import HELP
    from stableflows.models.registry import MODELS, _load_optional

    _load_optional()
    for name in MODELS:
        assert f" {name} " in f" {HELP['model.model'].replace('|', ' ')} ", name


def test_numeric_options_are_checked_on_the_command_line(tmp_path, capsys):
    for flag, value, message in (("--weight-decay", "inf", "finite"), ("--steps", "0", ">= 1"),
                                 ("--seed", "-1", ">= 0"), ("--lr", "nan", "finite")):
        assert main(["train", flag, value, "--out-dir", str(tmp_path / "x")]) == 2, flag
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_default_out_dirs_are_unique_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", *TINY, "--steps", "3", "--eval-every", "3"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("glow-digits-") for r in runs)
    assert [ln.split(": ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("run directory")] \
        == [f"runs/{r}" for r in runs]
