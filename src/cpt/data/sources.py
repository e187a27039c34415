"""Reading one source's documents: local files, folders and globs, `datasets` names and folders, streams.

Every reader yields `Doc(text, index, loc)`: `index` counts the documents this source has produced
(after filters and skips), and `loc` is a small JSON-serialisable position from which the same
reader can be reopened (`iter_docs(..., start=loc)`), which is what lets a streamed run resume at
the right document without re-reading what came before (a byte offset in JSON lines, a row in
Parquet, a file in a folder of .txt files).

    python -c "from cpt.data import read_documents; from cpt.config import SourceConfig; \
print(next(read_documents(SourceConfig(path='docs/'))))"
"""
from __future__ import annotations

import ast
import csv
import glob
import gzip
import hashlib
import io
import json
import operator
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from cpt.config import ConfigError, SourceConfig

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
SUFFIXES = TEXT_SUFFIXES + ROW_SUFFIXES


class DataError(ConfigError):
    """Bad input data, phrased for the user: names the file, line, field or key."""


class DataWarning(UserWarning):
    """Rows skipped (or repaired) while reading a source; the message carries the counts."""


class FileText(dict):
    """The row a .txt/.md file becomes: {"text": whole file}. Marked so the text field name does not apply."""


class Doc(NamedTuple):
    text: str
    index: int          # documents produced so far by this source (after filters and skips)
    loc: dict           # where this document starts; iter_docs(start=loc) yields it first


# ---------------------------------------------------------------------------- skip accounting


