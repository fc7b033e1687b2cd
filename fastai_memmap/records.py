"""Tabular sources to processed stores, out of core: `tabular_to_memmap` and its fitted `TabularState`.

fastai v1's ``TabularList`` runs ``FillMissing``, ``Categorify`` and ``Normalize`` on a DataFrame in RAM.
`tabular_to_memmap` does the same work chunk by chunk and writes the result as stores that
`fastai_memmap.tabular.MemmapTabularList` trains from; peak memory is set by `chunksize`, not by the table.

Sources
-------
A DataFrame, a CSV file (``pd.read_csv(chunksize=...)``), a JSON-lines file (one JSON object per line,
``.jsonl``/``.ndjson``/``.json``), an iterable of DataFrames (a generator is consumed once), or an
iterable of dict records. Each is cut into DataFrames of at most `chunksize` rows (`iter_frames`).

Layout of a tabular store
-------------------------
::

    out/
        tabular.json   the fitted state and a few facts (UTF-8 JSON, never pickle), see below
        cats/          store of int64 rows (n_cat,): category codes, 0 = '#na#'; columns `cat_names`
                       then FillMissing's indicator columns ``<col>_na``
        conts/         store of float32 rows (n_cont,): filled and normalised continuous values
        y/             only with targets: int64 scalars, class codes into ``meta['classes']``
                       (-1: missing label or a label absent from the training rows), or float32
                       scalars (one regression target) / rows (n_y,) (several)
        valid/         only with a split: int64 scalars, the sorted row numbers of validation rows

``tabular.json`` holds ``{"format": "fastai_memmap.tabular", "version": 1, "rows": N, "n_valid": k,
"split": {...}, "state": TabularState.to_dict()}``.

Fitting: what matches fastai
----------------------------
Statistics come from the *training* rows only (rows not chosen by `valid_idx`, `valid_pct` or
`valid_col`; every row when no split is given), as fastai fits its procs on the training set.

- Categorify: classes of a column = ``'#na#'`` then the sorted distinct training values (int, float,
  str or bool; a column read as int in one chunk and float in another is float, as pandas reads the
  whole file); code = position in classes; missing values and values absent from training get 0.
- FillMissing: a continuous column with missing training values gets a fill value and, with
  ``add_col``, a categorical indicator column ``<col>_na`` (classes ``'#na#', False, True``).
  ``FillStrategy.MEDIAN`` is the *exact* median (same as pandas): the raw training values are staged
  on disk and the two middle ranks found by radix selection, 16 bits a pass (`RADIX_BITS`), keeping at
  most ``max(chunksize, 65536)`` values per column in RAM; typically 1 or 2 extra reads of the staged
  column. ``CONSTANT`` uses ``fill_val``. ``COMMON`` (the mode) is refused: not streamable exactly.
  Missing values in a column that had none in training raise `ColumnValueError` (fastai raises too).
- Normalize: ``(x - mean) / (1e-7 + std)`` with mean and std (ddof=1, as pandas) of the *filled*
  training values, from float64 moments of fixed blocks of `STATS_BLOCK_ROWS` staged rows merged in
  order (Chan et al.): they agree with pandas to about 1e-15 relative (so the float32 values agree to
  float32 rounding), and do not depend on how the source was chunked (same store from every source).

Disk and atomicity: everything is built in a hidden directory ``.NAME.fmtmp-PID-HEX`` next to `out`
(raw staged columns there need about ``rows * (8 * n_cat + 8 * n_cont + 9)`` bytes until the end) and
renamed to `out` at the end; after a crash nothing partial is at `out`.
"""
import functools
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_categorical_dtype, is_numeric_dtype, is_object_dtype

from . import compat
compat.apply()
from fastai.tabular.transform import Categorify, FillMissing, FillStrategy, Normalize  # noqa: E402

from .errors import FormatError, MemmapError, StoreExistsError, StoreNotFoundError  # noqa: E402
from .writer import (MemmapWriter, OLD_MARK, TMP_MARK, _clean_stale, _fsync_dir, _remove,  # noqa: E402
                     _take_lock, _write_fsync)

__all__ = ["tabular_to_memmap", "TabularState", "iter_frames", "read_tabular_json", "TabularError",
           "ColumnNotFoundError", "ColumnTypeError", "ColumnValueError", "SourceNotFoundError",
           "TABULAR_FORMAT", "TABULAR_VERSION", "STATE_NAME", "NA_CLASS", "DEFAULT_CHUNKSIZE"]

TABULAR_FORMAT = "fastai_memmap.tabular"
TABULAR_VERSION = 1          # bump on any change a version-1 reader would misread
STATE_NAME = "tabular.json"
NA_CLASS = "#na#"            # fastai's class 0 of every categorical column
EPS = 1e-7                   # fastai's Normalize: (x - mean) / (1e-7 + std)
DEFAULT_CHUNKSIZE = 100_000  # rows per chunk: big enough to amortise pandas' per-call overhead
RADIX_BITS = 16              # bits of a float64 key resolved per selection pass: 65536 counters
MIN_SELECT_BUDGET = 1 << 16  # values of one column collected in RAM for the final exact partition
STATS_BLOCK_ROWS = 1 << 16   # staged rows per block of the statistics passes: fixed, so results do not
                             # depend on the source's chunking
PROC_NAMES = ("FillMissing", "Categorify", "Normalize")
_PROC_CLASSES = {"FillMissing": FillMissing, "Categorify": Categorify, "Normalize": Normalize}
_SIGN = np.uint64(1 << 63)


class TabularError(MemmapError, ValueError):
    "Bad arguments for a tabular store: procs, split, column lists, or a list that is not split."


class ColumnNotFoundError(MemmapError, KeyError):
    "A column named in `cat_names`, `cont_names`, `y_names` or `valid_col` is missing (chunk or row)."

    def __str__(self) -> str:   # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class ColumnTypeError(MemmapError, TypeError):
    "A column holds values of the wrong type (text in a continuous column, text and numbers mixed...)."


class ColumnValueError(MemmapError, ValueError):
    "A value cannot be processed: a missing value where training had none, an all-missing column..."


class SourceNotFoundError(MemmapError, FileNotFoundError):
    "A CSV or JSON-lines source file does not exist."


# ------------------------------------------------------------------------------------------ state
def _jfloat(x: float) -> Optional[float]:
    "JSON has no NaN: non-finite floats are written as null."
    x = float(x)
    return x if np.isfinite(x) else None


