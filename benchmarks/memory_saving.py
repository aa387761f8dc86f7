"""Memory and time of one training step of an invertible classifier: stored activations vs
stableflows' memory-saving backward (``MemorySavingCompose``) vs memcnn (when importable), at
several depths.

    OMP_NUM_THREADS=2 python benchmarks/memory_saving.py    # depths 4 and 32: table + runs/benchmarks/memory_saving.json
    python -m benchmarks.memory_saving --depths 4 8 16 32 --json runs/bench/memory_saving.json

Targets of the issue (checked in the table's last lines): with memory saving, the peak memory of a
training step at depth 32 is at most 1.3x that at depth 4, and a memory-saving step takes at most
1.6x the time of a stored-activation step.

memcnn (``pip install --no-deps memcnn && pip install pathlib2 six``; it must not replace torch)
gives two rows:

* ``memcnn``: memcnn's ``InvertibleModuleWrapper(keep_input=False)`` around each of the *same*
  stableflows layers (log-det dropped): memcnn's recomputation machinery on an identical network.
* ``memcnn_coupling``: memcnn's own couplings: the same squeeze, then ``depth / 2`` blocks
  ``InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm, Gm), keep_input=False)`` (or
  ``AffineCoupling(Fm, Gm, adapter=AffineAdapterSigmoid)``, Glow's ``sigmoid(h + 2)`` scale), each
  block being two half-couplings, so the number of couplings and conditioner networks (the same
  ``GlowCNN`` of width ``--hidden``) equals ``depth``; no ActNorm / 1x1 convolution (memcnn has none),
  same linear head.

Every (method, depth) runs in a fresh subprocess. Memory, measured two ways:

* ``peak MB``: growth of the process's peak resident set during one training step (forward,
  backward, AdamW step) after two warm-up steps: the kernel's high-water mark ``VmHWM`` is reset
  through ``/proc/self/clear_refs`` just before the step, and glibc is told to serve every block of
  64 KiB or more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set.
  This includes gradients, optimizer state and the recomputation's transient graph.
* ``saved MB``: bytes autograd keeps for backward during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, each storage once): the
  activations themselves; deterministic.

Time: one more subprocess per depth builds the model once and times the methods on the same layers
(``memcnn_coupling``: its own layers, in the same process), alternating them step by step (so that load from other processes hits all of them alike); median of
``--steps`` steps per method after a warm-up. The model is
``classifier(shape=(3, 32, 32), levels=1, steps_per_level=depth, coupling=...)`` (squeeze, then
``depth`` x [ActNorm, 1x1 conv, coupling]) with a linear head and cross-entropy on random data.
memcnn wraps each of the same layers (log-det dropped) in its ``InvertibleModuleWrapper``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("stored", "stableflows", "memcnn", "memcnn_coupling")
MEMCNN = ("memcnn", "memcnn_coupling")
DEFAULT_JSON = "runs/benchmarks/memory_saving.json"
MMAP_THRESHOLD = 65536  # bytes: larger blocks are mmapped and returned to the OS when freed
TARGET_MEMORY_RATIO = 1.3  # peak(depth max) / peak(depth min) with memory saving
TARGET_TIME_RATIO = 1.6  # memory-saving step / stored-activation step


# ----------------------------------------------------------------------------- worker
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _model(depth: int, args, memory_saving: bool):
    import torch

    from stableflows.models.classifier import classifier

    torch.manual_seed(0)
    model = classifier(shape=(3, 32, 32), n_classes=10, levels=1, steps_per_level=depth, hidden=args.hidden,
                       coupling=args.coupling, scale=args.scale, memory_saving=memory_saving)
    x0 = torch.rand(args.batch, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model.log_prob(x0)  # ActNorm initialisation
    return model


def _memcnn_run(model):
    """``head(chain(x))`` with every layer of ``model.flow`` in memcnn's InvertibleModuleWrapper."""
    import warnings

    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from memcnn import InvertibleModuleWrapper

    class Adapter(nn.Module):  # memcnn wants y = fn(x), x = fn.inverse(y): the log-det is dropped
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, x):  # memcnn detaches outputs in place: no views of the input
            y = self.t(x)[0]
            return y.clone() if y._is_view() else y

        def inverse(self, y):
            x = self.t.inverse(y)[0]
            return x.clone() if x._is_view() else x

    chain = nn.Sequential(*[InvertibleModuleWrapper(Adapter(t), keep_input=False, keep_input_inverse=False)
                            for t in model.flow.layers])
    return lambda x: model.head(chain(x))


