"""Data-parallel training (stableflows.train.distributed + the loop under torch.distributed).

Two CPU processes with gloo on 127.0.0.1 train a float64 flow (ActNorm, LU 1x1, affine coupling
and a spectral-normalised residual block with the exact log-det, so every step is deterministic)
and must follow the one-process trajectory with the same global batch:

* parameters and buffers (power-iteration vectors included) after k steps, and after resuming to
  k2 steps, equal the one-process run's within TRAJECTORY_ATOL (float64; the only difference is
  the summation order of the gradient average, amplified by Adam's division by sqrt(v) + eps for
  gradients near 0);
* bits/dim evaluated with the split sharded over the ranks and all-reduced equals the one-process
  :func:`evaluate` of the same weights within GATHER_ATOL;
* the ranks hold identical parameters and buffers; rank 0 alone writes (one record per evaluation).

The ranks are launched by ``torchrun`` (this file is the worker script), which also runs
``stableflows train`` through the command line in the same launch.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stableflows.config import ConfigError, RunConfig
from stableflows.data import Splits
from stableflows.models import glow
from stableflows.models.flow import Flow
from stableflows.train import evaluate, load_checkpoint, train
from stableflows.train import distributed as D
from stableflows.transforms.base import Compose
from stableflows.transforms.residual import ResidualBlock, mlp_lipschitz

WORLD = 2
K1, K2 = 4, 6  # steps before and after the resume
TRAJECTORY_ATOL = 1e-8  # float64 parameters after K2 AdamW steps (lr 1e-2)
GATHER_ATOL = 1e-12  # float64 bits/dim: sharded + all-reduced vs one process
DIM, LEVELS = 16, 17


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _splits() -> Splits:
    g = torch.Generator().manual_seed(5)

    def part(n):
        return torch.randint(0, LEVELS, (n, DIM), generator=g).double()

    return Splits(train=part(48), val=part(18), test=part(21), y_train=None, y_val=None, y_test=None,
                  levels=LEVELS, shape=(DIM,), name="synthetic")


def _model() -> Flow:
    torch.manual_seed(0)
    base = glow(shape=(DIM,), levels=1, steps_per_level=2, hidden=12)
    block = ResidualBlock(mlp_lipschitz(DIM, 12, n_power_iter=2), estimator="exact")
    return Flow(Compose([base.transform, block]), (DIM,)).double()


def _cfg(out_dir: str, steps: int) -> RunConfig:
    return RunConfig.from_dict({"train": {
        "steps": steps, "batch_size": 8, "lr": 1e-2, "warmup": 2, "eval_every": 2, "ema_decay": 0.9,
        "out_dir": out_dir, "device": "cpu", "threads": 1, "progress": False, "seed": 3}})


def _run_twice(out_dir: str):
    """K1 steps, then resume to K2 (fresh model objects, as a restarted job would build them)."""
    train(_cfg(out_dir, K1), model=_model(), splits=_splits())
    model = _model()
    result = train(_cfg(out_dir, K2), resume=True, model=model, splits=_splits())
    return model, result


CLI_ARGS = ["train", "--data", "digits", "--model", "glow", "--hidden", "4", "--levels", "1",
            "--steps-per-level", "1", "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--device", "cpu",
            "--threads", "1", "--no-progress"]


def _torchrun_main(out_dir: str, ref_path: str, report: str, cli_out: str) -> None:
    """One rank under torchrun: join the group from the environment (env://) once, run the float64
    training and resume (train() reuses the group), the checks that need the group, then the
    command line inside the same launch."""
    from stableflows.cli import main

    torch.set_num_threads(1)
    env = D.setup("cpu")
    assert env.world_size == WORLD and env.owns_group and env.backend == "gloo"
    try:
        model, result = _run_twice(out_dir)
        divergence = D.module_divergence(model, env)
        ref = _model()
        ref.load_state_dict(load_checkpoint(ref_path)["model"])
        gathered = D.evaluate_sharded(ref, _splits().test, LEVELS, env)
        status = main(CLI_ARGS + ["--out-dir", cli_out])  # reuses the group it finds
        if env.is_main:
            Path(report).write_text(json.dumps({"divergence": divergence, "gathered": gathered, "cli_status": status,
                                                "test": result.test, "best_step": result.best_step}))
    finally:
        D.teardown(env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    single_model, single = _run_twice(str(d / "single"))
    report = d / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__,
           str(d / "multi"), str(d / "single" / "last.pt"), str(report), str(d / "cli")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, single_model, single, json.loads(report.read_text()), proc


def test_parameters_follow_the_single_process_trajectory(runs):
    d, _, single, rep, _ = runs
    a = load_checkpoint(d / "single" / "last.pt")
    b = load_checkpoint(d / "multi" / "last.pt")
    assert a["step"] == b["step"] == K2
    worst = 0.0
    for name, t in a["model"].items():
        if torch.is_floating_point(t):
            worst = max(worst, float((t - b["model"][name]).abs().max()))
        else:
            assert torch.equal(t, b["model"][name]), name
    assert worst <= TRAJECTORY_ATOL
    assert any(k.endswith(".u") for k in a["model"]), "the power-iteration vectors are compared too"
    assert rep["divergence"] == 0.0  # every rank holds exactly rank 0's parameters and buffers
    assert rep["best_step"] == single.best_step
    assert abs(rep["test"] - single.test) <= 1e-8


def test_gathered_bits_per_dim_equals_single_process(runs):
    d, _, _, rep, _ = runs
    ref = _model()
    ref.load_state_dict(load_checkpoint(d / "single" / "last.pt")["model"])
    # one process, the loop's own evaluation, and an independent recomputation of the definition
    one = evaluate(ref, _splits().test, LEVELS)
    x = _splits().test
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    v = (x + u) / LEVELS
    with torch.no_grad():
        ref.eval()
        direct = float((-(ref.log_prob(v) - DIM * math.log(LEVELS)) / (DIM * math.log(2))).mean())
    assert abs(one - direct) <= GATHER_ATOL
    assert abs(rep["gathered"] - one) <= GATHER_ATOL


def test_only_rank_zero_writes(runs):
    d = runs[0]
    records = [json.loads(line) for line in (d / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6]
    assert sum(r["kind"] == "test" for r in records) == 1
    summary = json.loads((d / "multi" / "metrics.json").read_text())
    assert summary["processes"] == WORLD


def test_shard_bounds_cover_and_match_tensor_split():
    for n in range(0, 12):
        for w in range(1, 5):
            bounds = [D.shard_bounds(n, r, w) for r in range(w)]
            parts = torch.tensor_split(torch.arange(n), w)
            assert [list(range(lo, hi)) for lo, hi in bounds] == [p.tolist() for p in parts]
    with pytest.raises(ValueError):
        D.shard_bounds(4, 2, 2)


def test_single_process_env_is_the_identity():
    env = D.setup("cpu")
    assert not env.enabled and env.is_main and env.world_size == 1
    t = torch.arange(6.0)
    assert env.shard(t) is t
    assert env.any(True) and not env.any(False)
    assert env.average({"a": 2.0}) == {"a": 2.0}
    model = _model()
    assert D.wrap(model, env) is model
    assert D.module_divergence(model, env) == 0.0


def test_global_batch_must_split_evenly():
    env = D.DistEnv(rank=0, world_size=3)
    assert env.local_batch(12) == 4
    with pytest.raises(ConfigError, match="divisible"):
        env.local_batch(64)


def test_device_resolution():
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError):
        D.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert D.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA"):
            D.resolve_device("cuda")


def test_torchrun_launches_the_cli(runs):
    d, _, _, rep, proc = runs
    assert rep["cli_status"] == 0
    assert proc.stdout.count("test bpd") == WORLD  # every rank reports the same result
    summary = json.loads((d / "cli" / "metrics.json").read_text())
    assert summary["processes"] == WORLD and summary["steps"] == 2
    assert math.isfinite(summary["test"])


if __name__ == "__main__":  # a rank launched by torchrun from the fixture above
    _torchrun_main(*sys.argv[1:5])
