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
    fresh = tmp_path / "fresh"  # hidden files (a desktop's .DS_Store) do not make a folder non-empty
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"\0")
    assert main(["train", *TINY, "--steps", "3", "--eval-every", "3", "--out-dir", str(fresh)]) == 0
    assert (fresh / ".DS_Store").read_bytes() == b"\0"


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


# ----------------------------------------------------------------------------- kills during / between writes
KILL_ON_REPLACE = """
import os, signal
from pathlib import Path
real, seen = os.replace, {{}}
def replace(src, dst, *a, **k):
    name = Path(dst).name
    seen[name] = seen.get(name, 0) + 1
    if name == {name!r} and seen[name] == {nth} and {before}:
        os.kill(os.getpid(), signal.SIGKILL)  # full-size temporary file written, never renamed
    real(src, dst, *a, **k)
    if name == {name!r} and seen[name] == {nth} and not {before}:
        os.kill(os.getpid(), signal.SIGKILL)  # renamed; the next write never comes
os.replace = replace
"""


@pytest.mark.parametrize("name, before", [("last.pt", True), ("best.pt", False)],
                         ids=["during-last.pt-write", "between-best.pt-and-last.pt"])
def test_sigkill_during_and_between_checkpoint_writes_then_resume_bit_exact(reference, tmp_path, capsys, name,
                                                                             before):
    d = tmp_path / "run"
    p = child(["train", *TINY, "--steps", str(STEPS), "--out-dir", str(d)],
              prelude=KILL_ON_REPLACE.format(name=name, nth=2, before=before))
    rc, _, err = finish(p)
    assert rc == -signal.SIGKILL, err
    assert load_checkpoint(d / "last.pt")["step"] == 10  # the first checkpoint survived
    assert (d / ".lock").is_file()  # the dead process's lock file: the resume below takes it
    tmp = [f.name for f in d.iterdir() if f.name.endswith(".tmp")]
    assert bool(tmp) == before
    assert main(["train", "--resume", "--out-dir", str(d), "--steps", str(STEPS), "--no-progress"]) == 0
    if before:
        assert "removed .last.pt." in capsys.readouterr().err
    assert not [f for f in d.iterdir() if f.name.endswith(".tmp")]
    same_state(reference / "last.pt", d / "last.pt")
    a, b = load_checkpoint(reference / "best.pt"), load_checkpoint(d / "best.pt")
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigkill_before_the_first_checkpoint_says_how_to_start_again(tmp_path, capsys):
    d = tmp_path / "run"
    p = child(["train", *TINY, "--steps", "100000", "--eval-every", "100000", "--out-dir", str(d)], prelude=SLOW)
    wait_for(d / "config.yaml", p)
    p.send_signal(signal.SIGKILL)
    finish(p)
    assert main(["train", "--resume", "--out-dir", str(d)]) == USAGE
    err = capsys.readouterr().err.strip()
    assert "has no checkpoint yet" in err and f"--config {d / 'config.yaml'} --out-dir {d} --overwrite" in err
    assert len(err.splitlines()) == 1
    assert main(["train", "--config", str(d / "config.yaml"), "--out-dir", str(d), "--overwrite", "--steps", "10",
                 "--eval-every", "10"]) == 0


# ----------------------------------------------------------------------------- damaged checkpoints
def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ": note: " not in ln]
    assert len(lines) == 1, err
    return lines[0]


