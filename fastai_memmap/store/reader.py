"""Reading a store: `MemmapArray`, one virtual array over every shard of a store."""
import hashlib
import mmap
import os
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import (ArgumentError, ChecksumError, RowIndexError, RowIndexTypeError, ShardMismatchError, StoreChangedError,
                      StoreIOError,
                      StoreNotFoundError, TruncatedStoreError, UnverifiedStoreError)
from .kinds import reader_for
from .progress import Progress
from .format import MANIFEST_NAME, Manifest, ShardInfo, confined_path, describe, open_regular, read_npy_header

__all__ = ["MemmapArray", "open_memmap", "DEFAULT_MAX_OPEN", "ACCESS_HINTS", "RANGE_HINTS", "READ_MODES"]

DEFAULT_MAX_OPEN = 64       # mapped shards kept open at once; each mmap holds one file descriptor
HASH_CHUNK = 16 << 20       # bytes hashed per read in verify(): big enough to amortise syscalls
Ident = Tuple[int, int, int, int]   # (st_dev, st_ino, st_size, st_mtime_ns): one version of one file
_IDENT = struct.Struct("<QQQq")     # an Ident packed in pickles: fixed size, whatever the numbers
ADVISE_GAP = 256 << 10      # one-off hints: rows closer than this many bytes share one range (one large read)
PAGE = mmap.PAGESIZE        # madvise ranges start on a page boundary
# madvise advice per hint name; None where this Python/OS lacks the constant (the hint is then a no-op)
ACCESS_HINTS = {name: getattr(mmap, "MADV_" + name.upper(), None) for name in ("normal", "random", "sequential")}
RANGE_HINTS = {name: getattr(mmap, "MADV_" + name.upper(), None) for name in ("willneed", "dontneed")}
# 'evict': posix_fadvise(POSIX_FADV_DONTNEED) on the rows' file range (drops clean, unmapped pages from the cache)
RANGE_HINTS["evict"] = getattr(os, "POSIX_FADV_DONTNEED", None)
READ_MODES = ("mmap", "pread")   # how `read` gathers rows: from the memory maps, or by positioned reads
# MADV_POPULATE_READ (Linux >= 5.14; Python's mmap module lacks the constant): read and map the pages now
RANGE_HINTS["populate"] = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