def _ufloat(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass(frozen=True)
class TabularState:
    """The fitted processing of a tabular store, as plain data (saved as JSON, carried by the processor).

    `cat_names`/`cont_names` are the source columns; `classes` maps every categorical column, the
    ``<col>_na`` indicators included, to its classes (``'#na#'`` first, then str/int/float/bool values);
    `fill_values` maps the continuous columns that had missing training values to their fill value;
    `means`/`stds` (empty without Normalize) the normalisation of every continuous column; `y_kind` is
    ``'category'`` (with `y_classes`), ``'float'`` or None (no targets fitted).
    """
    cat_names: Tuple[str, ...] = ()
    cont_names: Tuple[str, ...] = ()
    procs: Tuple[str, ...] = PROC_NAMES
    classes: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    fill_values: Dict[str, float] = field(default_factory=dict)
    fill_strategy: str = "median"
    fill_val: float = 0.0
    add_col: bool = True
    means: Dict[str, float] = field(default_factory=dict)
    stds: Dict[str, float] = field(default_factory=dict)
    y_names: Tuple[str, ...] = ()
    y_kind: Optional[str] = None
    y_classes: Optional[Tuple[Any, ...]] = None

    @property
    def fill(self) -> bool:
        "Whether FillMissing is one of the procs."
        return "FillMissing" in self.procs

    @property
    def normalize(self) -> bool:
        "Whether Normalize is one of the procs."
        return "Normalize" in self.procs

    @property
    def na_names(self) -> Tuple[str, ...]:
        "FillMissing's indicator columns ``<col>_na``, in `cont_names` order."
        return tuple(f"{c}_na" for c in self.cont_names if c in self.fill_values) if self.add_col else ()

    @property
    def all_cat_names(self) -> Tuple[str, ...]:
        "Categorical columns of the model: `cat_names` then `na_names` (fastai's ``cat_names`` after procs)."
        return self.cat_names + self.na_names

    @property
    def col_names(self) -> Tuple[str, ...]:
        "All model columns: `all_cat_names` then `cont_names` (fastai's ``col_names``)."
        return self.all_cat_names + self.cont_names

    def to_dict(self) -> Dict[str, Any]:
        "The state as a JSON-compatible dict (lists, str, int, float, bool, None)."
        return {"cat_names": list(self.cat_names), "cont_names": list(self.cont_names), "procs": list(self.procs),
                "classes": {k: list(v) for k, v in self.classes.items()},
                "fill_values": {k: _jfloat(v) for k, v in self.fill_values.items()},
                "fill_strategy": self.fill_strategy, "fill_val": _jfloat(self.fill_val), "add_col": self.add_col,
                "means": {k: _jfloat(v) for k, v in self.means.items()},
                "stds": {k: _jfloat(v) for k, v in self.stds.items()},
                "y_names": list(self.y_names), "y_kind": self.y_kind,
                "y_classes": None if self.y_classes is None else list(self.y_classes)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "tabular state") -> "TabularState":
        "Validate a dict written by `to_dict` and build the state; raises ``FormatError``."
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(d).__name__}")
        names = {k: _str_list(d, k, where) for k in ("cat_names", "cont_names", "procs", "y_names")}
        maps = {k: _dict_of(d, k, where) for k in ("classes", "fill_values", "means", "stds")}
        st = cls(cat_names=names["cat_names"], cont_names=names["cont_names"], procs=names["procs"],
                 classes={k: tuple(v) for k, v in maps["classes"].items()},
                 fill_values={k: _ufloat(v) for k, v in maps["fill_values"].items()},
                 fill_strategy=d.get("fill_strategy", "median"), fill_val=_ufloat(d.get("fill_val", 0.0)),
                 add_col=bool(d.get("add_col", True)),
                 means={k: _ufloat(v) for k, v in maps["means"].items()},
                 stds={k: _ufloat(v) for k, v in maps["stds"].items()},
                 y_names=names["y_names"], y_kind=d.get("y_kind"),
                 y_classes=None if d.get("y_classes") is None else tuple(d["y_classes"]))
        st._validate(where)
        return st

    def _validate(self, where: str) -> None:
        bad = [p for p in self.procs if p not in PROC_NAMES]
        if bad:
            raise FormatError(f"{where}: expected procs among {PROC_NAMES}, found {bad}")
        for c in self.all_cat_names:
            cl = self.classes.get(c)
            if not isinstance(cl, tuple) or not cl or cl[0] != NA_CLASS:
                raise FormatError(f"{where}: expected classes ['{NA_CLASS}', ...] for categorical column {c!r}, "
                                  f"found {cl!r:.100}")
        if self.normalize and not set(self.cont_names) <= set(self.means) & set(self.stds):
            raise FormatError(f"{where}: expected means and stds for every continuous column {list(self.cont_names)}, "
                              f"found means for {sorted(self.means)}, stds for {sorted(self.stds)}")
        if self.y_kind not in (None, "category", "float"):
            raise FormatError(f"{where}: expected y_kind 'category', 'float' or null, found {self.y_kind!r}")
        if self.y_kind == "category" and self.y_classes is None:
            raise FormatError(f"{where}: expected y_classes for categorical targets, found null")


def _str_list(d: dict, key: str, where: str) -> Tuple[str, ...]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise FormatError(f"{where}: expected {key!r} to be a list of strings, found {v!r:.100}")
    return tuple(v)


