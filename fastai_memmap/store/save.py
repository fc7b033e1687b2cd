"""`save_memmap`: write any array-like (numpy, dask, scipy.sparse, an iterable of batches or of
variable-length items) to a store, choosing the store kind from the data.

It sits above the writers of every kind (`fastai_memmap.store.writer`, ``.ragged``, ``.sparse``,
``.parallel``), so none of them imports another to dispatch.
"""
import itertools
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import ArgumentError, ItemShapeError
from .parallel import is_dask_array, save_dask
from .ragged import save_ragged
from .sparse import save_sparse
from .writer import MemmapWriter

__all__ = ["save_memmap"]


def save_memmap(path: Union[str, Path], data: Any, dtype: Any = None, item_shape: Optional[Sequence[int]] = None,
                batch_rows: int = 65536, kind: Optional[str] = None, **kwargs) -> Path:
    """Write `data` to a new store at `path` and return the path.

    Parameters
    ----------
    data : ndarray-like or iterable of batches
        An array of shape ``(rows, *item_shape)`` (a ``np.memmap`` or h5py dataset works: it is
        copied `batch_rows` rows at a time, never whole), or an iterable of batches
        ``(n_i, *item_shape)`` (a generator is consumed once, one batch in memory at a time).
    dtype, item_shape : optional
        Default: from `data` (for an iterable, from its first batch).
    batch_rows : int
        Rows copied per write when `data` is an array.
    kind : str, optional
        ``"ragged"``: `data` is an iterable of variable-length items ``(length_i, *item_shape)``,
        written by `fastai_memmap.store.ragged.save_ragged` (an iterable of arrays is a dense iterable of
        batches unless this is given; a numpy object array of arrays is ragged by default).
        ``"sparse"``: `data` is a ``scipy.sparse`` matrix (the default for one) or an iterable of
        them, written in row chunks by `fastai_memmap.store.sparse.save_sparse`.
    **kwargs
        Passed to `MemmapWriter` (``overwrite``, ``shard_rows``, ``shard_bytes``, ``meta``, ``progress``).

    A chunked ``dask.array.Array`` is written by `fastai_memmap.store.parallel.save_dask`: one task and
    one shard per row chunk, committed atomically once all succeed.

    Raises what `MemmapWriter` raises; ``ValueError`` for an empty iterable without
    `dtype`/`item_shape`.
    """
    if is_dask_array(data):
        kwargs.pop("total", None)
        return save_dask(path, data, dtype=dtype, **kwargs)
    kind = kind or _infer_kind(data)
    if kind == "ragged":
        return save_ragged(path, data, dtype=dtype, item_shape=item_shape, batch_rows=batch_rows, **kwargs)
    if kind == "sparse":
        return save_sparse(path, data, dtype=dtype, batch_rows=batch_rows, **kwargs)
    if kind != "dense":
        raise ArgumentError(f"kind: expected 'dense', 'ragged' or 'sparse', found {kind!r}")
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        n = data.shape[0] if len(data.shape) else None
        if n is None:
            raise ItemShapeError(f"{path}: expected an array with a row axis, found a 0-d array")
        dtype = data.dtype if dtype is None else dtype
        item_shape = tuple(data.shape[1:]) if item_shape is None else item_shape
        batches = (data[i:i + batch_rows] for i in range(0, n, batch_rows))
        kwargs.setdefault("total", n)
    else:
        it = iter(data)
        first = next(it, None)
        if first is None and (dtype is None or item_shape is None):
            raise ArgumentError(f"{path}: empty iterable; pass dtype and item_shape to write an empty store")
        if first is not None:
            first = np.asarray(first)
            dtype = first.dtype if dtype is None else dtype
            item_shape = first.shape[1:] if item_shape is None else item_shape
        batches = itertools.chain(() if first is None else (first,), it)
    with MemmapWriter(path, dtype, item_shape, **kwargs) as w:
        for b in batches:
            w.append(b)
    return Path(path)


def _infer_kind(data: Any) -> str:
    "``'sparse'`` for a scipy.sparse matrix or array, ``'ragged'`` for a numpy object array, else ``'dense'``."
    if type(data).__module__.startswith("scipy.sparse"):
        return "sparse"
    if isinstance(data, np.ndarray) and data.dtype == object:
        return "ragged"
    return "dense"