class MemmapArray:
    """A read-only virtual array of shape ``(rows, *item_shape)`` over the shards of a store.

    Open with ``MemmapArray.open(path)`` where `path` is a store directory, its ``manifest.json``,
    or a bare C-order ``.npy`` file. Opening reads the manifest and each shard's ``.npy`` header and
    checks file sizes (O(number of shards)); shards are memory-mapped lazily on first access and at
    most `max_open` maps (hence file descriptors) are kept, least recently used first out.

    Indexing (``a[i]``, ``a[i:j:k]``, ``a[[5, 2, 5]]``, ``a[np.array(...)]``, a boolean mask of
    length ``len(a)``) always returns a new, owned, writable ``np.ndarray`` (a copy, never a view of
    the read-only map) of dtype ``a.dtype``: shape ``item_shape`` for an int, ``(n, *item_shape)``
    otherwise. Raises ``RowIndexError`` (an ``IndexError``) for out-of-range rows and
    ``RowIndexTypeError`` (a ``TypeError``) for non-integer indices.

    Pickling stores only the path and the manifest (a few hundred bytes, whatever the data size);
    the unpickled copy (e.g. in a spawned DataLoader worker) maps the files again on first access.
    After ``fork`` the child keeps using the parent's maps (same read-only pages, no copy).
    """

    def __init__(self, path: Union[str, Path], manifest: Manifest, offsets: Optional[List[int]] = None,
                 max_open: int = DEFAULT_MAX_OPEN, _bare: bool = False, access: str = "normal",
                 _idents: Optional[List[Ident]] = None, read_mode: str = "mmap"):
        self.path, self.manifest, self.max_open, self._bare = Path(path), manifest, int(max_open), _bare
        rows = [s.rows for s in manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        self._offsets = offsets
        # each shard's file size, and the identity of the file validated at open (checked when mapping)
        self._sizes = None if offsets is None else [o + r * manifest.row_bytes for o, r in zip(offsets, rows)]
        self._idents = _idents
        self._maps: "OrderedDict[int, np.memmap]" = OrderedDict()
        self._views: Dict[int, np.ndarray] = {}   # plain ndarray views of the maps: no memmap overhead per read
        self._access = _check_hint(access, ACCESS_HINTS)
        self._read_mode = _check_read_mode(read_mode)
        self._fds: Dict[int, int] = {}   # pread mode: one read-only descriptor per shard, opened on first read

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Union[str, Path], max_open: int = DEFAULT_MAX_OPEN,
             validate: str = "offsets") -> "Union[MemmapArray, RaggedArray, SparseArray]":
        """Open the store at `path` (directory, ``manifest.json`` or ``.npy`` file) and validate it.

        A store of kind ``"ragged"`` or ``"sparse"`` opens as a `RaggedArray` / `SparseArray`
        (`fastai_memmap.store.ragged`, `fastai_memmap.store.sparse`); `validate` (``"offsets"``, ``"lazy"``,
        ``"full"``) says how much of their offsets and indices is checked at open (see
        `fastai_memmap.store.format`); dense stores ignore it.

        Raises ``StoreNotFoundError`` (missing path, manifest or shard), ``FormatError`` (bad manifest
        or ``.npy`` header), ``TruncatedStoreError`` (file size differs from header),
        ``ShardMismatchError`` (shard dtype/shape differs from the manifest), ``UnsafePathError``,
        ``UnsupportedDtypeError``.
        """
        p = Path(path)
        if p.name == MANIFEST_NAME:
            p = p.parent
        if p.is_dir():
            before = _ident_or_none(p / MANIFEST_NAME)
            m = Manifest.load(p)
            if m.kind != "dense":
                a = reader_for(m.kind)(p, m, max_open=max_open, validate=validate)
            else:
                checked = [cls._check_shard(p, s, m) for s in m.shards]
                a = cls(p, m, [o for o, _ in checked], max_open=max_open, _idents=[i for _, i in checked])
            after = _ident_or_none(p / MANIFEST_NAME)
            if after != before:   # else the manifest of one store may describe the shards of the next
                raise StoreChangedError(f"{p / MANIFEST_NAME}: expected the manifest read at open "
                                        f"({_show(before)}), found {_show(after)} after checking the shards; "
                                        "store replaced while opening: open it again")
            return a
        if p.is_file():
            return cls._open_npy(p, max_open)
        if p.is_symlink() and not p.exists():
            raise StoreNotFoundError(f"{p}: expected a store directory or a .npy file, found a symlink that leads "
                                     "nowhere (dangling, or a symlink loop)")
        raise StoreNotFoundError(f"{p}: no store here; expected a store directory or a .npy file")

    @classmethod
    def _open_npy(cls, p: Path, max_open: int) -> "MemmapArray":
        dtype, shape, offset = read_npy_header(p)
        if len(shape) == 0:
            raise ShardMismatchError(f"{p}: expected an array with a row axis, found a 0-d array")
        m = Manifest(dtype=dtype, item_shape=tuple(shape[1:]), shards=(ShardInfo(p.name, shape[0]),),
                     meta={})
        st = _check_size(p, m, shape[0], offset)
        return cls(p.parent, m, [offset], max_open=max_open, _bare=True, _idents=[_ident(st)])

    @staticmethod
    def _check_shard(store: Path, s: ShardInfo, m: Manifest) -> Tuple[int, Ident]:
        "Validate shard `s` against `m`; return its data offset and the identity of the file validated."
        fp = confined_path(store, s.file)
        before = _stat(fp)
        dtype, shape, offset = read_npy_header(fp)
        if dtype != m.dtype or tuple(shape[1:]) != m.item_shape or not shape or shape[0] != s.rows:
            raise ShardMismatchError(
                f"{fp}: expected {describe(m.dtype, m.item_shape, s.rows)} ({m.dtype.str}) as in the manifest, found "
                f"shape {shape} {dtype.name} ({dtype.str}); shard replaced or manifest edited?")
        ident = _ident(_check_size(fp, m, s.rows, offset))
        if ident != _ident(before):   # the header read may belong to another file than the size checked
            raise StoreChangedError(f"{fp}: expected the same file during open, found {_show(_ident(before))} "
                                    f"then {_show(ident)}; store replaced while opening? open it again")
        return offset, ident

    # ---------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        "The store kind: always ``'dense'`` for a `MemmapArray`."
        return self.manifest.kind

    @property
    def dtype(self) -> np.dtype:
        "Element dtype of every row."
        return self.manifest.dtype

    @property
    def item_shape(self) -> Tuple[int, ...]:
        "Shape of one row (no row axis)."
        return self.manifest.item_shape

    @property
    def shape(self) -> Tuple[int, ...]:
        "``(rows, *item_shape)``."
        return (len(self),) + self.item_shape

    @property
    def ndim(self) -> int:
        "``1 + len(item_shape)``."
        return 1 + len(self.item_shape)

    @property
    def nbytes(self) -> int:
        "Data bytes of the whole store (headers excluded)."
        return len(self) * self.manifest.row_bytes

    @property
    def meta(self) -> Dict[str, Any]:
        "The manifest's free-form ``meta`` dict (layout, classes...). Do not mutate."
        return self.manifest.meta

    @property
    def shard_files(self) -> List[Path]:
        "Paths of the shard files, in row order."
        return [self.path / s.file for s in self.manifest.shards]

    @property
    def where(self) -> Path:
        """What messages and ``fastai-memmap info`` call this store: the ``.npy`` file for a bare array
        (whose `path` is the folder holding it), else the store directory (same as `path`)."""
        return self.shard_files[0] if self._bare else self.path

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"MemmapArray({str(self.where)!r}, {describe(self.dtype, self.item_shape, len(self))}, "
                f"{len(self.manifest.shards)} shard(s))")

    # ---------------------------------------------------------------- pickling
    def __reduce__(self):
        return (_rebuild, (str(self.path), self.manifest.to_dict(), self._offsets, self.max_open, self._bare,
                           self._access, _pack_idents(self._idents), self._read_mode))

    # ---------------------------------------------------------------- maps
    @property
    def shard_starts(self) -> np.ndarray:
        """Row number where each shard starts, then the row count: int64 ``(n_shards + 1,)``, a read-only
        view (``shard_starts[k]:shard_starts[k + 1]`` are shard ``k``'s rows)."""
        v = self._starts.view()
        v.flags.writeable = False
        return v

    def shard_view(self, k: int) -> np.ndarray:
        """Shard `k`'s rows, ``(rows_k, *item_shape)``: a read-only view of the memory map (no copy; valid
        while the store is open, like any numpy memmap). For readers of other kinds built on dense
        parts; users read rows with indexing or `read`, which copy. Raises ``IndexError`` for a bad `k`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(self.manifest.shards):
            raise RowIndexError(f"{self.where}: expected a shard number in [0, {len(self.manifest.shards)}), found {k!r}")
        return self._map(int(k))

    def _map(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is not None:
            self._touch(k)
            self._check_mapped(k, m)
            return m
        s = self.manifest.shards[k]
        shape = (s.rows,) + self.item_shape
        if s.rows == 0 or self.manifest.row_bytes == 0:
            return np.empty(shape, self.dtype)
        fp = self.path / s.file
        with _open_shard(fp) as f:   # read-only; identity checked on the descriptor that is mapped
            self._check_same_file(k, fp, os.fstat(f.fileno()))
            m = np.memmap(f, dtype=self.dtype, mode="r", offset=self._offsets[k], shape=shape)
        _madvise(m, ACCESS_HINTS[self._access])
        self._maps[k] = m
        self._views[k] = m.view(np.ndarray)
        while len(self._maps) > self.max_open:
            try:
                self._views.pop(self._maps.popitem(last=False)[0], None)
            except KeyError:   # emptied meanwhile by another thread (readahead): nothing left to evict
                break
        return m

    def _touch(self, k: int) -> None:
        "Mark shard `k` most recently used; it may have been evicted by another thread (readahead) meanwhile."
        try:
            self._maps.move_to_end(k)
        except KeyError:
            pass

    def _view(self, k: int) -> np.ndarray:
        "Shard `k` as a plain ndarray view of its map (numpy's memmap subclass costs per indexing)."
        v, m = self._views.get(k), self._maps.get(k)
        if v is None or m is None:
            m = self._map(k)
            return self._views.get(k, m)   # a shard of no bytes has no map, only an empty array
        self._touch(k)
        self._check_mapped(k, m)
        return v

    def _check_mapped(self, k: int, m: np.memmap) -> None:
        "Raise ``StoreChangedError`` if mapped shard `k` changed size: an fstat of the map's descriptor, ~1 µs."
        found = m._mmap.size()
        if found != self._sizes[k]:
            raise StoreChangedError(
                f"{self.path / self.manifest.shards[k].file}: expected {self._sizes[k]} bytes as when the store "
                f"was opened, found {found}; file truncated or rewritten while in use (reading it would kill "
                "the process with SIGBUS): replace stores with MemmapWriter(overwrite=True), never in place")

    def _check_same_file(self, k: int, fp: Path, st: os.stat_result) -> None:
        "Raise ``StoreChangedError`` unless `st` is the file validated at open (device, inode, size, mtime)."
        expect = None if self._idents is None else tuple(self._idents[k])
        if expect is None:   # made without identities: at least the size must match
            expect = (st.st_dev, st.st_ino, self._sizes[k], st.st_mtime_ns)
        if _ident(st) != expect:
            raise StoreChangedError(
                f"{fp}: expected the file validated when the store was opened ({_show(expect)}), found "
                f"{_show(_ident(st))}; store replaced or rewritten since (or copied elsewhere): open it again")

    def close(self) -> None:
        "Drop every map and descriptor. The array stays usable: maps and descriptors reopen on access."
        self._maps.clear()
        self._views.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    # ---------------------------------------------------------------- positioned reads
    @property
    def read_mode(self) -> str:
        "How `read` gathers rows: ``'mmap'`` (from the memory maps, the default) or ``'pread'``."
        return self._read_mode

    def set_read_mode(self, mode: str) -> "MemmapArray":
        """Choose how `read` (and slicing, fancy indexing) gathers rows; returns `self`.

        ``'mmap'`` (default): copies from the memory maps, the fastest when the store is in the page
        cache. ``'pread'``: one ``preadv`` per run of adjacent rows into the result, so no page of the
        store is ever mapped into this process: for stores larger than memory, read in random order,
        where mapped pages (promoted by the kernel as recently used) would push out the pages read
        ahead for the next batches, and every row would be read twice. Kept by pickles (DataLoader
        workers). Results are identical in both modes. Raises ``ArgumentError`` for another `mode`.
        """
        self._read_mode = _check_read_mode(mode)
        return self

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            fp = self.path / self.manifest.shards[k].file
            with _open_shard(fp) as f:   # identity checked on the descriptor that is kept
                self._check_same_file(k, fp, os.fstat(f.fileno()))
                fd = self._fds[k] = os.dup(f.fileno())
        return fd

    def _pread_rows(self, k: int, local: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
        "Read shard `k`'s rows `local` (sorted) into ``out[dest]`` with one ``preadv`` per run of adjacent rows."
        rb = self.manifest.row_bytes
        if rb == 0 or len(local) == 0:
            return
        fd, base = self._fd(k), self._offsets[k]
        flat = out.reshape(-1).view(np.uint8).reshape(len(out), rb)
        cuts = np.flatnonzero(np.diff(local) != 1) + 1
        starts = np.concatenate([[0], cuts]).tolist()
        ends = np.concatenate([cuts, [len(local)]]).tolist()
        rows, dests = local.tolist(), dest.tolist()
        for a, b in zip(starts, ends):
            want = (b - a) * rb
            try:
                got = os.preadv(fd, [flat[d] for d in dests[a:b]], base + rows[a] * rb)
            except OSError as e:
                raise StoreIOError(e.errno, f"{self.path / self.manifest.shards[k].file}: expected to read "
                                   f"{want} bytes at byte {base + rows[a] * rb}, found {e.strerror}") from e
            if got != want:
                raise StoreChangedError(
                    f"{self.path / self.manifest.shards[k].file}: expected {want} bytes at byte {base + rows[a] * rb}, "
                    f"read {got}; file truncated or rewritten while in use: open the store again")

    def _read_pread(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        bounds = np.searchsorted(sidx, self._starts)
        for k in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[k], bounds[k + 1]
            self._pread_rows(int(k), sidx[a:b] - self._starts[k], order[a:b], out)
        return out

    # ---------------------------------------------------------------- access hints
    @property
    def access(self) -> str:
        "The access-pattern hint applied to every map (``'normal'``, ``'random'`` or ``'sequential'``)."
        return self._access

    def advise(self, hint: str, rows: Any = None, merge_bytes: int = ADVISE_GAP) -> None:
        """Tell the kernel how rows will be read (``madvise``); a hint, never a change of results.

        Parameters
        ----------
        hint : str
            Access pattern of every map, kept for maps opened later and by unpickled copies (DataLoader
            workers): ``'random'`` (no readahead around page faults: cold random reads fetch only the
            pages touched), ``'sequential'`` (aggressive readahead), ``'normal'`` (the default).
            Or a one-off request on `rows`: ``'willneed'`` (start reading them from disk in the
            background, in large requests, into the page cache shared by every process),
            ``'populate'`` (read them and map them into this process now, blocking until done:
            later reads of them take no page fault; a no-op before Linux 5.14), ``'dontneed'``
            (unmap them from this process; the page cache keeps them) or ``'evict'`` (also remove
            them from the page cache where no process maps them: ``POSIX_FADV_DONTNEED``, for
            consumed rows of a store larger than memory; the next read of them goes to the disk).
        rows : int array-like, optional
            Only for the one-off hints: the row numbers concerned (default: every row).
        merge_bytes : int
            Rows less than this many bytes apart are merged into one range (one large request; default
            `ADVISE_GAP`, 256 KiB, for block order). ``0`` merges only adjacent rows: for random
            order, where a merged gap would be read for nothing.

        Raises
        ------
        ValueError
            Unknown `hint`, or `rows` given with an access-pattern hint.
        RowIndexError, RowIndexTypeError
            As ``read`` for bad `rows`.
        """
        if hint in ACCESS_HINTS:
            if rows is not None:
                raise ArgumentError(f"{self.where}: access hint {hint!r} applies to whole maps, found rows=...; "
                                    "pass rows only with 'willneed', 'populate', 'dontneed' or 'evict'")
            self._access = hint
            for m in self._maps.values():
                _madvise(m, ACCESS_HINTS[hint])
            return
        advice = RANGE_HINTS.get(_check_hint(hint, RANGE_HINTS))
        idx = np.arange(len(self), dtype=np.int64) if rows is None else np.unique(self._norm_indices(rows))
        if advice is None or len(idx) == 0 or self.manifest.row_bytes == 0:
            return
        bounds = np.searchsorted(idx, self._starts)
        for k in np.flatnonzero(np.diff(bounds)):
            local = idx[bounds[k]:bounds[k + 1]] - self._starts[k]
            ranges = _row_ranges(local, self.manifest.row_bytes, merge_bytes)
            if hint == "evict":
                fd, base = self._fd(int(k)), self._offsets[k]
                for lo, hi in ranges:
                    try:
                        os.posix_fadvise(fd, base + lo, hi - lo, advice)
                    except OSError:   # a hint: refusing it changes nothing
                        pass
                continue
            m = self._map(int(k))
            for lo, hi in ranges:
                _madvise(m, advice, lo, hi)

    # ---------------------------------------------------------------- indexing
    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            i = self._norm_int(int(key))
            k = 0 if len(self._starts) == 2 else int(self._starts.searchsorted(i, side="right")) - 1
            row = self._view(k)[i - int(self._starts[k])]   # the per-item hot path: plain ndarray view
            return np.array(row, dtype=self.dtype)   # a copy; a scalar row loses its byte order without dtype
        if isinstance(key, slice):
            if key.step == 0:
                raise RowIndexError(f"{self.where}: expected a slice step other than 0, found {key!r:.100}")
            try:
                r = range(len(self))[key]   # O(1): never materialise arange(len(self))
            except TypeError:
                raise RowIndexTypeError(f"{self.where}: expected integer slice bounds, found {key!r:.100}") from None
            return self.read(np.arange(r.start, r.stop, r.step, dtype=np.int64))
        if isinstance(key, tuple):
            raise RowIndexTypeError(f"{self.where}: expected a row index (int, slice or int array), found a tuple "
                                    f"{key!r:.100}; index rows first, then the returned array")
        return self.read(key)

    def _norm_int(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise RowIndexError(f"{self.where}: row {i} out of range, expected -{n} <= row < {n}")
        return i + n if i < 0 else i

    def _norm_indices(self, idx: Any) -> np.ndarray:
        try:
            a = np.asarray(idx)
        except (ValueError, TypeError) as e:   # ragged nested lists
            raise RowIndexTypeError(f"{self.where}: expected a 1-d sequence of integer row indices, found "
                                    f"{idx!r:.100} ({e})") from None
        if a.dtype == object and a.ndim == 1 and all(type(v) is int for v in a.tolist()):
            bad = [v for v in a.tolist() if not -len(self) <= v < len(self)]
            if bad:   # beyond int64: out of range
                raise RowIndexError(f"{self.where}: row {bad[0]} out of range, expected -{len(self)} <= row < {len(self)}")
            a = np.array(a.tolist(), dtype=np.int64)   # valid Python ints in an object array: read them
        if a.dtype == bool:
            if a.shape != (len(self),):
                raise RowIndexError(f"{self.where}: expected a boolean mask of shape ({len(self)},), found {a.shape}")
            return np.flatnonzero(a)
        if a.size == 0:
            return np.zeros(0, np.int64)
        if a.dtype.kind not in "iu":
            raise RowIndexTypeError(f"{self.where}: expected integer row indices, found dtype {a.dtype}")
        if a.ndim != 1:
            raise RowIndexTypeError(f"{self.where}: expected a 1-d array of row indices, found shape {a.shape}")
        n = len(self)
        lo, hi = int(a.min()), int(a.max())   # before the int64 cast: uint64 >= 2**63 would wrap negative
        if lo < -n or hi >= n:
            bad = lo if lo < -n else hi
            raise RowIndexError(f"{self.where}: row {bad} out of range, expected -{n} <= row < {n}")
        a = a.astype(np.int64, copy=False)
        return np.where(a < 0, a + n, a) if lo < 0 else a

    def read(self, indices: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Gather rows `indices` (int array-like or boolean mask) into a new array (or into `out`).

        Each shard involved is read with one gather: rows of a single shard (the common case) or
        rows already sorted go straight into the result (one copy); unsorted rows spanning several
        shards are read in ascending order, then scattered. The result has the rows in the
        requested order, duplicates allowed. Returns an owned array of
        shape ``(len(indices), *item_shape)`` and dtype ``self.dtype``; `out`, if given, must have
        exactly that shape and dtype and is returned. Raises ``RowIndexError``,
        ``RowIndexTypeError``, ``StoreChangedError`` (a shard shrank since opening).
        """
        idx = self._norm_indices(indices)
        shape = (len(idx),) + self.item_shape
        if out is None:
            out = np.empty(shape, self.dtype)
        elif not isinstance(out, np.ndarray):
            raise RowIndexTypeError(f"{self.where}: expected out a numpy array of shape {shape} {self.dtype}, "
                                    f"found {type(out).__name__}")
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.writeable:
            raise RowIndexError(f"{self.where}: expected out of shape {shape} {self.dtype}, writable, found "
                                f"{out.shape} {out.dtype}{'' if out.flags.writeable else ', read-only'}")
        if len(idx) == 0:
            return out
        if self._read_mode == "pread" and out.flags.c_contiguous:
            return self._read_pread(idx, out)
        lo, hi = int(idx.min()), int(idx.max())
        k = int(np.searchsorted(self._starts, lo, side="right") - 1)
        if hi < self._starts[k + 1]:   # one shard (the common case): one gather straight into `out`
            np.take(self._view(k), idx - self._starts[k] if k else idx, axis=0, out=out, mode="clip")
            return out
        if (idx[1:] >= idx[:-1]).all():   # sorted across shards: each shard's rows land in a slice of `out`
            bounds = np.searchsorted(idx, self._starts)
            for k in np.flatnonzero(np.diff(bounds)):
                a, b = bounds[k], bounds[k + 1]
                np.take(self._view(int(k)), idx[a:b] - self._starts[k], axis=0, out=out[a:b], mode="clip")
            return out
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        bounds = np.searchsorted(sidx, self._starts)
        for k in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[k], bounds[k + 1]
            out[order[a:b]] = self._view(int(k))[sidx[a:b] - self._starts[k]]
        return out

    # ---------------------------------------------------------------- checks
    def verify(self, progress: bool = False, allow_unchecked: bool = False) -> List[Dict[str, Any]]:
        """Re-read every shard and compare it with the SHA-256 recorded at write time.

        Reads every data byte (cost: the store size in bytes, read in 16 MiB chunks; nothing is mapped).
        Every shard's size is checked first, checksum or not.

        Parameters
        ----------
        progress : bool
            Show a progress bar over the shards.
        allow_unchecked : bool
            Accept shards without a recorded checksum (a bare ``.npy`` file, a manifest whose checksums were
            removed): they are reported with status ``"unchecked"`` and 0 bytes hashed instead of raising.

        Returns
        -------
        list of dict
            One dict per shard file, in row order: ``file`` (str, name inside the store), ``bytes_hashed``
            (int, the data bytes read and hashed, header excluded; 0 when unchecked), ``checksum`` (the
            recorded ``"sha256:..."`` or None) and ``status`` (``"ok"`` or ``"unchecked"``).

        Raises
        ------
        ChecksumError
            A shard's SHA-256 differs from the recorded one (names the file, expected and found).
        UnverifiedStoreError
            Some shards have no checksum and `allow_unchecked` is False (names them). A ``ChecksumError``.
        TruncatedStoreError, StoreChangedError
            A file's size differs from its header, or the file was replaced since the store was opened.
        """
        return check_verified(self.where, self._hash_shards(progress),
                              allow_unchecked)

    def _hash_shards(self, progress: bool = False) -> List[Dict[str, Any]]:
        "`verify`'s report, shards without checksum included (size-checked only); raises ``ChecksumError``."
        shards = list(enumerate(self.manifest.shards))
        bar = Progress(len(shards), progress, "shards verified")
        report = []
        try:
            for k, s in shards:
                bar.update(k)
                fp = self.path / s.file
                _check_size(fp, self.manifest, s.rows, self._offsets[k])
                if s.checksum is None:
                    report.append({"file": s.file, "bytes_hashed": 0, "checksum": None, "status": "unchecked"})
                    continue
                with _open_shard(fp) as f:   # hash the file validated at open, not a replacement of the same size
                    self._check_same_file(k, fp, os.fstat(f.fileno()))
                    digest, nbytes = _hash_count(f, self._offsets[k])
                found = "sha256:" + digest
                if found != s.checksum:
                    raise ChecksumError(f"{fp}: expected checksum {s.checksum}, found {found}; "
                                        "data changed after writing (disk error or edited file)")
                report.append({"file": s.file, "bytes_hashed": nbytes, "checksum": s.checksum, "status": "ok"})
            bar.update(len(shards))
        finally:
            bar.close()
        return report