def flip_weight(path: Path) -> None:
    """Flip an exponent bit of the first weight of magnitude in [0.25, 2) (it grows by ~2**128)."""
    s = load_checkpoint(path)
    name, t = next((k, v) for k, v in s["model"].items() if v.is_floating_point() and v.numel()
                   and 0.25 <= float(v.flatten()[0].abs()) < 2)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(t.flatten()[:4].numpy().tobytes())
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_is_refused_everywhere_and_resume_overwrites_nothing(reference, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    flip_weight(d / "best.pt")
    flip_weight(d / "last.pt")
    before = snapshot(d)
    for argv in (["eval", str(d)], ["sample", str(d), "--out", str(tmp_path / "s.png")],
                 ["train", "--resume", "--out-dir", str(d), "--steps", "40", "--no-progress"],
                 ["audit", str(d)]):
        assert main(argv) == USAGE, argv
        line = one_line(capsys.readouterr().err)
        assert "damaged checkpoint" in line and str(d) in line, line
    assert snapshot(d) == before and not (tmp_path / "s.png").exists()


def _resave(src: Path, dst: Path, edit) -> None:
    s = load_checkpoint(src)
    edit(s)
    save_checkpoint(dst, s)  # valid checksums: only the structure is wrong


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("optimizer"), "'optimizer'"),
    (lambda s: s.__setitem__("step", "ten"), "does not fit this run"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "weights do not fit"),
    (lambda s: s["config"]["model"].__setitem__("model", "realnvp"), "weights do not fit"),
    (lambda s: s["sampler"].__setitem__("perm", torch.arange(3)), "batch order"),
    (lambda s: s.__setitem__("model", [1, 2]), "'model' is a list"),
])
def test_structural_edits_of_a_checkpoint_give_one_line(reference, tmp_path, capsys, edit, message):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    _resave(reference / "last.pt", d / "last.pt", edit)
    assert main(["train", "--resume", "--out-dir", str(d), "--steps", "40", "--no-progress"]) == USAGE
    line = one_line(capsys.readouterr().err)
    assert message in line and "last.pt" in line, line


