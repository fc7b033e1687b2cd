"""Sparse stores: one sparse vector of a fixed dense `size` per row, stored CSR-style.

`SparseArray` reads them (as a virtual dense array of shape ``(rows, size)``, or as CSR batches),
`SparseWriter` (also ``MemmapWriter(..., kind="sparse")``) writes them, `save_sparse` converts a
``scipy.sparse`` matrix in row chunks, `csr_to_dense` expands a batch without a Python loop.
On disk a sparse store is a ragged store of column indices (`fastai_memmap.store.ragged`) plus, unless
every stored value is 1, a flat values file per shard; the layout is specified in
`fastai_memmap.store.format` ("Sparse stores"). Only numpy is needed; scipy only to convert to/from it.
"""
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ArgumentError, ItemShapeError, OffsetsError, ShardMismatchError, SparseIndexError
from .format import Manifest, ShardInfo, check_dtype
from .ragged import (OFFSETS_CHECK_CHUNK, RaggedArray, RaggedWriter, check_validate, norm_rows, open_part)
from .reader import ACCESS_HINTS, DEFAULT_MAX_OPEN, MemmapArray, check_verified
from .kinds import register_kind
from .writer import DEFAULT_SHARD_BYTES

__all__ = ["SparseArray", "SparseWriter", "save_sparse", "csr_to_dense", "is_scipy_sparse", "default_index_dtype"]


def is_scipy_sparse(x: Any) -> bool:
    "True for a ``scipy.sparse`` matrix or array (without importing scipy)."
    return type(x).__module__.startswith("scipy.sparse")


def default_index_dtype(size: int) -> np.dtype:
    "``int32`` column indices when `size` fits (half the bytes of int64), else ``int64``."
    return np.dtype("<i4") if size <= 2 ** 31 else np.dtype("<i8")


def csr_to_dense(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, size: int,
                 out: Optional[np.ndarray] = None, dtype: Any = None) -> np.ndarray:
    """Expand CSR rows to a dense array of shape ``(len(indptr) - 1, size)``, without a Python loop.

    Parameters
    ----------
    indptr : int array of shape ``(n + 1,)``, ``indptr[0] == 0``
    indices, values : arrays of shape ``(indptr[-1],)``
        Column indices in ``[0, size)`` and their values; a repeated index within a row adds its
        values (as ``scipy.sparse`` does).
    out : ndarray, optional
        Filled in place (zeroed first) and returned; shape ``(n, size)``.
    dtype : optional
        dtype of the new array (default ``values.dtype``).

    Returns a new (or `out`) C-contiguous array. Rows with canonical indices (strictly increasing)
    are written by one index assignment; otherwise ``np.add.at`` sums duplicates.

    Raises
    ------
    SparseIndexError
        A column index outside ``[0, size)`` (it would land in another row), naming the row.
    OffsetsError
        `indptr` is not 1-d, does not start at 0, decreases or does not end at ``len(indices)``.
    ItemShapeError
        `values` not of the length of `indices`, or `out` of another shape.
    """
    n = _check_csr(indptr, indices, values, size)
    if out is None:
        out = np.zeros((n, size), values.dtype if dtype is None else dtype)
    else:
        if out.shape != (n, size):
            raise ItemShapeError(f"csr_to_dense: expected out of shape {(n, size)}, found {out.shape}")
        out[...] = 0
    if len(indices):
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        lin = rows * size + indices.astype(np.int64, copy=False)
        flat = out.reshape(-1)
        if len(lin) < 2 or bool((np.diff(lin) > 0).all()):
            flat[lin] = values
        else:
            np.add.at(flat, lin, values)
    return out