@dataclass
class ReadReport:
    """What was skipped, repaired or filtered while reading, with the first place each happened."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)
    first_detail: dict[str, str] = field(default_factory=dict)
    filtered: int = 0
    strict: bool = False

    LABELS = {"empty": "empty or whitespace-only", "non_string": "non-string text", "bad_utf8": "invalid UTF-8",
              "bad_json": "malformed JSON", "missing_field": "missing text field",
              "bad_csv": "malformed CSV/TSV row", "repaired_utf8": "invalid UTF-8 (bytes replaced)"}

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        if self.strict:
            raise self.strict_error(kind, where, detail)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, where)
        self.first_detail.setdefault(kind, detail)

    def strict_error(self, kind: str, where: str, detail: str = "") -> DataError:
        return DataError(f"{where}: {self.LABELS.get(kind, kind)}{(': ' + detail) if detail else ''} "
                         "(data.strict is on; turn it off to skip such rows and count them)")

    def check_cached(self, counts: dict[str, int], first: dict[str, str], detail: dict[str, str]) -> None:
        """Under data.strict, refuse a token cache whose (non-strict) build skipped rows: the strict run
        must fail at the first bad row exactly as it would have with no cache."""
        if self.strict and counts:
            kind = next(iter(counts))  # kinds are recorded in the order first met: this is the first bad row
            raise self.strict_error(kind, first.get(kind, self.source), detail.get(kind, ""))

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "repaired_utf8")

    def summary(self) -> str | None:
        if not self.counts:
            return None
        parts = [f"{n} {self.LABELS[k]} (first at {self.first[k]})" for k, n in self.counts.items()
                 if k != "repaired_utf8"]
        msg = [f"skipped {self.skipped} rows: " + "; ".join(parts)] if parts else []
        if "repaired_utf8" in self.counts:
            msg.append(f"read {self.counts['repaired_utf8']} files with invalid UTF-8, bad bytes replaced by U+FFFD "
                       f"(first at {self.first['repaired_utf8']})")
        return f"{self.source}: " + "; ".join(msg)

    def warn(self) -> None:
        msg = self.summary()
        if msg:
            warnings.warn(msg, DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------- row filters

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<|not\s+in\b|in\b)\s*(.+?)\s*$")


@dataclass(frozen=True)
class RowFilter:
    """One `column op value` condition, e.g. `int_score >= 3` or `language == "ja"`."""

    text: str
    column: str
    op: str
    value: Any

    def __call__(self, row: dict, where: str) -> bool:
        v = row.get(self.column)
        if v is None:
            return False  # a missing or null value never passes a condition on it
        want = self.value
        if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(v, str):
            try:
                v = float(v)  # CSV cells are strings; `score >= 3` still means a number there
            except ValueError:
                raise DataError(f"{where}: filter {self.text!r}: column {self.column!r} holds {v!r}, not a number") from None
        try:
            return bool(_OPS[self.op](v, want))
        except TypeError:
            raise DataError(f"{where}: filter {self.text!r}: cannot compare {type(v).__name__} {v!r} "
                            f"with {type(want).__name__} {want!r}") from None


def check_filter_columns(filters: list[RowFilter], row: dict, where: str) -> None:
    """Refuse filters on columns the source's first row lacks: a missing value never passes, so every row
    would be dropped without a word."""
    missing = [f for f in filters if f.column not in row]
    if missing:
        raise DataError(f"{where}: filter {missing[0].text!r}: no column {missing[0].column!r}; "
                        f"the fields are: {_names(row)}")


def parse_filters(filters: Iterable[str]) -> list[RowFilter]:
    """Parse `data.sources[i].filters`; a filter that does not parse raises a DataError quoting it."""
    out = []
    for text in filters:
        m = _FILTER.match(text)
        if not m:
            raise DataError(f"filter {text!r} is not `column op value` with op one of "
                            f"{', '.join(_OPS)} (e.g. 'int_score >= 3', 'language == \"ja\"')")
        column, op, raw = m.group(1), re.sub(r"\s+", " ", m.group(2)), m.group(3)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: `language == ja` means the string
        if op in ("in", "not in") and not isinstance(value, (list, tuple, set, str)):
            raise DataError(f"filter {text!r}: `{op}` needs a list, e.g. language in ['en', 'de']")
        out.append(RowFilter(text, column, op, value))
    return out


# ---------------------------------------------------------------------------- local files


def source_label(source: SourceConfig | Any) -> str:
    if isinstance(source, SourceConfig):
        return source.path or source.dataset or "<empty source>"
    return f"<{type(source).__name__}>"


def resolve_files(path: str) -> list[Path]:
    """A file, a folder (recursively, supported suffixes only) or a glob -> sorted list of files."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        if is_datasets_folder(p):
            # its dataset_info.json would otherwise be read as rows, and its .arrow files not at all
            raise DataError(f"{path}: this is a `datasets` folder (save_to_disk): give it as the source's "
                            f"`dataset: {path}` instead of `path:`")
        try:
            files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in SUFFIXES)
        except OSError as e:
            raise DataError(f"{path}: folder cannot be listed ({e.strerror or e}): check its permissions") from None
        if not files:
            other = other_files(p)
            raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files (.gz allowed)"
                            + (f"; it holds {_describe_files(other)}: convert them to one of those" if other else ""))
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{path}: glob matches no files")
    else:
        raise DataError(f"{path}: no such file, folder or glob")
    for f in files:
        if _suffix(f) not in SUFFIXES:
            raise DataError(f"{f}: unsupported file type {''.join(f.suffixes) or '(none)'}; "
                            f"use {' '.join(SUFFIXES)} (optionally .gz)")
    return files


_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_datasets_folder(p: Path) -> bool:
    """A `datasets` save_to_disk folder. A folder of JSON documents may hold a `state.json` of its own:
    a marker counts only beside the .arrow files it describes (or a DatasetDict's dataset_dict.json)."""
    if not p.is_dir():
        return False
    return (p / "dataset_dict.json").exists() or (
        any((p / m).exists() for m in _DATASETS_MARKERS) and any(p.glob("*.arrow")))


