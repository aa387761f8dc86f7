"""Checkpoints: atomic writes (a crash mid-write keeps the previous file), no code execution on
load, named errors for missing / corrupt / foreign files."""
from __future__ import annotations

import os
import pathlib
import pickle

import pytest
import torch

from stableflows.config import RunConfig
from stableflows.train import checkpoint as ck
from stableflows.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint


def state(v: float) -> dict:
    cfg = RunConfig().replace("train", lr=v)
    return {"model": {"w": torch.full((3, 2), v), "n": torch.tensor([1, 2])}, "step": 7, "val": v,
            "history": [{"kind": "eval", "val_bpd": v, "x": None}], "rng": torch.get_rng_state(),
            "config": cfg.to_dict(), "pair": (1, "a")}


def test_round_trip(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", state(0.5))
    s = load_checkpoint(p)
    assert s["format"] == ck.FORMAT and s["step"] == 7 and s["val"] == 0.5
    assert torch.equal(s["model"]["w"], torch.full((3, 2), 0.5)) and s["model"]["n"].dtype == torch.int64
    assert torch.equal(s["rng"], torch.get_rng_state()) and s["history"][0]["x"] is None
    assert RunConfig.from_dict(s["config"]) == RunConfig().replace("train", lr=0.5)


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "last.pt"
    save_checkpoint(path, state(1.0))

    def boom(*a, **k):
        raise OSError("simulated crash")

    if where == "replace":
        monkeypatch.setattr(ck.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(ck.os, "fsync", boom)
    else:  # the process dies half-way through writing the bytes
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise OSError("simulated crash")

        monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, state(2.0))
    monkeypatch.undo()
    assert load_checkpoint(path)["val"] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_checkpoint(tmp_path / "nope.pt")
    assert e.value.path == tmp_path / "nope.pt" and str(tmp_path / "nope.pt") in str(e.value)
    good = save_checkpoint(tmp_path / "good.pt", state(1.0)).read_bytes()
    for name, data in [("garbage.pt", b"not a checkpoint at all"), ("truncated.pt", good[: len(good) // 2]),
                       ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="corrupt") as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_foreign_files_are_not_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    for name in ("plain.pt", "list.pt"):
        with pytest.raises(CheckpointError, match="not a stableflows checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_loading_executes_no_code(tmp_path):
    marker = tmp_path / "pwned"
    # a torch zip archive whose pickle carries a __reduce__ payload, with the right marker keys
    torch.save({"format": ck.FORMAT, "format_version": 1, "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused") as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert "evil.pt" in str(e.value)
    # a bare pickle file (legacy format) with the same payload
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"format": ck.FORMAT, "x": Payload(marker)}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # sanity: the payload does fire when unpickled freely
    assert marker.exists()


def test_only_plain_objects_are_saved(tmp_path):
    for bad in ({"m": torch.nn.Linear(2, 2)}, {"p": pathlib.Path("x")}, {"f": lambda: 0}, {(1, 2): 3}):
        with pytest.raises(CheckpointError):
            save_checkpoint(tmp_path / "x.pt", bad)
    assert not (tmp_path / "x.pt").exists()


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="none of"):
        resolve_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "last.pt", state(1.0))
    assert resolve_checkpoint(tmp_path) == tmp_path / "last.pt"
    save_checkpoint(tmp_path / "best.pt", state(1.0))
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert resolve_checkpoint(tmp_path / "last.pt") == tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "missing")


# ----------------------------------------------------------------------------- integrity
def _flip_exponent_bit(path: pathlib.Path, value: float) -> None:
    """Set the top exponent bit of the first float32 equal to ``value`` in the file (0.5 -> 1.7e38)."""
    import struct

    data = bytearray(path.read_bytes())
    at = bytes(data).find(struct.pack("<f", value))
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def _flip_in_member(path: pathlib.Path, value: float) -> None:
    """The same flip, done inside the archive's member and written as a new archive, so every CRC
    matches the damaged bytes (a damage the zip layer cannot see)."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i.filename)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for info, data in members:
            at = data.find(struct.pack("<f", value)) if "/data/" in info.filename else -1
            if at >= 0:
                data = data[:at + 3] + bytes([data[at + 3] ^ 0x40]) + data[at + 4:]
            z.writestr(info, data)
    path.write_bytes(buf.getvalue())


def test_a_flipped_bit_is_refused_naming_the_file_and_the_tensor(tmp_path):
    p = save_checkpoint(tmp_path / "last.pt", state(0.5))
    good = p.read_bytes()
    _flip_exponent_bit(p, 0.5)
    with pytest.raises(CheckpointError, match="CRC-32") as e:  # the zip CRC, which torch.load ignores
        load_checkpoint(p)
    assert str(p) in str(e.value)
    assert float(torch.load(p, weights_only=True)["model"]["w"].flatten()[0]) > 1e38  # what torch alone gives
    p.write_bytes(good)
    _flip_in_member(p, 0.5)  # CRCs consistent: the digest still catches it, and names the tensor
    with pytest.raises(CheckpointError, match=r"tensor model\.w does not match the stored checksum"):
        load_checkpoint(p)


def test_digests_follow_a_written_out_definition(tmp_path):
    """The stored digest of a tensor is SHA-256 of its dtype, shape and little-endian bytes."""
    import hashlib

    p = save_checkpoint(tmp_path / "a.pt", state(0.25))
    s = torch.load(p, weights_only=True)
    w = torch.full((3, 2), 0.25)
    ref = hashlib.sha256(b"torch.float32(3, 2)" + w.numpy().astype("<f4").tobytes()).hexdigest()
    assert s["checksum"]["tensors"]["model.w"] == ref
    # an edit of a plain entry (re-saved by torch, CRCs fine) is caught by the state digest
    s["step"] = 8
    torch.save(s, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        load_checkpoint(tmp_path / "edited.pt")


def test_checkpoints_without_checksums_load_with_a_note(tmp_path):
    torch.save({**state(1.0), "format": ck.FORMAT, "format_version": 1}, tmp_path / "v1.pt")
    with pytest.warns(ck.UnverifiedCheckpointWarning, match="no checksums"):
        s = load_checkpoint(tmp_path / "v1.pt")
    assert s["step"] == 7
    torch.save({**state(1.0), "format": ck.FORMAT, "format_version": 2}, tmp_path / "stripped.pt")
    with pytest.raises(CheckpointError, match="checksum entry is missing"):
        load_checkpoint(tmp_path / "stripped.pt")


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "a.pt", state(1.0))
        ck.atomic_write_text(tmp_path / "m.json", "{}")
        reference = tmp_path / "plain"
        reference.write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    for name in ("a.pt", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640 == reference.stat().st_mode & 0o777
