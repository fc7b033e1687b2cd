"""Scale-out conversion: write a chunked `dask.array.Array` to a store, one shard per row chunk.

Each row chunk is computed and written by its own dask task, straight into its shard file in the
writer's temporary directory (no gather through the client); the manifest is committed once every
task has succeeded, atomically, exactly as for a single `MemmapWriter` (same lock, same rename).
If any task fails, the temporary directory is removed and nothing appears at the target.
Works with dask's default (threaded) scheduler, ``scheduler='processes'`` and a
``dask.distributed`` client (``Client(processes=True)``) whose workers share the filesystem.
"""
import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from .casting import cast_rows

from ..errors import ItemShapeError
from .format import check_dtype, npy_header_bytes, shard_name
from .writer import MemmapWriter

__all__ = ["save_dask", "write_shard_file", "is_dask_array"]


def is_dask_array(data: Any) -> bool:
    "True if `data` is a `dask.array.Array` (without importing dask when it is not loaded)."
    da = __import__("sys").modules.get("dask.array")
    return da is not None and isinstance(data, da.Array)


def write_shard_file(path: Union[str, Path], block: Any, dtype: Any, item_shape: Optional[Tuple[int, ...]] = None,
                     casting: str = "lossless") -> Tuple[int, str]:
    """Write `block` (rows × item shape) as a complete ``.npy`` shard at `path` (must not exist).

    Casts to `dtype` under `casting` (`fastai_memmap.store.casting`: lossless by default), fsyncs, returns
    ``(rows, "sha256:<hex>")`` where the checksum covers the data bytes, as the store format requires.
    Raises ``FileExistsError``, ``LossyCastError``, ``ItemShapeError`` (a block whose item shape is not
    `item_shape`, when given).
    """
    block = np.asarray(block)
    a = cast_rows(block, np.dtype(dtype), block.shape[1:] if item_shape is None else item_shape, casting, str(path))
    with open(path, "xb") as f:
        f.write(npy_header_bytes(a.dtype, a.shape))
        data = memoryview(a).cast("B") if a.nbytes else b""
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(a), "sha256:" + hashlib.sha256(data).hexdigest()


def save_dask(path: Union[str, Path], arr: Any, dtype: Any = None, scheduler: Optional[str] = None,
              **kwargs: Any) -> Path:
    """Write the dask array `arr` (rows along axis 0) to a new store at `path`, one shard per row chunk.

    Parameters
    ----------
    arr : dask.array.Array
        Shape ``(rows, *item_shape)``. Chunks may split rows freely; trailing axes are rechunked to
        one chunk each (a row is never split across shards). Empty row chunks are skipped.
    dtype : numpy dtype, optional
        dtype on disk (default ``arr.dtype``); cast with ``casting='same_kind'``.
    scheduler : str, optional
        Passed to ``dask.compute`` (``'threads'``, ``'processes'``, ``'synchronous'``); by default
        the active scheduler (a ``distributed.Client`` if one is set as default).
    **kwargs
        Passed to `MemmapWriter` (``overwrite``, ``meta``); ``shard_rows`` / ``shard_bytes`` do not
        apply (shards follow the chunks).

    Returns the store path. Raises what `MemmapWriter` raises, ``ItemShapeError`` for a 0-d array,
    and re-raises a failed task's exception after removing everything written.
    """
    import dask
    if arr.ndim == 0:
        raise ItemShapeError(f"{path}: expected a dask array with a row axis, found a 0-d array")
    dtype = check_dtype(arr.dtype if dtype is None else dtype)
    arr = arr.rechunk({i: -1 for i in range(1, arr.ndim)})
    blocks = [b for b, n in zip(arr.to_delayed().reshape(-1), arr.chunks[0]) if n > 0]
    writer = MemmapWriter(path, dtype, arr.shape[1:], **kwargs)
    with writer:
        names = [shard_name(i) for i in range(len(blocks))]
        tasks = [dask.delayed(write_shard_file)(str(writer.staging_dir / n), b, dtype, writer.item_shape, writer.casting)
                 for n, b in zip(names, blocks)]
        results = dask.compute(*tasks, scheduler=scheduler) if scheduler else dask.compute(*tasks)
        declared = [n for n in arr.chunks[0] if n > 0]
        for name, (rows, _), n in zip(names, results, declared):
            if rows != n:
                raise ItemShapeError(f"{path}: chunk of shard {name}: expected {n} rows as the dask array declares, "
                                     f"found a block of {rows}; fix the array's chunks (nothing was committed)")
        writer.add_shards([(n, rows, ck) for n, (rows, ck) in zip(names, results)])
    return Path(path)