def check_verified(where: Path, report: List[Dict[str, Any]], allow_unchecked: bool) -> List[Dict[str, Any]]:
    """Return the `verify` `report` of the store at `where`; raise ``UnverifiedStoreError`` naming the files
    without checksum (status ``"unchecked"``) unless `allow_unchecked`. Shared by every kind's `verify`."""
    unchecked = [r["file"] for r in report if r["status"] == "unchecked"]
    if unchecked and not allow_unchecked:
        shown = ", ".join(unchecked[:5]) + (f" and {len(unchecked) - 5} more" if len(unchecked) > 5 else "")
        raise UnverifiedStoreError(
            f"{where}: expected a recorded checksum for every file, found none for {len(unchecked)} of "
            f"{len(report)} ({shown}); their content is unproven (bare .npy file, or checksums removed from "
            "the manifest): rewrite the store, or pass allow_unchecked=True (CLI: --allow-unchecked)")
    return report


def file_sha256(path: Path, offset: int) -> str:
    "Hex SHA-256 of the bytes of `path` from `offset` to the end, read in 16 MiB chunks."
    with open(path, "rb") as f:
        return _sha256(f, offset)


def _sha256(f: Any, offset: int) -> str:
    return _hash_count(f, offset)[0]


def _hash_count(f: Any, offset: int) -> Tuple[str, int]:
    "Hex SHA-256 of the open file `f` from `offset` to its end, and the number of bytes hashed."
    h, n = hashlib.sha256(), 0
    f.seek(offset)
    while True:
        b = f.read(HASH_CHUNK)
        if not b:
            break
        h.update(b)
        n += len(b)
    return h.hexdigest(), n


