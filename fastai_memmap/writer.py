"""Writing a store out of core: `MemmapWriter` (context manager) and `save_memmap`.

Atomicity: a writer builds the store in a hidden temporary directory next to the target
(``.NAME.fmtmp-PID-RANDOM``), fsyncs it, then moves it to the target in one ``rename`` (a new
target) or one ``renameat2(RENAME_EXCHANGE)`` (replacing a store: the old and new directories swap
in one step, so the target never disappears). Until then nothing changes at the target; after a
crash (exception, SIGKILL, power loss) the target holds the previous complete store or the new
one, never a partial store. Where the filesystem cannot exchange, replacing takes two renames
(old store aside as ``.NAME.fmold-PID-RANDOM``, new one in); a crash between them leaves no target,
and the next writer puts the previous store back. Leftover temporary directories are recognisable
by their prefix and removed by the next writer of the same target (with a warning).
Two writers of one target exclude each other with an ``flock`` on ``.NAME.lock`` next to it
(released by the OS if the process dies); the second gets ``WriterConflictError``.
"""
import ctypes
import errno
import fcntl
import glob
import hashlib
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import (ItemShapeError, StoreExistsError, StoreWriteError, UnsafePathError, WriterConflictError,
                     MemmapError)
from .format import MANIFEST_NAME, Manifest, ShardInfo, check_dtype, npy_header_bytes, shard_name

__all__ = ["MemmapWriter", "save_memmap", "DEFAULT_SHARD_BYTES", "TMP_MARK"]

DEFAULT_SHARD_BYTES = 1 << 30   # 1 GiB of data per shard: few files, yet a shard fits any filesystem
TMP_MARK = ".fmtmp-"            # marks a writer's temporary directory: ".NAME.fmtmp-PID-HEX"
OLD_MARK = ".fmold-"            # a replaced store waiting to be deleted: ".NAME.fmold-PID-HEX"


