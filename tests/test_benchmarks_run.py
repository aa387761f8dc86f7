"""``make bench`` = ``python -m benchmarks.run``: the Makefile target, the plan it runs (every
command names files that exist), usage errors, and one real benchmark run in a subprocess writing
its JSON and the summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fashion_data import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_makefile_bench_target_runs_the_runner():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:.*\n\t(.*)$", text, re.M)
    assert recipe and "-m benchmarks.run" in recipe.group(1)
    assert (ROOT / "benchmarks" / "run.py").is_file()


def test_list_names_every_benchmark_with_existing_files():
    r = _run("--list")
    assert r.returncode == 0, r.stderr
    cmds = [line.split("$ ", 1)[1] for line in r.stdout.splitlines() if "$ " in line]
    names = [line.split()[0] for line in r.stdout.splitlines() if line and not line.startswith(" ")]
    assert {"quality-glow", "quality-resflow", "quality-splineglow", "memory_saving", "resflow_memory",
            "resflow_speed", "resflow_squeeze_first", "audit_speed", "peers"} == set(names)
    for c in cmds:
        words = c.split()
        assert words[:2] == ["python", "-m"]
        mod = words[2]
        if mod.startswith("benchmarks."):
            assert (ROOT / (mod.replace(".", "/") + ".py")).is_file(), mod
        else:
            assert mod == "stableflows"
        for w in words:
            if w.startswith("configs/"):
                assert (ROOT / w).is_file(), w


def test_unknown_name_is_a_usage_error():
    r = _run("--only", "nope")
    assert r.returncode == 2
    assert "unknown benchmark(s) nope" in r.stderr


def test_quick_run_writes_the_benchmark_json_and_the_summary(tmp_path):
    r = _run("--quick", "--only", "resflow_speed", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    (row,) = summary["benchmarks"]
    assert row["name"] == "resflow_speed" and row["exit_status"] == 0 and summary["quick"] is True
    out = json.loads((tmp_path / "resflow_speed.json").read_text())
    assert row["files"] == [str(tmp_path / "resflow_speed.json")]
    med = out["median_s"]
    assert row["figures"]["ratio"] == out["ratio"] == med["stableflows"] / med["normflows"]
    assert (tmp_path / "logs" / "resflow_speed.log").read_text().count("ratio stableflows / normflows") == 1


@needs_fashion_mnist
def test_squeeze_first_benchmark_ratio_is_the_median_of_its_rounds(tmp_path):
    r = _run("--quick", "--only", "resflow_squeeze_first", "--out-dir", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads((tmp_path / "resflow_squeeze_first.json").read_text())
    full, fast = out["configs"]
    (rnd,) = out["rounds"]
    assert rnd["train_ratio"] == rnd[full]["train_s_per_step"] / rnd[fast]["train_s_per_step"]
    assert rnd["eval_ratio"] == rnd[full]["eval_s_per_image"] / rnd[fast]["eval_s_per_image"]
    assert out["train_ratio"] == [rnd["train_ratio"]] * 3 and out["eval_ratio"] == [rnd["eval_ratio"]] * 3
    # the squeezed model has 4 input channels where the full one has 1: its first convolutions are larger
    assert out["params"][fast] > out["params"][full] > 0
