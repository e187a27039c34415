"""Checkpoints: atomic save, rotation, resume, and the stop signal.

A checkpoint is `output_dir/checkpoint-N/`. It is written to a hidden temporary folder, every file is
fsynced, a `COMPLETE` marker (with a manifest of file sizes) goes in last, and only then is the folder
renamed into place. A folder without a marker that matches its files is never resumed from and never
counted. Folders are deleted by first renaming them to a hidden trash name, so a kill during deletion
cannot leave a half-deleted folder that still looks complete. This module is the only place that
writes or deletes checkpoint folders.

    python -m pytest tests/test_checkpoint.py tests/test_reliability.py -q
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger("cpt")

PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
_TMP = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)-\d+$")


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message says which folder and why."""


# ---------------------------------------------------------------------------- finding


def _manifest(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def is_complete(path: str | Path) -> bool:
    """The marker exists and every file it lists is there with its recorded size (a truncated or
    missing file, e.g. from a copy that died half way, makes the folder incomplete)."""
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    if files is None:  # a marker written before manifests existed
        return True
    for name, size in files.items():
        f = Path(path) / name
        try:
            if f.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def step_of(path: str | Path) -> int:
    m = _STEP.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected {PREFIX}<step>)")
    return int(m.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _STEP.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def has_run_artifacts(output_dir: str | Path) -> bool:
    """Does output_dir hold another run's checkpoints (complete or not) or a finished adapter?"""
    d = Path(output_dir)
    if not d.is_dir():
        return False
    return any(_STEP.match(p.name) for p in d.iterdir()) or (d / "adapter_model.safetensors").is_file() or (d / "model.safetensors").is_file()


def _discard(path: Path) -> None:
    """Delete a folder so that no kill can leave it half-deleted under a name that is read."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    path.rename(trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Clean up after a save or a rotation that was killed. Returns what was removed.

    A temporary folder that is complete (killed between its marker and its rename) is moved into
    place if its step has no checkpoint, since it is whole; every other temporary or trash folder,
    and any checkpoint folder whose marker is missing, is deleted."""
    d = Path(output_dir)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir(), key=lambda p: p.name):
        m = _TMP.match(p.name)
        if m and p.is_dir() and is_complete(p) and not (d / f"{PREFIX}{m.group(1)}").exists():
            p.rename(d / f"{PREFIX}{m.group(1)}")
            _fsync_dir(d)
            log.warning("recovered %s%s from a save interrupted after it was complete", PREFIX, m.group(1))
    for p in d.iterdir():
        stale = p.name.startswith((TMP_PREFIX, TRASH_PREFIX))
        if p.is_dir() and (stale or (_STEP.match(p.name) and not (p / COMPLETE).is_file())):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def unwritable_dir(path: str | Path, key: str) -> Optional[str]:
    """Why the output folder `path` (config key `key`) cannot be written, as a message naming the key, the
    path and what to do; None when it can. Catches a file in the way (at the path or above it), a folder
    without write permission, a read-only file system and a full disk. Callers check this before loading
    anything heavy, so that the problem costs seconds, not a model load and a traceback.

    Nothing is created: a missing folder is made when the run writes its first file, so a run that fails
    a later check leaves no empty folder behind. The probe file goes into the nearest folder that exists,
    which is where the missing ones would be made."""
    p = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if p.exists() and not p.is_dir():
        return f"{where} is a file, not a folder: choose another {key}, or move the file away"
    existing = next((q for q in (p, *p.parents) if q.exists() or q.is_symlink()), Path("."))
    if not existing.is_dir():
        return (f"{where}: {existing} is not a folder (a file or a broken link), so none can be made under it; "
                f"choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}: {existing} is not writable by this user; fix its permissions or choose another {key}"
    probe = existing / f".cpt-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = {errno.ENOSPC: "the disk is full: free some space", errno.EDQUOT: "the disk quota is used up: free some space",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied: fix the permissions",
               errno.EPERM: "permission denied: fix the permissions"}.get(e.errno, e.strerror or str(e))
        return f"{where}: cannot write in {existing} ({why}), or choose another {key}"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def clear_checkpoints(output_dir: str | Path) -> None:
    """Remove every checkpoint folder (only for overwrite_output_dir)."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and (_STEP.match(p.name) or p.name.startswith((TMP_PREFIX, TRASH_PREFIX))):
                shutil.rmtree(p)


# ---------------------------------------------------------------------------- saving


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None],
                    save_total_limit: Optional[int] = None, protect: tuple[Path, ...] = ()) -> Path:
    """Write a checkpoint through `write(folder)` atomically, then rotate old ones.

    On any error the partial folder is removed, earlier checkpoints are untouched, and a
    CheckpointError says what happened. Rotation runs only after the new folder is in place."""
    out = Path(output_dir)
    final = out / f"{PREFIX}{step}"
    tmp = out / f"{TMP_PREFIX}{step}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        with open(tmp / COMPLETE, "w") as f:
            json.dump({"step": step, "time": time.time(), "files": _manifest(tmp)}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Same step saved again (e.g. the non-finite stop right after a periodic save). A kill
            # between these two renames leaves the complete temp folder, which remove_partial promotes.
            _discard(final)
        tmp.rename(final)
        _fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):
            # torch.save reports a full disk as RuntimeError, safetensors as its own error: treat any
            # failure here as an I/O failure of this save.
            detail = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"could not write checkpoint {final}: {detail}. The partial folder was removed and "
                                  f"earlier checkpoints are intact; fix the cause (e.g. free disk space) and run the same command to resume.") from e
        raise
    rotate(out, save_total_limit, protect=(final, *protect))
    return final


def rotate(output_dir: str | Path, limit: Optional[int], protect: tuple[Path, ...] = ()) -> list[Path]:
    """Keep the newest `limit` complete checkpoints; never delete a protected one (the one just
    written, the best one) or the newest. Protected ones count toward the limit, so the folder may
    briefly hold limit+1 when the best is old."""
    if not limit:
        return []
    ckpts = list_checkpoints(output_dir)
    keep = {p.resolve() for p in protect}
    if ckpts:
        keep.add(ckpts[-1].resolve())
    removable = [p for p in ckpts if p.resolve() not in keep]
    excess = len(ckpts) - limit
    deleted = []
    for p in removable:
        if excess <= 0:
            break
        _discard(p)
        deleted.append(p)
        excess -= 1
    return deleted


# ---------------------------------------------------------------------------- training state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def torch_rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state(state: dict, torch_state: dict[str, torch.Tensor]) -> None:
    random.setstate(_from_json(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch_state["cpu"])
    if torch.cuda.is_available():
        cuda = [torch_state[k] for k in sorted(k for k in torch_state if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_json(x: Any) -> Any:
    return [_to_json(v) for v in x] if isinstance(x, (tuple, list)) else x


def _from_json(x: Any) -> Any:
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


def load_torch(path: Path) -> Any:
    """Only tensors and plain containers: a pickle that tries to run code is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for anything that is not plain data
        raise CheckpointError(f"refused to load {path}: it holds more than plain tensors and containers, and "
                              f"unpickling it could run code ({str(e)[:200]})") from None
    except OSError:
        raise  # a missing file: the caller names the checkpoint
    except Exception as e:  # a truncated or corrupt archive
        raise CheckpointError(f"could not read {path}: the file is damaged ({type(e).__name__}: {str(e)[:200]})") from None


# ---------------------------------------------------------------------------- the stop signal


class StopSignal:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit 0. A second signal is noted but
    does not interrupt a save; if the grace period runs out the process exits with code 143."""

    def __init__(self, grace_seconds: float = 120.0):
        self.grace_seconds = grace_seconds
        self.requested: Optional[str] = None
        self._old: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.warning("%s received again; still finishing the step and saving (up to %.0fs)", name, self.grace_seconds)
            return
        self.requested = name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", name)
        if self.grace_seconds > 0:
            self._timer = threading.Timer(self.grace_seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        log.error("grace period of %.0fs ran out before the checkpoint was written; exiting", self.grace_seconds)
        os._exit(143)

    def __exit__(self, *exc: Any) -> None:
        if self._timer:
            self._timer.cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)