def other_files(folder: Path) -> list[Path]:
    """Files in a source folder that cpt does not read (hidden files aside): reported, never silently dropped."""
    try:
        return sorted(f for f in folder.rglob("*") if f.is_file() and _suffix(f) not in SUFFIXES
                      and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    except OSError:
        return []


def _describe_files(files: list[Path]) -> str:
    kinds: dict[str, int] = {}
    for f in files:
        k = "".join(f.suffixes[-2:]).lower() or f.name
        kinds[k] = kinds.get(k, 0) + 1
    shown = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:6])
    return f"{len(files)} file(s) of other types ({shown}{', ...' if len(kinds) > 6 else ''})"


def _suffix(f: Path) -> str:
    name = f.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _open_bytes(f: Path) -> io.BufferedIOBase:
    return gzip.open(f, "rb") if f.name.lower().endswith(".gz") else open(f, "rb")


_SIGNATURES = (
    (b"PAR1", "a Parquet file", "name it .parquet"),
    (b"\x1f\x8b", "gzip-compressed", "add .gz to its name (e.g. data.jsonl.gz)"),
    (b"PK\x03\x04", "a ZIP archive (.zip, .docx, .xlsx, .odt, ...)", "export its text as .txt, .jsonl or .csv"),
    (b"%PDF", "a PDF", "extract its text first (e.g. pdftotext) into .txt"),
    (b"ARROW1", "an Arrow file", "load it with `datasets` (a `dataset:` source) or convert it to .parquet"),
    (b"\xff\xfe\x00\x00", "UTF-32 text", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (b"\xff\xfe", "UTF-16 text", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 text", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
)
_BOM = b"\xef\xbb\xbf"


def _check_head(f: Path, head: bytes) -> None:
    """Refuse a text-format file whose first bytes say it is something else: read as text, it would
    become garbage documents or a pile of skipped rows instead of an error naming the file."""
    for magic, what, fix in _SIGNATURES:
        if head.startswith(magic):
            raise DataError(f"{f}: the file is {what}, which cpt does not read as {_suffix(f)}: {fix}")
    if b"\x00" in head[:8192]:
        raise DataError(f"{f}: holds NUL bytes, so it is binary or UTF-16/32 text, which cpt does not read as "
                        f"{_suffix(f)}: convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) or remove it from "
                        "the source")


def _peek(fh: Any) -> bytes:
    try:
        return fh.peek(8192)[:8192]
    except (AttributeError, io.UnsupportedOperation):
        return b""


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _iter_text_file(f: Path, report: ReadReport) -> Iterator[dict]:
    with _open_bytes(f) as fh:
        data = fh.read()
    _check_head(f, data[:8192])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # A whole file is one document: replacing a stray byte keeps the document, dropping it would not.
        report.skip("repaired_utf8", f"{f}:{_line_of(data, e.start)}", "bytes replaced with U+FFFD")
        text = data.decode("utf-8-sig", errors="replace")
    del data  # a huge one-document file: hold its text only, not its bytes as well
    yield FileText(text=text)


def _iter_jsonl(f: Path, report: ReadReport, row: int, byte: int | None) -> Iterator[tuple[dict, int, int | None]]:
    """(row dict, row number, byte offset) for each line; malformed lines are skipped and counted."""
    seekable = not f.name.lower().endswith(".gz")
    with _open_bytes(f) as fh:
        lineno = 0
        if byte is not None and seekable:
            fh.seek(byte)
            lineno = row
        else:
            _check_head(f, _peek(fh))
        offset = fh.tell() if seekable else None
        for raw in fh:
            start = offset
            if seekable:
                offset += len(raw)
            lineno += 1
            if lineno <= row:
                continue  # compressed file: no seeking, read up to the saved row
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]  # Windows editors start UTF-8 files with a byte-order mark
            where = f"{f}:{lineno}"
            if not raw.strip():
                continue  # blank separator lines are not rows
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.skip("bad_utf8", where, str(e))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.skip("bad_json", where, e.msg)
                continue
            if not isinstance(obj, dict):
                report.skip("bad_json", where, f"expected an object, got {type(obj).__name__}")
                continue
            yield obj, lineno - 1, start


def _iter_json(f: Path, report: ReadReport) -> Iterator[dict]:
    with _open_bytes(f) as fh:
        data = fh.read()
    _check_head(f, data[:8192])
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{f}:{_line_of(data, e.start)}: invalid UTF-8 in a .json file") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            for obj, _, _ in _iter_jsonl(f, report, 0, None):
                yield obj
            return
        raise DataError(f"{f}:{e.lineno}: malformed JSON: {e.msg}"
                        + (" (the file is empty)" if not data.strip() else
                           " (truncated or not JSON: fix the file, or remove it from the source)")) from None
    del data
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{f}: a .json file must hold a list of rows (or an object with one list of rows)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{f}: a .json file must hold a list of rows")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            report.skip("bad_json", f"{f}: row {i}", f"expected an object, got {type(r).__name__}")
            continue
        yield r


def _iter_csv(f: Path, report: ReadReport, columns: list[str] | None, delimiter: str = ",") -> Iterator[dict]:
    """Rows of a .csv (or, with a tab delimiter, a .tsv) with a header line; quoting as Excel and pandas write it."""
    csv.field_size_limit(sys.maxsize)
    kind, sep = ("TSV", "tab") if delimiter == "\t" else ("CSV", "comma")
    with _open_bytes(f) as raw:
        _check_head(f, _peek(raw))
        fh = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        # strict: an unclosed quote (a truncated file) or stray text after a quoted cell is an error
        # naming the line, not a row that silently swallows the rest of the file
        reader = csv.DictReader(fh, delimiter=delimiter, strict=True)
        line = 1  # where the row being read starts (a quoted cell may span lines)
        try:
            if reader.fieldnames is not None and columns:
                _check_csv_header(f, reader.fieldnames, columns)
            line = reader.line_num + 1
            for r in reader:
                where, line = f"{f}:{line}", reader.line_num + 1
                if None in r:
                    # an unquoted comma (tab) in the text: the cells past the header's would be dropped silently
                    report.skip("bad_csv", where, f"{len(reader.fieldnames) + len(r[None])} cells, the header names "
                                f"{len(reader.fieldnames)} (quote cells that hold a {sep})")
                    continue
                if any(v is None for v in r.values()):
                    report.skip("bad_csv", where, f"fewer cells than the {len(reader.fieldnames)} the header names")
                    continue
                bad = next((k for k, v in r.items() if isinstance(v, str) and _has_surrogates(v)), None)
                if bad is not None:
                    report.skip("bad_utf8", where, f"in column {bad!r}")
                    continue
                yield r
        except csv.Error as e:
            raise DataError(f"{f}:{line}: malformed {kind}: {e} (a truncated file or an unclosed quote: "
                            "fix the quoting, or remove the file from the source)") from None


def shorten(text: Any, n: int = 60) -> str:
    """A value quoted for a message, cut to about `n` characters: a header row that is really a document
    must not print the whole document."""
    s = repr(text)
    return s if len(s) <= n else s[: n - 3] + "...'"


def csv_header_problem(f: Path, fieldnames: list[str], columns: list[str]) -> str | None:
    """What is wrong when a CSV's header row names none of `columns`, or None."""
    missing = [c for c in columns if c not in fieldnames]
    if not missing:
        return None
    found = shorten(",".join(map(str, fieldnames)))
    kind = "TSV" if _suffix(f) == ".tsv" else "CSV"
    return (f"{f}: has no header row naming the column {missing[0]!r} (its first line reads {found}). "
            f"The first line of a {kind} names its columns: add a header line (e.g. `{missing[0]}`), or set the "
            "source's text_field (or data.dataset_text_field) to the column that holds the text")


def _check_csv_header(f: Path, fieldnames: list[str], columns: list[str]) -> None:
    problem = csv_header_problem(f, fieldnames, columns)
    if problem:
        raise DataError(problem)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def parquet_file(f: Path) -> Any:
    """pyarrow's ParquetFile, or a DataError naming the file when it is truncated or not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f}: not a readable Parquet file ({_first_line(e)}); it is truncated (an interrupted "
                        "download or copy) or not Parquet at all: write or download it again, or remove it "
                        "from the source") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: library messages run on with advice for their own users."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(". ")[0].rstrip(".")


def _iter_parquet(f: Path, columns: list[str] | None, row: int) -> Iterator[dict]:
    import pyarrow as pa

    pf = parquet_file(f)
    names = pf.schema_arrow.names
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{f}: no column {missing[0]!r}; the columns are: {_names(names)}. Set the source's "
                            "text_field (or data.dataset_text_field) to the column that holds the text")
    skip = row
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if skip >= n:
            skip -= n  # the saved position lies past this row group: never read it
            continue
        try:
            table = pf.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: row group {g} cannot be read ({_first_line(e)}); the file is damaged: write or "
                            "download it again, or remove it from the source") from None
        for r in table.slice(skip).to_pylist():
            yield r
        skip = 0


def _names(names: Iterable[Any], n: int = 20) -> str:
    names = list(names)
    shown = ", ".join(shorten(k, 40) if not isinstance(k, str) or len(k) > 37 else k for k in names[:n])
    return (shown + (f", ... ({len(names)} in all)" if len(names) > n else "")) or "(none)"


def _iter_file_rows(f: Path, report: ReadReport, columns: list[str] | None, row: int,
                    byte: int | None) -> Iterator[tuple[dict, str, int, int | None]]:
    """(row, where, row number, byte offset) from one file, starting at `row` (or `byte` for JSON lines)."""
    try:
        yield from _file_rows(f, report, columns, row, byte)
    except (OSError, EOFError, zlib.error) as e:
        gz = f.name.lower().endswith(".gz") and not isinstance(e, PermissionError)
        fix = ("the compressed file is truncated or not gzip: download or compress it again" if gz else
               "check that it exists, is readable and is complete")
        raise DataError(f"{f}: cannot be read ({type(e).__name__}: {_first_line(e)}); {fix}, "
                        "or remove it from the source") from None


def _file_rows(f: Path, report: ReadReport, columns: list[str] | None, row: int,
               byte: int | None) -> Iterator[tuple[dict, str, int, int | None]]:
    kind = _suffix(f)
    if kind == ".jsonl":
        for r, i, b in _iter_jsonl(f, report, row, byte):
            yield r, f"{f}:{i + 1}", i, b
        return
    if kind in TEXT_SUFFIXES:
        it: Iterable[dict] = _iter_text_file(f, report)
        where = lambda i: str(f)  # noqa: E731
    elif kind == ".json":
        it, where = _iter_json(f, report), lambda i: f"{f}: row {i}"
    elif kind in (".csv", ".tsv"):
        it, where = _iter_csv(f, report, columns, "\t" if kind == ".tsv" else ","), lambda i: f"{f}: row {i + 1}"
    else:
        it, where = _iter_parquet(f, columns, row), lambda i: f"{f}: row {i}"
        for i, r in enumerate(it, start=row):
            yield r, where(i), i, None
        return
    for i, r in enumerate(it):
        if i >= row:
            yield r, where(i), i, None


# ---------------------------------------------------------------------------- `datasets` sources


_SLICE = re.compile(r"^\s*([\w\-.]+)\s*(?:\[\s*(-?\d*)\s*(%?)\s*:\s*(-?\d*)\s*(%?)\s*\])?\s*$")


def _slice_bounds(m: re.Match, n: int | None) -> tuple[int, int | None]:
    """[start, stop) rows of a `train[a:b]` slice of a split of n rows (stop None: to the end). Percentages
    round as `datasets` does; n may be unknown (None) only for non-negative row counts."""

    def bound(v: str, pct: str, default: int | None) -> int | None:
        if v in ("", "-"):
            return default
        x = int(v)
        if pct:
            x = round(n * x / 100)
        if n is None:
            return x
        return max(0, min(n, x if x >= 0 else n + x))

    a = bound(m.group(2), m.group(3), 0) or 0
    b = bound(m.group(4), m.group(5), n)
    return a, (max(a, b) if b is not None else None)


def _slice_split(ds: Any, split: str, where: str) -> Any:
    """Apply `train[:10%]`-style slicing to a Dataset loaded from disk (load_dataset does its own)."""
    m = _SLICE.match(split)
    if not m or m.group(2) is None:
        return ds
    a, b = _slice_bounds(m, len(ds))
    return ds.select(range(a, b))


def split_rows(source: SourceConfig) -> int | None:
    """How many rows the split of a `dataset:` source holds, without downloading it: from the data
    set's metadata (its info or README), else from the Parquet footers of its files; None if neither says."""
    import datasets

    base = _SLICE.match(source.split).group(1)
    try:
        builder = datasets.load_dataset_builder(source.dataset, source.name, data_files=source.data_files)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"dataset {source.dataset!r} (name={source.name!r}) could not be opened: {type(e).__name__}: "
                        f"{_first_line(e)}") from None
    splits = builder.info.splits or {}
    if base in splits and splits[base].num_examples:
        return int(splits[base].num_examples)
    files = (builder.config.data_files or {}).get(base) if getattr(builder.config, "data_files", None) else None
    if files and all(str(f).endswith(".parquet") for f in files):
        import fsspec
        import pyarrow.parquet as pq

        total = 0
        for f in files:
            with fsspec.open(str(f), "rb") as fh:  # reads the footer only
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
    return None


