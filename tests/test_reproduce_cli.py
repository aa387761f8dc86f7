"""The reproduce command finds experiments by discovery and rejects unknown names."""
import argparse
import json

import pytest

from stableflows.commands import reproduce
from stableflows.experiments import registry


def _args(**kw):
    base = dict(name=None, list=False, out=None, quick=True, seed=0, threads=None, data=None, data_dir=None, paper=False,
                seeds=None, reuse=False, progress_every=0.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_unknown_experiment_is_a_usage_error(capsys):
    assert reproduce.run(_args(name="no-such-experiment")) == 2
    assert "unknown experiment 'no-such-experiment'" in capsys.readouterr().err


def test_list_names_every_registered_experiment(capsys):
    assert reproduce.run(_args(list=True)) == 0
    out = capsys.readouterr().out
    for name in registry():
        assert name in out


def test_experiment_runs_and_writes_under_out(tmp_path, monkeypatch, capsys):
    calls = {}

    def fake(out_dir, *, quick=False, seed=0):
        """A test experiment."""
        calls.update(out=out_dir, quick=quick, seed=seed)
        (out_dir / "table.json").write_text(json.dumps({"x": 1}))
        return {"x": 1}

    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"fake": fake})
    assert reproduce.run(_args(name="fake", out=str(tmp_path / "o"), seed=3)) == 0
    assert calls == {"out": tmp_path / "o", "quick": True, "seed": 3}
    assert (tmp_path / "o" / "table.json").exists()


def test_data_options_reach_experiments_that_take_them(tmp_path, monkeypatch, capsys):
    calls = {}

    def takes(out_dir, *, quick=False, seed=0, data="digits", data_dir=None, paper=False):
        """Takes data options."""
        calls.update(data=data, data_dir=data_dir, paper=paper)
        return {}

    def plain(out_dir, *, quick=False, seed=0):
        """Takes none."""
        return {}

    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"takes": takes, "plain": plain})
    args = _args(name="takes", out=str(tmp_path / "a"), data="cifar10", data_dir="/data", paper=True)
    assert reproduce.run(args) == 0
    assert calls == {"data": "cifar10", "data_dir": "/data", "paper": True}
    calls.clear()
    assert reproduce.run(_args(name="takes", out=str(tmp_path / "b"))) == 0  # unset: the experiment's defaults
    assert calls == {"data": "digits", "data_dir": None, "paper": False}
    assert reproduce.run(_args(name="plain", out=str(tmp_path / "c"), paper=True)) == 2
    err = capsys.readouterr().err
    assert "does not take --paper" in err and "its data options: none" in err
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_supervised_table_takes_the_paper_options():
    import inspect

    params = inspect.signature(registry()["supervised-table"]).parameters
    assert {"data", "data_dir", "paper"} <= set(params)


def test_end_prints_the_table_and_the_path_not_the_json(tmp_path, monkeypatch, capsys):
    def fake(out_dir, *, quick=False, seed=0):
        """Writes a table."""
        (out_dir / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
        (out_dir / "summary.json").write_text(json.dumps({"rows": [{"a": 1, "b": 2}], "huge": list(range(500))}))
        return {"huge": list(range(500))}

    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"fake": fake})
    assert reproduce.run(_args(name="fake", out=str(tmp_path / "o"))) == 0
    out = capsys.readouterr().out
    assert "| 1 | 2 |" in out and f"full results: {tmp_path / 'o'}/" in out and "summary.json" in out
    assert "499" not in out  # the summary itself is not dumped


