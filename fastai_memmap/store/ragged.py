"""Ragged stores: items of varying length along their first axis, as flat data plus int64 offsets.

`RaggedArray` reads them, `RaggedWriter` (also reached as ``MemmapWriter(..., kind="ragged")``)
writes them, `save_ragged` converts an iterable of arrays. The on-disk layout is specified in
`fastai_memmap.store.format` ("Ragged stores"). A ragged store is two dense virtual arrays read through
`MemmapArray`: the *elements* (every item's data, concatenated, shape ``(length, *trailing)``) and
the *offsets* (one ``(rows + 1,)`` int64 run per shard); this module adds the item structure.
"""
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import (ArgumentError, ItemShapeError, OffsetsError, RowIndexError, RowIndexTypeError,
                      ShardMismatchError, WriterStateError)
from .format import OFFSETS_DTYPE, Manifest, ShardInfo, final_npy_header, npy_header_bytes, shard_name
from .casting import cast_rows
from .reader import ACCESS_HINTS, ADVISE_GAP, DEFAULT_MAX_OPEN, MemmapArray, check_verified
from .kinds import register_kind
from .writer import DEFAULT_SHARD_BYTES, MemmapWriter

__all__ = ["RaggedArray", "RaggedWriter", "save_ragged", "check_offsets", "ragged_ranges", "VALIDATE_MODES",
           "OFFSETS_CHECK_CHUNK"]

VALIDATE_MODES = ("offsets", "lazy", "full")
OFFSETS_CHECK_CHUNK = 1 << 22   # offsets checked per vectorised pass: 32 MiB of int64, whatever the shard size
SAVE_CHUNK_BYTES = 64 << 20     # save_ragged: items buffered per append, at most this many data bytes


# ---------------------------------------------------------------------------------------- offsets
def check_offsets(offsets: np.ndarray, length: int, where: Union[str, Path]) -> None:
    """Check one shard's offsets: ``offsets[0] == 0``, values in ``[0, length]``, non-decreasing,
    ``offsets[-1] == length``.

    Parameters
    ----------
    offsets : 1-d int64 array (or read-only map) of shape ``(rows + 1,)``
        Read in chunks of `OFFSETS_CHECK_CHUNK` values: O(rows) time, O(chunk) extra memory.
    length : int
        Rows of the shard's data file (elements along the first axis).
    where : str or Path
        The offsets file, named in the error.

    Raises
    ------
    OffsetsError
        (a ``FormatError``, a ``ValueError``) naming `where`, the first bad position, expected and found.
    """
    n = len(offsets)
    if n == 0 or int(offsets[0]) != 0:
        raise OffsetsError(f"{where}: expected offsets[0] == 0, found "
                           f"{'no offsets' if n == 0 else int(offsets[0])}; offsets file corrupt or not ours")
    if int(offsets[-1]) != length:
        raise OffsetsError(f"{where}: expected offsets[{n - 1}] == {length} (the data file's length), found "
                           f"{int(offsets[-1])}; data and offsets files do not belong together (truncated?)")
    for a in range(0, n, OFFSETS_CHECK_CHUNK):
        chunk = np.asarray(offsets[a:a + OFFSETS_CHECK_CHUNK + 1])   # one value of overlap: diffs span chunks
        bad = np.flatnonzero((chunk < 0) | (chunk > length))
        if len(bad):
            i = a + int(bad[0])
            raise OffsetsError(f"{where}: expected offsets in [0, {length}] (the data file's length), found "
                               f"offsets[{i}] = {int(offsets[i])}")
        bad = np.flatnonzero(np.diff(chunk) < 0)
        if len(bad):
            i = a + int(bad[0])
            raise OffsetsError(f"{where}: expected non-decreasing offsets, found offsets[{i}] = {int(offsets[i])} "
                               f"> offsets[{i + 1}] = {int(offsets[i + 1])}")


def ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every ``(s, n)`` pair, without a Python loop.

    Returns a new int64 array of ``lengths.sum()`` values.
    """
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.asarray(starts, np.int64) - (np.cumsum(lengths) - lengths)   # start minus position in output
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


# ---------------------------------------------------------------------------------------- row indices
def norm_rows(key: Any, n: int, where: Any) -> Tuple[Optional[int], np.ndarray]:
    """Normalise a row index of a store of `n` rows, as `MemmapArray` does.

    Returns ``(i, rows)``: ``i`` is the row for an integer key (``rows`` is then ``[i]``), ``None``
    otherwise; ``rows`` is an int64 array (slice, int array-like, boolean mask of length `n`).
    Raises ``RowIndexError`` / ``RowIndexTypeError`` naming `where`.
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        i = int(key)
        if not -n <= i < n:
            raise RowIndexError(f"{where}: row {i} out of range, expected -{n} <= row < {n}")
        i = i + n if i < 0 else i
        return i, np.array([i], np.int64)
    if isinstance(key, slice):
        try:
            r = range(n)[key]
        except TypeError:
            raise RowIndexTypeError(f"{where}: expected integer slice bounds, found {key!r:.100}") from None
        return None, np.arange(r.start, r.stop, r.step, dtype=np.int64)
    if isinstance(key, tuple) or key is None or isinstance(key, (str, bytes, float, np.floating)):
        raise RowIndexTypeError(f"{where}: expected a row index (int, slice or int array), found {key!r:.100}")
    a = np.asarray(key)
    if a.dtype == bool:
        if a.shape != (n,):
            raise RowIndexError(f"{where}: expected a boolean mask of shape ({n},), found {a.shape}")
        return None, np.flatnonzero(a)
    if a.size == 0:
        return None, np.zeros(0, np.int64)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise RowIndexTypeError(f"{where}: expected a 1-d array of integer row indices, found shape {a.shape} "
                                f"dtype {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < -n or hi >= n:
        raise RowIndexError(f"{where}: row {lo if lo < -n else hi} out of range, expected -{n} <= row < {n}")
    a = a.astype(np.int64, copy=False)
    return None, (np.where(a < 0, a + n, a) if lo < 0 else a)


# ---------------------------------------------------------------------------------------- reader
def _part_manifests(m: Manifest, dtype: np.dtype, trailing: Tuple[int, ...]) -> Tuple[Manifest, Manifest]:
    "Dense manifests of the element files (`file` of each shard) and of the offsets files."
    elements = Manifest(dtype=dtype, item_shape=trailing, meta={},
                        shards=tuple(ShardInfo(s.file, s.length, s.checksum) for s in m.shards))
    offsets = Manifest(dtype=OFFSETS_DTYPE, item_shape=(), meta={},
                       shards=tuple(ShardInfo(s.offsets, s.rows + 1, s.offsets_checksum) for s in m.shards))
    return elements, offsets


def open_part(store: Path, m: Manifest, max_open: int) -> MemmapArray:
    """Open the dense virtual array of one part of a ragged/sparse store (elements, offsets or values),
    checking each file's ``.npy`` header, size and identity against `m` (O(number of shards)), as
    `MemmapArray` does for a dense store: a file replaced later is refused when first mapped.

    Raises ``StoreNotFoundError``, ``FormatError``, ``ShardMismatchError``, ``TruncatedStoreError``,
    ``StoreChangedError``, ``UnsafePathError``, naming the file.
    """
    checked = [MemmapArray._check_shard(store, s, m) for s in m.shards]   # header, size, file identity
    return MemmapArray(store, m, [o for o, _ in checked], max_open=max_open, _idents=[i for _, i in checked])


class RaggedArray:
    """A read-only virtual list of ``rows`` items, item ``i`` an array of shape ``(length_i, *trailing_shape)``.

    Open with ``MemmapArray.open(path)`` (or ``RaggedArray.open(path)``) on a store of kind ``"ragged"``.
    Opening checks the manifest, every ``.npy`` header and file size, and (``validate="offsets"``, the
    default) every shard's offsets: O(rows), 8 bytes read per item. ``validate="lazy"`` defers the
    offsets check of a shard to its first read (before any of its items is returned).

    ``a[i]`` returns item ``i`` as a new, owned, writable array of dtype ``a.dtype`` and shape
    ``(length_i, *trailing_shape)``. A slice, an int array-like (any order, duplicates allowed) or a
    boolean mask returns a list of such arrays (views into one new buffer per call, never of the map).
    `gather` returns the same as one flat array plus lengths: one sorted read per shard, no Python
    loop per item. Row errors are ``RowIndexError`` / ``RowIndexTypeError``.

    Pickles as path + manifest (the two part arrays pickle the same way); safe under fork and
    spawn. At most `max_open` files are mapped at once (split between the data and offsets files).
    """
    kind = "ragged"

    def __init__(self, path: Union[str, Path], manifest: Manifest, elements: MemmapArray, offsets: MemmapArray,
                 checked: Iterable[int] = ()):
        self.path, self.manifest = Path(path), manifest
        self.elements = elements      # every item's data, concatenated: (nelements, *trailing_shape)
        self._offsets = offsets       # one (rows + 1,) run of int64 per shard
        self._starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards], dtype=np.int64)])
        self._starts = self._starts.astype(np.int64)
        self._checked = set(checked)  # shards whose offsets were validated (in this or the parent process)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Union[str, Path], max_open: int = DEFAULT_MAX_OPEN, validate: str = "offsets") -> "RaggedArray":
        "Open the ragged store at `path`; raises like ``MemmapArray.open`` plus ``FormatError`` for another kind."
        a = MemmapArray.open(path, max_open=max_open, validate=validate)
        if not isinstance(a, cls):
            raise ShardMismatchError(f"{a.path}: expected a store of kind {cls.kind!r}, found {a.kind!r}")
        return a

    @classmethod
    def _open(cls, path: Path, m: Manifest, max_open: int = DEFAULT_MAX_OPEN,
              validate: str = "offsets") -> "RaggedArray":
        "Open the parts of the ragged store at `path` whose validated manifest is `m` (``MemmapArray.open`` calls this)."
        check_validate(validate)
        elements_m, offsets_m = _part_manifests(m, m.dtype, m.item_shape)
        per_part = max(1, max_open // 2)
        a = cls(path, m, open_part(path, elements_m, per_part), open_part(path, offsets_m, per_part))
        if validate != "lazy":
            a._check_all_offsets()
        return a

    def _check_all_offsets(self) -> None:
        for k in range(len(self.manifest.shards)):
            self._check_shard_offsets(k)

    def _check_shard_offsets(self, k: int) -> None:
        if k in self._checked:
            return
        s = self.manifest.shards[k]
        check_offsets(self._offsets.shard_view(k), s.length, self.path / s.offsets)
        self._checked.add(k)

    # ---------------------------------------------------------------- properties
    @property
    def dtype(self) -> np.dtype:
        "Element dtype of every item."
        return self.manifest.dtype

    @property
    def trailing_shape(self) -> Tuple[int, ...]:
        "Shape of an item without its first (variable) axis: item ``i`` is ``(length_i, *trailing_shape)``."
        return self.manifest.item_shape

    @property
    def meta(self) -> Dict[str, Any]:
        "The manifest's free-form ``meta`` dict. Do not mutate."
        return self.manifest.meta

    @property
    def nelements(self) -> int:
        "Total length of all items (rows of the concatenated data)."
        return len(self.elements)

    @property
    def nbytes(self) -> int:
        "Bytes of the items' data (offsets and headers excluded)."
        return self.elements.nbytes

    @property
    def shard_files(self) -> List[Path]:
        "Paths of every file of every shard (data, offsets[, values]), in row order."
        return [self.path / f for s in self.manifest.shards for f in s.files]

    @property
    def where(self) -> Path:
        "What messages and ``fastai-memmap info`` call this store: its directory (same as `path`)."
        return self.path

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {len(self)} items of "
                f"{ragged_shape(self.trailing_shape)} {self.dtype.name}, {self.nelements} elements, "
                f"{len(self.manifest.shards)} shard(s))")

    # ---------------------------------------------------------------- pickling and maps
    def __reduce__(self):
        return (_rebuild, (type(self), str(self.path), self.manifest.to_dict(), self._parts(), sorted(self._checked)))

    def _parts(self) -> Tuple[MemmapArray, ...]:
        return (self.elements, self._offsets)

    def close(self) -> None:
        "Drop every map (and its file descriptor). The array stays usable: maps reopen on access."
        for part in self._parts():
            part.close()

    # ---------------------------------------------------------------- item bounds
    def _locate(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Global element start and length of each of the (normalised) `rows`; two int64 arrays.

        Reads ``offsets[r]`` and ``offsets[r + 1]`` of every row in one sorted gather per shard.
        """
        k = np.searchsorted(self._starts, rows, side="right") - 1
        if len(self._checked) < len(self.manifest.shards):    # validate="lazy": check shards before use
            for shard in np.unique(k).tolist():
                self._check_shard_offsets(shard)
        g = self._offsets._starts[k] + (rows - self._starts[k])   # row of offsets[r] in the offsets array
        both = self._offsets.read(np.concatenate([g, g + 1])).astype(np.int64, copy=False)
        lo, hi = both[:len(rows)], both[len(rows):]
        return self.elements.shard_starts[k] + lo, hi - lo

    def lengths(self, rows: Any = None) -> np.ndarray:
        """Lengths (first-axis sizes) of items `rows` (default: every item), a new int64 array.

        O(len(rows)): reads 16 bytes per row; ``rows=None`` reads every offsets file once.
        """
        if rows is None:
            if len(self._checked) < len(self.manifest.shards):
                self._check_all_offsets()
            return np.concatenate([np.diff(self._offsets.shard_view(k)) for k in range(len(self.manifest.shards))]
                                  + [np.zeros(0, np.int64)]).astype(np.int64, copy=False)
        return self._locate(norm_rows(rows, len(self), self.path)[1])[1]

    def starts(self, rows: Any = None) -> np.ndarray:
        """Index in `elements` of the first element of items `rows` (default: every item), a new int64 array."""
        if rows is None:
            rows = np.arange(len(self), dtype=np.int64)
        return self._locate(norm_rows(rows, len(self), self.path)[1])[0]

    # ---------------------------------------------------------------- reading
    def element_index(self, rows: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Indices in `elements` of every element of items `rows`, concatenated, and the items' lengths.

        Returns ``(index, lengths)``, two new int64 arrays. Raises ``RowIndexError``, ``RowIndexTypeError``.
        """
        starts, lengths = self._locate(norm_rows(rows, len(self), self.path)[1])
        return ragged_ranges(starts, lengths), lengths

    def gather(self, rows: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Items `rows` as one flat array and their lengths.

        Returns ``(data, lengths)``: `data` a new array of shape ``(lengths.sum(), *trailing_shape)`` and
        dtype `dtype` (item ``j`` is ``data[cumsum(lengths)[j-1]:cumsum(lengths)[j]]``), `lengths` int64
        of shape ``(len(rows),)``. One sorted read per shard whatever the order of `rows` (duplicates
        allowed). Raises ``RowIndexError``, ``RowIndexTypeError``, ``StoreChangedError``.
        """
        index, lengths = self.element_index(rows)
        return self.elements.read(index), lengths

    def read(self, rows: Any) -> List[np.ndarray]:
        "Items `rows` as a list of arrays (views into one new buffer, as from `gather`)."
        data, lengths = self.gather(rows)
        return np.split(data, np.cumsum(lengths)[:-1]) if len(lengths) else []

    def __getitem__(self, key: Any) -> Union[np.ndarray, List[np.ndarray]]:
        i, rows = norm_rows(key, len(self), self.path)
        if i is None:
            return self.read(rows)
        data, _ = self.gather(rows)
        return data

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # ---------------------------------------------------------------- kernel hints
    def advise(self, hint: str, rows: Any = None) -> None:
        """`MemmapArray.advise` for items: a hint to the kernel, never a change of results.

        An access-pattern hint (``'random'``, ``'sequential'``, ``'normal'``) applies to every part. A
        one-off hint (``'willneed'``, ``'populate'``, ``'dontneed'``) applies to the offsets of items
        `rows` (default: every item) and to every page of their elements. Raises what
        ``MemmapArray.advise`` raises, ``RowIndexError`` / ``RowIndexTypeError`` for bad `rows`.
        """
        if hint in ACCESS_HINTS or rows is None:
            for part in self._parts():
                part.advise(hint, rows)
            return
        rows = norm_rows(rows, len(self), self.path)[1]
        k = np.searchsorted(self._starts, rows, side="right") - 1
        g = self._offsets._starts[k] + (rows - self._starts[k])   # offsets[r] and offsets[r + 1]
        self._offsets.advise(hint, np.concatenate([g, g + 1]))
        self.elements.advise(hint, self._element_sample(rows, self.elements.manifest.row_bytes))

    def _element_sample(self, rows: np.ndarray, row_bytes: int) -> np.ndarray:
        """Element rows of items `rows` (normalised) close enough together that ``advise`` covers every
        element of an item with one range (``ADVISE_GAP`` apart at most), without listing each element."""
        starts, lengths = self._locate(rows)
        step = max(1, ADVISE_GAP // max(1, int(row_bytes)))
        counts = -(-lengths // step)
        j = ragged_ranges(np.zeros(len(counts), np.int64), counts)
        last = (starts + lengths - 1)[lengths > 0]
        return np.concatenate([np.repeat(starts, counts) + step * j, last])

    # ---------------------------------------------------------------- checks
    def verify(self, progress: bool = False, allow_unchecked: bool = False) -> List[Dict[str, Any]]:
        """Check every file (data, offsets) against its checksum and every shard's offsets; reads every byte.

        Parameters
        ----------
        progress, allow_unchecked
            As for ``MemmapArray.verify``.

        Returns
        -------
        list of dict
            One dict per file as ``MemmapArray.verify`` returns: every data file, then every offsets file.

        Raises
        ------
        ChecksumError, TruncatedStoreError, StoreChangedError
            As ``MemmapArray.verify``, naming the file.
        OffsetsError
            A shard's offsets do not start at 0, decrease or do not end at its data length.
        UnverifiedStoreError
            A file has no recorded checksum and `allow_unchecked` is False (raised after every other check).
        """
        return check_verified(self.path, self._verify_report(progress), allow_unchecked)

    def _verify_report(self, progress: bool = False) -> List[Dict[str, Any]]:
        "Hash every part, then check every shard's offsets; `verify`'s report, unchecked files included."
        report = [r for part in self._parts() for r in part._hash_shards(progress)]
        self._checked.clear()
        self._check_all_offsets()
        return report


def ragged_shape(trailing: Tuple[int, ...]) -> str:
    "``(?, 3)``: the shape of a ragged item, ``?`` for its variable first axis."
    return "(" + ", ".join(["?"] + [str(t) for t in trailing]) + ("," if not trailing else "") + ")"


def check_validate(validate: str) -> None:
    if validate not in VALIDATE_MODES:
        raise ArgumentError(f"validate: expected one of {VALIDATE_MODES}, found {validate!r}")


def _rebuild(cls: type, path: str, manifest: Dict[str, Any], parts: Tuple[MemmapArray, ...],
             checked: List[int]) -> "RaggedArray":
    return cls(path, Manifest.from_dict(manifest, where=path), *parts, checked=checked)




# ---------------------------------------------------------------------------------------- writer
class NpyStream:
    """One ``.npy`` file written incrementally: a reserved header, rows appended with a running
    SHA-256 of the data bytes, the header rewritten in place with the final row count at `finish`."""

    def __init__(self, path: Path, dtype: np.dtype, trailing: Tuple[int, ...]):
        self.path, self.dtype, self.trailing, self.rows = path, dtype, trailing, 0
        reserved = npy_header_bytes(dtype, (0,) + trailing, reserve=True)
        self._hlen = len(reserved)
        self._f = open(path, "xb")
        self._f.write(reserved)
        self._hash = hashlib.sha256()

    def write(self, a: np.ndarray) -> None:
        "Append the rows of `a` (C-contiguous, of this stream's dtype and trailing shape)."
        if a.nbytes:
            b = memoryview(a).cast("B")
            self._f.write(b)
            self._hash.update(b)
        self.rows += len(a)

    def finish(self) -> str:
        "Rewrite the header, fsync, close; return the data checksum ``sha256:<hex>``."
        self._f.seek(0)
        head = final_npy_header(self.dtype, (self.rows,) + self.trailing, self._hlen)
        self._f.write(head)
        if len(head) < self._hlen:   # no data bytes: the short header, nothing after it
            self._f.truncate(len(head))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        "Close without finishing (abort); a failed flush is ignored: the file is discarded."
        try:
            self._f.close()
        except OSError:
            pass


class _OpenShard:
    "The files of the shard being written: element streams (data[, values]) and the offsets stream."

    def __init__(self, tmp: Path, n: int, parts: Sequence[Tuple[str, np.dtype, Tuple[int, ...]]]):
        self.names = [shard_name(n, part) for part, _, _ in parts] + [shard_name(n, "offsets")]
        self.flats = [NpyStream(tmp / name, dt, tr) for name, (_, dt, tr) in zip(self.names, parts)]
        self.offsets = NpyStream(tmp / self.names[-1], OFFSETS_DTYPE, ())
        self.offsets.write(np.zeros(1, OFFSETS_DTYPE))
        self.rows = self.length = 0

    def close(self) -> None:
        for s in self.flats + [self.offsets]:
            s.close()


class RaggedWriter(MemmapWriter):
    """Write items of varying length (``(length_i, *item_shape)``) to a new ragged store at `path`.

    Use as a context manager, like `MemmapWriter` (or ``MemmapWriter(..., kind="ragged")``)::

        with RaggedWriter("tokens", np.int32) as w:
            for docs in chunks:               # a list of 1-d int arrays of any lengths (0 included)
                w.append(docs)

    Parameters
    ----------
    path, dtype, overwrite, meta, total, progress, casting
        As for `MemmapWriter`; `total` counts items; `casting` (default ``"lossless"``) applies to the
        elements of every item (int64 300 into an int8 store raises ``LossyCastError``).
    item_shape : sequence of int
        The *trailing* shape every item shares (``()`` for token ids).
    shard_rows : int, optional
        Start a new shard after this many items.
    shard_bytes : int
        Start a new shard before an item that would take the shard's data past `shard_bytes`
        (an item larger than that gets a shard of its own). Items never span shards.

    Raises what `MemmapWriter` raises; ``ItemShapeError`` for items of another trailing shape,
    non-numeric dtype, or inconsistent lengths; ``LossyCastError`` for a value the cast would change.
    """
    kind = "ragged"

    def __init__(self, path: Union[str, Path], dtype: Any, item_shape: Sequence[int] = (),
                 shard_rows: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, meta: Optional[Dict[str, Any]] = None,
                 total: Optional[int] = None, progress: bool = False, kind: str = "ragged",
                 casting: str = "lossless"):
        if kind != self.kind:
            raise ArgumentError(f"{path}: expected kind={self.kind!r} for {type(self).__name__}, found {kind!r}")
        super().__init__(path, dtype, item_shape, shard_rows=shard_rows, shard_bytes=shard_bytes,
                         overwrite=overwrite, meta=meta, total=total, progress=progress, casting=casting)
        self.shard_rows = shard_rows or 2 ** 62
        self.shard_bytes = int(shard_bytes)
        self.length = 0

    def _parts(self) -> List[Tuple[str, np.dtype, Tuple[int, ...]]]:
        "``(file part, dtype, trailing shape)`` of each element file of a shard."
        return [("data", self.dtype, self.item_shape)]

    def _element_bytes(self) -> int:
        return sum(int(np.prod(tr, dtype=np.int64)) * dt.itemsize for _, dt, tr in self._parts())

    # ---------------------------------------------------------------- appending
    def append(self, items: Iterable[Any]) -> None:
        """Append `items`: a sequence of array-likes, each of shape ``(length_i, *item_shape)``.

        Cast under the writer's `casting` (default ``"lossless"``: no value may change). Raises
        ``ItemShapeError`` for a wrong trailing shape or a non-numeric dtype, ``LossyCastError``.
        """
        arrays = [np.asarray(a) for a in items]
        for j, a in enumerate(arrays):
            if a.ndim != len(self.item_shape) + 1 or a.shape[1:] != self.item_shape:
                raise ItemShapeError(f"{self.path}: expected items of shape {ragged_shape(self.item_shape)} "
                                     f"(? = any length), found {a.shape}")
            arrays[j] = self._cast(a, self.dtype, self.item_shape, f"{self.path}: item {self.length + j}")
        lengths = np.array([len(a) for a in arrays], np.int64)
        data = (np.concatenate(arrays) if arrays and lengths.sum() else np.zeros((0,) + self.item_shape, self.dtype))
        self.append_flat(data, lengths)

    def append_flat(self, data: Any, lengths: Any) -> None:
        """Append ``len(lengths)`` items given as one flat array: item ``j`` is the next ``lengths[j]`` rows of `data`.

        `data` has shape ``(lengths.sum(), *item_shape)``; `lengths` is a 1-d array of ints >= 0.
        No Python loop per item. Raises ``ItemShapeError``.
        """
        self._check_open()
        data, lengths = self._cast(data, self.dtype, self.item_shape), self._lengths(lengths, data)
        self._guard(self._write_items, lengths, [data])

    def _check_open(self) -> None:
        if self._tmp is None or self._committed:
            raise WriterStateError(f"{self.path}: expected an open writer (use `with {type(self).__name__}(...) as w:`), "
                                   f"found one {'already closed' if self._committed else 'not open'}")

    def _cast(self, a: Any, dtype: np.dtype, trailing: Tuple[int, ...], where: Optional[str] = None) -> np.ndarray:
        "`a` (shape ``(n, *trailing)``) cast to `dtype` under the writer's `casting` (`fastai_memmap.store.casting`)."
        a = np.asarray(a)
        if a.ndim != len(trailing) + 1 or a.shape[1:] != trailing:
            raise ItemShapeError(f"{self.path}: expected flat data of shape (n, {', '.join(map(str, trailing))}), "
                                 f"found {a.shape}")
        if a.size == 0 and a.dtype.kind not in "biufc":
            a = a.astype(dtype)   # an empty list of items arrives as float64 or object: nothing to change
        return cast_rows(a, dtype, trailing, self.casting, where or f"{self.path}: flat data")

    def _lengths(self, lengths: Any, data: np.ndarray) -> np.ndarray:
        n = np.asarray(lengths)
        if n.ndim != 1 or (n.size and n.dtype.kind not in "iu"):
            raise ItemShapeError(f"{self.path}: expected a 1-d integer array of item lengths, found shape "
                                 f"{n.shape} dtype {n.dtype}")
        n = n.astype(np.int64)
        if n.size and int(n.min()) < 0:
            raise ItemShapeError(f"{self.path}: expected item lengths >= 0, found {int(n.min())}")
        if int(n.sum()) != len(data):
            raise ItemShapeError(f"{self.path}: expected flat data of sum(lengths) = {int(n.sum())} rows, "
                                 f"found {len(data)}")
        return n

    def _write_items(self, lengths: np.ndarray, flats: List[np.ndarray]) -> None:
        ends = np.cumsum(lengths)
        eb = self._element_bytes()
        i, n = 0, len(lengths)
        while i < n:
            if self._f is None:
                self._new_shard()
            sh = self._f
            base = int(ends[i - 1]) if i else 0
            take = min(n - i, self.shard_rows - sh.rows)
            if eb:   # items while the shard's data stays within shard_bytes; at least one in an empty shard
                fit = (self.shard_bytes - sh.length * eb) // eb
                take = min(take, int(np.searchsorted(ends[i:i + take] - base, fit, side="right")))
                if take == 0 and sh.rows == 0:
                    take = 1
            if take:
                stop = int(ends[i + take - 1])
                for stream, flat in zip(sh.flats, flats):
                    stream.write(flat[base:stop])
                sh.offsets.write((sh.length + ends[i:i + take] - base).astype(OFFSETS_DTYPE))
                sh.rows, sh.length = sh.rows + take, sh.length + stop - base
                self.rows, self.length, i = self.rows + take, self.length + stop - base, i + take
            if take == 0 or sh.rows >= self.shard_rows or (eb and sh.length * eb >= self.shard_bytes):
                self._finish_shard()
        if self._pbar is not None:
            self._pbar.update(self.rows)

    # ---------------------------------------------------------------- shards and manifest
    def _new_shard(self) -> None:
        self._f = _OpenShard(self._tmp, self._shard_n, self._parts())
        self._shard_n += 1

    def _finish_shard(self) -> None:
        sh, self._f = self._f, None
        checksums = [s.finish() for s in sh.flats]
        entry = dict(file=sh.names[0], rows=sh.rows, checksum=checksums[0], offsets=sh.names[-1],
                     offsets_checksum=sh.offsets.finish(), length=sh.length)
        if len(sh.flats) > 1:
            entry.update(values=sh.names[1], values_checksum=checksums[1])
        self._shards.append(ShardInfo(**entry))

    def _manifest(self) -> Manifest:
        return Manifest(dtype=self.dtype, item_shape=self.item_shape, meta=self.meta, kind=self.kind,
                        shards=tuple(self._shards))


def save_ragged(path: Union[str, Path], items: Iterable[Any], dtype: Any = None, item_shape: Optional[Sequence[int]] = None,
                batch_rows: int = 65536, **kwargs: Any) -> Path:
    """Write an iterable of variable-length arrays to a new ragged store at `path`; return the path.

    Parameters
    ----------
    items : iterable of array-likes
        Item ``i`` of shape ``(length_i, *item_shape)`` (a list, a generator consumed once, a numpy
        object array). Items are buffered `batch_rows` at a time (at most 64 MiB of data).
    dtype, item_shape : optional
        Default: from the first item (`item_shape` is its shape without the first axis).
    **kwargs
        Passed to `RaggedWriter` (``overwrite``, ``shard_rows``, ``shard_bytes``, ``meta``, ``progress``).

    Raises what `RaggedWriter` raises; ``ArgumentError`` (a ``ValueError``) for an empty iterable without `dtype`.
    """
    it = iter(items)
    first = next(it, None)
    if first is None and dtype is None:
        raise ArgumentError(f"{path}: expected items or a dtype, found an empty iterable and no dtype; pass dtype "
                            "(and item_shape) to write an empty store")
    if first is not None:
        first = np.asarray(first)
        if first.ndim == 0:
            raise ItemShapeError(f"{path}: expected items with a first (variable) axis, found a 0-d item")
        dtype = first.dtype if dtype is None else dtype
        item_shape = first.shape[1:] if item_shape is None else item_shape
    if hasattr(items, "__len__"):
        kwargs.setdefault("total", len(items))
    with RaggedWriter(path, dtype, tuple(item_shape or ()), **kwargs) as w:
        buf, nbytes = [], 0
        for a in itertools.chain(() if first is None else (first,), it):
            a = np.asarray(a)
            buf.append(a)
            nbytes += a.nbytes
            if len(buf) >= batch_rows or nbytes >= SAVE_CHUNK_BYTES:
                w.append(buf)
                buf, nbytes = [], 0
        if buf:
            w.append(buf)
    return Path(path)


register_kind("ragged", RaggedArray._open, RaggedWriter)
