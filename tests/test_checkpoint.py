"""The checkpoint module on its own: atomic save, hard kill mid-save, rotation, failed saves, the
stop signal's grace timer, and refusing pickles that run code. No model needed; seconds in all.

    python -m pytest tests/test_checkpoint.py -q
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cpt import checkpoint as ckpt


def _writer(payload: bytes = b"x" * 1000, n_files: int = 3):
    def write(folder: Path) -> None:
        for i in range(n_files):
            (folder / f"part{i}.bin").write_bytes(payload)
        torch.save({"w": torch.arange(4)}, folder / "state.pt")
    return write


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------- atomic save


def test_save_is_complete_only_after_marker_and_leaves_no_temp(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _writer())
    assert path == tmp_path / "checkpoint-5" and ckpt.is_complete(path)
    assert _names(tmp_path) == ["checkpoint-5"]
    marker = json.loads((path / ckpt.COMPLETE).read_text())
    assert marker["step"] == 5 and marker["files"]["part0.bin"] == 1000
    # A folder named like a checkpoint but without the marker is neither listed nor resumed from.
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "state.pt").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.remove_partial(tmp_path) == [tmp_path / "checkpoint-9"]


def test_truncated_file_makes_checkpoint_incomplete(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _writer())
    newer = ckpt.save_checkpoint(tmp_path, 2, _writer())
    with open(newer / "part1.bin", "r+b") as f:
        f.truncate(10)
    assert not ckpt.is_complete(newer)
    assert ckpt.latest_checkpoint(tmp_path) == path


def test_failing_writer_removes_partial_and_keeps_previous(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, 1, _writer())
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def dies_half_way(folder: Path) -> None:
        _writer()(folder)
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2.*Input/output error.*errno 5.*intact"):
        ckpt.save_checkpoint(tmp_path, 2, dies_half_way, save_total_limit=1)
    assert _names(tmp_path) == ["checkpoint-1"]  # no partial folder, and rotation never ran
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_disk_full_leaves_previous_intact(tmp_path, monkeypatch, where):
    """ENOSPC from torch.save (which reports it as RuntimeError) or from fsync: a clear error, the
    partial folder gone, the previous checkpoint byte-for-byte the same."""
    good = ckpt.save_checkpoint(tmp_path, 10, _writer())
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    if where == "torch.save":
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")
        monkeypatch.setattr(torch, "save", full)
        match = "file write failed"
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(ckpt.os, "fsync", full)
        match = "No space left on device"
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.save_checkpoint(tmp_path, 20, _writer(), save_total_limit=1)
    monkeypatch.undo()
    assert _names(tmp_path) == ["checkpoint-10"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_same_step_saved_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, _writer(b"a" * 10))
    ckpt.save_checkpoint(tmp_path, 3, _writer(b"b" * 10))
    assert _names(tmp_path) == ["checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "part0.bin").read_bytes() == b"b" * 10


def test_complete_temp_folder_is_recovered(tmp_path):
    """Killed between the marker and the rename (or between discarding the old folder of the same step
    and the rename): the temp folder is whole, so recovery moves it into place."""
    ckpt.save_checkpoint(tmp_path, 4, _writer(b"new"))
    (tmp_path / "checkpoint-4").rename(tmp_path / f"{ckpt.TMP_PREFIX}4-12345")
    (tmp_path / f"{ckpt.TRASH_PREFIX}checkpoint-4-12345-1").mkdir()
    incomplete = tmp_path / f"{ckpt.TMP_PREFIX}5-12345"
    incomplete.mkdir()
    (incomplete / "part0.bin").write_bytes(b"half")
    removed = ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in removed) == sorted([incomplete.name, f"{ckpt.TRASH_PREFIX}checkpoint-4-12345-1"])
    assert _names(tmp_path) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "part0.bin").read_bytes() == b"new"


# ---------------------------------------------------------------------------- hard kill mid-save

_KILLED_SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cpt import checkpoint as ckpt
    out, stage = Path(sys.argv[1]), sys.argv[2]
    def write(folder):
        (folder / "a.bin").write_bytes(b"2" * 5000)
        if stage == "write":
            (out / "READY").write_text("")
            time.sleep(60)
        (folder / "b.bin").write_bytes(b"2" * 5000)
    if stage == "rename":
        real = Path.rename
        def slow_rename(self, target):
            if Path(target).name == "checkpoint-2":
                (out / "READY").write_text("")
                time.sleep(60)
            return real(self, target)
        Path.rename = slow_rename
    if stage == "rotate":
        real_rmtree = ckpt.shutil.rmtree
        def slow_rmtree(path, *a, **k):
            (out / "READY").write_text("")
            time.sleep(60)
        ckpt.shutil.rmtree = slow_rmtree
    ckpt.save_checkpoint(out, 2, write, save_total_limit=1)
""")


