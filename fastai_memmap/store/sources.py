"""Tabular sources cut into DataFrames of at most `chunksize` rows: `iter_frames`.

A source is a DataFrame (sliced, views), a CSV file (``pd.read_csv(chunksize=...)``, only the needed
columns), a JSON-lines file (one JSON object per line, ``.jsonl``/``.ndjson``/``.json``), an iterable
of DataFrames (a generator is consumed once), or an iterable of dict records (a key missing from a
record is a missing value). At most one chunk is alive at a time, so memory is set by `chunksize`.
"""
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import ColumnNotFoundError, FormatError, MemmapError, SourceNotFoundError, TabularError

__all__ = ["iter_frames", "DEFAULT_CHUNKSIZE"]

DEFAULT_CHUNKSIZE = 100_000  # rows per chunk: big enough to amortise pandas' per-call overhead


def iter_frames(source: Any, chunksize: int = DEFAULT_CHUNKSIZE, file_format: Optional[str] = None,
                read_kwargs: Optional[Dict[str, Any]] = None, columns: Optional[Sequence[str]] = None
                ) -> Iterator[pd.DataFrame]:
    """Cut a tabular `source` into DataFrames of at most `chunksize` rows, one alive at a time.

    Parameters
    ----------
    source : DataFrame, str or Path, iterable of DataFrames, or iterable of dicts
        A DataFrame is sliced (views, no copy). A path is a CSV file or, for `file_format`
        ``'jsonl'`` or a ``.jsonl``/``.ndjson``/``.json`` suffix, a JSON-lines file. Records (dicts)
        are grouped `chunksize` at a time into ``pd.DataFrame(records)``: a key missing from a record
        is a missing value.
    read_kwargs : dict, optional
        Extra arguments of ``pd.read_csv`` (``sep``, ``dtype``, ``na_values``...).
    columns : sequence of str, optional
        Columns needed: a CSV is read with ``usecols=columns``.

    Raises
    ------
    SourceNotFoundError, ColumnNotFoundError (CSV header lacks a column), FormatError (a bad JSON
    line), TabularError (not a supported source).
    """
    if not isinstance(chunksize, (int, np.integer)) or chunksize < 1:
        raise TabularError(f"expected chunksize >= 1 rows, found {chunksize!r}")
    if isinstance(source, pd.DataFrame):
        yield from _slices(source, chunksize)
    elif isinstance(source, (str, os.PathLike)):
        yield from _file_frames(Path(source), chunksize, file_format, dict(read_kwargs or {}), columns)
    elif isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TabularError(f"expected a DataFrame, a CSV/JSON-lines path, or an iterable of DataFrames or dicts; "
                           f"found {type(source).__name__}" + (" (wrap a single record in a list)" if isinstance(source, Mapping) else ""))
    else:
        yield from _iterable_frames(iter(source), chunksize)


def _slices(df: pd.DataFrame, chunksize: int) -> Iterator[pd.DataFrame]:
    if len(df) <= chunksize:
        yield df
        return
    for a in range(0, len(df), chunksize):
        yield df.iloc[a:a + chunksize]


def _iterable_frames(it: Iterator, chunksize: int) -> Iterator[pd.DataFrame]:
    first = next(it, None)
    if first is None:
        return
    if isinstance(first, Mapping):
        yield from _record_frames(_prepend([first], it), chunksize, "record")
        return
    if not isinstance(first, pd.DataFrame):
        raise TabularError(f"expected an iterable of DataFrames or of dicts, found a first element of type "
                           f"{type(first).__name__}")
    frames = _prepend([first], it)
    del first                      # keep a single chunk alive: no name holds a consumed one
    for i, df in enumerate(frames):
        if not isinstance(df, pd.DataFrame):
            raise TabularError(f"element {i} of the source: expected a DataFrame like the first, found {type(df).__name__}")
        yield from _slices(df, chunksize)
        del df


def _prepend(box: list, it: Iterator) -> Iterator:
    "Yield ``box.pop()`` then the rest of `it`, holding no reference to the first element afterwards."
    yield box.pop()
    yield from it


def _record_frames(records: Iterable, chunksize: int, what: str) -> Iterator[pd.DataFrame]:
    batch: List[Mapping] = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TabularError(f"{what} {i}: expected a dict (column -> value), found {type(r).__name__}")
        batch.append(r)
        if len(batch) >= chunksize:
            frame, batch = pd.DataFrame(batch), []
            yield frame
            del frame
    if batch:
        yield pd.DataFrame(batch)


