"""Tabular sources to processed stores, out of core: the converter `tabular_to_memmap`.

fastai v1's ``TabularList`` runs ``FillMissing``, ``Categorify`` and ``Normalize`` on a DataFrame in RAM.
`tabular_to_memmap` does the same work chunk by chunk and writes the result as stores that
`fastai_memmap.tabular.item_list.MemmapTabularList` trains from; peak memory is set by `chunksize`, not by the table.

The stages live in their own modules: `fastai_memmap.store.sources` (the source cut into chunks),
`fastai_memmap.tabular.split` (train/validation rows), `fastai_memmap.tabular.encoding` (values to
codes and floats), `fastai_memmap.tabular.streaming_stats` (staged columns, moments, exact medians),
`fastai_memmap.tabular.state` (the fitted state, the store layout and ``tabular.json``) and
`fastai_memmap.tabular.writer` (the build directory, committed atomically). This module runs them.

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
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from fastai.tabular.transform import Categorify, FillMissing, FillStrategy, Normalize  # noqa: E402

# The error classes live in errors.py; imported here (and re-exported) so old imports keep working.
from ..errors import (ColumnNotFoundError, ColumnTypeError, ColumnValueError, SourceNotFoundError,  # noqa: E402,F401
                      TabularError)
from ..store.progress import Progress  # noqa: E402
from ..store.sources import DEFAULT_CHUNKSIZE, count_rows, iter_frames  # noqa: E402
from .streaming_stats import RADIX_BITS, Moments, medians, Scratch  # noqa: E402,F401
from .encoding import (EPS, apply_lut, check_columns, ClassMap, cont_matrix, ColumnVocab,  # noqa: E402,F401
                       cat_maps, encode_conts, encode_frame)
from .split import Split  # noqa: E402
from .state import (NA_CLASS, PROC_NAMES, STATE_NAME, TABULAR_FORMAT, TABULAR_VERSION,  # noqa: E402,F401
                    TabularState, read_tabular_json)
from .writer import Staging, Writers  # noqa: E402

__all__ = ["tabular_to_memmap", "TabularState", "iter_frames", "read_tabular_json", "TabularError",
           "ColumnNotFoundError", "ColumnTypeError", "ColumnValueError", "SourceNotFoundError",
           "TABULAR_FORMAT", "TABULAR_VERSION", "STATE_NAME", "NA_CLASS", "DEFAULT_CHUNKSIZE"]

# Looked up in this module's namespace when a store is fitted (tests monkeypatch them here).
MIN_SELECT_BUDGET = 1 << 16  # values of one column collected in RAM for the final exact partition
STATS_BLOCK_ROWS = 1 << 16   # staged rows per block of the statistics passes: fixed, so results do not
                             # depend on the source's chunking
_PROC_CLASSES = {"FillMissing": FillMissing, "Categorify": Categorify, "Normalize": Normalize}


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
            fill_val = kw.get("fill_val", 0.0)
            if isinstance(fill_val, bool) or not isinstance(fill_val, (int, float, np.number)) or not np.isfinite(fill_val):
                raise TabularError(f"procs: FillMissing fill_val: expected a finite number, found {fill_val!r:.50}")
            opts.update(fill_strategy="median" if strat == FillStrategy.MEDIAN else "constant",
                        fill_val=float(fill_val), add_col=bool(kw.get("add_col", True)))
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


# ------------------------------------------------------------------------------------------ converter
def tabular_to_memmap(source: Any, out: Union[str, Path], cat_names: Optional[Sequence[str]] = None,
                      cont_names: Optional[Sequence[str]] = None, y_names: Union[str, Sequence[str], None] = None,
                      procs: Sequence[Any] = (FillMissing, Categorify, Normalize), chunksize: int = DEFAULT_CHUNKSIZE,
                      *, valid_idx: Any = None, valid_pct: Optional[float] = None, valid_col: Optional[str] = None,
                      seed: Optional[int] = None, y_kind: Optional[str] = None,
                      state: Union[TabularState, str, Path, None] = None, file_format: Optional[str] = None,
                      read_kwargs: Optional[Dict[str, Any]] = None, overwrite: bool = False, progress: bool = True,
                      total: Optional[int] = None, missing_y: str = "error") -> Path:
    """Process a table out of core as fastai's ``TabularList`` would, and write it as a tabular store.

    Parameters
    ----------
    source : DataFrame, CSV or JSON-lines path, iterable of DataFrames, or iterable of dicts
        See `iter_frames`. Read once, `chunksize` rows at a time (a generator works).
    out : str or Path
        The tabular store directory to create (layout in `fastai_memmap.tabular.state`).
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
        text in the last bit; ``{'float_precision': 'round_trip'}`` reads floats exactly. A CSV line
        with more fields than the header is a ``FormatError``, unless ``usecols`` is given here (then
        pandas reads those columns and ignores extra fields).
    missing_y : {'error', 'keep'}
        A missing target (an empty cell, None, NaN) is a ``ColumnValueError`` by default; ``'keep'``
        stores it as code -1 (categorical: ``label_from_memmap`` drops such rows with a warning, as
        fastai drops unknown labels) or NaN (float targets).
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
        No training rows (an empty or header-only source, every row in validation); a continuous column
        with no training value (median undefined) or fewer than 2 (std undefined); ``inf`` in a
        continuous column or target; a missing target (see `missing_y`); missing values in a column
        that had none in training.
    StoreExistsError, WriterConflictError, StoreWriteError, SourceNotFoundError, FormatError
        As the writer and readers do. On any error nothing is written at `out`.
    """
    out = Path(out)
    if missing_y not in ("error", "keep"):
        raise TabularError(f"missing_y: expected 'error' or 'keep', found {missing_y!r}")
    split = Split(valid_idx, valid_pct, valid_col, seed)
    if state is not None:
        state = _load_state(state)
        for what, given, fitted in (("cat_names", cat_names, state.cat_names), ("cont_names", cont_names, state.cont_names)):
            if given is not None and _names(given, what) != fitted:
                raise TabularError(f"{what}: expected the fitted {list(fitted)} (or None) with state=, found {list(given)}")
        job: Any = _Apply(state, _names(y_names, "y_names"), split)
    else:
        job = _Fit(_names(cat_names, "cat_names"), _names(cont_names, "cont_names"), _names(y_names, "y_names"),
                   _parse_procs(procs), y_kind, split, chunksize)
    job.missing_y, job.source = missing_y, _source_name(source)
    total = total if total is not None else (count_rows(source, file_format) if progress else None)
    frames = iter_frames(source, chunksize, file_format, read_kwargs, job.columns)
    with Staging(out, overwrite) as stage:
        rows, st = job.run(frames, stage.dir, Progress(total, progress))
        stage.commit({"format": TABULAR_FORMAT, "version": TABULAR_VERSION, "rows": rows,
                      "n_valid": job.n_valid, "split": split.doc, "state": st.to_dict()})
    return out


def _load_state(state: Any) -> TabularState:
    "A `TabularState`, the state of an open `TabularStore`, or the state saved in a store directory (validated)."
    if isinstance(getattr(state, "state", None), TabularState):
        state = state.state
    if not isinstance(state, TabularState):
        return read_tabular_json(state)[1]
    state._validate("state=")
    return state


def _source_name(source: Any) -> str:
    "How messages name the source: its path, or its type."
    return str(source) if isinstance(source, (str, os.PathLike)) else f"source ({type(source).__name__})"


def _check_y(df: pd.DataFrame, names: Sequence[str], start: int, job: Any) -> None:
    "Refuse a missing target unless ``missing_y='keep'``: it would become no class (or a NaN target) silently."
    if job.missing_y == "keep":
        return
    for c in names:
        miss = df[c].isna().to_numpy()
        if miss.any():
            i = int(np.flatnonzero(miss)[0])
            raise ColumnValueError(f"{job.source}: target column {c!r}, row {start + i}: expected a label, found a missing "
                                   f"value ({int(miss.sum())} in rows {start}..{start + len(df) - 1}); drop or fill those "
                                   "rows, or pass missing_y='keep' to store them as unlabelled (code -1 / NaN)")


class _Apply:
    "One pass: encode every chunk with an already fitted state (test sets)."
    missing_y, source = "error", "source"     # set by tabular_to_memmap

    def __init__(self, state: TabularState, y_names: Tuple[str, ...], split: Split):
        if y_names and y_names != state.y_names:
            raise TabularError(f"y_names: expected the fitted targets {list(state.y_names)} or None, found {list(y_names)}")
        if y_names and state.y_kind is None:
            raise TabularError("y_names: the fitted state has no targets to encode")
        self.state, self.y_names, self.split, self.n_valid = state, y_names, split, 0
        self.columns = list(dict.fromkeys(state.cat_names + state.cont_names + y_names + ((split.col,) if split.col else ())))

    def run(self, frames: Iterator[pd.DataFrame], folder: Path, bar: Progress) -> Tuple[int, TabularState]:
        st, maps, start = self.state, cat_maps(self.state), 0
        ymap = ClassMap(st.y_names[0], st.y_classes, 0, -1) if self.y_names and st.y_kind == "category" else None
        with Writers(folder) as w:
            w.open_x(st)
            if self.y_names:
                w.open_y(st.y_names, st.y_kind, st.y_classes)
            if self.split.given:
                w.open_valid()
            for df in frames:
                where = f"rows {start}..{start + len(df) - 1}: "
                check_columns(df, self.columns, where.rstrip(": "))
                cats, conts = encode_frame(df, st, maps, where, start)
                w.cats.append(cats)
                w.conts.append(conts)
                if self.y_names:
                    _check_y(df, st.y_names, start, self)
                    w.y.append(ymap.encode(df[st.y_names[0]]) if ymap else _y_floats(df, st.y_names, where, start))
                self.n_valid += w.add_valid(self.split, df, start)
                start += len(df)
                bar.update(start)
                del df
            bar.close()
            self.split.check_end(start)
        return start, st


def _y_floats(df: pd.DataFrame, names: Sequence[str], where: str, start: int) -> np.ndarray:
    a = cont_matrix(df, names, where, start)
    with np.errstate(over="ignore"):
        a32 = a.astype(np.float32)
    over = np.isinf(a32)
    if over.any():
        i, j = (int(k[0]) for k in np.nonzero(over))
        raise ColumnValueError(f"{where}target column {names[j]!r}, row {start + i}: value {a[i, j]!r} overflows the "
                               "store's float32; rescale the target")
    a = a32
    return a[:, 0] if len(names) == 1 else a


class _Fit:
    """Pass 1 reads the source once: provisional category codes, raw floats and the train mask are staged
    on disk while vocabularies and null counts accumulate. Then the state is fitted from the staged values
    (medians by radix selection, then means and stds) and pass 2 turns the staged rows into the final stores."""
    missing_y, source = "error", "source"     # set by tabular_to_memmap

    def __init__(self, cat_names, cont_names, y_names, opts, y_kind, split: Split, chunksize: int):
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
        self.vocabs = [ColumnVocab(c) for c in cat_names]
        self.yvocab = ColumnVocab(y_names[0]) if y_names else None
        self.n_train = 0
        self.nulls = {"train": np.zeros(k, np.int64), "valid": np.zeros(k, np.int64)}
        self.n_valid = 0

    # -------------------------------------------------------------- pass 1
    def run(self, frames: Iterator[pd.DataFrame], folder: Path, bar: Progress) -> Tuple[int, TabularState]:
        layout = {"cats": (np.int64, len(self.cat_names)), "conts": (np.float64, len(self.cont_names)),
                  "y": (np.int64, None), "train": (np.bool_, None)}
        scratch = Scratch(folder, layout)
        try:
            with Writers(folder) as w:
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

    def _chunk(self, df: pd.DataFrame, start: int, scratch: Scratch, w: Writers) -> None:
        where = f"rows {start}..{start + len(df) - 1}"
        check_columns(df, self.columns, where)
        valid = self.split.mask(df, start)
        train = ~valid
        cats = np.empty((len(df), len(self.cat_names)), np.int64)
        for j, v in enumerate(self.vocabs):
            cats[:, j] = v.encode(df[v.name], train)
        raw = cont_matrix(df, self.cont_names, f"{self.source}: {where}: ", start)
        miss = np.isnan(raw)
        self.nulls["train"] += miss[train].sum(0)
        self.nulls["valid"] += miss[valid].sum(0)
        self.n_train += int(train.sum())
        y = self._y_chunk(df, train, w, start)
        scratch.append(len(df), cats=cats, conts=raw, y=y, train=train)
        self.n_valid += w.add_valid(self.split, df, start, valid)

    def _y_chunk(self, df: pd.DataFrame, train: np.ndarray, w: Writers, start: int) -> np.ndarray:
        if not self.y_names:
            return np.zeros(0, np.int64)
        _check_y(df, self.y_names, start, self)
        if self.y_kind is None:   # fastai's rule: the first label decides
            first = df[self.y_names[0]]
            self.y_kind = "float" if len(self.y_names) > 1 or first.dtype.kind == "f" else "category"
        if self.y_kind == "float":
            if w.y is None:
                w.open_y(self.y_names, "float", None)
            w.y.append(_y_floats(df, self.y_names, f"{self.source}: ", start))
            return np.zeros(0, np.int64)
        return self.yvocab.encode(df[self.y_names[0]], train)

    # -------------------------------------------------------------- fit
    def _fit(self, scratch: Scratch) -> Tuple[TabularState, Dict[str, Any]]:
        if self.n_train == 0:
            raise ColumnValueError(f"{self.source}: expected training rows to fit the state on, found none ({scratch.rows} "
                                   f"row(s), {self.n_valid} of them validation); classes, fill values, means and stds "
                                   "fitted on no rows are undefined: check the source (header only?) and the split")
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

    def _fill_values(self, scratch: Scratch) -> Dict[str, float]:
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
        med = medians(scratch, {j: self._values(j) for j in need}, max(self.chunksize, MIN_SELECT_BUDGET),
                      STATS_BLOCK_ROWS)
        return {self.cont_names[j]: med[j] for j in need}

    def _values(self, j: int) -> int:
        "Non-missing training values of continuous column `j`."
        return self.n_train - int(self.nulls["train"][j])

    def _norm_stats(self, scratch: Scratch, fills: Dict[str, float]) -> Tuple[Dict[str, float], Dict[str, float]]:
        "Means and stds (ddof=1) of the training values, filled first as fastai's FillMissing does."
        if "Normalize" not in self.opts["procs"]:
            return {}, {}
        mom = Moments(len(self.cont_names))
        fill = np.array([fills.get(c, np.nan) for c in self.cont_names])
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is refused below, with the column named
            for raw, train in scratch.chunks(("conts", "train"), STATS_BLOCK_ROWS):
                x = raw[train]
                x = np.where(np.isnan(x), fill, x)
                for j in range(x.shape[1]):
                    mom.add(j, x[~np.isnan(x[:, j]), j])
        few = {c: int(mom.n[j]) for j, c in enumerate(self.cont_names) if mom.n[j] < 2}
        if few:
            raise ColumnValueError(f"{self.source}: column(s) {sorted(few)}: Normalize needs at least 2 training values "
                                   f"for a std, found {sorted(few.values())}; drop them from cont_names, fill them, or "
                                   "leave Normalize out of procs")
        means = {c: float(mom.mean[j]) for j, c in enumerate(self.cont_names)}
        stds = {c: mom.std(j) for j, c in enumerate(self.cont_names)}
        bad = [c for c in self.cont_names if not (np.isfinite(means[c]) and np.isfinite(stds[c]))]
        if bad:
            raise ColumnValueError(f"{self.source}: column(s) {bad}: mean or std overflows float64 (values near "
                                   "1e154 or beyond); rescale them")
        return means, stds

    # -------------------------------------------------------------- pass 2
    def _write(self, scratch: Scratch, st: TabularState, luts: Dict[str, Any], w: Writers, progress: bool) -> None:
        w.open_x(st)
        cat_y = self.y_kind == "category"
        if cat_y:
            w.open_y(st.y_names, st.y_kind, st.y_classes)
        bar, done = Progress(scratch.rows, progress, "writing"), 0
        for cats, raw, *y in scratch.chunks(("cats", "conts") + (("y",) if cat_y else ()), self.chunksize):
            for j, c in enumerate(self.cat_names):
                cats[:, j] = apply_lut(cats[:, j], luts[c], 0)
            na, conts = encode_conts(raw, st)
            w.cats.append(np.concatenate([cats, na], 1))
            w.conts.append(conts)
            if cat_y:
                w.y.append(apply_lut(y[0], luts["__y__"], -1))
            done += len(raw)
            bar.update(done)
        bar.close()