# ----------------------------------------------------------------------------- unusable out-dirs
def test_out_dir_that_is_a_file_or_below_one(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out, message in ((f, "is not a directory"), (f / "run", "lies below a file")):
        assert main(["train", *TINY, "--steps", "5", "--out-dir", str(out)]) == USAGE
        assert message in one_line(capsys.readouterr().err)
    assert f.read_text() == "x"


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/mnt (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full / read-only disk cases needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_out_dir(tmpfs, capsys):
    (tmpfs / "old").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for out in (tmpfs / "new", tmpfs / "old"):
        assert main(["train", *TINY, "--steps", "5", "--out-dir", str(out)]) == USAGE
        line = one_line(capsys.readouterr().err)
        assert "Read-only file system" in line and str(out) in line


FILL_AFTER_FIRST_CHECKPOINT = """
import os
from pathlib import Path
from stableflows.train import checkpoint as ck
real, done = ck.save_checkpoint, []
def save(path, state):
    out = real(path, state)
    if Path(path).name == "last.pt" and not done:  # then fill the disk
        done.append(1)
        with open(Path(path).parent.parent / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 16)); f.flush()
            except OSError:
                pass
    return out
ck.save_checkpoint = save
from stableflows.train import loop
loop.save_checkpoint = save
"""


def test_full_disk(tmpfs, capsys):
    # full before the start: the probe says so, nothing is trained
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    assert main(["train", *TINY, "--steps", "5", "--out-dir", str(tmpfs / "a")]) == USAGE
    assert "No space left on device" in one_line(capsys.readouterr().err)
    filler.unlink()
    # full after the first checkpoint: one line, exit 3, the previous checkpoint kept and loadable
    d = tmpfs / "run"
    rc, out, err = finish(child(["train", *TINY, "--steps", "30", "--out-dir", str(d)],
                                prelude=FILL_AFTER_FIRST_CHECKPOINT))
    assert rc == COULD_NOT_RUN, err
    line = one_line(err)
    assert "No space left on device" in line and "(step 10) is kept" in line and "--resume" in line
    assert load_checkpoint(d / "last.pt")["step"] == 10
    assert not [f for f in d.iterdir() if f.name.endswith(".tmp")]
    (tmpfs / "filler").unlink()
    assert main(["train", "--resume", "--out-dir", str(d), "--no-progress"]) == 0


# ----------------------------------------------------------------------------- bounded fuzz
N_MUTATIONS = 150  # per format; the three together take seconds


def mutations(blob: bytes, n: int, seed: int):
    """Random byte flips, overwrites, truncations, insertions and repeated chunks of ``blob``."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(blob)
        kind = rng.randrange(5)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            i = rng.randrange(len(b))
            b[i:i + 8] = bytes(rng.randrange(256) for _ in range(8))
        elif kind == 2:
            del b[rng.randrange(len(b)):]
        elif kind == 3:
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 64)] * rng.randint(1, 4)
        yield bytes(b)


def only_own_errors(load, path: Path, blobs) -> tuple[int, int]:
    """Every mutated file either loads or raises the library's own error (which names the file)."""
    from stableflows.transforms.base import StableflowsError

    ok = refused = 0
    for blob in blobs:
        path.write_bytes(blob)
        try:
            load(path)
            ok += 1
        except StableflowsError as e:
            assert path.name in str(e), e
            refused += 1
    return ok, refused


def test_fuzz_idx_cifar_and_checkpoint_loading(reference, tmp_path):
    import gzip
    import pickle
    import struct

    import numpy as np

    from stableflows.data import read_idx
    from stableflows.data.files import _cifar_batch
    from stableflows.train.evaluate import load_flow

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    idx = struct.pack(">BBBB3I", 0, 0, 0x08, 3, *img.shape) + img.tobytes()
    counts = {"idx": only_own_errors(read_idx, tmp_path / "x-idx3-ubyte", mutations(idx, N_MUTATIONS, 1))}
    counts["idx.gz"] = only_own_errors(read_idx, tmp_path / "x-idx3-ubyte.gz",
                                       mutations(gzip.compress(idx), N_MUTATIONS, 2))
    batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}
    counts["cifar"] = only_own_errors(_cifar_batch, tmp_path / "data_batch_1",
                                      mutations(pickle.dumps(batch, protocol=2), N_MUTATIONS, 3))
    counts["checkpoint"] = only_own_errors(load_flow, tmp_path / "best.pt",
                                           mutations((reference / "best.pt").read_bytes(), N_MUTATIONS, 4))
    for name, (ok, refused) in counts.items():
        assert ok + refused == N_MUTATIONS and refused > N_MUTATIONS // 3, (name, ok, refused)


def test_fuzz_structural_edits_of_checkpoints(reference, tmp_path):
    """Random entries of a saved dict deleted or replaced by values of other types, re-saved with
    valid checksums: load_flow and --resume either work or raise the library's own error."""
    import random

    from stableflows.train.evaluate import load_flow
    from stableflows.transforms.base import StableflowsError

    rng = random.Random(5)
    base = load_checkpoint(reference / "last.pt")
    fillers = [None, 0, -1, 2.5, "x", [], {}, [1, 2], {"a": 1}, torch.zeros(3), True]

    def paths(obj, prefix=()):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield prefix + (k,)
                yield from paths(v, prefix + (k,))

    all_paths = [p for p in paths(base) if p[0] not in ("checksum", "format", "format_version")]
    for i in range(60):
        s = load_checkpoint(reference / "last.pt")
        where = rng.choice(all_paths)
        parent = s
        for k in where[:-1]:
            parent = parent[k]
        if rng.random() < 0.4:
            del parent[where[-1]]
        else:
            parent[where[-1]] = rng.choice(fillers)
        d = tmp_path / f"r{i}"
        d.mkdir()
        save_checkpoint(d / "last.pt", s)
        try:
            load_flow(d / "last.pt")
        except StableflowsError as e:
            assert "last.pt" in str(e), (where, e)
        if i % 15 == 0:  # the resume path as well (a command-line run each: a few of them)
            shutil.copy(reference / "best.pt", d / "best.pt")
            rc = main(["train", "--resume", "--out-dir", str(d), "--steps", "31", "--no-progress"])
            assert rc in (0, USAGE), (where, rc)
