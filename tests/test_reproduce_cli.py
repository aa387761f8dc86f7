"""The reproduce command finds experiments by discovery and rejects unknown names."""
import argparse
import json

from stableflows.commands import reproduce
from stableflows.experiments import registry


def _args(**kw):
    base = dict(name=None, list=False, out=None, quick=True, seed=0, threads=None, data=None, data_dir=None, paper=False)
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
