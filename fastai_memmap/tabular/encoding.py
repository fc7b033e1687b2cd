"""Column values to model inputs: type checks, category codes, and FillMissing/Categorify/Normalize
of a fitted `TabularState` applied to raw rows (`encode_frame`, `encode_conts`).

Both passes of `fastai_memmap.tabular.convert.tabular_to_memmap` and ``predict`` on a raw row use these, so a
training row and a row given to ``predict`` are encoded the same way:

- a categorical value is a str, int, float or bool (text and numbers are not mixed in one column);
  its code is its position in the column's classes, 0 (``'#na#'``) when missing or unknown;
- a continuous value is a number or missing (NaN); FillMissing replaces a missing value with the
  fitted fill value (and sets the ``<col>_na`` indicator), Normalize computes ``(x - mean) / (EPS + std)``.
"""
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_categorical_dtype, is_numeric_dtype, is_object_dtype

from ..errors import ColumnNotFoundError, ColumnTypeError, ColumnValueError
from .state import NA_CLASS, TabularState

__all__ = ["encode_frame", "encode_conts", "cat_maps", "EPS"]

EPS = 1e-7                   # fastai's Normalize: (x - mean) / (1e-7 + std)


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


def apply_lut(codes: np.ndarray, lut: np.ndarray, missing: int) -> np.ndarray:
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


def cont_matrix(df: pd.DataFrame, names: Sequence[str], where: str = "", start: int = 0) -> np.ndarray:
    """float64 ``(len(df), len(names))`` of continuous columns, NaN for missing values.

    Raises ``ColumnTypeError`` (text...) and ``ColumnValueError`` for ``inf``/``-inf``: no statistic nor
    model input can use them (a mean of inf, a normalised inf, give NaN predictions)."""
    out = np.empty((len(df), len(names)), np.float64)
    for j, c in enumerate(names):
        out[:, j] = _cont_column(df[c], c)
    bad = np.isinf(out)
    if bad.any():
        i, j = (int(k[0]) for k in np.nonzero(bad))
        raise ColumnValueError(f"{where}column {names[j]!r}, row {start + i}: expected a finite number or a missing "
                               f"value, found {out[i, j]} ({int(bad[:, j].sum())} such value(s) in this chunk); "
                               "replace them (e.g. by NaN, which FillMissing fills)")
    return out


def check_columns(df: pd.DataFrame, names: Sequence[str], where: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise ColumnNotFoundError(f"{where}: expected column(s) {missing}, found columns {list(df.columns)[:20]}")


class ColumnVocab:
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
        prov = apply_lut(codes, lut, -1)
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


class ClassMap:
    "Encodes values with fitted classes: `unknown` for missing or unseen values, type checked."

    def __init__(self, name: str, values: Sequence[Any], start: int, unknown: int):
        self.name, self.unknown = name, unknown
        self.code = {v: i + start for i, v in enumerate(values)}
        self.kind = _kind(values[0]) if len(values) else None

    def encode(self, s: pd.Series) -> np.ndarray:
        codes, uniques = _factorize(s, self.name)
        lut = np.array([self._code(v) for v in uniques], np.int64)
        return apply_lut(codes, lut, self.unknown)

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
                                   f"FillMissing has no fill value (nor a {c}_na column) for it; supply a value")
    if state.normalize and len(state.cont_names):
        m = np.array([state.means[c] for c in state.cont_names])
        s = np.array([state.stds[c] for c in state.cont_names])
        raw = (raw - m) / (EPS + s)
    with np.errstate(over="ignore"):       # refused just below, with the column named
        out = raw.astype(np.float32)
    over = np.isinf(out)
    if over.any():
        i, j = (int(k[0]) for k in np.nonzero(over))
        raise ColumnValueError(f"{where}column {state.cont_names[j]!r}: value {raw[i, j]!r} (row {i} of the chunk, after "
                               "FillMissing and Normalize) overflows the store's float32; rescale the column")
    return na, out


def encode_frame(df: pd.DataFrame, state: TabularState, maps: Optional[List["ClassMap"]] = None,
                 where: str = "", start: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Encode raw rows with a fitted `state`: ``(cats, conts)``, int64 ``(n, n_cat)`` and float32 ``(n, n_cont)``.

    Unknown or missing categories get 0 (``'#na#'``). `start` is the global row number of ``df``'s first
    row (for messages). Raises ``ColumnNotFoundError``, ``ColumnTypeError``, ``ColumnValueError``
    (``inf``, a value overflowing float32, a missing value FillMissing has no fill value for).
    """
    check_columns(df, state.cat_names + state.cont_names, where.rstrip(": ") or "rows")
    maps = maps if maps is not None else cat_maps(state)
    cats = np.empty((len(df), len(state.cat_names)), np.int64)
    for j, (c, m) in enumerate(zip(state.cat_names, maps)):
        cats[:, j] = m.encode(df[c])
    na, conts = encode_conts(cont_matrix(df, state.cont_names, where, start), state, where)
    return np.concatenate([cats, na], 1), conts


def cat_maps(state: TabularState) -> List[ClassMap]:
    "One value -> code map per source categorical column of `state` (0 for unknown)."
    return [ClassMap(c, state.classes[c][1:], 1, 0) for c in state.cat_names]
