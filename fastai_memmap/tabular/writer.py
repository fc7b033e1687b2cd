"""Writing a tabular store: the hidden build directory and its sub-stores, committed atomically.

Everything is built in a hidden directory ``.NAME.fmtmp-PID-HEX`` next to `out` (the writer's
``TMP_MARK``, under the same lock file and stale-temporary cleanup as `MemmapWriter`) and renamed to
`out` once ``tabular.json`` is written and fsynced; after a crash nothing partial is at `out`.
"""
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..errors import TabularError
from .split import Split
from .state import STATE_NAME, TabularState, read_tabular_json
from ..store.writer import MemmapWriter, begin_staging, commit_staging, fsync_dir, write_fsync

__all__: list = []           # internal to the tabular converter


def _is_tabular_store(path: Path) -> None:
    "Raise ``MemmapError`` unless `path` is a tabular store (``overwrite=True`` replaces nothing else)."
    read_tabular_json(path)


class Staging:
    "The hidden directory a tabular store is built in, renamed to `out` on success, removed on failure."

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.dir: Optional[Path] = None
        self._lock = None

    def __enter__(self) -> "Staging":
        self._lock, self.dir = begin_staging(self.out, self.overwrite, is_store=_is_tabular_store)
        return self

    def commit(self, doc: Dict[str, Any]) -> None:
        try:
            text = json.dumps(doc, indent=1, allow_nan=False)
        except ValueError as e:
            raise TabularError(f"{self.out}: state not representable as JSON ({e})") from None
        for lock in self.dir.glob(".*.lock"):     # the sub-stores' writer locks: private to the staging dir
            lock.unlink()
        write_fsync(self.dir / STATE_NAME, text.encode("utf8"))
        fsync_dir(self.dir)
        commit_staging(self.dir, self.out, self.overwrite, is_store=_is_tabular_store)
        self.dir = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class Writers:
    "The final sub-stores of a tabular store, written in the staging directory; a context manager."

    def __init__(self, folder: Path):
        self.folder, self.stack = folder, ExitStack()
        self.cats = self.conts = self.y = self.valid = None

    def __enter__(self) -> "Writers":
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

    def add_valid(self, split: Split, df: pd.DataFrame, start: int, valid: Optional[np.ndarray] = None) -> int:
        "Append the validation rows of a chunk; returns how many."
        if self.valid is None:
            return 0
        v = np.flatnonzero(split.mask(df, start) if valid is None else valid) + start
        self.valid.append(v)
        return len(v)