def _dict_of(d: dict, key: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise FormatError(f"{where}: expected {key!r} to be a JSON object, found {type(v).__name__}")
    return v


def read_tabular_json(path: Union[str, Path]) -> Tuple[Dict[str, Any], TabularState]:
    """Read ``path/tabular.json`` of a tabular store: returns ``(document, state)``.

    Raises ``StoreNotFoundError`` if the file is missing, ``FormatError`` if it is not a version-1
    tabular document or its state is malformed.
    """
    fp = Path(path) / STATE_NAME
    try:
        doc = json.loads(fp.read_bytes().decode("utf8"))
    except FileNotFoundError:
        raise StoreNotFoundError(f"{fp}: not found; expected a tabular store written by tabular_to_memmap") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{fp}: expected UTF-8 JSON, found unparsable content ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != TABULAR_FORMAT:
        raise FormatError(f"{fp}: expected format {TABULAR_FORMAT!r}, found {doc.get('format') if isinstance(doc, dict) else doc!r:.80}")
    if doc.get("version") != TABULAR_VERSION:
        raise FormatError(f"{fp}: expected version {TABULAR_VERSION}, found {doc.get('version')!r}; "
                          "written by a newer fastai_memmap? upgrade the package")
    if not isinstance(doc.get("rows"), int):
        raise FormatError(f"{fp}: expected an integer 'rows', found {doc.get('rows')!r:.50}")
    return doc, TabularState.from_dict(doc.get("state"), where=str(fp))


# ------------------------------------------------------------------------------------------ sources
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
    if columns is not None and "usecols" not in kw:
        header = pd.read_csv(path, nrows=0, **kw).columns
        missing = [c for c in columns if c not in header]
        if missing:
            raise ColumnNotFoundError(f"{path}: expected column(s) {missing} in the CSV header, found {list(header)[:20]}")
        kw["usecols"] = list(columns)
    with pd.read_csv(path, chunksize=chunksize, **kw) as reader:
        for df in reader:
            yield df
            del df


def _json_records(path: Path) -> Iterator[dict]:
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


def _count_rows(source: Any, file_format: Optional[str]) -> Optional[int]:
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


# ------------------------------------------------------------------------------------------ columns
def _native(v: Any, name: str) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (str, bool, int, float)):
        return v
    raise ColumnTypeError(f"column {name!r}: expected category values of type str, int, float or bool, found "
                          f"{v!r:.50} ({type(v).__name__}); convert the column first")


def _kind(v: Any) -> str:
    return "text" if isinstance(v, str) else "number"


def _factorize(s: pd.Series, name: str) -> Tuple[np.ndarray, List[Any]]:
    "Codes (int64, -1 for missing) into the distinct values (native Python) of one chunk of a column."
    if is_categorical_dtype(s):
        s = s.astype(object)
    codes, uniques = pd.factorize(s, sort=False)
    return codes.astype(np.int64, copy=False), [_native(u, name) for u in uniques]


def _apply_lut(codes: np.ndarray, lut: np.ndarray, missing: int) -> np.ndarray:
    out = np.full(len(codes), missing, np.int64)
    ok = codes >= 0
    out[ok] = lut[codes[ok]]
    return out