def test_seeds_give_mean_std_and_paired_differences(tmp_path, monkeypatch, capsys):
    """Three seeds of a fake experiment: the seed table's mean / std equal numpy's (ddof 1), and the
    claim's per-seed differences are A - B of the same seed."""
    import numpy as np

    from stableflows.experiments._common import Claim, Report

    vals = {0: (2.0, 2.5), 1: (2.2, 2.1), 2: (1.9, 2.6)}

    def fake(out_dir, *, quick=False, seed=0):
        """Fake with two rows."""
        a, b = vals[seed]
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"model": "A", "bpd": a, "ok": True}, {"model": "B", "bpd": b, "ok": seed != 1}]
        (out_dir / "summary.json").write_text(json.dumps({"rows": rows}))
        return {"rows": rows}

    rep = Report(keys=("model",), columns=("model", "bpd", "ok"),
                 claims=(Claim("A beats B", "bpd", {"model": "A"}, {"model": "B"}),))
    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"fake": fake})
    monkeypatch.setattr("stableflows.experiments.reports", lambda: {"fake": rep})
    assert reproduce.run(_args(name="fake", out=str(tmp_path), seeds="0,1,2", quick=False)) == 0
    res = json.loads((tmp_path / "seeds.json").read_text())
    a = np.array([v[0] for v in vals.values()])
    b = np.array([v[1] for v in vals.values()])
    row_a, row_b = res["rows"]
    assert row_a["bpd"]["mean"] == pytest.approx(a.mean()) and row_a["bpd"]["std"] == pytest.approx(a.std(ddof=1))
    assert row_b["ok"] == {"true": 2, "n": 3}
    (claim,) = res["claims"]
    assert claim["diffs"] == pytest.approx(list(a - b)) and claim["wins"] == 2 and claim["n"] == 3
    assert claim["diff_std"] == pytest.approx((a - b).std(ddof=1))
    out = capsys.readouterr().out
    assert "A beats B" in out and "2/3 seeds" in out and (tmp_path / "seed_2" / "summary.json").exists()
    # --reuse takes the finished seeds without running them again
    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"fake": lambda *a, **k: 1 / 0})
    assert reproduce.run(_args(name="fake", out=str(tmp_path), seeds="0,1,2", reuse=True, quick=False)) == 0


def test_bad_seeds_are_a_usage_error(capsys):
    assert reproduce.run(_args(name="supervised-table", seeds="0,x")) == 2
    assert "--seeds" in capsys.readouterr().err


def test_progress_lines_are_rate_limited_and_carry_eta(capsys):
    from stableflows.experiments._common import Progress

    p = Progress()
    p.configure(every=1000.0, prefix="exp")
    p.phase("model A", 100)
    p.update(10, loss=2.5)
    p.update(20, loss=2.4)  # within the interval: not printed
    p.update(30, force=True)
    lines = [l for l in capsys.readouterr().out.splitlines() if l]
    assert len(lines) == 2 and lines[0].startswith("[exp] model A: step 10/100 (10%), loss 2.5")
    assert "ETA" in lines[1] and "step 30/100" in lines[1]


def test_paired_claim_with_an_infinite_baseline_counts_as_a_win():
    """A finite reconstruction error against an infinite one beats it (diff -inf), seed by seed."""
    import math

    from stableflows.experiments._common import Claim, paired

    runs = [[{"m": "A", "e": 1e-3}, {"m": "B", "e": math.inf}], [{"m": "A", "e": 2e-3}, {"m": "B", "e": 1e-3}],
            [{"m": "A", "e": math.nan}, {"m": "B", "e": 1.0}]]
    c = paired(runs, Claim("A < B", "e", {"m": "A"}, {"m": "B"}))
    assert c["n"] == 2 and c["skipped_seeds"] == 1 and c["wins"] == 1
    assert c["diffs"][0] == -math.inf and c["diffs"][1] == pytest.approx(1e-3)


def test_a_claim_about_rows_no_seed_has_is_left_out(tmp_path, monkeypatch):
    """pgd-range's ResFlow-conv claims apply to 28x28 data only: on data without that model the seed
    summary leaves them out instead of printing a 0/0-seed line; a claim whose rows exist stays."""
    from stableflows.experiments._common import Claim, Report

    def fake(out_dir, *, quick=False, seed=0):
        """Fake with rows A and B only."""
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"model": "A", "e": 1.0 + 0.5 * seed}, {"model": "B", "e": 2.0}]
        (out_dir / "summary.json").write_text(json.dumps({"rows": rows}))

    rep = Report(keys=("model",), columns=("model", "e"),
                 claims=(Claim("A beats B", "e", {"model": "A"}, {"model": "B"}),
                         Claim("A beats C", "e", {"model": "A"}, {"model": "C"})))
    monkeypatch.setattr("stableflows.experiments.registry", lambda: {"fake": fake})
    monkeypatch.setattr("stableflows.experiments.reports", lambda: {"fake": rep})
    assert reproduce.run(_args(name="fake", out=str(tmp_path), seeds="0,1", quick=False)) == 0
    res = json.loads((tmp_path / "seeds.json").read_text())
    assert [c["claim"] for c in res["claims"]] == ["A beats B"] and res["claims"][0]["wins"] == 2
    assert "A beats C" not in (tmp_path / "seeds.md").read_text()