def _needs_size(m: re.Match) -> bool:
    return bool(m.group(3) or m.group(5)) or any(v.startswith("-") for v in (m.group(2), m.group(4)) if v)


def streamed_split_rows(source: SourceConfig) -> int | None:
    """For a streamed `dataset:` source whose split is a slice by percentage (or from the end): the
    split's size, or a DataError with the fix when the metadata does not say. None when no size is needed."""
    m = _SLICE.match(source.split)
    if not m or m.group(2) is None or not _needs_size(m):
        return None
    n = split_rows(source)
    if n is None:
        raise DataError(f"dataset {source.dataset!r}: split {source.split!r} is streamed, and the size a percentage "
                        f"needs is not in its metadata; give rows instead ({m.group(1)}[:100000]), or set "
                        "streaming: false to load the split whole")
    return n


def _stream_slice(source: SourceConfig, m: re.Match) -> Any:
    """A streamed split's slice (`train[:10%]`, `train[1000:5000]`): the rows are skipped and taken from
    the stream, since `datasets` slices only splits it has materialised. A percentage or a negative
    bound needs the split's size, read from the metadata (streamed_split_rows)."""
    import datasets

    n = streamed_split_rows(source)
    a, b = _slice_bounds(m, n)
    try:
        ds = datasets.load_dataset(source.dataset, source.name, split=m.group(1), data_files=source.data_files,
                                   streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"dataset {source.dataset!r} (name={source.name!r}, split={source.split!r}) could not be "
                        f"loaded: {type(e).__name__}: {e}") from None
    if a:
        ds = ds.skip(a)
    return ds.take(b - a) if b is not None else ds