class MemmapWriter:
    """Write rows of one dtype and item shape to a new store at `path`, out of core.

    Use as a context manager::

        with MemmapWriter("x_store", np.float32, (1024,)) as w:
            for batch in batches:          # each batch: array-like of shape (n, 1024)
                w.append(batch)

    Parameters
    ----------
    path : str or Path
        The store directory to create. Must not exist unless ``overwrite=True``.
    dtype : numpy dtype
        Element dtype on disk (bool, int, uint, float or complex; object/structured refused).
    item_shape : sequence of int
        Shape of one row; ``()`` for scalar rows.
    shard_rows, shard_bytes : int, optional
        Start a new shard file after `shard_rows` rows, or once a shard holds `shard_bytes` data
        bytes (default ``DEFAULT_SHARD_BYTES`` = 1 GiB); whichever comes first.
    overwrite : bool
        Replace an existing store at `path` (atomically: readers see the old or the new store).
    meta : dict, optional
        JSON-compatible metadata saved in the manifest (e.g. ``{"layout": "HWC"}``).
    total : int, optional
        Expected number of rows, only for the progress bar.
    progress : bool
        Show a fastprogress bar (needs `total`).
    kind : str
        ``"dense"`` (this class); ``"ragged"`` or ``"sparse"`` construct a `RaggedWriter` /
        `SparseWriter` instead (their extra keywords, e.g. ``size=``, pass through).

    Raises
    ------
    StoreExistsError
        `path` exists and ``overwrite=False`` (checked on ``__enter__``).
    WriterConflictError
        Another writer holds the lock of `path`.
    UnsupportedDtypeError, ItemShapeError
        Bad dtype, item shape, or a batch of the wrong shape / uncastable dtype in `append`.
    StoreWriteError
        An ``OSError`` (disk full, file too large...) while writing; nothing is committed.
    """

    def __new__(cls, *args: Any, kind: str = "dense", **kwargs: Any) -> "MemmapWriter":
        if cls is MemmapWriter and kind != "dense":
            cls = _writer_class(kind)
        return super().__new__(cls)

    def __init__(self, path: Union[str, Path], dtype: Any, item_shape: Sequence[int] = (),
                 shard_rows: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, meta: Optional[Dict[str, Any]] = None,
                 total: Optional[int] = None, progress: bool = False, kind: str = "dense"):
        self.path = Path(path)
        self.dtype = check_dtype(dtype)
        shape = tuple(item_shape) if isinstance(item_shape, (tuple, list)) else (item_shape,)
        if not all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape):
            raise ItemShapeError(f"{self.path}: expected item_shape of non-negative ints, found {item_shape!r}")
        self.item_shape = tuple(int(s) for s in shape)
        row_bytes = math.prod(self.item_shape) * self.dtype.itemsize   # exact: no int64 overflow
        limit = max(1, shard_bytes // row_bytes) if row_bytes else 2 ** 62
        if shard_rows is not None and shard_rows < 1:
            raise ValueError(f"{self.path}: expected shard_rows >= 1, found {shard_rows}")
        self.shard_rows = min(limit, shard_rows) if shard_rows else limit
        self.overwrite, self.meta, self.total, self.progress = overwrite, dict(meta or {}), total, progress
        self.rows = 0
        self._shards: list = []
        self._f = self._hash = self._tmp = self._lock = self._pbar = None
        self._shard_n = 0
        self._committed = False
        _check_json(self.meta, self.path)

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "MemmapWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> "MemmapWriter":
        "Take the lock, clean stale temporaries and create the temporary directory (``__enter__`` calls this)."
        self._lock, self._tmp = begin_staging(self.path, self.overwrite)
        if self.progress and self.total:
            from fastprogress.fastprogress import progress_bar
            self._pbar = progress_bar(range(self.total))
            self._pbar.update(0)
        return self

    def append(self, batch: Any) -> None:
        """Append rows: `batch` is array-like of shape ``(n, *item_shape)``, castable to `dtype`.

        The batch is cast with ``casting='same_kind'`` (float64 → float32 is fine, float → int is
        refused) and written at once; nothing else is held in memory. Raises ``ItemShapeError``.
        """
        if self._tmp is None or self._committed:
            raise MemmapError(f"{self.path}: writer is not open (use `with MemmapWriter(...) as w:`)")
        a = np.asarray(batch)
        if a.shape[1:] != self.item_shape or a.ndim != len(self.item_shape) + 1:
            raise ItemShapeError(f"{self.path}: expected a batch of shape (n, {', '.join(map(str, self.item_shape))}) "
                                 f"-- (n, *item_shape) -- found {a.shape}")
        try:
            a = np.ascontiguousarray(a.astype(self.dtype, casting="same_kind", copy=False))
        except TypeError:
            raise ItemShapeError(f"{self.path}: expected values castable to {self.dtype} (same kind), found {a.dtype}") from None
        self._guard(self._write, a)
        if self._pbar is not None:
            self._pbar.update(min(self.rows, self.total))

    def _guard(self, write, *args: Any) -> None:
        "Call ``write(*args)``; on an ``OSError`` abort and raise ``StoreWriteError``."
        try:
            write(*args)
        except OSError as e:
            self.abort()
            raise StoreWriteError(e.errno, f"{self.path}: writing failed ({os.strerror(e.errno or 0) or e}); "
                                  "nothing was committed, the target is unchanged") from e

    def _write(self, a: np.ndarray) -> None:
        start = 0
        while start < len(a):
            if self._f is None:
                self._new_shard()
            take = min(len(a) - start, self.shard_rows - self._shards[-1][1])
            chunk = memoryview(a[start:start + take]).cast("B") if a.nbytes else b""
            self._f.write(chunk)
            self._hash.update(chunk)
            self._shards[-1][1] += take
            self.rows += take
            start += take
            if self._shards[-1][1] >= self.shard_rows:
                self._finish_shard()

    def _new_shard(self) -> None:
        name = shard_name(self._shard_n)
        self._shard_n += 1
        self._f = open(self._tmp / name, "xb")
        self._f.write(npy_header_bytes(self.dtype, (0,) + self.item_shape, reserve=True))
        self._hash = hashlib.sha256()
        self._shards.append([name, 0, None])

    def _finish_shard(self) -> None:
        name, rows, _ = self._shards[-1]
        f = self._f
        hlen = len(npy_header_bytes(self.dtype, (0,) + self.item_shape, reserve=True))
        f.seek(0)
        f.write(npy_header_bytes(self.dtype, (rows,) + self.item_shape, length=hlen))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._shards[-1][2] = "sha256:" + self._hash.hexdigest()
        self._f = self._hash = None

    def close(self) -> Path:
        """Finish the last shard, write the manifest and rename the store into place.

        Returns the store path. A store with zero rows is valid (one empty shard). Raises
        ``StoreWriteError`` on OS errors (the target is then unchanged).
        """
        if self._committed:
            return self.path
        if self._tmp is None:
            raise MemmapError(f"{self.path}: writer was never opened or was aborted")
        try:
            if self._f is None and not self._shards:
                self._new_shard()
            if self._f is not None:
                self._finish_shard()
            m = self._manifest()
            _write_fsync(self._tmp / MANIFEST_NAME, m.to_json().encode("utf8"))
            _fsync_dir(self._tmp)
            self._commit()
        except MemmapError:   # StoreExistsError is an OSError too: keep its type
            self.abort()
            raise
        except OSError as e:
            self.abort()
            raise StoreWriteError(e.errno, f"{self.path}: committing failed ({e}); the target is unchanged") from e
        finally:
            if self._pbar is not None:
                self._pbar.on_iter_end()
        self._committed = True
        self._release()
        return self.path

    def _manifest(self) -> Manifest:
        "The manifest of the finished shards."
        return Manifest(dtype=self.dtype, item_shape=self.item_shape, meta=self.meta,
                        shards=tuple(ShardInfo(n, r, c) for n, r, c in self._shards))

    def _commit(self) -> None:
        commit_staging(self._tmp, self.path, self.overwrite)
        self._tmp = None

    def abort(self) -> None:
        "Discard everything written so far; the target is left as it was. Safe to call twice."
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:   # flushing the buffer of a discarded shard failed (disk full?): nothing to keep
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)   # closing the descriptor releases the flock
            self._lock = None


