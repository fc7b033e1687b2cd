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

from .casting import CASTINGS, cast_rows
from ..errors import (ArgumentError, ArgumentTypeError, ItemShapeError, MemmapError, NotAStoreError, OverlapError,
                      StoreExistsError, StoreIOError, StoreWriteError, UnsafePathError, WriterConflictError,
                      WriterStateError)
from .kinds import writer_for
from .progress import Progress
from .reader import MemmapArray
from .format import (MANIFEST_NAME, Manifest, ShardInfo, check_dtype, check_meta, encode_manifest,
                     final_npy_header, npy_header_bytes, shard_name)

__all__ = ["MemmapWriter", "save_memmap", "DEFAULT_SHARD_BYTES", "TMP_MARK", "check_replaceable",
           "check_no_overlap", "os_error", "WriterGroup", "commit_group"]

DEFAULT_SHARD_BYTES = 1 << 30   # 1 GiB of data per shard: few files, yet a shard fits any filesystem
TMP_MARK = ".fmtmp-"            # marks a writer's temporary directory: ".NAME.fmtmp-PID-HEX"
OLD_MARK = ".fmold-"            # a replaced store waiting to be deleted: ".NAME.fmold-PID-HEX"
NAME_MAX = 255                  # bytes in one path component on Linux filesystems (ext4, xfs, btrfs, tmpfs)
STEM_MAX = 200                  # longer target names are shortened (+ a hash) in the names of temporaries and locks


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
    casting : str
        ``"lossless"`` (default): `append` casts a batch to `dtype` only if no value changes, except
        the rounding of floats into a narrower float (float64 → float32) and of large integers into
        floats; see `fastai_memmap.store.casting`. ``"no"``, ``"equiv"``, ``"safe"``, ``"same_kind"``,
        ``"unsafe"``: numpy's own casting rules (``ndarray.astype(casting=...)``), for users who want them.

    Raises
    ------
    StoreExistsError
        `path` exists and ``overwrite=False`` (checked on ``__enter__``).
    NotAStoreError
        ``overwrite=True`` but `path` is not a store (a file, a symlink, a directory without a valid
        manifest or with files that are not the store's): nothing is deleted.
    LossyCastError
        `append` would change a value (names the first offending row); see `casting`.
    WriterStateError
        `append` / `close` on a writer that is not open (closed, aborted, never entered).
    StoreIOError
        An OS error at the file boundary before writing (read-only filesystem, permission, symlink
        loop, name too long), with the path and its likely cause.
    WriterConflictError
        Another writer holds the lock of `path`.
    UnsupportedDtypeError, ItemShapeError
        Bad dtype, item shape, or a batch of the wrong shape / uncastable dtype in `append`.
    StoreWriteError
        An ``OSError`` (disk full, file too large...) while writing; nothing is committed.
    """

    def __new__(cls, *args: Any, kind: str = "dense", **kwargs: Any) -> "MemmapWriter":
        if cls is MemmapWriter and kind != "dense":
            cls = writer_for(kind)
        return super().__new__(cls)

    def __init__(self, path: Union[str, Path], dtype: Any, item_shape: Sequence[int] = (),
                 shard_rows: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, meta: Optional[Dict[str, Any]] = None,
                 total: Optional[int] = None, progress: bool = False, kind: str = "dense",
                 casting: str = "lossless"):
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path: expected a str or Path, found {type(path).__name__}")
        self.path = Path(path)
        self.dtype = check_dtype(dtype)
        if casting not in CASTINGS:
            raise ArgumentError(f"casting: expected one of {CASTINGS}, found {casting!r}")
        self.casting = casting
        shape = tuple(item_shape) if isinstance(item_shape, (tuple, list)) else (item_shape,)
        if not all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape):
            raise ItemShapeError(f"{self.path}: expected item_shape of non-negative ints, found {item_shape!r}")
        self.item_shape = tuple(int(s) for s in shape)
        row_bytes = math.prod(self.item_shape) * self.dtype.itemsize   # exact: no int64 overflow
        limit = max(1, shard_bytes // row_bytes) if row_bytes else 2 ** 62
        if shard_rows is not None and (not isinstance(shard_rows, (int, np.integer)) or shard_rows < 1):
            raise ArgumentError(f"{self.path}: expected shard_rows an int >= 1, found {shard_rows!r}")
        if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise ArgumentError(f"{self.path}: expected shard_bytes an int >= 1, found {shard_bytes!r}")
        self.shard_rows = min(limit, shard_rows) if shard_rows else limit
        self.overwrite, self.meta, self.total, self.progress = overwrite, dict(meta or {}), total, progress
        self.rows = 0
        self._shards: list = []
        self._f = self._hash = self._tmp = self._lock = self._pbar = None
        self._shard_n = 0
        self._committed = self._staged = False
        if meta is not None and not isinstance(meta, dict):
            raise ArgumentTypeError(f"{self.path}: expected meta a dict, found {type(meta).__name__}")
        check_meta(self.meta, str(self.path))   # before any byte is written: the reader would refuse it

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
        self._pbar = Progress(self.total, self.progress, "rows written")
        return self

    @property
    def staging_dir(self) -> Path:
        """The temporary directory the store is staged in until `commit` (a sibling of `path`,
        ``.NAME.fmtmp-PID-HEX``). Raises ``WriterStateError`` before `open` or after commit/abort."""
        if self._tmp is None:
            raise WriterStateError(f"{self.path}: expected an open writer (inside `with`), found it "
                                   f"{'committed' if self._committed else 'not open or aborted'}")
        return self._tmp

    def add_shards(self, shards: Sequence[Tuple[str, int, str]]) -> None:
        """Adopt shard files written into `staging_dir` by others (e.g. `save_dask`'s tasks): each
        ``(file name, rows, "sha256:<hex of the data bytes>")``, in row order, after the rows appended
        so far. Call before any `append`; `commit` validates them with the reader like appended rows.
        Raises ``WriterStateError`` if rows were appended or the writer is not open."""
        self.staging_dir
        if self._f is not None or self.rows:
            raise WriterStateError(f"{self.path}: expected add_shards before any append, found {self.rows} rows")
        self._shards.extend([n, int(r), c] for n, r, c in shards)
        self._shard_n += len(shards)
        self.rows += sum(int(r) for _, r, _ in shards)

    def append(self, batch: Any) -> None:
        """Append rows: `batch` is array-like of shape ``(n, *item_shape)``, castable to `dtype`.

        The batch is cast under the writer's `casting` (default ``"lossless"``: no value may change
        but for float rounding) and written at once; nothing else is held in memory (the batch is
        copied only when its dtype or layout differs). Raises ``ItemShapeError`` (shape, ragged
        nested lists, non-numeric values), ``LossyCastError`` (first offending row named),
        ``WriterStateError`` (writer not open).
        """
        self._check_open()
        a = cast_rows(batch, self.dtype, self.item_shape, self.casting, str(self.path), first_row=self.rows)
        self._guard(self._write, a)
        if self._pbar is not None:
            self._pbar.update(self.rows)

    def _check_open(self) -> None:
        if self._tmp is None or self._committed or self._staged:
            state = ("closed" if self._committed or self._staged else
                     "not open (never entered, or aborted after an error)")
            raise WriterStateError(f"{self.path}: expected an open writer, found it {state}; "
                                   "use `with MemmapWriter(...) as w:` and append inside the block")

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
        head = final_npy_header(self.dtype, (rows,) + self.item_shape, hlen)
        f.write(head)
        if len(head) < hlen:   # no data bytes: the short header, nothing after it
            f.truncate(len(head))
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
        self.stage()
        _guard_commit([self], lambda: commit_staging(self._tmp, self.path, self.overwrite))
        self._mark_committed()
        return self.path

    def stage(self) -> Path:
        """Finish the last shard, write the manifest and check the staged store as the reader will,
        without committing it (`close` or a `WriterGroup` commits). Returns the staging directory.
        After this `append` is refused. Raises ``WriterStateError``, the reader's ``FormatError``,
        ``StoreWriteError`` (the writer is then aborted, the target unchanged)."""
        self._check_open()
        _guard_commit([self], self._finish_staging)
        self._staged = True
        return self._tmp

    def _finish_staging(self) -> None:
        try:
            if self._f is None and not self._shards:
                self._new_shard()
            if self._f is not None:
                self._finish_shard()
            write_fsync(self._tmp / MANIFEST_NAME, encode_manifest(self._manifest(), str(self.path)))
            fsync_dir(self._tmp)
            self._validate_staged()
        finally:
            if self._pbar is not None:
                self._pbar.close()

    def _mark_committed(self) -> None:
        self._tmp, self._committed = None, True
        self._release()

    def _manifest(self) -> Manifest:
        "The manifest of the finished shards."
        return Manifest(dtype=self.dtype, item_shape=self.item_shape, meta=self.meta,
                        shards=tuple(ShardInfo(n, r, c) for n, r, c in self._shards))

    def _validate_staged(self) -> None:
        """Open the staged store with the reader, exactly as a user would: what it refuses is never
        committed (raises the reader's ``FormatError`` / ``ShardMismatchError``; the target is unchanged)."""
        MemmapArray.open(self._tmp).close()

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


def _guard_commit(writers: Sequence[MemmapWriter], step: Any) -> None:
    "Run `step()`; on any error abort every writer (the targets stay as they were) and raise it typed."
    try:
        step()
    except MemmapError:   # StoreExistsError is an OSError too: keep its type
        for w in writers:
            w.abort()
        raise
    except OSError as e:
        for w in writers:
            w.abort()
        raise StoreWriteError(e.errno, f"{writers[0].path}: committing failed ({e}); the target is unchanged") from e


class WriterGroup:
    """Writers whose stores appear together or not at all (e.g. an image store and its label store).

    ::

        with WriterGroup() as g:
            wx = g.add(MemmapWriter(out / "x", np.uint8, (32, 32, 3), overwrite=True))
            wy = g.add(MemmapWriter(out / "y", np.int64, (), overwrite=True))
            ...append...
            g.commit()

    `add` opens a writer (its lock, its staging directory); `commit` stages every writer (checks each
    store as the reader will) and then swaps all in with `commit_group`: if any step fails, no target
    changes. Leaving the block without `commit` (or with an exception) aborts every writer.
    Raises what `MemmapWriter.close` raises.
    """

    def __init__(self) -> None:
        self.writers: list = []

    def __enter__(self) -> "WriterGroup":
        return self

    def add(self, writer: MemmapWriter) -> MemmapWriter:
        "Open `writer` and add it to the group; returns it."
        writer.open()
        self.writers.append(writer)
        return writer

    def commit(self) -> Tuple[Path, ...]:
        "Stage and commit every writer as one group; returns their paths."
        for w in self.writers:
            w.stage()      # aborts that writer on error; __exit__ aborts the others
        _guard_commit(self.writers, lambda: commit_group([(w.staging_dir, w.path) for w in self.writers],
                                                         [w.overwrite for w in self.writers]))
        for w in self.writers:
            w._mark_committed()
        return tuple(w.path for w in self.writers)

    def __exit__(self, exc_type, exc, tb) -> None:
        for w in self.writers:
            if not w._committed:
                w.abort()


_CAUSES = {errno.ELOOP: "a symlink loop in the path", errno.ENAMETOOLONG: "a name longer than the filesystem allows",
           errno.EROFS: "a read-only filesystem", errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.ENOTDIR: "a path component is a file, not a directory", errno.ENOSPC: "no space left on the device",
           errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "a directory where a file was expected"}


def os_error(e: OSError, path: Path, doing: str) -> StoreIOError:
    """An ``OSError`` raised at the file boundary as a `StoreIOError` (same `errno`) naming `path`, what was
    being done and the likely cause (symlink loop, read-only filesystem, permission...)."""
    cause = _CAUSES.get(e.errno, os.strerror(e.errno) if e.errno else str(e))
    return StoreIOError(e.errno, f"{path}: {doing} failed: {cause} ({e})")


def staging_stem(name: str) -> str:
    "`name`, or for a very long one a shortened form + hash: temporaries and locks must fit in NAME_MAX too."
    if len(os.fsencode(name)) <= STEM_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:STEM_MAX - 17]).rstrip("\ufffd") + "~" + digest