def _check_size(fp: Path, m: Manifest, rows: int, offset: int, changed: bool = False) -> os.stat_result:
    "Raise unless the file at `fp` has the size its header and `rows` imply; return its ``stat``."
    expect = offset + rows * m.row_bytes
    st = _stat(fp)
    found = st.st_size
    if found != expect:
        what = f"{expect} bytes ({offset} header + {rows} rows of {describe(m.dtype, m.item_shape)})"
        if changed:
            raise StoreChangedError(f"{fp}: expected {what}, found {found}; file changed since the store was opened")
        raise TruncatedStoreError(f"{fp}: expected {what}, found {found}; "
                                  f"{'truncated (writer not closed?)' if found < expect else 'trailing bytes'}")
    return st


def _check_read_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in READ_MODES:
        raise ArgumentError(f"read_mode: expected one of {READ_MODES}, found {mode!r:.50}")
    return mode


def _check_hint(hint: str, hints: Dict[str, Optional[int]]) -> str:
    if hint not in hints:
        known = sorted(set(ACCESS_HINTS) | set(RANGE_HINTS))
        raise ArgumentError(f"expected an access hint in {known}, found {hint!r}")
    return hint


def _madvise(m: np.ndarray, advice: Optional[int], lo: int = 0, hi: Optional[int] = None) -> None:
    """``madvise`` bytes ``[lo, hi)`` of the data of memmap `m` (default: all of it); a no-op where
    `advice` is None (constant missing) or `m` maps nothing. Errors of the hint are ignored."""
    raw = getattr(m, "_mmap", None)
    if advice is None or raw is None:
        return
    start = m.offset % mmap.ALLOCATIONGRANULARITY   # where the data begins inside the mmap
    hi = m.nbytes if hi is None else hi
    a = (start + lo) // PAGE * PAGE
    b = min(len(raw), start + hi)
    if b > a:
        try:
            raw.madvise(advice, a, b - a)
        except (OSError, ValueError):   # a hint: an old kernel refusing it changes nothing
            pass