def _writer_class(kind: str) -> type:
    "The writer class of a store `kind` other than dense (imported lazily: the dense writer needs neither)."
    if kind == "ragged":
        from .ragged import RaggedWriter
        return RaggedWriter
    if kind == "sparse":
        from .sparse import SparseWriter
        return SparseWriter
    raise ValueError(f"kind: expected 'dense', 'ragged' or 'sparse', found {kind!r}")


def begin_staging(target: Path, overwrite: bool) -> Tuple[int, Path]:
    """Lock `target` and create the hidden temporary directory a new store is built in.

    Returns ``(lock_fd, tmp_dir)``; close `lock_fd` to release the lock. Cleans temporaries left by
    interrupted writers of `target` (putting back a store whose replacement was interrupted).
    Raises ``FileNotFoundError`` (no parent directory), ``WriterConflictError`` (locked),
    ``StoreExistsError`` (`target` exists and not `overwrite`), ``UnsafePathError`` (symlinked lock).
    """
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{target}: parent directory {parent} does not exist")
    lock = _take_lock(parent / f".{target.name}.lock", target)
    try:
        _clean_stale(parent, target.name)   # may put back a store whose replacement was interrupted
        if (target.exists() or target.is_symlink()) and not overwrite:
            what = "a symlink" if target.is_symlink() else "a file or store"
            raise StoreExistsError(f"{target}: {what} exists already; pass overwrite=True to replace it")
        tmp = parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        os.close(lock)
        raise
    return lock, tmp