def _cont_column(s: pd.Series, name: str) -> np.ndarray:
    "float64 values of a continuous column (NaN for missing); raises ColumnTypeError for text and other types."
    if is_numeric_dtype(s) or is_bool_dtype(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if is_object_dtype(s):
        vals = s.to_numpy(dtype=object)
        bad = next((v for v in vals if not (v is None or isinstance(v, (int, float, np.number, np.bool_)))), None)
        if bad is None:
            return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        found = f"{bad!r:.50} ({type(bad).__name__})"
    else:
        found = f"dtype {s.dtype}"
    raise ColumnTypeError(f"column {name!r}: expected numbers (or missing values) in a continuous column, found "
                          f"{found}; fix the data, or list {name!r} in cat_names")


def _cont_matrix(df: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    out = np.empty((len(df), len(names)), np.float64)
    for j, c in enumerate(names):
        out[:, j] = _cont_column(df[c], c)
    return out


def _check_columns(df: pd.DataFrame, names: Sequence[str], where: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise ColumnNotFoundError(f"{where}: expected column(s) {missing}, found columns {list(df.columns)[:20]}")


class _Vocab:
    "Distinct values of one categorical column numbered in order of appearance (provisional codes)."

    def __init__(self, name: str):
        self.name, self.ids, self.values, self.in_train = name, {}, [], []
        self.kind: Optional[str] = None
        self.saw_float = False

    def encode(self, s: pd.Series, train: np.ndarray) -> np.ndarray:
        "Provisional codes (int64, -1 missing) of one chunk; records which values occur in training rows."
        codes, uniques = _factorize(s, self.name)
        lut = np.empty(len(uniques), np.int64)
        for i, v in enumerate(uniques):
            self._check_kind(v)
            j = self.ids.get(v)
            if j is None:
                j = self.ids[v] = len(self.values)
                self.values.append(v)
                self.in_train.append(False)
            lut[i] = j
        prov = _apply_lut(codes, lut, -1)
        for j in np.unique(prov[train & (prov >= 0)]):
            self.in_train[j] = True
        return prov

    def _check_kind(self, v: Any) -> None:
        self.saw_float |= isinstance(v, float)
        if self.kind is None:
            self.kind, self.example = _kind(v), v
        elif _kind(v) != self.kind:
            raise ColumnTypeError(f"column {self.name!r}: expected values of one kind, found text and numbers "
                                  f"({self.example!r:.30} and {v!r:.30}); for a CSV pass "
                                  f"read_kwargs={{'dtype': {{{self.name!r}: str}}}}")

    def finish(self) -> Tuple[Tuple[Any, ...], np.ndarray]:
        "(classes, lut): sorted training values (floats if any chunk was float), provisional -> 1-based code."
        vals = [v for v, t in zip(self.values, self.in_train) if t]
        if self.saw_float and self.kind == "number":
            vals = [float(v) for v in vals]
        vals = sorted(vals)
        code = {v: i + 1 for i, v in enumerate(vals)}
        return (NA_CLASS, *vals), np.array([code.get(v, 0) for v in self.values], np.int64)


class _ClassMap:
    "Encodes values with fitted classes: `unknown` for missing or unseen values, type checked."

    def __init__(self, name: str, values: Sequence[Any], start: int, unknown: int):
        self.name, self.unknown = name, unknown
        self.code = {v: i + start for i, v in enumerate(values)}
        self.kind = _kind(values[0]) if len(values) else None

    def encode(self, s: pd.Series) -> np.ndarray:
        codes, uniques = _factorize(s, self.name)
        lut = np.array([self._code(v) for v in uniques], np.int64)
        return _apply_lut(codes, lut, self.unknown)

    def _code(self, v: Any) -> int:
        if self.kind is not None and _kind(v) != self.kind:
            raise ColumnTypeError(f"column {self.name!r}: expected a {self.kind} category as in training, found "
                                  f"{v!r:.50} ({type(v).__name__})")
        return self.code.get(v, self.unknown)


def _na_tables(state: TabularState) -> List[Tuple[int, int]]:
    "(code of False, code of True) of each indicator column, 0 where the class was not seen in training."
    out = []
    for n in state.na_names:
        cl = state.classes[n]
        out.append(tuple(next((i for i, c in enumerate(cl) if i and c is v), 0) for v in (False, True)))
    return out


def encode_conts(raw: np.ndarray, state: TabularState, where: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Apply FillMissing and Normalize of `state` to raw continuous values.

    `raw` is float64 ``(n, len(cont_names))`` with NaN for missing values; it is modified in place.
    Returns ``(na_codes, conts)``: int64 ``(n, len(na_names))`` indicator codes and float32
    ``(n, len(cont_names))`` values (new arrays). Raises ``ColumnValueError`` for a missing value in a
    column that had none in training (FillMissing has no fill value for it).
    """
    tables = _na_tables(state)
    na = np.zeros((len(raw), len(tables)), np.int64)
    i = 0
    for j, c in enumerate(state.cont_names):
        miss = np.isnan(raw[:, j])
        if c in state.fill_values:
            if state.add_col:
                na[:, i] = np.where(miss, tables[i][1], tables[i][0])
                i += 1
            raw[miss, j] = state.fill_values[c]
        elif state.fill and miss.any():
            raise ColumnValueError(f"{where}column {c!r}: missing value(s), but the training rows had none, so "
                                   "FillMissing has no fill value (nor a {c}_na column) for it; supply a value")
    if state.normalize and len(state.cont_names):
        m = np.array([state.means[c] for c in state.cont_names])
        s = np.array([state.stds[c] for c in state.cont_names])
        raw = (raw - m) / (EPS + s)
    return na, raw.astype(np.float32)


def encode_frame(df: pd.DataFrame, state: TabularState, maps: Optional[List["_ClassMap"]] = None,
                 where: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Encode raw rows with a fitted `state`: ``(cats, conts)``, int64 ``(n, n_cat)`` and float32 ``(n, n_cont)``.

    Unknown or missing categories get 0 (``'#na#'``). Raises ``ColumnNotFoundError``,
    ``ColumnTypeError``, ``ColumnValueError``.
    """
    _check_columns(df, state.cat_names + state.cont_names, where.rstrip(": ") or "rows")
    maps = maps if maps is not None else cat_maps(state)
    cats = np.empty((len(df), len(state.cat_names)), np.int64)
    for j, (c, m) in enumerate(zip(state.cat_names, maps)):
        cats[:, j] = m.encode(df[c])
    na, conts = encode_conts(_cont_matrix(df, state.cont_names), state, where)
    return np.concatenate([cats, na], 1), conts


def cat_maps(state: TabularState) -> List[_ClassMap]:
    "One value -> code map per source categorical column of `state` (0 for unknown)."
    return [_ClassMap(c, state.classes[c][1:], 1, 0) for c in state.cat_names]


# ------------------------------------------------------------------------------------------ statistics
class _Moments:
    "Count, mean and sum of squared deviations per column, merged chunk by chunk (Chan, Golub, LeVeque)."

    def __init__(self, k: int):
        self.n, self.mean, self.m2 = np.zeros(k), np.zeros(k), np.zeros(k)

    def add(self, j: int, x: np.ndarray) -> None:
        if len(x):
            mb = x.mean()
            self.merge(j, len(x), mb, float(((x - mb) ** 2).sum()))

    def merge(self, j: int, nb: float, mb: float, m2b: float) -> None:
        na = self.n[j]
        n = na + nb
        d = mb - self.mean[j]
        self.mean[j] += d * nb / n
        self.m2[j] += m2b + d * d * na * nb / n
        self.n[j] = n

    def std(self, j: int) -> float:
        return float(np.sqrt(self.m2[j] / (self.n[j] - 1))) if self.n[j] > 1 else float("nan")


def _float_keys(x: np.ndarray) -> np.ndarray:
    "Order-preserving map of non-NaN float64 to uint64: a < b  <=>  key(a) < key(b)."
    b = x.view(np.uint64)
    return np.where(b >> np.uint64(63) == 1, ~b, b | _SIGN)


def _key_float(k: np.uint64) -> float:
    b = np.uint64(k)
    b = b & ~_SIGN if b >> np.uint64(63) == 1 else ~b
    return float(np.array([b], np.uint64).view(np.float64)[0])


class _RankSelector:
    """Exact `k`-th smallest (0-based) of `n` uint64 keys streamed in passes, at most `budget` kept in RAM.

    Each histogram pass fixes the next `RADIX_BITS` bits of the answer; once the keys sharing the fixed
    prefix number at most `budget`, one last pass collects them and ``np.partition`` finishes.
    """

    def __init__(self, k: int, n: int, budget: int):
        self.k, self.n, self.budget = k, n, budget
        self.prefix, self.bits, self.result = np.uint64(0), 0, None
        self._start()

    def _start(self) -> None:
        self.collect = self.n <= self.budget
        self.parts: List[np.ndarray] = []
        self.hist = np.zeros(1 << RADIX_BITS, np.int64)

    def feed(self, keys: np.ndarray) -> None:
        if self.bits:
            keys = keys[keys >> np.uint64(64 - self.bits) == self.prefix]
        if self.collect:
            self.parts.append(keys)
        else:
            digit = (keys >> np.uint64(64 - self.bits - RADIX_BITS)) & np.uint64((1 << RADIX_BITS) - 1)
            self.hist += np.bincount(digit.astype(np.intp), minlength=1 << RADIX_BITS)

    def end_pass(self) -> bool:
        "Finish a pass; True once `result` (a uint64 key) is known."
        if self.collect:
            a = np.concatenate(self.parts)
            self.result = np.partition(a, self.k)[self.k]
            return True
        cum = np.cumsum(self.hist)
        b = int(np.searchsorted(cum, self.k, side="right"))
        self.k -= int(cum[b - 1]) if b else 0
        self.n = int(self.hist[b])
        self.prefix = (self.prefix << np.uint64(RADIX_BITS)) | np.uint64(b)
        self.bits += RADIX_BITS
        if self.bits == 64:          # every remaining key equals the prefix
            self.result = self.prefix
            return True
        self._start()
        return False


# ------------------------------------------------------------------------------------------ staging
class _Scratch:
    "Raw columns of the first pass in plain files, appended per chunk and re-read in row chunks (no mmap: RSS stays flat)."

    def __init__(self, folder: Path, layout: Dict[str, Tuple[Any, Optional[int]]]):
        "`layout`: name -> (dtype, columns), columns None for a 1-d array."
        self.layout = {k: (np.dtype(d), w) for k, (d, w) in layout.items()}
        self.files = {k: open(folder / f"_scratch_{k}.bin", "x+b") for k in layout}
        self.rows = 0

    def append(self, n: int, **arrays: np.ndarray) -> None:
        for k, a in arrays.items():
            dt, w = self.layout[k]
            a = np.ascontiguousarray(a, dtype=dt)
            if a.size:
                self.files[k].write(memoryview(a).cast("B"))
        self.rows += n

    def chunks(self, names: Sequence[str], rows: int) -> Iterator[Tuple[np.ndarray, ...]]:
        for k in names:
            self.files[k].flush()
            self.files[k].seek(0)
        for start in range(0, self.rows, rows):
            n = min(rows, self.rows - start)
            yield tuple(self._read(k, n) for k in names)

    def _read(self, k: str, n: int) -> np.ndarray:
        dt, w = self.layout[k]
        a = np.empty((n,) if w is None else (n, w), dt)
        if a.size and self.files[k].readinto(memoryview(a).cast("B")) != a.nbytes:
            raise FormatError(f"{self.files[k].name}: staged file shorter than {self.rows} rows (disk full?)")
        return a

    def close(self) -> None:
        for f in self.files.values():
            f.close()
            os.unlink(f.name)


class _Staging:
    "The hidden directory a tabular store is built in, renamed to `out` on success, removed on failure."

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.dir: Optional[Path] = None
        self._lock = None

    def __enter__(self) -> "_Staging":
        parent = self.out.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"{self.out}: parent directory {parent} does not exist")
        self._lock = _take_lock(parent / f".{self.out.name}.lock", self.out)
        try:
            if self.out.exists() and not self.overwrite:
                raise StoreExistsError(f"{self.out}: exists already; pass overwrite=True to replace it")
            _clean_stale(parent, self.out.name)
            self.dir = parent / f".{self.out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.dir.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def commit(self, doc: Dict[str, Any]) -> None:
        try:
            text = json.dumps(doc, indent=1, allow_nan=False)
        except ValueError as e:
            raise TabularError(f"{self.out}: state not representable as JSON ({e})") from None
        for lock in self.dir.glob(".*.lock"):     # the sub-stores' writer locks: private to the staging dir
            lock.unlink()
        _write_fsync(self.dir / STATE_NAME, text.encode("utf8"))
        _fsync_dir(self.dir)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.dir, self.out)
        self.dir = None
        _fsync_dir(self.out.parent)
        if old is not None:
            _remove(old)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class _Bar:
    "A fastprogress bar over rows (nothing when disabled or the total is unknown)."

    def __init__(self, total: Optional[int], on: bool, comment: str = ""):
        self.total, self.pb, self.on = total, None, on
        if on and total:
            from fastprogress.fastprogress import progress_bar
            self.pb = progress_bar(range(total))
            self.pb.comment = comment
            self.pb.update(0)

    def update(self, done: int) -> None:
        if self.pb is not None:
            self.pb.update(min(done, self.total))

    def close(self) -> None:
        if self.pb is not None:
            self.pb.on_iter_end()


# ------------------------------------------------------------------------------------------ arguments
def _parse_procs(procs: Sequence[Any]) -> Dict[str, Any]:
    "Names and FillMissing options of fastai procs given as classes, instances or ``functools.partial``."
    names, opts = [], {"fill_strategy": "median", "fill_val": 0.0, "add_col": True}
    for p in procs:
        cls, kw = (p.func, dict(p.keywords)) if isinstance(p, functools.partial) else \
                  (p, {}) if isinstance(p, type) else (type(p), dict(vars(p)))
        name = next((n for n, c in _PROC_CLASSES.items() if isinstance(cls, type) and issubclass(cls, c)), None)
        if name is None or name in names:
            raise TabularError(f"procs: expected each of FillMissing, Categorify, Normalize at most once, found {p!r:.80}")
        names.append(name)
        if name == "FillMissing":
            strat = kw.get("fill_strategy", FillStrategy.MEDIAN)
            if strat not in (FillStrategy.MEDIAN, FillStrategy.CONSTANT):
                raise TabularError(f"procs: FillMissing fill_strategy {strat!r} is not supported out of core; "
                                   "use FillStrategy.MEDIAN (exact) or FillStrategy.CONSTANT")
            opts.update(fill_strategy="median" if strat == FillStrategy.MEDIAN else "constant",
                        fill_val=float(kw.get("fill_val", 0.0)), add_col=bool(kw.get("add_col", True)))
    if "Normalize" in names and "FillMissing" in names and names.index("Normalize") < names.index("FillMissing"):
        raise TabularError("procs: expected FillMissing before Normalize (fastai's order); found Normalize first")
    return {"procs": tuple(names), **opts}


def _names(x: Any, what: str) -> Tuple[str, ...]:
    if x is None:
        return ()
    x = (x,) if isinstance(x, str) else tuple(x)
    if not all(isinstance(c, str) for c in x):
        raise TabularError(f"{what}: expected column names (str), found {list(x)!r:.100}")
    return x


class _Split:
    "Which rows are validation rows (excluded from fitting), decided chunk by chunk."

    def __init__(self, valid_idx: Any, valid_pct: Optional[float], valid_col: Optional[str], seed: Optional[int]):
        given = [n for n, v in (("valid_idx", valid_idx), ("valid_pct", valid_pct), ("valid_col", valid_col)) if v is not None]
        if len(given) > 1:
            raise TabularError(f"expected at most one of valid_idx, valid_pct, valid_col; found {given}")
        self.idx = self.pct = self.col = None
        self.doc: Dict[str, Any] = {"by": None}
        if valid_idx is not None:
            a = np.asarray(valid_idx)
            if a.size and (a.dtype.kind not in "iu" or a.ndim != 1 or a.min() < 0):
                raise TabularError(f"valid_idx: expected non-negative integer row numbers, found dtype {a.dtype} shape {a.shape}")
            self.idx, self.doc = np.unique(a.astype(np.int64)), {"by": "valid_idx"}
        elif valid_pct is not None:
            if not 0 <= valid_pct < 1:
                raise TabularError(f"valid_pct: expected a fraction in [0, 1), found {valid_pct!r}")
            seed = int(np.random.SeedSequence().entropy % (1 << 63)) if seed is None else int(seed)
            self.pct, self.rng, self.doc = float(valid_pct), np.random.default_rng(seed), \
                {"by": "valid_pct", "valid_pct": float(valid_pct), "seed": seed}
        elif valid_col is not None:
            self.col, self.doc = valid_col, {"by": "valid_col", "valid_col": valid_col}

    @property
    def given(self) -> bool:
        return self.doc["by"] is not None

    def mask(self, df: pd.DataFrame, start: int) -> np.ndarray:
        "Boolean (len(df),): True for validation rows of the chunk starting at global row `start`."
        n = len(df)
        if self.idx is not None:
            m = np.zeros(n, bool)
            lo, hi = np.searchsorted(self.idx, [start, start + n])
            m[self.idx[lo:hi] - start] = True
            return m
        if self.pct is not None:
            return self.rng.random(n) < self.pct
        if self.col is not None:
            s = df[self.col]
            if not (is_bool_dtype(s) or is_numeric_dtype(s) or is_object_dtype(s)):
                raise ColumnTypeError(f"valid_col {self.col!r}: expected booleans, found dtype {s.dtype}")
            return s.fillna(False).to_numpy().astype(bool)
        return np.zeros(n, bool)

    def check_end(self, rows: int) -> None:
        if self.idx is not None and len(self.idx) and self.idx[-1] >= rows:
            raise TabularError(f"valid_idx: expected row numbers < {rows} (the source's row count), found {self.idx[-1]}")


# ------------------------------------------------------------------------------------------ converter
def tabular_to_memmap(source: Any, out: Union[str, Path], cat_names: Optional[Sequence[str]] = None,
                      cont_names: Optional[Sequence[str]] = None, y_names: Union[str, Sequence[str], None] = None,
                      procs: Sequence[Any] = (FillMissing, Categorify, Normalize), chunksize: int = DEFAULT_CHUNKSIZE,
                      *, valid_idx: Any = None, valid_pct: Optional[float] = None, valid_col: Optional[str] = None,
                      seed: Optional[int] = None, y_kind: Optional[str] = None,
                      state: Union[TabularState, str, Path, None] = None, file_format: Optional[str] = None,
                      read_kwargs: Optional[Dict[str, Any]] = None, overwrite: bool = False, progress: bool = True,
                      total: Optional[int] = None) -> Path:
    """Process a table out of core as fastai's ``TabularList`` would, and write it as a tabular store.

    Parameters
    ----------
    source : DataFrame, CSV or JSON-lines path, iterable of DataFrames, or iterable of dicts
        See `iter_frames`. Read once, `chunksize` rows at a time (a generator works).
    out : str or Path
        The tabular store directory to create (layout in the module docstring).
    cat_names, cont_names : sequence of str
        Categorical and continuous columns (``<col>_na`` indicators are added by FillMissing).
    y_names : str or sequence of str, optional
        Target column(s); None writes no targets.
    procs : sequence
        fastai's ``FillMissing``, ``Categorify``, ``Normalize`` (classes, instances or
        ``functools.partial``, e.g. ``partial(FillMissing, fill_strategy=FillStrategy.CONSTANT)``).
        Categorify is required when there are categorical columns.
    chunksize : int
        Rows per chunk; memory use grows with it (and with the number of distinct categories).
    valid_idx, valid_pct, valid_col : optional, at most one
        Validation rows, excluded from fitting and saved in ``out/valid``: row numbers; a random
        fraction (with `seed`; the draw does not depend on `chunksize`); or a boolean column.
    y_kind : {'category', 'float'}, optional
        Classification or regression; default: 'float' for several targets or a float target column
        in the first chunk (fastai's rule), else 'category'.
    state : TabularState, TabularStore or path of a tabular store, optional
        Apply this fitted state instead of fitting (e.g. a test set): cat/cont names and procs come from
        it (`cat_names`/`cont_names` must be None or the same), `y_names` must be its targets or None.
    file_format : {'csv', 'jsonl'}, optional
        For a path source; default from the suffix.
    read_kwargs : dict, optional
        Extra ``pd.read_csv`` arguments. pandas' default float parser may differ from the written
        text in the last bit; ``{'float_precision': 'round_trip'}`` reads floats exactly.
    overwrite : bool
        Replace an existing `out` (atomically).
    progress, total : bool, int
        Show fastprogress bars over rows. The total comes from `total`, the DataFrame or list length,
        or a count of the file's lines (one fast extra read); a generator without `total` gets no bar.

    Returns
    -------
    Path
        `out`.

    Raises
    ------
    TabularError
        Bad procs, split or column lists.
    ColumnNotFoundError (a KeyError)
        A listed column is missing from the source.
    ColumnTypeError (a TypeError)
        Text in a continuous column, text and numbers mixed in a categorical column...
    ColumnValueError
        A continuous column with no training value (median undefined), or missing values in a column
        that had none in training.
    StoreExistsError, WriterConflictError, StoreWriteError, SourceNotFoundError, FormatError
        As the writer and readers do. On any error nothing is written at `out`.
    """
    out = Path(out)
    split = _Split(valid_idx, valid_pct, valid_col, seed)
    if state is not None:
        state = _load_state(state)
        for what, given, fitted in (("cat_names", cat_names, state.cat_names), ("cont_names", cont_names, state.cont_names)):
            if given is not None and _names(given, what) != fitted:
                raise TabularError(f"{what}: expected the fitted {list(fitted)} (or None) with state=, found {list(given)}")
        job: Any = _Apply(state, _names(y_names, "y_names"), split)
    else:
        job = _Fit(_names(cat_names, "cat_names"), _names(cont_names, "cont_names"), _names(y_names, "y_names"),
                   _parse_procs(procs), y_kind, split, chunksize)
    total = total if total is not None else (_count_rows(source, file_format) if progress else None)
    frames = iter_frames(source, chunksize, file_format, read_kwargs, job.columns)
    with _Staging(out, overwrite) as stage:
        rows, st = job.run(frames, stage.dir, _Bar(total, progress))
        stage.commit({"format": TABULAR_FORMAT, "version": TABULAR_VERSION, "rows": rows,
                      "n_valid": job.n_valid, "split": split.doc, "state": st.to_dict()})
    return out


def _load_state(state: Any) -> TabularState:
    "A `TabularState`, the state of an open `TabularStore`, or the state saved in a store directory."
    if isinstance(getattr(state, "state", None), TabularState):
        return state.state
    return state if isinstance(state, TabularState) else read_tabular_json(state)[1]


class _Writers:
    "The final sub-stores of a tabular store, written in the staging directory; a context manager."

    def __init__(self, folder: Path):
        self.folder, self.stack = folder, ExitStack()
        self.cats = self.conts = self.y = self.valid = None

    def __enter__(self) -> "_Writers":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.__exit__(*exc)

    def _open(self, name: str, dtype: Any, shape: Tuple[int, ...], meta: Dict[str, Any]) -> MemmapWriter:
        return self.stack.enter_context(MemmapWriter(self.folder / name, dtype, shape, meta=meta))

    def open_x(self, st: TabularState) -> None:
        self.cats = self._open("cats", np.int64, (len(st.all_cat_names),), {"names": list(st.all_cat_names)})
        self.conts = self._open("conts", np.float32, (len(st.cont_names),), {"names": list(st.cont_names)})

    def open_y(self, y_names: Sequence[str], y_kind: str, y_classes: Optional[Sequence[Any]]) -> None:
        if y_kind == "category":
            self.y = self._open("y", np.int64, (), {"classes": list(y_classes), "names": list(y_names)})
        else:
            self.y = self._open("y", np.float32, () if len(y_names) == 1 else (len(y_names),), {"names": list(y_names)})

    def open_valid(self) -> None:
        self.valid = self._open("valid", np.int64, (), {})

    def add_valid(self, split: _Split, df: pd.DataFrame, start: int, valid: Optional[np.ndarray] = None) -> int:
        "Append the validation rows of a chunk; returns how many."
        if self.valid is None:
            return 0
        v = np.flatnonzero(split.mask(df, start) if valid is None else valid) + start
        self.valid.append(v)
        return len(v)


class _Apply:
    "One pass: encode every chunk with an already fitted state (test sets)."

    def __init__(self, state: TabularState, y_names: Tuple[str, ...], split: _Split):
        if y_names and y_names != state.y_names:
            raise TabularError(f"y_names: expected the fitted targets {list(state.y_names)} or None, found {list(y_names)}")
        if y_names and state.y_kind is None:
            raise TabularError("y_names: the fitted state has no targets to encode")
        self.state, self.y_names, self.split, self.n_valid = state, y_names, split, 0
        self.columns = list(dict.fromkeys(state.cat_names + state.cont_names + y_names + ((split.col,) if split.col else ())))

    def run(self, frames: Iterator[pd.DataFrame], folder: Path, bar: _Bar) -> Tuple[int, TabularState]:
        st, maps, start = self.state, cat_maps(self.state), 0
        ymap = _ClassMap(st.y_names[0], st.y_classes, 0, -1) if self.y_names and st.y_kind == "category" else None
        with _Writers(folder) as w:
            w.open_x(st)
            if self.y_names:
                w.open_y(st.y_names, st.y_kind, st.y_classes)
            if self.split.given:
                w.open_valid()
            for df in frames:
                where = f"rows {start}..{start + len(df) - 1}: "
                _check_columns(df, self.columns, where.rstrip(": "))
                cats, conts = encode_frame(df, st, maps, where)
                w.cats.append(cats)
                w.conts.append(conts)
                if self.y_names:
                    w.y.append(ymap.encode(df[st.y_names[0]]) if ymap else _y_floats(df, st.y_names))
                self.n_valid += w.add_valid(self.split, df, start)
                start += len(df)
                bar.update(start)
                del df
            bar.close()
            self.split.check_end(start)
        return start, st


def _y_floats(df: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    a = _cont_matrix(df, names).astype(np.float32)
    return a[:, 0] if len(names) == 1 else a


class _Fit:
    """Pass 1 reads the source once: provisional category codes, raw floats and the train mask are staged
    on disk while vocabularies and null counts accumulate. Then the state is fitted from the staged values
    (medians by radix selection, then means and stds) and pass 2 turns the staged rows into the final stores."""

    def __init__(self, cat_names, cont_names, y_names, opts, y_kind, split: _Split, chunksize: int):
        if not cat_names and not cont_names:
            raise TabularError("expected at least one column in cat_names or cont_names, found none")
        if cat_names and "Categorify" not in opts["procs"]:
            raise TabularError("procs: Categorify is required with categorical columns (the store keeps codes)")
        if y_kind not in (None, "category", "float") or (y_kind == "category" and len(y_names) > 1):
            raise TabularError(f"y_kind: expected 'category' (one target) or 'float', found {y_kind!r} for {list(y_names)}")
        dup = set(cat_names) & set(cont_names) | ({f"{c}_na" for c in cont_names} & set(cat_names + cont_names))
        if dup or len(set(cat_names)) < len(cat_names) or len(set(cont_names)) < len(cont_names):
            raise TabularError(f"expected distinct column names (and no '<cont>_na' among them), found duplicates {sorted(dup)}")
        self.cat_names, self.cont_names, self.y_names, self.opts = cat_names, cont_names, y_names, opts
        self.y_kind, self.split, self.chunksize = y_kind, split, chunksize
        self.columns = list(dict.fromkeys(cat_names + cont_names + y_names + ((split.col,) if split.col else ())))
        k = len(cont_names)
        self.vocabs = [_Vocab(c) for c in cat_names]
        self.yvocab = _Vocab(y_names[0]) if y_names else None
        self.n_train = 0
        self.nulls = {"train": np.zeros(k, np.int64), "valid": np.zeros(k, np.int64)}
        self.n_valid = 0

    # -------------------------------------------------------------- pass 1
    def run(self, frames: Iterator[pd.DataFrame], folder: Path, bar: _Bar) -> Tuple[int, TabularState]:
        layout = {"cats": (np.int64, len(self.cat_names)), "conts": (np.float64, len(self.cont_names)),
                  "y": (np.int64, None), "train": (np.bool_, None)}
        scratch = _Scratch(folder, layout)
        try:
            with _Writers(folder) as w:
                if self.split.given:
                    w.open_valid()
                start = 0
                for df in frames:
                    self._chunk(df, start, scratch, w)
                    start += len(df)
                    bar.update(start)
                    del df
                bar.close()
                self.split.check_end(start)
                st, luts = self._fit(scratch)
                self._write(scratch, st, luts, w, bar.on)
        finally:
            scratch.close()
        return start, st

    def _chunk(self, df: pd.DataFrame, start: int, scratch: _Scratch, w: _Writers) -> None:
        _check_columns(df, self.columns, f"rows {start}..{start + len(df) - 1}")
        valid = self.split.mask(df, start)
        train = ~valid
        cats = np.empty((len(df), len(self.cat_names)), np.int64)
        for j, v in enumerate(self.vocabs):
            cats[:, j] = v.encode(df[v.name], train)
        raw = _cont_matrix(df, self.cont_names)
        miss = np.isnan(raw)
        self.nulls["train"] += miss[train].sum(0)
        self.nulls["valid"] += miss[valid].sum(0)
        self.n_train += int(train.sum())
        y = self._y_chunk(df, train, w)
        scratch.append(len(df), cats=cats, conts=raw, y=y, train=train)
        self.n_valid += w.add_valid(self.split, df, start, valid)

    def _y_chunk(self, df: pd.DataFrame, train: np.ndarray, w: _Writers) -> np.ndarray:
        if not self.y_names:
            return np.zeros(0, np.int64)
        if self.y_kind is None:   # fastai's rule: the first label decides
            first = df[self.y_names[0]]
            self.y_kind = "float" if len(self.y_names) > 1 or first.dtype.kind == "f" else "category"
        if self.y_kind == "float":
            if w.y is None:
                w.open_y(self.y_names, "float", None)
            w.y.append(_y_floats(df, self.y_names))
            return np.zeros(0, np.int64)
        return self.yvocab.encode(df[self.y_names[0]], train)

    # -------------------------------------------------------------- fit
    def _fit(self, scratch: _Scratch) -> Tuple[TabularState, Dict[str, Any]]:
        classes, luts = {}, {}
        for v in self.vocabs:
            classes[v.name], luts[v.name] = v.finish()
        fills = self._fill_values(scratch)
        if self.opts["add_col"]:
            for c in self.cont_names:
                if c in fills:
                    has_value = self._values(self.cont_names.index(c)) > 0
                    classes[f"{c}_na"] = (NA_CLASS, False, True) if has_value else (NA_CLASS, True)
        means, stds = self._norm_stats(scratch, fills)
        y_classes = None
        if self.y_kind == "category":
            yc, luts["__y__"] = self.yvocab.finish()
            y_classes = yc[1:]
            luts["__y__"] = luts["__y__"] - 1          # 0-based class codes, -1 = not a training class
        st = TabularState(cat_names=self.cat_names, cont_names=self.cont_names, procs=self.opts["procs"],
                          classes=classes, fill_values=fills, fill_strategy=self.opts["fill_strategy"],
                          fill_val=self.opts["fill_val"], add_col=self.opts["add_col"], means=means, stds=stds,
                          y_names=self.y_names, y_kind=self.y_kind if self.y_names else None, y_classes=y_classes)
        st._validate("fitted state")
        return st, luts

    def _fill_values(self, scratch: _Scratch) -> Dict[str, float]:
        if "FillMissing" not in self.opts["procs"]:
            return {}
        need = [j for j, c in enumerate(self.cont_names) if self.nulls["train"][j] > 0]
        for j, c in enumerate(self.cont_names):
            if self.nulls["valid"][j] and j not in need:
                raise ColumnValueError(f"column {c!r}: {self.nulls['valid'][j]} missing value(s) in validation rows "
                                       "but none in training rows, so FillMissing has no fill value for it "
                                       "(fastai raises too); fill them, or change the split")
        if self.opts["fill_strategy"] == "constant":
            return {self.cont_names[j]: self.opts["fill_val"] for j in need}
        empty = [self.cont_names[j] for j in need if self._values(j) == 0]
        if empty:
            raise ColumnValueError(f"column(s) {empty}: every training value is missing, the median is undefined; "
                                   "drop them from cont_names or use FillStrategy.CONSTANT")
        med = _medians(scratch, {j: self._values(j) for j in need}, max(self.chunksize, MIN_SELECT_BUDGET))
        return {self.cont_names[j]: med[j] for j in need}

    def _values(self, j: int) -> int:
        "Non-missing training values of continuous column `j`."
        return self.n_train - int(self.nulls["train"][j])

    def _norm_stats(self, scratch: _Scratch, fills: Dict[str, float]) -> Tuple[Dict[str, float], Dict[str, float]]:
        "Means and stds (ddof=1) of the training values, filled first as fastai's FillMissing does."
        if "Normalize" not in self.opts["procs"]:
            return {}, {}
        mom = _Moments(len(self.cont_names))
        fill = np.array([fills.get(c, np.nan) for c in self.cont_names])
        for raw, train in scratch.chunks(("conts", "train"), STATS_BLOCK_ROWS):
            x = raw[train]
            x = np.where(np.isnan(x), fill, x)
            for j in range(x.shape[1]):
                mom.add(j, x[~np.isnan(x[:, j]), j])
        return ({c: float(mom.mean[j]) for j, c in enumerate(self.cont_names)},
                {c: mom.std(j) for j, c in enumerate(self.cont_names)})

    # -------------------------------------------------------------- pass 2
    def _write(self, scratch: _Scratch, st: TabularState, luts: Dict[str, Any], w: _Writers, progress: bool) -> None:
        w.open_x(st)
        cat_y = self.y_kind == "category"
        if cat_y:
            w.open_y(st.y_names, st.y_kind, st.y_classes)
        bar, done = _Bar(scratch.rows, progress, "writing"), 0
        for cats, raw, *y in scratch.chunks(("cats", "conts") + (("y",) if cat_y else ()), self.chunksize):
            for j, c in enumerate(self.cat_names):
                cats[:, j] = _apply_lut(cats[:, j], luts[c], 0)
            na, conts = encode_conts(raw, st)
            w.cats.append(np.concatenate([cats, na], 1))
            w.conts.append(conts)
            if cat_y:
                w.y.append(_apply_lut(y[0], luts["__y__"], -1))
            done += len(raw)
            bar.update(done)
        bar.close()


def _medians(scratch: _Scratch, counts: Dict[int, int], budget: int) -> Dict[int, float]:
    "Exact medians (pandas' definition) of the non-NaN training values of staged columns `counts` (col -> n)."
    sel = {j: [_RankSelector(k, n, budget) for k in ((n // 2,) if n % 2 else (n // 2 - 1, n // 2))]
           for j, n in counts.items()}
    active = dict(sel)
    while active:
        for raw, train in scratch.chunks(("conts", "train"), STATS_BLOCK_ROWS):
            t = train.astype(bool)
            for j, ss in active.items():
                x = raw[t, j]
                keys = _float_keys(x[~np.isnan(x)])
                for s in ss:
                    if s.result is None:
                        s.feed(keys)
        for j in list(active):
            done = [s.end_pass() if s.result is None else True for s in active[j]]
            if all(done):
                del active[j]
    return {j: float(np.mean([_key_float(s.result) for s in ss])) for j, ss in sel.items()}