def _file_format(path: Path, file_format: Optional[str]) -> str:
    if file_format is None:
        return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"
    if file_format not in ("csv", "jsonl"):
        raise TabularError(f"{path}: expected file_format 'csv' or 'jsonl', found {file_format!r}")
    return file_format


def _file_frames(path: Path, chunksize: int, file_format: Optional[str], kw: Dict[str, Any],
                 columns: Optional[Sequence[str]]) -> Iterator[pd.DataFrame]:
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: source file not found")
    if _file_format(path, file_format) == "jsonl":
        yield from _record_frames(_json_records(path), chunksize, f"{path}: record")
        return
    # Every column is parsed (no ``usecols``): with ``usecols`` pandas ignores the fields a line has beyond
    # the header, silently. A caller who wants that passes ``read_kwargs={'usecols': [...]}`` explicitly.
    strict = "usecols" not in kw and "index_col" not in kw
    with _csv_errors(path, kw):
        if columns is not None:
            header = pd.read_csv(path, nrows=0, **kw).columns
            missing = [c for c in columns if c not in header]
            if missing:
                raise ColumnNotFoundError(f"{path}: expected column(s) {missing} in the CSV header, found {list(header)[:20]}")
        with pd.read_csv(path, chunksize=chunksize, **kw) as reader:
            start = 0
            for df in reader:
                if strict:
                    _check_no_implicit_index(df, path, start)
                if columns is not None and strict:
                    df = df[list(columns)]
                start += len(df)
                yield df
                del df


def _check_no_implicit_index(df: pd.DataFrame, path: Path, start: int) -> None:
    "pandas takes the first column as the index when the first data line has more fields than the header."
    if len(df) and (not isinstance(df.index, pd.RangeIndex) or df.index.start != start):
        raise FormatError(f"{path}: line 2: expected as many fields as the header's {len(df.columns)}, found more "
                          "(pandas would shift the columns, taking the first as an index); fix the line (a "
                          "trailing delimiter?), or pass read_kwargs={'usecols': [...]} to read only the listed "
                          "columns and ignore extra fields")


class _csv_errors:
    "Context manager: pandas' and the codec's errors on a CSV file as `FormatError`s naming the file."

    def __init__(self, path: Path, kw: Dict[str, Any]):
        self.path, self.encoding = path, kw.get("encoding", "utf-8")

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, MemmapError) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, pd.errors.EmptyDataError):
            raise FormatError(f"{self.path}: expected a CSV file with a header line, found an empty file") from None
        if isinstance(exc, UnicodeDecodeError):
            raise FormatError(f"{self.path}: expected text in {self.encoding}, found an undecodable byte "
                              f"{exc.object[exc.start:exc.start + 1]!r} ({exc.reason}); pass read_kwargs={{'encoding': ...}} (e.g. "
                              "'latin-1')") from None
        if isinstance(exc, pd.errors.ParserError):
            raise FormatError(f"{self.path}: expected a well-formed CSV file, found: {str(exc).strip()}; a line "
                              "with more fields than the header? fix it, or pass read_kwargs={'usecols': [...]} "
                              "to read only the listed columns and ignore extra fields") from None
        return False


def _json_records(path: Path) -> Iterator[dict]:
    try:
        yield from _json_lines(path)
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: expected UTF-8 JSON lines, found an undecodable byte ({e.reason}); "
                          "JSON text is UTF-8: re-encode the file") from None


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{lineno}: expected one JSON object per line, found invalid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise FormatError(f"{path}:{lineno}: expected a JSON object, found {type(r).__name__}")
            yield r


def count_rows(source: Any, file_format: Optional[str]) -> Optional[int]:
    "Number of rows for the progress bar, when cheap to know (lines of a file are counted, not parsed)."
    if isinstance(source, pd.DataFrame):
        return len(source)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return sum(map(len, source)) if len(source) and isinstance(source[0], pd.DataFrame) else len(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        n, last = 0, b"\n"
        with open(source, "rb") as f:
            while True:
                b = f.read(1 << 24)
                if not b:
                    break
                n, last = n + b.count(b"\n"), b[-1:]
        n += last != b"\n"
        return max(n - (_file_format(Path(source), file_format) == "csv"), 0)
    return None