def _row_ranges(rows: np.ndarray, row_bytes: int, merge_bytes: int = ADVISE_GAP) -> List[Tuple[int, int]]:
    "Byte ranges ``[lo, hi)`` covering sorted unique `rows`, merging rows closer than `merge_bytes` bytes."
    gap_rows = max(1, merge_bytes // row_bytes)
    breaks = np.flatnonzero(np.diff(rows) > gap_rows)
    firsts = np.concatenate([[rows[0]], rows[breaks + 1]])
    lasts = np.concatenate([rows[breaks], [rows[-1]]])
    return [(int(a) * row_bytes, (int(b) + 1) * row_bytes) for a, b in zip(firsts, lasts)]


def _rebuild(path: str, manifest: Dict[str, Any], offsets: List[int], max_open: int, bare: bool,
             access: str = "normal", idents: Optional[bytes] = None, read_mode: str = "mmap") -> MemmapArray:
    if bare:  # a bare .npy: its name need not be a valid shard name, re-read its header instead
        a = MemmapArray._open_npy(Path(path) / manifest["shards"][0]["file"], max_open)
        a._access = access
        a._idents = _unpack_idents(idents) or a._idents   # the file the pickled array was opened on
        return a.set_read_mode(read_mode)
    return MemmapArray(path, Manifest.from_dict(manifest, where=path), offsets, max_open=max_open, access=access,
                       _idents=_unpack_idents(idents), read_mode=read_mode)


# ---------------------------------------------------------------- file identity
def _ident(st: os.stat_result) -> Ident:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _show(ident: Optional[Ident]) -> str:
    return "no file" if ident is None else f"device {ident[0]} inode {ident[1]}, {ident[2]} bytes, mtime_ns {ident[3]}"


def _ident_or_none(fp: Path) -> Optional[Ident]:
    try:
        return _ident(os.stat(fp))
    except OSError:
        return None


def _stat(fp: Path) -> os.stat_result:
    try:
        return os.stat(fp)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{fp}: shard file not found (store incomplete, moved or replaced?)") from None


def _open_shard(fp: Path):
    return open_regular(fp, "shard file not found (store moved, deleted or replaced since it was opened?)")


def _pack_idents(idents: Optional[List[Ident]]) -> Optional[bytes]:
    return None if idents is None else b"".join(_IDENT.pack(*i) for i in idents)


def _unpack_idents(blob: Optional[bytes]) -> Optional[List[Ident]]:
    return None if blob is None else list(_IDENT.iter_unpack(blob))


def open_memmap(path: Union[str, Path], max_open: int = DEFAULT_MAX_OPEN, validate: str = "offsets") -> MemmapArray:
    "Shorthand for ``MemmapArray.open(path, max_open, validate)``."
    return MemmapArray.open(path, max_open=max_open, validate=validate)