def check_replaceable(target: Path, is_store: Optional[Any] = None) -> None:
    """Refuse to replace `target` unless it is a store: ``overwrite=True`` never deletes anything else.

    A store is a directory (not a symlink) whose ``manifest.json`` opens (`Manifest.load`) and which
    holds nothing but the manifest and the shard files it names. `is_store`, if given, replaces that
    check for other store layouts (e.g. a tabular store): a function of the directory that raises
    ``MemmapError`` when it is not one.

    Raises ``NotAStoreError`` (a ``FileExistsError``) naming what is there.
    """
    if target.is_symlink():
        raise NotAStoreError(f"{target}: expected a store to replace, found a symlink (to {os.readlink(target)!r}); "
                             "not replaced: remove the link or write elsewhere")
    if not target.is_dir():
        raise NotAStoreError(f"{target}: expected a store directory to replace, found a "
                             f"{'regular file' if target.is_file() else 'special file'}; not replaced: overwrite=True "
                             "replaces stores only (move the file or write elsewhere)")
    try:
        if is_store is not None:
            is_store(target)
            return
        m = Manifest.load(target)
    except MemmapError as e:
        raise NotAStoreError(f"{target}: expected a store to replace, found a directory that is not one ({e}); "
                             "not replaced: overwrite=True replaces stores only") from None
    extra = sorted(set(os.listdir(target)) - {MANIFEST_NAME} - {f for s in m.shards for f in s.files})
    if extra:
        raise NotAStoreError(f"{target}: expected only the manifest and shards of a store, found other files "
                             f"{extra[:5]!r}{' ...' if len(extra) > 5 else ''}; not replaced (they would be deleted): "
                             "move them out first")