def _memcnn_coupling_model(depth: int, args):
    """``head(blocks(squeeze(x)))`` with memcnn's own couplings (see the module docstring)."""
    import warnings

    import torch
    from torch import nn

    from stableflows.transforms.nets import GlowCNN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import memcnn

    if depth % 2:
        raise ValueError(f"memcnn_coupling needs an even depth (two half-couplings per block), got {depth}")
    torch.manual_seed(0)
    c = 12  # (3, 32, 32) squeezed to (12, 16, 16); halves of 6 channels

    def block():
        if args.coupling == "additive":
            inner = memcnn.AdditiveCoupling(Fm=GlowCNN(c // 2, c // 2, hidden=args.hidden),
                                            Gm=GlowCNN(c // 2, c // 2, hidden=args.hidden))
        else:
            inner = memcnn.AffineCoupling(Fm=GlowCNN(c // 2, c, hidden=args.hidden),
                                          Gm=GlowCNN(c // 2, c, hidden=args.hidden),
                                          adapter=memcnn.AffineAdapterSigmoid)
        return memcnn.InvertibleModuleWrapper(inner, keep_input=False, keep_input_inverse=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[block() for _ in range(depth // 2)])
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 16 * 16, 10))

        def forward(self, x):
            return self.head(self.blocks(nn.functional.pixel_unshuffle(x, 2)))

    model = Net()
    model.train()
    return model, lambda x: model(x)


def _build(method: str, depth: int, args):
    if method == "memcnn_coupling":
        return _memcnn_coupling_model(depth, args)
    model = _model(depth, args, memory_saving=(method == "stableflows"))
    if method != "memcnn":
        return model, lambda x: model(x)
    return model, _memcnn_run(model)


def _saved_bytes(run, x) -> int:
    import torch

    seen, total = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(x)
    out.sum().backward()
    return total[0]


def _stepper(model, run, args):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(args.batch, 3, 32, 32, generator=g)
    ys = torch.randint(0, 10, (args.batch,), generator=g)

    def step(fn=run):
        x = xs.clone()  # memcnn frees the storage of its input
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fn(x), ys)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, opt, xs


def worker(method: str, depth: int, args) -> dict:
    """Peak-RSS growth of one training step and saved-tensor bytes, in a fresh process."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    model, run = _build(method, depth, args)
    step, opt, xs = _stepper(model, run, args)
    for _ in range(2):
        step()
    gc.collect()
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    step()
    peak_kb = _status_kb("VmHWM")
    opt.zero_grad(set_to_none=True)
    saved = _saved_bytes(run, xs.clone())
    n_params = sum(p.numel() for p in model.parameters())
    return {"method": method, "depth": depth, "peak_mb": (peak_kb - base_kb) / 1024, "rss_mb": peak_kb / 1024,
            "saved_mb": saved / 2 ** 20, "params_mb": 4 * n_params / 2 ** 20, "threads": torch.get_num_threads()}


def time_worker(depth: int, methods: list[str], args) -> dict:
    """Median step time of each method on the same model, methods alternating step by step."""
    import torch

    from stableflows.memory import set_memory_saving

    torch.set_num_threads(args.threads)
    model = _model(depth, args, memory_saving=True)
    runs = {"stored": lambda x: model(x), "stableflows": lambda x: model(x)}
    if "memcnn" in methods:
        runs["memcnn"] = _memcnn_run(model)
    step, _, _ = _stepper(model, None, args)
    steps = {m: step for m in methods}
    if "memcnn_coupling" in methods:  # its own network and optimizer, timed in the same rounds
        other, runs["memcnn_coupling"] = _memcnn_coupling_model(depth, args)
        steps["memcnn_coupling"] = _stepper(other, None, args)[0]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.steps + 1):  # round 0 is the warm-up
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            set_memory_saving(model, m == "stableflows")
            t0 = time.perf_counter()
            steps[m](runs[m])
            if r > 0:
                times[m].append(time.perf_counter() - t0)
    return {m: 1000 * statistics.median(v) for m, v in times.items()}


# ----------------------------------------------------------------------------- driver
def _memcnn_available() -> bool:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import memcnn  # noqa: F401
        return True
    except Exception:
        return False


def _memcnn_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("memcnn")
    except Exception:
        return None


def _spawn(method: str, depth: int, args, methods: list[str] | None = None) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "benchmarks.memory_saving", "--worker", method, "--depth", str(depth),
           "--batch", str(args.batch), "--hidden", str(args.hidden), "--coupling", args.coupling,
           "--scale", args.scale, "--steps", str(args.steps), "--threads", str(args.threads)]
    if methods:
        cmd += ["--methods", *methods]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"worker {method} depth {depth} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    available = _memcnn_available()
    methods = [m for m in args.methods if m not in MEMCNN or available]
    if not available and any(m in MEMCNN for m in args.methods):
        print("memcnn is not importable: its rows are skipped "
              "(pip install --no-deps memcnn && pip install pathlib2 six)")
    rows = []
    for depth in args.depths:
        times = _spawn("time", depth, args, methods)
        for m in methods:
            rows.append({**_spawn(m, depth, args), "step_ms": times[m]})
            r = rows[-1]
            print(f"  done {m:11s} depth {depth:3d}: peak {r['peak_mb']:8.1f} MB, {r['step_ms']:8.1f} ms", flush=True)
    return rows


def report(rows: list[dict], args) -> str:
    by = {(r["method"], r["depth"]): r for r in rows}
    lo, hi = min(args.depths), max(args.depths)
    lines = [f"batch {args.batch}, (3, 32, 32), {args.coupling} coupling, hidden {args.hidden}, "
             f"{rows[0]['threads']} threads; peak = growth of peak RSS during one training step "
             f"(fresh process per row); load average {args.load[0]:.2f} {args.load[1]:.2f} {args.load[2]:.2f} "
             f"on {os.cpu_count()} CPUs at the start",
             f"{'method':15s} {'depth':>5s} {'peak MB':>9s} {'saved MB':>9s} {'params MB':>9s} {'step ms':>9s} "
             f"{'time / stored':>13s}"]
    for r in rows:
        st = by.get(("stored", r["depth"]))
        ratio = r["step_ms"] / st["step_ms"] if st else float("nan")
        lines.append(f"{r['method']:15s} {r['depth']:5d} {r['peak_mb']:9.1f} {r['saved_mb']:9.1f} "
                     f"{r['params_mb']:9.1f} {r['step_ms']:9.1f} {ratio:13.2f}")
    for m in METHODS:
        if (m, lo) in by and (m, hi) in by:
            mem = by[m, hi]["peak_mb"] / by[m, lo]["peak_mb"]
            target = f" (target <= {TARGET_MEMORY_RATIO})" if m == "stableflows" else ""
            lines.append(f"{m}: peak memory depth {hi} / depth {lo} = {mem:.2f}{target}")
    for m in ("stableflows",) + MEMCNN:
        if (m, hi) in by and ("stored", hi) in by:
            t = by[m, hi]["step_ms"] / by["stored", hi]["step_ms"]
            target = f" (target <= {TARGET_TIME_RATIO})" if m == "stableflows" else ""
            lines.append(f"{m}: step time / stored-activation step time at depth {hi} = {t:.2f}{target}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 32])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--coupling", default="additive", choices=("additive", "affine"))
    p.add_argument("--scale", default="sigmoid")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--json", default=DEFAULT_JSON, help=f"write the rows to this file (default: {DEFAULT_JSON}; "
                                                        "'none' to skip)")
    p.add_argument("--worker", default=None, choices=METHODS + ("time",), help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "time":
        print(json.dumps(time_worker(args.depth, args.methods, args)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.depth, args)))
        return
    args.load = os.getloadavg()
    rows = run(args)
    text = report(rows, args)
    print(text)
    if args.json and args.json.lower() != "none":
        import torch

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_after": os.getloadavg(),
                "memcnn": _memcnn_version(), "targets": {"memory_ratio": TARGET_MEMORY_RATIO,
                                                         "time_ratio": TARGET_TIME_RATIO}}
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), **meta, "report": text}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