def load_hf(source: SourceConfig, streaming: bool) -> Any:
    """The `datasets` object behind a `dataset:` source: a save_to_disk folder or load_dataset(...)."""
    import datasets

    name = source.dataset
    p = Path(name).expanduser()
    if p.is_dir() and any((p / m).exists() for m in _DATASETS_MARKERS):
        try:
            ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError, OSError, KeyError) as e:
            raise DataError(f"{name}: this `datasets` folder cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                            "it is incomplete or damaged: save it again with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            split = (_SLICE.match(source.split) or re.match(r"(.*)", source.split)).group(1)
            if split not in ds:
                raise DataError(f"{name}: no split {split!r}; splits are: {', '.join(ds)}")
            ds = ds[split]
        ds = _slice_split(ds, source.split, name)
        return ds.to_iterable_dataset() if streaming else ds
    m = _SLICE.match(source.split)
    if streaming and m and m.group(2) is not None:
        return _stream_slice(source, m)
    try:
        return datasets.load_dataset(name, source.name, split=source.split, data_files=source.data_files,
                                     streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"dataset {name!r} (name={source.name!r}, split={source.split!r}) could not be loaded: "
                        f"{type(e).__name__}: {e}") from None


def _hf_columns(ds: Any) -> list[str] | None:
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    return list(names) if names is not None else None


def _iter_hf_rows(ds: Any, columns: list[str] | None, start: dict | None) -> Iterator[tuple[dict, str, dict]]:
    """(row, where, loc) from a Dataset (random access: loc is a row number) or an IterableDataset
    (loc is the stream's own state_dict, taken before each row, so it can be reopened there)."""
    import datasets

    if columns is not None and _hf_columns(ds) is not None:
        ds = ds.select_columns([c for c in columns if c in _hf_columns(ds)])
    elif isinstance(ds, datasets.IterableDataset):
        ds = ds.skip(0)  # a new object: load_state_dict below must not stick to the caller's dataset
    if isinstance(ds, datasets.Dataset):
        i = int(start["row"]) if start else 0
        n = len(ds)
        while i < n:
            batch = ds[i:i + 1000]
            keys = list(batch)
            for j in range(len(batch[keys[0]]) if keys else 0):
                yield {k: batch[k][j] for k in keys}, f"row {i + j}", {"row": i + j}
            i += 1000
        return
    if start and "state" in start:
        ds.load_state_dict(start["state"])
    rows = int(start.get("row", 0)) if start else 0
    has_state = hasattr(ds, "state_dict")
    if not has_state and rows:
        ds = ds.skip(rows)  # older datasets: no stream state, so skip (reads, never tokenizes) the rows before
    state = ds.state_dict() if has_state else None
    for r in ds:
        yield r, f"row {rows}", ({"state": state, "row": rows} if has_state else {"row": rows})
        rows += 1
        if has_state:
            state = ds.state_dict()


# ---------------------------------------------------------------------------- documents


def _text_field(source: SourceConfig | Any, default_text_field: str) -> str:
    if isinstance(source, SourceConfig) and source.text_field:
        return source.text_field
    return default_text_field


def is_streaming(source: SourceConfig | Any, default: bool = False) -> bool:
    if isinstance(source, SourceConfig):
        return default if source.streaming is None else bool(source.streaming)
    import datasets

    return isinstance(source, datasets.IterableDataset)


def iter_rows(source: SourceConfig | Any, *, columns: list[str] | None = None, streaming: bool | None = None,
              report: ReadReport | None = None, start: dict | None = None,
              file_order: list[int] | None = None, loaded: Any = None) -> Iterator[tuple[dict, str, dict]]:
    """Raw rows `(row, where, loc)` of a source, before text extraction and filters.

    `file_order` reorders a local source's files (a streamed source reshuffles its shards per epoch);
    `loc["file"]` then indexes that order. `columns` is a hint for columnar formats (Parquet, datasets).
    `loaded` is the `datasets` object of a `dataset:` source when the caller has loaded it already.
    """
    report = report or ReadReport(source_label(source))
    if isinstance(source, SourceConfig) and source.path:
        files = resolve_files(source.path)
        folder = Path(source.path).expanduser()
        other = other_files(folder) if folder.is_dir() and not start else []
        if other:
            warnings.warn(f"{source.path}: ignored {_describe_files(other)}, first {other[0]}; cpt reads "
                          f"{' '.join(SUFFIXES)} (optionally .gz)", DataWarning, stacklevel=2)
        order = file_order if file_order is not None else list(range(len(files)))
        k0 = int(start["file"]) if start else 0
        for k in range(k0, len(order)):
            f = files[order[k]]
            row0 = int(start["row"]) if start and k == k0 else 0
            byte0 = start.get("byte") if start and k == k0 else None
            for r, where, i, b in _iter_file_rows(f, report, columns, row0, byte0):
                yield r, where, {"file": k, "row": i, "byte": b}
        return
    if isinstance(source, SourceConfig):
        if not source.dataset:
            raise DataError("a data source needs `path` or `dataset`")
        ds = loaded if loaded is not None else load_hf(source, is_streaming(source) if streaming is None else streaming)
        where0 = source.dataset
    else:
        ds, where0 = source, source_label(source)
    for r, where, loc in _iter_hf_rows(ds, columns, start):
        yield r, f"{where0}: {where}", loc


def iter_docs(source: SourceConfig | Any, default_text_field: str = "text", *, max_docs: int | None = None,
              strict: bool = False, streaming: bool | None = None, start: dict | None = None,
              report: ReadReport | None = None, file_order: list[int] | None = None,
              loaded: Any = None) -> Iterator[Doc]:
    """Documents of one source with their index and reopenable position; see the module docstring."""
    field_ = _text_field(source, default_text_field)
    filters = parse_filters(source.filters if isinstance(source, SourceConfig) else [])
    report = report or ReadReport(source_label(source), strict=strict)
    report.strict = strict
    columns = sorted({field_, *(f.column for f in filters)})
    index = int(start.get("doc", 0)) if start else 0
    if max_docs is not None and index >= max_docs:
        return
    checked = False
    for row, where, loc in iter_rows(source, columns=columns, streaming=streaming, report=report, start=start,
                                     file_order=file_order, loaded=loaded):
        if isinstance(row, FileText):
            if filters:
                raise DataError(f"{where}: filters {[f.text for f in filters]} need columns, and a .txt/.md file has none")
            text = row["text"]  # .txt/.md: the file is the document whatever the text field is called
        elif not checked and field_ not in row:
            raise DataError(f"{where}: no text field {field_!r}; the fields are: {_names(row)}. "
                            "Set data.dataset_text_field or the source's text_field to the field that holds the text.")
        elif field_ not in row:
            report.skip("missing_field", where, f"no field {field_!r}")
            continue
        else:
            text = row[field_]
        if not checked:
            check_filter_columns(filters, row, where)
        checked = True
        if filters and not all(f(row, where) for f in filters):
            report.filtered += 1
            continue
        if not isinstance(text, str):
            report.skip("non_string", where, f"{type(text).__name__} in {field_!r}")
            continue
        if not text.strip():
            report.skip("empty", where)
            continue
        yield Doc(text, index, {**loc, "doc": index})
        index += 1
        if max_docs is not None and index >= max_docs:
            break


def read_documents(source: SourceConfig | Any, default_text_field: str = "text", max_docs: int | None = None,
                   strict: bool = False) -> Iterator[str]:
    """One source's text documents in file order, filters applied, bad rows skipped and counted.

    A DataWarning with the counts is issued when the iterator is exhausted; `strict` raises a
    DataError naming the file and line at the first bad row instead.
    """
    report = ReadReport(source_label(source), strict=strict)
    for doc in iter_docs(source, default_text_field, max_docs=max_docs, strict=strict, report=report):
        yield doc.text
    report.warn()


# ---------------------------------------------------------------------------- fingerprints


def source_fingerprint(source: SourceConfig | Any, loaded: Any = None) -> str:
    """A hash that changes when the source's content may have changed (files: name, size, mtime)."""
    h = hashlib.sha256()
    if isinstance(source, SourceConfig) and source.path:
        for f in resolve_files(source.path):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        ds = loaded if loaded is not None else source
        if isinstance(source, SourceConfig):
            h.update(json.dumps([source.dataset, source.name, source.split, source.data_files], default=str).encode())
        fp = getattr(ds, "_fingerprint", None)
        if fp is None:
            raise DataError(f"{source_label(source)}: this dataset has no fingerprint, so its tokens cannot be cached")
        h.update(str(fp).encode())
    return h.hexdigest()
