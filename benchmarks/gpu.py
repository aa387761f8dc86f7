"""The first GPU figures, in one call: CIFAR-10-sized Glow and the Residual Flow of ``configs/``,
stableflows eager and compiled against FrEIA and normflows, plus a short CUDA training run.

    python benchmarks/gpu.py --device cuda --out "$OUT"     # on the GPU machine, about 6-8 minutes
    python benchmarks/gpu.py --device cpu --quick --out /tmp/g  # tiny sizes, seconds (tests/test_gpu_script.py)

Writes ``gpu.json`` under ``--out`` (default ``$OUT`` when set, else ``runs/benchmarks``) and prints a
summary. Every section runs on its own (an error is recorded in the JSON, the next section still
runs) and sections are skipped once ``--time-limit`` seconds have passed:

1. ``device``: name, capability, memory, torch / CUDA versions, UTC date.
2. ``glow``: a CIFAR-10-sized Glow, (3, 32, 32), batch 64, 3 levels x ``--glow-steps`` steps (8 by
   default; the paper's 32 with ``--glow-steps 32``), hidden ``--hidden``: stableflows eager and
   ``torch.compile``d, FrEIA's AllInOne and normflows' Glow matched to its parameter count
   (:mod:`stableflows.bench.speed`), timed in interleaved rounds (median ms per step), peak device
   memory of a step above the resident weights, and host syncs of one step counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (the whole step: optimizer included; stableflows'
   loop reads one value per step, the loss's finiteness).
3. ``resflow``: the Residual Flow of ``configs/resflow_cifar10.toml`` (3 levels x 16 blocks, hidden
   512, 4 FC blocks, Russian roulette) at batch ``--resflow-batch``: stableflows eager and compiled
   (each residual block runs eagerly under compile: one graph break per block), normflows' residual
   flow (``nf.flows.Residual`` of a ``LipschitzCNN``, same number of blocks at the first scale's
   size) matched to its parameter count.
4. ``train``: ``stableflows train --config configs/demo.toml --device cuda`` for ``--train-steps``
   steps, checked for a falling validation bits/dim.

The data are random integer images of 256 levels (nothing is downloaded; the speed of a step does
not depend on the pixel values). ``--quick`` shrinks every model, the rounds and the training run,
does not match the peers' widths, and compiles with the ``aot_eager`` backend, so the whole script is
exercised on a CPU in seconds; on a CPU host syncs are counted with ``torch.profiler`` instead of the
CUDA sync debug mode (there AdamW's reads of its host-side step counters are counted too).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

CIFAR = (3, 32, 32)
LEVELS_256 = 256
DATA_N = 2048  # random training images on the device


def _device_info(device: torch.device) -> dict:
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info


def _sync_count(stepper) -> int:
    """Host syncs of one whole training step (model, optimizer, the finiteness read)."""
    if stepper.device.type == "cuda":
        torch.cuda.synchronize(stepper.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stepper.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message).lower() for w in caught)
    from stableflows.bench.syncs import count_syncs

    return count_syncs(stepper.step)


def _memory(stepper, steps: int = 2) -> dict:
    """Peak memory of ``steps`` training steps above what was allocated before them (weights,
    gradients and optimizer states of every resident model), and that baseline."""
    if stepper.device.type != "cuda":
        return {}
    torch.cuda.synchronize(stepper.device)
    base = torch.cuda.memory_allocated(stepper.device)
    torch.cuda.reset_peak_memory_stats(stepper.device)
    for _ in range(steps):
        stepper.step()
    torch.cuda.synchronize(stepper.device)
    peak = torch.cuda.max_memory_allocated(stepper.device)
    return {"step_peak_above_resident_mib": round((peak - base) / 2**20, 1), "resident_mib": round(base / 2**20, 1)}


def _time_models(models: dict, data: torch.Tensor, *, device, batch, rounds, steps, warmup) -> dict:
    from stableflows.bench.speed import Stepper, paired_ms

    steppers, errors = {}, {}
    for name, m in models.items():
        try:
            steppers[name] = Stepper(m, data, LEVELS_256, batch_size=batch, device=device)
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            errors[name] = f"{type(e).__name__}: {e}"
    res = paired_ms(steppers, rounds=rounds, steps=steps, warmup=warmup) if steppers else {"models": []}
    for row in res["models"]:
        s = steppers[row["name"]]
        for key, fn in (("host_syncs_per_step", _sync_count), ("memory", _memory)):
            try:
                row[key] = fn(s)
            except Exception as e:  # noqa: BLE001
                row[key] = f"error: {type(e).__name__}: {e}"
    res["build_errors"] = errors
    return res


def glow_section(a, device) -> dict:
    from stableflows.bench.speed import glow_contenders

    shape = (3, 8, 8) if a.quick else CIFAR
    levels = 2 if a.quick else 3
    models = glow_contenders(shape, levels=levels, steps_per_level=a.glow_steps, hidden=a.hidden,
                             compiled=a.compile_options, match=not a.quick)
    data = torch.randint(0, LEVELS_256, (DATA_N // (8 if a.quick else 1), *shape)).float()
    res = _time_models(models, data, device=device, batch=a.batch, rounds=a.rounds, steps=a.steps, warmup=a.warmup)
    res.update({"shape": list(shape), "levels": levels, "steps_per_level": a.glow_steps, "hidden": a.hidden,
                "batch": a.batch})
    return res


def _resflow_model(shape, a):
    from stableflows.bench.speed import Model
    from stableflows.config import load_config
    from stableflows.models.registry import build_model

    cfg = load_config(ROOT / "configs" / "resflow_cifar10.toml").model
    if a.quick:
        import dataclasses

        cfg = dataclasses.replace(cfg, levels=2, steps_per_level=1, hidden=8, fc_blocks=1)
    flow = build_model(cfg, shape)
    return flow, cfg


def _normflows_resflow(shape, hidden: int, blocks: int):
    """normflows' residual flow on images: ``blocks`` x [Residual(LipschitzCNN 3x3 -> 1x1 -> 3x3, c=0.98),
    ActNorm] on the squeezed image, the shared Logit(0.01) pre-transform."""
    import normflows as nf

    from stableflows.bench.contender import standard_normal_logp
    from stableflows.bench.speed import Model, _Pipeline

    c, h, w = shape
    flows = []
    for _ in range(blocks):
        net = nf.nets.LipschitzCNN([4 * c, hidden, hidden, 4 * c], [3, 1, 3], lipschitz_const=0.98, init_zeros=True)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm((4 * c, 1, 1))]
    flows.append(nf.flows.Squeeze())
    body = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian((4 * c, h // 2, w // 2), trainable=False), flows=flows)
    module = _Pipeline(body)

    def log_prob(v):
        y, ld = module.pre(v)
        for f in reversed(module.body.flows):
            y, d = f.inverse(y)
            ld = ld + d
        return standard_normal_logp(y) + ld

    return Model("normflows-resflow", module, log_prob, hidden, notes=[f"squeeze + {blocks} x [Residual(LipschitzCNN), ActNorm]"])


def resflow_section(a, device) -> dict:
    from stableflows.bench.contender import count_params, match_hidden
    from stableflows.bench.peers import library_available
    from stableflows.bench.speed import Model

    shape = (3, 8, 8) if a.quick else CIFAR
    torch.manual_seed(0)
    flow, cfg = _resflow_model(shape, a)
    models = {"stableflows-resflow": Model("stableflows-resflow", flow, flow.log_prob, cfg.hidden,
                                           notes=[f"configs/resflow_cifar10.toml: {cfg.levels} levels x "
                                                  f"{cfg.steps_per_level} blocks, hidden {cfg.hidden}, "
                                                  f"{cfg.fc_blocks} FC blocks"])}
    if a.compile_options is not None:
        torch.manual_seed(0)
        flow_c, _ = _resflow_model(shape, a)
        models["stableflows-resflow-compiled"] = Model("stableflows-resflow-compiled", flow_c, flow_c.log_prob,
                                                       cfg.hidden, compile_options=a.compile_options,
                                                       notes=["residual blocks eager (one break per block)"])
    notes = []
    if library_available("normflows"):
        blocks = cfg.levels * cfg.steps_per_level
        target = count_params(flow)
        try:
            h = a.hidden if a.quick else match_hidden(lambda w: _normflows_resflow(shape, w, blocks).module, target)
            torch.manual_seed(0)
            models["normflows-resflow"] = _normflows_resflow(shape, h, blocks)
        except Exception as e:  # noqa: BLE001
            notes.append(f"normflows-resflow not built: {type(e).__name__}: {e}")
    data = torch.randint(0, LEVELS_256, (DATA_N // (8 if a.quick else 1), *shape)).float()
    res = _time_models(models, data, device=device, batch=a.resflow_batch, rounds=a.rounds, steps=a.resflow_steps,
                       warmup=a.warmup)
    res.update({"shape": list(shape), "batch": a.resflow_batch, "notes": notes})
    return res


def train_section(a, device, out: Path) -> dict:
    from stableflows.cli import main as cli

    run_dir = out / "train_demo"
    argv = ["train", "--config", str(ROOT / "configs" / "demo.toml"), "--device", str(device),
            "--steps", str(a.train_steps), "--time-budget", str(a.train_budget), "--eval-every", str(a.train_eval_every),
            "--out-dir", str(run_dir), "--no-progress", "--threads", str(torch.get_num_threads())]
    if a.quick:
        argv += ["--hidden", "8", "--levels", "2", "--steps-per-level", "1", "--warmup", "5"]
    t0 = time.perf_counter()
    code = cli(argv)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    val = [(r["step"], r["val_bpd"]) for r in records if r.get("kind") == "eval" and "val_bpd" in r]
    summary = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    falling = len(val) >= 2 and all(math.isfinite(b) for _, b in val) and val[-1][1] < val[0][1]
    return {"argv": argv, "exit_code": code, "wall_s": time.perf_counter() - t0, "val_bpd": val,
            "test_bpd": summary.get("test"), "steps_per_s": summary.get("steps_per_s"), "loss_falls": falling}


def _summary(report: dict) -> str:
    lines = [f"device: {report['device'].get('name', report['device']['device'])} ({report['device']['date_utc']})"]
    for sec in ("glow", "resflow"):
        r = report.get(sec)
        if not isinstance(r, dict) or "models" not in r:
            lines.append(f"{sec}: {r}")
            continue
        lines.append(f"\n{sec} {tuple(r['shape'])}, batch {r['batch']}")
        lines.append("| model | params | ms / step | ratio | host syncs / step | step memory MiB |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for m in r["models"]:
            mem = m.get("memory", {})
            mem = mem.get("step_peak_above_resident_mib", "") if isinstance(mem, dict) else mem
            lines.append(f"| {m['name']} | {m['params']:,} | {m['ms_per_step']:.1f} | {m['ratio_to_reference']:.2f} "
                         f"| {m.get('host_syncs_per_step')} | {mem} |")
        for k, v in r.get("build_errors", {}).items():
            lines.append(f"not built: {k}: {v}")
    t = report.get("train")
    if isinstance(t, dict):
        lines.append(f"\ntrain: exit {t['exit_code']}, val bpd {t['val_bpd']}, loss falls: {t['loss_falls']}")
    elif t is not None:
        lines.append(f"\ntrain: {t}")
    if report["skipped"]:
        lines.append(f"skipped (time limit): {', '.join(report['skipped'])}")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/benchmarks", help="directory of gpu.json")
    p.add_argument("--quick", action="store_true", help="tiny models and rounds (a CPU check of the script)")
    p.add_argument("--time-limit", type=float, default=480.0, help="skip the remaining sections after this many s")
    p.add_argument("--sections", default="glow,train,resflow")
    p.add_argument("--glow-steps", type=int, default=None, help="steps per level of the Glow (default 8)")
    p.add_argument("--hidden", type=int, default=None, help="conditioner width of the Glow (default 512)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resflow-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per model and round (Glow)")
    p.add_argument("--resflow-steps", type=int, default=None, help="timed steps per model and round (Residual Flow)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (compilation)")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --quick: aot_eager)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--train-budget", type=float, default=None, help="seconds of the training run")
    p.add_argument("--train-eval-every", type=int, default=None)
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(glow_steps=1 if q else 8, hidden=8 if q else 512, rounds=2 if q else 5, steps=2 if q else 10,
                    resflow_steps=1 if q else 3, warmup=1 if q else 3, train_steps=20 if q else 600,
                    train_budget=60.0 if q else 90.0, train_eval_every=10 if q else 200)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if q:
        a.batch, a.resflow_batch = min(a.batch, 16), min(a.resflow_batch, 8)
    a.compile_options = None
    if not a.no_compile:
        backend = a.backend or ("aot_eager" if q else None)
        a.compile_options = {k: v for k, v in (("mode", a.mode), ("backend", backend)) if v is not None}
    return a


def main(argv=None) -> int:
    a = parse(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: CUDA is not available here (use --device cpu --quick for a check of the script)", file=sys.stderr)
        return 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"device": _device_info(device), "args": {k: v for k, v in vars(a).items()}, "skipped": []}
    sections = {"glow": lambda: glow_section(a, device), "resflow": lambda: resflow_section(a, device),
                "train": lambda: train_section(a, device, out)}
    for name in a.sections.split(","):
        if time.perf_counter() - t0 > a.time_limit:
            report["skipped"].append(name)
            continue
        s0 = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if isinstance(report[name], dict):
            report[name]["section_s"] = round(time.perf_counter() - s0, 1)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")  # after every section
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(_summary(report))
    print(f"\nwrote {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