@pytest.mark.parametrize("stage", ["write", "rename", "rotate"])
def test_sigkill_during_save(tmp_path, stage):
    """SIGKILL a process while it writes checkpoint-2 (or right before its rename, or while rotation
    deletes checkpoint-1): what remains always resumes from a complete checkpoint."""
    first = ckpt.save_checkpoint(tmp_path, 1, lambda f: (f / "a.bin").write_bytes(b"1" * 5000))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(tmp_path), stage])
    deadline = time.time() + 60
    while not (tmp_path / "READY").exists():
        assert proc.poll() is None and time.time() < deadline, "the saver never reached the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "READY").unlink()
    latest = ckpt.latest_checkpoint(tmp_path)
    ckpt.remove_partial(tmp_path)
    if stage == "write":
        assert latest == first and _names(tmp_path) == ["checkpoint-1"]
        assert (first / "a.bin").read_bytes() == b"1" * 5000
    elif stage == "rename":
        # The temp folder was complete: recovery promotes it, checkpoint-1 is untouched.
        assert latest == first and _names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
        assert (tmp_path / "checkpoint-2" / "b.bin").read_bytes() == b"2" * 5000
    else:
        # checkpoint-1 was moved to the trash before deletion: never half-deleted under its own name.
        assert latest == tmp_path / "checkpoint-2" and _names(tmp_path) == ["checkpoint-2"]
    assert ckpt.is_complete(ckpt.latest_checkpoint(tmp_path))


# ---------------------------------------------------------------------------- rotation


def test_rotation_keeps_newest_and_protected(tmp_path):
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, _writer(), save_total_limit=2)
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    best = tmp_path / "checkpoint-2"
    for s in (4, 5, 6):
        ckpt.save_checkpoint(tmp_path, s, _writer(), save_total_limit=2, protect=(best,))
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-6"]
    # limit 1 with an old best: the best and the newest both survive
    ckpt.save_checkpoint(tmp_path, 7, _writer(), save_total_limit=1, protect=(best,))
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-7"]
    # the newest survives even when nothing protects it explicitly
    assert ckpt.rotate(tmp_path, 1) == [tmp_path / "checkpoint-2"]
    assert _names(tmp_path) == ["checkpoint-7"]


def test_rotation_ignores_incomplete_and_counts_only_complete(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _writer())
    (tmp_path / "checkpoint-8").mkdir()  # no marker: not a checkpoint, so it cannot be "the newest"
    ckpt.save_checkpoint(tmp_path, 2, _writer(), save_total_limit=1)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-1").exists()


# ---------------------------------------------------------------------------- stop signal


def test_stop_signal_second_signal_does_not_interrupt_and_grace_expires(monkeypatch):
    exits = []
    monkeypatch.setattr(ckpt.os, "_exit", lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with ckpt.StopSignal(grace_seconds=0.3) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without the handler
        time.sleep(0.6)
    assert stop.requested == "SIGTERM" and exits == [143]
    # a stop that finishes in time never hits the timer, and the old handlers come back
    with ckpt.StopSignal(grace_seconds=0.3):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    time.sleep(0.4)
    assert exits == [143]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---------------------------------------------------------------------------- safe loading


class _Planted:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Planted(str(target))}, bad)
    # The payload is real: unrestricted unpickling writes the file.
    torch.load(bad, weights_only=False)
    assert target.read_text() == "pwned"
    target.unlink()
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.load_torch(bad)
    assert not target.exists()
    # plain tensor files still load
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(ckpt.load_torch(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_damaged_tensor_file_is_a_clear_error(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "opt.pt")
    data = (tmp_path / "opt.pt").read_bytes()
    (tmp_path / "opt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="opt.pt: the file is damaged"):
        ckpt.load_torch(tmp_path / "opt.pt")
    with pytest.raises(FileNotFoundError):
        ckpt.load_torch(tmp_path / "missing.pt")