def check_no_overlap(outputs: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse outputs that are, contain or lie inside an input (after resolving symlinks and ``..``).

    A converter writing there could replace or change its own source data. Raises ``OverlapError``.
    """
    for o in outputs:
        ro = Path(os.path.realpath(o))
        for i in inputs:
            ri = Path(os.path.realpath(i))
            if ro == ri or ri in ro.parents or ro in ri.parents:
                rel = "is" if ro == ri else ("lies inside" if ri in ro.parents else "contains")
                raise OverlapError(f"{o}: expected an output path apart from the inputs, found that it {rel} the "
                                   f"input {i}; writing there could destroy the source data: pick another output")


def begin_staging(target: Path, overwrite: bool, is_store: Optional[Any] = None) -> Tuple[int, Path]:
    """Lock `target` and create the hidden temporary directory a new store is built in.

    Returns ``(lock_fd, tmp_dir)``; close `lock_fd` to release the lock. Cleans temporaries left by
    interrupted writers of `target` (putting back a store whose replacement was interrupted).
    Missing parent directories of `target` are created (`make_parents`; they stay if the write then
    fails: nothing else is left behind). Raises ``WriterConflictError`` (locked),
    ``StoreExistsError`` (`target` exists and not `overwrite`), ``NotAStoreError`` (`target` exists,
    `overwrite`, but is not a store: see `check_replaceable`, which `is_store` is passed to),
    ``UnsafePathError`` (symlinked lock), ``StoreIOError`` (other OS errors, with their cause).
    """
    try:
        return _begin_staging(target, overwrite, is_store)
    except MemmapError:
        raise
    except (OSError, RuntimeError) as e:   # pathlib raises RuntimeError for a symlink loop
        if isinstance(e, RuntimeError):
            e = OSError(errno.ELOOP, str(e))
        raise os_error(e, target, "preparing to write the store") from None


def make_parents(directory: Path) -> None:
    """Create `directory` and its missing parents, as ``mkdir -p`` (each new directory's entry is fsynced
    in its parent, so a committed store's path survives a crash). Existing directories are left as they
    are. Raises ``StoreIOError`` (``ENOTDIR``) when a component is a file, ``EACCES``/``EROFS``... with the
    cause, via `os_error` in `begin_staging`."""
    missing = []
    d = directory
    while not d.is_dir():
        if d.exists() or d.is_symlink():   # a file (or a dangling link) where a directory is needed
            raise StoreIOError(errno.ENOTDIR, f"{directory}: expected a directory (or nothing) at {d}, found "
                               f"{'a symlink that leads nowhere' if d.is_symlink() and not d.exists() else 'a file'}; "
                               "pick another output path")
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:   # made by a concurrent writer
            if not d.is_dir():
                raise
        _fsync_dir_quiet(d.parent)


def _fsync_dir_quiet(path: Path) -> None:
    "fsync a directory where the filesystem allows it (some refuse directory fsync: nothing to do there)."
    try:
        fsync_dir(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise


def _begin_staging(target: Path, overwrite: bool, is_store: Optional[Any]) -> Tuple[int, Path]:
    if len(os.fsencode(target.name)) > NAME_MAX:
        raise StoreIOError(errno.ENAMETOOLONG, f"{target}: expected a name of at most {NAME_MAX} bytes, found "
                           f"{len(os.fsencode(target.name))}; pick a shorter name")
    parent = target.parent
    make_parents(parent)
    lock = _take_lock(parent / f".{staging_stem(target.name)}.lock", target)
    try:
        _clean_stale(parent, target.name)   # may put back a store whose replacement was interrupted
        if target.exists() or target.is_symlink():
            if not overwrite:
                what = "a symlink" if target.is_symlink() else ("a store" if target.is_dir() else "a file")
                raise StoreExistsError(f"{target}: {what} exists already; pass overwrite=True to replace a store")
            check_replaceable(target, is_store)
        tmp = parent / f".{staging_stem(target.name)}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        os.close(lock)
        raise
    return lock, tmp


def commit_staging(tmp: Path, target: Path, overwrite: bool, is_store: Optional[Any] = None) -> None:
    """Move the complete store built in `tmp` to `target` atomically (the caller holds the lock).

    Replaces an existing `target` only with `overwrite` and only if it is still a store
    (`check_replaceable`, checked again here: something else may have appeared while writing). One
    ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it, else two renames; a failed second
    rename puts the old store back. Raises ``StoreExistsError`` if `target` appeared and not
    `overwrite`, ``NotAStoreError``, ``OSError`` from the renames (the target is then unchanged).
    """
    old, _ = _swap_in(tmp, target, overwrite, is_store)
    if old is not None:
        _remove(old)


def _swap_in(tmp: Path, target: Path, overwrite: bool, is_store: Optional[Any]) -> Tuple[Optional[Path], str]:
    """Put `tmp` at `target`. Returns ``(old, how)``: where the previous store now is (None for a new
    target), to delete once all is done, and how it was done (``"new"``, ``"exchange"``, ``"rename"``)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return None, "new"
    if not overwrite:
        raise StoreExistsError(f"{target}: appeared while writing; not replaced (overwrite=False)")
    check_replaceable(target, is_store)
    if _try_exchange(tmp, target):   # one atomic step: the old store is now at tmp
        fsync_dir(target.parent)
        return tmp, "exchange"
    old = target.parent / f".{staging_stem(target.name)}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)   # put the previous store back: the target must be unchanged
        raise
    fsync_dir(target.parent)
    return old, "rename"


def _swap_back(tmp: Path, target: Path, old: Optional[Path], how: str) -> None:
    "Undo `_swap_in`: the new store goes back to `tmp`, the previous one (if any) back to `target`."
    if how == "exchange":
        _exchange(tmp, target)
    else:
        os.rename(target, tmp)
        if how == "rename":
            os.rename(old, target)
    fsync_dir(target.parent)


def commit_group(staged: Sequence[Tuple[Path, Path]], overwrite: Sequence[bool]) -> None:
    """Commit several staged stores ``[(tmp, target), ...]`` as a group: all appear, or none changes.

    `overwrite` holds one flag per store.
    Each target is checked first (`check_replaceable` where it exists), then swapped in one by one;
    if one fails, those already swapped are put back as they were before the error is raised. The
    previous stores are deleted only once every target holds its new store. The caller holds every
    target's lock. Raises like `commit_staging`. (A crash *between* two swaps can leave the group
    half-replaced; each target is still a complete store, old or new.)
    """
    for (tmp, target), ok in zip(staged, overwrite):
        if target.exists() or target.is_symlink():
            if not ok:
                raise StoreExistsError(f"{target}: exists; not replaced (overwrite=False)")
            check_replaceable(target)
    done: list = []
    try:
        for (tmp, target), ok in zip(staged, overwrite):
            done.append((tmp, target) + _swap_in(tmp, target, ok, None))
    except BaseException:
        for tmp, target, old, how in reversed(done):
            _swap_back(tmp, target, old, how)
        raise
    for _, _, old, _ in done:
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
    stem = staging_stem(name)
    stale = [p for p in parent.glob(f".{glob.escape(stem)}.fm*-*")
             if p.name.startswith(f".{stem}{TMP_MARK}") or p.name.startswith(f".{stem}{OLD_MARK}")]
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
        raise StoreIOError(errno.ENOSYS, "renameat2 not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise StoreIOError(e, f"{a} <-> {b}: renameat2(RENAME_EXCHANGE) failed: {os.strerror(e)}")


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


def write_fsync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
