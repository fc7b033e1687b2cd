"""The train/validation split of a tabular store, decided chunk by chunk while the source streams.

At most one of ``valid_idx`` (row numbers), ``valid_pct`` (a random fraction drawn with a seed, the
draw does not depend on the chunk size) or ``valid_col`` (a boolean column). Validation rows are
excluded from fitting, as fastai fits its procs on the training set; ``split.doc`` is saved in
``tabular.json`` (``{"by": None}`` without a split).
"""
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype, is_object_dtype

from ..errors import ColumnTypeError, TabularError

__all__: list = []           # internal to the tabular converter


class Split:
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