def commit_staging(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the complete store built in `tmp` to `target` atomically (the caller holds the lock).

    Replaces an existing `target` only with `overwrite` (one ``renameat2(RENAME_EXCHANGE)`` where the
    filesystem has it, else two renames; a failed second rename puts the old store back). Raises
    ``StoreExistsError`` if `target` appeared and not `overwrite`, ``OSError`` from the renames (the
    target is then unchanged).
    """
    old = None
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise StoreExistsError(f"{target}: appeared while writing; not replaced (overwrite=False)")
        if _try_exchange(tmp, target):   # one atomic step: the old store is now at tmp
            _fsync_dir(target.parent)
            _remove(tmp)
            return
        old = target.parent / f".{target.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:   # put the previous store back: the target must be unchanged
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


def _take_lock(lock_path: Path, target: Path) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UnsafePathError(f"{lock_path}: expected a regular lock file, found a symlink (to "
                              f"{os.readlink(lock_path)!r}); not followed: remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WriterConflictError(f"{target}: another writer holds {lock_path}; "
                                      "wait for it to finish or write elsewhere") from None
        raise
    return fd


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporaries left by crashed writers of `name` (we hold the lock, so none is live).

    If the target is missing and exactly one complete replaced store (``.NAME.fmold-*``) is left, a
    writer died between the two renames of a fallback replace: that previous store is put back.
    """
    stale = [p for p in parent.glob(f".{glob.escape(name)}.fm*-*")
             if p.name.startswith(f".{name}{TMP_MARK}") or p.name.startswith(f".{name}{OLD_MARK}")]
    old = [p for p in stale if OLD_MARK in p.name and (p / MANIFEST_NAME).is_file()]
    target = parent / name
    if len(old) == 1 and not (target.exists() or target.is_symlink()):
        os.rename(old[0], target)
        warnings.warn(f"{old[0]}: restored as {target}, the previous store of a writer interrupted while replacing it")
        stale.remove(old[0])
    for p in stale:
        warnings.warn(f"{p}: removing leftover temporary store of an interrupted writer")
        _remove(p)


_RENAME_EXCHANGE = 2       # linux/fs.h: atomically swap two existing paths
_AT_FDCWD = -100           # linux/fcntl.h: paths relative to the working directory
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}   # fs or kernel cannot


def _exchange(a: Path, b: Path) -> None:
    "Swap the directory entries `a` and `b` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a), None, str(b))


def _try_exchange(a: Path, b: Path) -> bool:
    "`_exchange` `a` and `b`; False (nothing changed) where the platform or filesystem cannot."
    try:
        _exchange(a, b)
    except OSError as e:
        if e.errno in _NO_EXCHANGE:
            return False
        raise
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_json(meta: Dict[str, Any], path: Path) -> None:
    import json
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{path}: expected JSON-compatible meta (str, int, float, list, dict), found: {e}") from None


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
        written by `fastai_memmap.ragged.save_ragged` (an iterable of arrays is a dense iterable of
        batches unless this is given; a numpy object array of arrays is ragged by default).
        ``"sparse"``: `data` is a ``scipy.sparse`` matrix (the default for one) or an iterable of
        them, written in row chunks by `fastai_memmap.sparse.save_sparse`.
    **kwargs
        Passed to `MemmapWriter` (``overwrite``, ``shard_rows``, ``shard_bytes``, ``meta``, ``progress``).

    A chunked ``dask.array.Array`` is written by `fastai_memmap.parallel.save_dask`: one task and
    one shard per row chunk, committed atomically once all succeed.

    Raises what `MemmapWriter` raises; ``ValueError`` for an empty iterable without
    `dtype`/`item_shape`.
    """
    from .parallel import is_dask_array
    if is_dask_array(data):
        from .parallel import save_dask
        kwargs.pop("total", None)
        return save_dask(path, data, dtype=dtype, **kwargs)
    kind = kind or _infer_kind(data)
    if kind == "ragged":
        from .ragged import save_ragged
        return save_ragged(path, data, dtype=dtype, item_shape=item_shape, batch_rows=batch_rows, **kwargs)
    if kind == "sparse":
        from .sparse import save_sparse
        return save_sparse(path, data, dtype=dtype, batch_rows=batch_rows, **kwargs)
    if kind != "dense":
        raise ValueError(f"kind: expected 'dense', 'ragged' or 'sparse', found {kind!r}")
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
            raise ValueError(f"{path}: empty iterable; pass dtype and item_shape to write an empty store")
        if first is not None:
            first = np.asarray(first)
            dtype = first.dtype if dtype is None else dtype
            item_shape = first.shape[1:] if item_shape is None else item_shape
        batches = _chain(first, it)
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


def _chain(first: Optional[np.ndarray], rest: Iterable) -> Iterable:
    if first is not None:
        yield first
    yield from rest
