"""Token cache: a source tokenized once into memory-mapped shards, reused across runs and resumes.

Layout of one entry, `<root>/<key>/`:
    meta.json           what was cached (key material, counts, skipped rows, shard list); written last
    tokens-00000.bin    raw uint16/uint32 token ids, documents back to back (EOS included)
    offsets.npy         int64 [n_docs + 1]: where each document starts in the concatenated shards

`key` hashes the source's fingerprint (file names, sizes, mtimes; or the dataset fingerprint), the
tokenizer's, and every setting that changes the tokens (text field, filters, max_docs, add_eos),
so a changed source or tokenizer builds a new entry. `data.strict` changes what is accepted, not the
tokens: an entry records the rows its build skipped, and a strict run refuses an entry that skipped
any, failing at the first bad row as it would have with no cache. An entry is built in a temporary
folder and renamed into place, so a crash never leaves a half-written entry that a later run would
trust; a lock file keeps several ranks of one host from building the same entry twice.

    python -c "from cpt.data.cache import cache_root; print(cache_root(None))"
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from array import array
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cpt.data.sources import DataError, Doc, ReadReport
from cpt.data.tokenize import Encoder

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB in uint16, few enough files for a billion tokens


def cache_root(cache_dir: str | None) -> Path:
    """data.cache_dir, else $CPT_CACHE, else ~/.cache/cpt/tokens."""
    return Path(cache_dir or os.environ.get("CPT_CACHE") or Path.home() / ".cache" / "cpt" / "tokens").expanduser()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TokenShards:
    """Read-only view of one cache entry: documents' tokens by global position, memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self._maps = [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r") if s["n_tokens"] else
                      np.zeros(0, self.dtype) for s in self.meta["shards"]]
        self._starts = np.cumsum([0] + [s["n_tokens"] for s in self.meta["shards"]])
        self.n_docs = int(self.meta["n_docs"])
        self.n_tokens = int(self.meta["n_tokens"])

    def get(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the concatenation of every document (a copy, safe to modify)."""
        if start >= end:
            return np.zeros(0, self.dtype)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < end:
            lo = start - self._starts[i]
            hi = min(end, self._starts[i + 1]) - self._starts[i]
            pieces.append(self._maps[i][lo:hi])
            start = self._starts[i] + hi
            i += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def doc(self, i: int) -> np.ndarray:
        return self.get(int(self.offsets[i]), int(self.offsets[i + 1]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_or_build(root: Path, key_parts: dict, docs: Callable[[], Iterator[Doc]], encoder: Encoder,
                  report: ReadReport, label: str,
                  extra_meta: Callable[[], dict] | None = None) -> tuple[TokenShards, bool]:
    """The cache entry for `key_parts`, built from `docs()` when missing. Returns (shards, was_cached).

    `extra_meta()` is called only when building; what it returns is stored in meta.json (the
    source's inspection verdict, so a cache hit needs no reading at all).
    """
    key = cache_key(key_parts)
    final = root / key
    if (final / "meta.json").exists():
        return _checked(TokenShards(final), report), True
    with _locked(root / f"{key}.lock"):
        if (final / "meta.json").exists():  # another rank built it while we waited
            return _checked(TokenShards(final), report), True
        tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, key_parts, docs, encoder, report, label, extra_meta() if extra_meta else {})
            try:
                os.rename(tmp, final)
            except OSError:
                # another host on a shared file system (where flock may not reach) renamed first
                if not (final / "meta.json").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return TokenShards(final), False


def _checked(shards: TokenShards, report: ReadReport) -> TokenShards:
    """An entry built without data.strict may hold a source with skipped rows; what a run accepts is not
    part of the key (a clean source's entry serves strict and lenient runs alike), so it is checked here."""
    m = shards.meta
    report.check_cached(m.get("skipped", {}), m.get("first_skipped", {}), m.get("first_skipped_detail", {}))
    return shards


def _build(tmp: Path, key_parts: dict, docs: Callable[[], Iterator[Doc]], encoder: Encoder,
           report: ReadReport, label: str, extra: dict) -> None:
    tmp.mkdir(parents=True)
    t0 = time.time()
    offsets = array("q", [0])
    shards: list[dict] = []
    total = 0
    fh = None
    in_shard = SHARD_TOKENS

    for _doc, ids in encoder.encode_docs(docs()):
        pos = 0
        while pos < len(ids):  # a document may straddle two shards: addressing is global anyway
            if in_shard >= SHARD_TOKENS:
                if fh is not None:
                    fh.close()
                shards.append({"file": f"tokens-{len(shards):05d}.bin", "n_tokens": 0})
                fh = open(tmp / shards[-1]["file"], "wb")
                in_shard = 0
            take = min(len(ids) - pos, SHARD_TOKENS - in_shard)
            fh.write(ids[pos:pos + take].tobytes())
            shards[-1]["n_tokens"] += take
            in_shard += take
            pos += take
        total += len(ids)
        offsets.append(total)
    if fh is not None:
        fh.close()
    if len(offsets) == 1:
        raise DataError(f"{label}: no documents read (after filters and skipped rows)"
                        + (f"; {report.summary()}" if report.summary() else ""))
    np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    meta = {"format": FORMAT_VERSION, "source": label, "key_parts": key_parts, "dtype": encoder.dtype.name,
            "n_docs": len(offsets) - 1, "n_tokens": total, "shards": shards, "skipped": dict(report.counts),
            "first_skipped": dict(report.first), "first_skipped_detail": dict(report.first_detail),
            "filtered": report.filtered, "build_seconds": round(time.time() - t0, 2), **extra}
    with open(tmp / "meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp / "meta.json.tmp", tmp / "meta.json")