def _check_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, size: int) -> int:
    "Number of rows of the CSR parts; raises if they are inconsistent or an index is outside ``[0, size)``."
    if np.ndim(indptr) != 1 or len(indptr) < 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any() \
            or indptr[-1] != len(indices):
        raise OffsetsError(f"csr_to_dense: expected indptr 1-d, from 0, non-decreasing, ending at "
                           f"len(indices) = {len(indices)}, found {np.asarray(indptr)!r:.200}")
    if len(values) != len(indices):
        raise ItemShapeError(f"csr_to_dense: expected one value per index ({len(indices)}), found {len(values)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= size):
        bad = int(np.flatnonzero((indices < 0) | (indices >= size))[0])
        row = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise SparseIndexError(f"csr_to_dense: expected column indices in [0, {size}), found {int(indices[bad])} "
                               f"in row {row} (entry {bad}); it would be written into another row")
    return len(indptr) - 1


class SparseArray:
    """A read-only virtual array of shape ``(rows, size)`` stored sparsely (see `fastai_memmap.store.format`).

    Open with ``MemmapArray.open(path)`` on a store of kind ``"sparse"``. Indexing (``a[i]``,
    slices, int arrays, boolean masks) and `read` return new, owned, dense arrays of dtype `dtype`,
    shape ``(size,)`` for an int and ``(n, size)`` otherwise, like a `MemmapArray`; `read_csr` returns
    the CSR parts of a batch and `to_scipy` a ``scipy.sparse.csr_matrix``. Every batch is one sorted
    read per shard and file.

    Validation: offsets as for ragged stores (at open, or lazily with ``validate="lazy"``); column
    indices of every row read are range-checked on read (O(stored entries read)), and all of them at
    open with ``validate="full"`` or by `verify` (O(nnz)). Raises ``SparseIndexError`` naming the
    indices file, the position, expected and found.

    Pickles as path + manifest; fork/spawn safe; at most about `max_open` maps at once.
    """
    kind = "sparse"

    def __init__(self, path: Union[str, Path], manifest: Manifest, pattern: RaggedArray,
                 values: Optional[MemmapArray] = None, checked: Iterable[int] = ()):
        self.path, self.manifest = Path(path), manifest
        self.pattern = pattern        # the column indices as a ragged store: item i = indices of row i
        self.values = values          # flat values, aligned with pattern.elements; None: every value is 1
        self._checked = set(checked)  # shards whose indices were all range-checked

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Union[str, Path], max_open: int = DEFAULT_MAX_OPEN, validate: str = "offsets") -> "SparseArray":
        "Open the sparse store at `path`; raises like ``MemmapArray.open`` plus ``ShardMismatchError`` for another kind."
        a = MemmapArray.open(path, max_open=max_open, validate=validate)
        if not isinstance(a, cls):
            raise ShardMismatchError(f"{a.path}: expected a store of kind {cls.kind!r}, found {a.kind!r}")
        return a

    @classmethod
    def _open(cls, path: Path, m: Manifest, max_open: int = DEFAULT_MAX_OPEN, validate: str = "offsets") -> "SparseArray":
        "Open the parts of the sparse store at `path` whose validated manifest is `m` (``MemmapArray.open`` calls this)."
        check_validate(validate)
        parts = 3 if m.has_values else 2
        pattern_m = Manifest(dtype=m.index_dtype, item_shape=(), meta={}, kind="ragged", shards=tuple(
            ShardInfo(s.file, s.rows, s.checksum, s.offsets, s.offsets_checksum, s.length) for s in m.shards))
        pattern = RaggedArray._open(path, pattern_m, max_open=max(2, 2 * max_open // parts), validate=validate)
        values = None
        if m.has_values:
            values_m = Manifest(dtype=m.dtype, item_shape=(), meta={},
                                shards=tuple(ShardInfo(s.values, s.length, s.values_checksum) for s in m.shards))
            values = open_part(path, values_m, max(1, max_open // parts))
        a = cls(path, m, pattern, values)
        if validate == "full":
            a._check_all_indices()
        return a

    def _check_all_indices(self) -> None:
        for k in range(len(self.manifest.shards)):
            self._check_shard_indices(k)

    def _check_shard_indices(self, k: int) -> None:
        if k in self._checked:
            return
        idx = self.pattern.elements.shard_view(k)
        for a in range(0, len(idx), OFFSETS_CHECK_CHUNK):
            self._check_range(np.asarray(idx[a:a + OFFSETS_CHECK_CHUNK]), lambda j: a + j, k)
        self._checked.add(k)

    def _check_range(self, indices: np.ndarray, position, shard: int) -> None:
        "Raise ``SparseIndexError`` for the first index outside ``[0, size)``; `position(j)` locates it in its file."
        if not len(indices) or (int(indices.min()) >= 0 and int(indices.max()) < self.size):
            return
        j = int(np.flatnonzero((indices < 0) | (indices >= self.size))[0])
        raise SparseIndexError(f"{self.path / self.manifest.shards[shard].file}: expected column indices in "
                               f"[0, {self.size}) (the store's size), found {int(indices[j])} at position "
                               f"{position(j)}; indices file corrupt or size in the manifest wrong")

    # ---------------------------------------------------------------- properties
    @property
    def dtype(self) -> np.dtype:
        "dtype of the values (and of the dense rows returned)."
        return self.manifest.dtype

    @property
    def index_dtype(self) -> np.dtype:
        "dtype of the stored column indices."
        return self.manifest.index_dtype

    @property
    def size(self) -> int:
        "Dense length of a row."
        return self.manifest.size

    @property
    def item_shape(self) -> Tuple[int, ...]:
        "``(size,)``: the shape of one dense row."
        return (self.size,)

    @property
    def shape(self) -> Tuple[int, int]:
        "``(rows, size)``: the shape of the dense equivalent."
        return (len(self), self.size)

    @property
    def ndim(self) -> int:
        "Always 2: ``(rows, size)``."
        return 2

    @property
    def nnz(self) -> int:
        "Number of stored entries."
        return self.pattern.nelements

    @property
    def has_values(self) -> bool:
        "Whether values are stored (else every stored entry is 1)."
        return self.values is not None

    @property
    def nbytes(self) -> int:
        "Bytes of the stored data: indices, values and offsets (headers excluded)."
        return self.pattern.nbytes + (0 if self.values is None else self.values.nbytes) + 8 * (
            len(self) + len(self.manifest.shards))

    @property
    def dense_nbytes(self) -> int:
        "Bytes the same rows take in a dense store: ``rows * size * itemsize``."
        return len(self) * self.size * self.dtype.itemsize

    @property
    def meta(self) -> Dict[str, Any]:
        "The manifest's free-form ``meta`` dict. Do not mutate."
        return self.manifest.meta

    @property
    def shard_files(self) -> List[Path]:
        "Paths of every file of every shard (indices, offsets[, values])."
        return [self.path / f for s in self.manifest.shards for f in s.files]

    @property
    def where(self) -> Path:
        "What messages and ``fastai-memmap info`` call this store: its directory (same as `path`)."
        return self.path

    def __len__(self) -> int:
        return len(self.pattern)

    def __repr__(self) -> str:
        return (f"SparseArray({str(self.path)!r}, {len(self)} rows of ({self.size},) {self.dtype.name}, "
                f"{self.nnz} stored{'' if self.has_values else ' (all 1)'}, {len(self.manifest.shards)} shard(s))")

    # ---------------------------------------------------------------- pickling and maps
    def __reduce__(self):
        return (_rebuild, (str(self.path), self.manifest.to_dict(), self.pattern, self.values, sorted(self._checked)))

    def close(self) -> None:
        "Drop every map (and its file descriptor). The array stays usable: maps reopen on access."
        self.pattern.close()
        if self.values is not None:
            self.values.close()

    # ---------------------------------------------------------------- reading
    def read_csr(self, rows: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR parts of rows `rows` (int array-like, slice or boolean mask; any order, duplicates allowed).

        Returns ``(indptr, indices, values)``: new arrays, `indptr` int64 of shape ``(n + 1,)`` from 0,
        `indices` of `index_dtype` and `values` of `dtype`, both of shape ``(indptr[-1],)`` (values of
        a store without values are ones). Raises ``RowIndexError``, ``RowIndexTypeError``,
        ``SparseIndexError`` (an index read is outside ``[0, size)``).
        """
        index, lengths = self.pattern.element_index(norm_rows(rows, len(self), self.path)[1])
        indices = self.pattern.elements.read(index)
        if len(indices) and not (int(indices.min()) >= 0 and int(indices.max()) < self.size):
            bad = int(np.flatnonzero((indices < 0) | (indices >= self.size))[0])
            starts = self.pattern.elements.shard_starts
            k = int(np.searchsorted(starts, index[bad], side="right") - 1)
            self._check_range(indices[bad:bad + 1], lambda j: int(index[bad] - starts[k]), k)
        values = self.values.read(index) if self.values is not None else np.ones(len(index), self.dtype)
        indptr = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return indptr, indices, values

    def advise(self, hint: str, rows: Any = None) -> None:
        """`MemmapArray.advise` for rows: the pattern's (`RaggedArray.advise`) and, for a one-off hint on
        `rows`, every page of their values. A hint, never a change of results; raises like `read`."""
        self.pattern.advise(hint, rows)
        if self.values is None:
            return
        if hint in ACCESS_HINTS or rows is None:
            self.values.advise(hint, rows)
            return
        row_bytes = max(self.values.manifest.row_bytes, self.pattern.elements.manifest.row_bytes)
        self.values.advise(hint, self.pattern._element_sample(norm_rows(rows, len(self), self.path)[1], row_bytes))

    def read(self, rows: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows `rows` as a new dense array of shape ``(n, size)`` and dtype `dtype` (or into `out`).

        Raises like `read_csr`; ``ItemShapeError`` for an `out` of another shape.
        """
        indptr, indices, values = self.read_csr(rows)
        return csr_to_dense(indptr, indices, values, self.size, out=out, dtype=self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        i, rows = norm_rows(key, len(self), self.path)
        dense = self.read(rows)
        return dense[0] if i is not None else dense

    def to_scipy(self, rows: Any = None) -> Any:
        """Rows `rows` (default: all, O(nnz) memory) as a ``scipy.sparse.csr_matrix`` of shape ``(n, size)``."""
        from scipy.sparse import csr_matrix
        indptr, indices, values = self.read_csr(slice(None) if rows is None else rows)
        return csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, self.size))

    # ---------------------------------------------------------------- checks
    def verify(self, progress: bool = False, allow_unchecked: bool = False) -> List[Dict[str, Any]]:
        """Check every file against its checksum, every shard's offsets and every column index (reads every byte).

        Parameters
        ----------
        progress, allow_unchecked
            As for ``MemmapArray.verify``.

        Returns
        -------
        list of dict
            One dict per file as ``MemmapArray.verify`` returns: every index file, every offsets file,
            then every values file (none for a pattern-only store).

        Raises
        ------
        ChecksumError, TruncatedStoreError, StoreChangedError, OffsetsError
            As ``RaggedArray.verify``, naming the file.
        SparseIndexError
            A stored column index is outside ``[0, size)``.
        UnverifiedStoreError
            A file has no recorded checksum and `allow_unchecked` is False (raised after every other check).
        """
        report = self.pattern._verify_report(progress)
        if self.values is not None:
            report += self.values._hash_shards(progress)
        self._checked.clear()
        self._check_all_indices()
        return check_verified(self.path, report, allow_unchecked)


def _rebuild(path: str, manifest: Dict[str, Any], pattern: RaggedArray, values: Optional[MemmapArray],
             checked: List[int]) -> SparseArray:
    return SparseArray(path, Manifest.from_dict(manifest, where=path), pattern, values, checked)


# ---------------------------------------------------------------------------------------- writer
class SparseWriter(RaggedWriter):
    """Write sparse rows of dense length `size` to a new sparse store at `path`, in CSR chunks.

    Use as a context manager (or ``MemmapWriter(path, dtype, kind="sparse", size=...)``)::

        with SparseWriter("features", np.float32, size=100_000) as w:
            for chunk in chunks:             # scipy.sparse matrices (n_i, 100_000)
                w.append(chunk)

    Parameters
    ----------
    path, overwrite, meta, total, progress, shard_rows, shard_bytes, casting
        As for `RaggedWriter` (`shard_bytes` counts index and value bytes; `casting` applies to values).
    dtype : numpy dtype
        dtype of the values and of the dense rows read back (default float32).
    size : int
        Dense length of a row (or give ``item_shape=(size,)``).
    index_dtype : numpy integer dtype, optional
        Default: int32 if `size` <= 2**31, else int64.
    values : bool
        Store values (default). ``False`` stores only the pattern: every stored entry reads as 1, and
        appending a value other than 1 raises ``ItemShapeError``.

    Raises what `MemmapWriter` raises; ``ItemShapeError`` for indices outside ``[0, size)``, bad
    `indptr`, or values of the wrong length or kind.
    """
    kind = "sparse"

    def __init__(self, path: Union[str, Path], dtype: Any = np.float32, item_shape: Optional[Sequence[int]] = None,
                 size: Optional[int] = None, index_dtype: Any = None, values: bool = True,
                 shard_rows: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, meta: Optional[Dict[str, Any]] = None,
                 total: Optional[int] = None, progress: bool = False, kind: str = "sparse",
                 casting: str = "lossless"):
        if size is None and item_shape is not None and len(tuple(item_shape)) == 1:
            size = tuple(item_shape)[0]
        if not isinstance(size, (int, np.integer)) or size < 0 or (
                item_shape is not None and tuple(item_shape) != (size,)):
            raise ItemShapeError(f"{path}: expected size (an int >= 0) or item_shape=(size,), found size={size!r}, "
                                 f"item_shape={item_shape!r}")
        self.size = int(size)
        self.index_dtype = check_dtype(default_index_dtype(self.size) if index_dtype is None else index_dtype)
        if self.index_dtype.kind not in "iu" or (self.size and self.size - 1 > np.iinfo(self.index_dtype).max):
            raise ItemShapeError(f"{path}: expected an integer index_dtype that holds {max(self.size - 1, 0)}, "
                                 f"found {self.index_dtype}")
        self.has_values = bool(values)
        super().__init__(path, dtype, (), shard_rows=shard_rows, shard_bytes=shard_bytes, overwrite=overwrite,
                         meta=meta, total=total, progress=progress, kind=kind, casting=casting)

    def _parts(self) -> List[Tuple[str, np.dtype, Tuple[int, ...]]]:
        parts = [("indices", self.index_dtype, ())]
        return parts + [("values", self.dtype, ())] if self.has_values else parts

    def _manifest(self) -> Manifest:
        return Manifest(dtype=self.dtype, item_shape=(self.size,), meta=self.meta, kind="sparse",
                        shards=tuple(self._shards), size=self.size, index_dtype=self.index_dtype)

    def append(self, rows: Any) -> None:
        """Append rows: a ``scipy.sparse`` matrix/array, a dense 2-d array of shape ``(n, size)``, or a
        tuple ``(indptr, indices[, values])``. Raises ``ItemShapeError``."""
        if is_scipy_sparse(rows):
            m = rows.tocsr()
            if m.ndim != 2 or m.shape[1] != self.size:
                raise ItemShapeError(f"{self.path}: expected a sparse matrix of shape (n, {self.size}), found {m.shape}")
            return self.append_csr(m.indptr, m.indices, m.data)
        if isinstance(rows, tuple):
            return self.append_csr(*rows)
        a = np.asarray(rows)
        if a.ndim != 2 or a.shape[1] != self.size:
            raise ItemShapeError(f"{self.path}: expected dense rows of shape (n, {self.size}), found {a.shape}")
        r, c = np.nonzero(a)
        indptr = np.zeros(len(a) + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=len(a)), out=indptr[1:])
        self.append_csr(indptr, c, a[r, c])

    def append_csr(self, indptr: Any, indices: Any, values: Any = None) -> None:
        """Append ``len(indptr) - 1`` rows in CSR form (row ``j``: ``indices[indptr[j]:indptr[j+1]]``).

        `indptr` is a non-decreasing int array (it may start above 0, as in a sliced matrix); `indices`
        ints in ``[0, size)``; `values` (default: ones) cast to `dtype` under the writer's `casting`
        (default ``"lossless"``). Vectorised. Raises ``ItemShapeError``, ``LossyCastError``.
        """
        self._check_open()
        indptr = np.asarray(indptr)
        if indptr.ndim != 1 or len(indptr) < 1 or indptr.dtype.kind not in "iu":
            raise ItemShapeError(f"{self.path}: expected a 1-d integer indptr of n + 1 values, found shape "
                                 f"{indptr.shape} dtype {indptr.dtype}")
        indptr = indptr.astype(np.int64)
        lengths = np.diff(indptr)
        if len(lengths) and int(lengths.min()) < 0:
            raise ItemShapeError(f"{self.path}: expected a non-decreasing indptr, found a decrease at row "
                                 f"{int(np.flatnonzero(lengths < 0)[0])}")
        a, b = int(indptr[0]), int(indptr[-1])
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu") or not 0 <= a <= b <= len(indices):
            raise ItemShapeError(f"{self.path}: expected 1-d integer indices with indptr[0] <= indptr[-1] <= "
                                 f"len(indices), found shape {indices.shape} dtype {indices.dtype}, indptr from {a} to {b}")
        indices = indices[a:b]
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise ItemShapeError(f"{self.path}: expected column indices in [0, {self.size}), found {bad}")
        flats = [np.ascontiguousarray(indices.astype(self.index_dtype, copy=False))]   # in range: exact
        vals = None if values is None else np.asarray(values)
        if vals is not None:
            if vals.ndim != 1 or len(vals) < b:
                raise ItemShapeError(f"{self.path}: expected values of shape ({b},) aligned with indices, found {vals.shape}")
            vals = vals[a:b]
        if self.has_values:
            flats.append(self._cast(np.ones(len(indices), self.dtype) if vals is None else vals, self.dtype, ()))
        elif vals is not None and len(vals) and not bool((vals == 1).all()):
            raise ItemShapeError(f"{self.path}: expected only values equal to 1 in a store without values "
                                 f"(values=False), found {vals[vals != 1][0]!r}; write with values=True")
        self._guard(self._write_items, lengths, flats)


def save_sparse(path: Union[str, Path], data: Any, dtype: Any = None, batch_rows: int = 65536,
                values: Optional[bool] = None, **kwargs: Any) -> Path:
    """Write a ``scipy.sparse`` matrix (or an iterable of them, row chunks) to a new sparse store.

    Parameters
    ----------
    data : scipy.sparse matrix/array of shape ``(rows, size)``, or an iterable of them
        A matrix is converted to CSR once (if it is not) and written `batch_rows` rows at a time.
    dtype : optional
        Values dtype on disk (default: the matrix's).
    values : bool, optional
        Store values (default ``True``); ``False`` for a 0/1 pattern (values must all be 1).
    **kwargs
        Passed to `SparseWriter` (``overwrite``, ``shard_rows``, ``shard_bytes``, ``meta``,
        ``index_dtype``, ``progress``).

    Returns the path. Raises what `SparseWriter` raises; ``ArgumentError`` for an empty iterable.
    """
    if is_scipy_sparse(data):
        m = data.tocsr()
        chunks: Iterable = (m[i:i + batch_rows] for i in range(0, m.shape[0], batch_rows))
        first, size = None, m.shape[1]
        kwargs.setdefault("total", m.shape[0])
        dtype = m.dtype if dtype is None else dtype
    else:
        chunks = iter(data)
        first = next(chunks, None)
        if first is None:
            raise ArgumentError(f"{path}: expected scipy.sparse row chunks, found an empty iterable")
        size, dtype = first.shape[1], first.dtype if dtype is None else dtype
    with SparseWriter(path, dtype, size=size, values=True if values is None else values, **kwargs) as w:
        if first is not None:
            w.append(first)
        for chunk in chunks:
            w.append(chunk)
    return Path(path)


register_kind("sparse", SparseArray._open, SparseWriter)
