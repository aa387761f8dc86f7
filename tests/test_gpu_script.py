"""``benchmarks/gpu.py`` (issue 16) runs end to end on a CPU in its ``--quick`` mode, so that a
session with a GPU runs it in one call: every section produces its figures, the short training run
learns (validation bits/dim falls), and the JSON is written."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_mode_writes_every_section(tmp_path):
    gpu = _gpu_module()
    assert gpu.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"]["device"] == "cpu" and report["skipped"] == []
    glow = report["glow"]
    names = [m["name"] for m in glow["models"]]
    assert names[0] == "stableflows-glow" and {"FrEIA-allinone", "normflows-glow"} <= set(names), glow
    for m in glow["models"] + report["resflow"]["models"]:
        assert m["ms_per_step"] > 0 and m["skipped_steps"] == 0 and isinstance(m["host_syncs_per_step"], int)
    assert report["resflow"]["models"][0]["name"] == "stableflows-resflow"
    train = report["train"]
    assert train["exit_code"] == 0 and train["loss_falls"], train


def test_compile_options_of_the_gpu_run():
    gpu = _gpu_module()
    assert gpu.parse(["--quick"]).compile_options == {"backend": "aot_eager"}  # CPU check: no Inductor build
    assert gpu.parse([]).compile_options == {}  # the GPU run: torch.compile's defaults (Inductor)
    assert gpu.parse(["--mode", "max-autotune"]).compile_options == {"mode": "max-autotune"}
    assert gpu.parse(["--no-compile"]).compile_options is None
    a = gpu.parse([])
    assert (a.glow_steps, a.hidden, a.batch) == (8, 512, 64)
