"""The fastai_memmap store: on-disk format, version 1.

A *store* holds N rows ("items") of one dtype and one item shape, e.g. 1,000,000 rows of
(3, 64, 64) uint8. It reads as one virtual array of shape ``(N, *item_shape)`` by global
row index, even when it spans several files.

Layout
------
A store is a directory::

    my_store/
        manifest.json        # the header: format, version, dtype, item shape, rows, shards
        shard-000000.npy     # rows [0, r0)        -- each a valid .npy file, version 1.0
        shard-000001.npy     # rows [r0, r0 + r1)
        ...

A bare ``.npy`` file (C order, simple dtype) also opens as a one-shard store without a manifest;
it has no checksum.

Besides these *dense* stores (``kind`` ``"dense"``), a store can hold *ragged* items (item ``i`` has
shape ``(length_i, *item_shape)``: token ids, point clouds, variable-height images) or *sparse* rows
(CSR-style vectors of a fixed dense ``size``); see `Ragged stores`_ and `Sparse stores`_ below. Both
use only valid ``.npy`` files, so plain numpy reads every part. Dense stores are unchanged by them.

Shards
------
Each shard is a standard NumPy ``.npy`` file, format version 1.0 (see ``numpy.lib.format``):
6 bytes magic ``\\x93NUMPY``, 2 bytes version ``\\x01\\x00``, a little-endian uint16 header length,
then an ASCII Python-literal dict ``{'descr': ..., 'fortran_order': False, 'shape': (rows, *item_shape), }``
padded with spaces and a final ``\\n`` so that the data starts at a multiple of ``DATA_ALIGN`` (4096
bytes, the page size; numpy itself pads to ``ARRAY_ALIGN``, 64, and reads either unchanged). The data
follow in C order, ``rows * prod(item_shape) * itemsize`` bytes, nothing after. So
``np.load(shard, mmap_mode='r')`` reads any shard without this package.

Page-aligned data make a row of at most 4 KiB touch one page when 4096 is a multiple of the row size
(and a row of a multiple of 4 KiB touch only its own pages): a cold random read of one row then costs
one page read from disk, not two. Stores written before this rule (data at a multiple of 64) open and
read the same; readers take the data offset from each header, never assume it.

Writers reserve a fixed header size when a shard is opened (big enough for a 19-digit row count,
``MAX_ROWS_DIGITS``) and rewrite the header in place, same length, when the shard is complete.

Manifest
--------
``manifest.json`` is strict UTF-8 JSON (RFC 8259: never pickle, and no ``NaN``/``Infinity`` tokens,
which Python's ``json`` would accept but other languages' parsers refuse; writers refuse such values
in ``meta`` and readers refuse manifests that contain them), at most ``MAX_MANIFEST_BYTES`` (64 MiB),
an object with these keys:

=============  ==========================================================================
``format``     the string ``"fastai_memmap"`` (``FORMAT_NAME``)
``version``    integer format version; this module reads ``1`` (``FORMAT_VERSION``)
``kind``       ``"dense"`` (every row has ``item_shape``; the default when the key is missing),
               ``"ragged"`` or ``"sparse"`` (below)
``dtype``      NumPy dtype string with explicit byte order, e.g. ``"<f4"``, ``"|u1"``
``item_shape`` list of non-negative ints, the shape of one row (``[]`` for scalars); for ragged
               stores the *trailing* shape, for sparse stores ``[size]``
``rows``       total number of rows, the sum of the shards' rows
``shards``     list of ``{"file": name, "rows": int, "checksum": "sha256:<hex>"}``, in row order;
               ``file`` is a bare file name inside the store directory (no ``/``, no ``..``);
               the checksum covers the shard's data bytes (not its header)
``meta``       free JSON object for the user and item lists (e.g. ``{"layout": "HWC",
               "classes": [...]}``)
=============  ==========================================================================

Validation at open (O(number of shards): one ``stat`` and one header read per shard) checks the
format name and version, field types, the dtype (no object, structured/void or non-numeric
dtypes), each shard's ``.npy`` header against the manifest (dtype, item shape, rows), each file
size against ``header + rows * row_bytes``, and that shard names stay inside the directory.
Checksums are checked only by ``verify()``: they need to read every byte.

Ragged stores
-------------
``kind`` is ``"ragged"``. Item ``i`` is an array of shape ``(length_i, *item_shape)``, ``length_i >= 0``
(empty items are allowed). Each shard is a pair of ``.npy`` files, written as for dense shards
(version 1.0, reserved header, data aligned to ``DATA_ALIGN``)::

    shard-000000.data.npy       # (length, *item_shape) of dtype: the shard's items, concatenated
    shard-000000.offsets.npy    # (rows + 1,) '<i8': item r is data[offsets[r]:offsets[r + 1]]

Offsets are little-endian int64 with ``offsets[0] == 0``, non-decreasing, and
``offsets[rows] == length`` (the data file's row count), so ``length_i = offsets[r + 1] - offsets[r]``
and every item lies inside the data file. A shard entry of the manifest names both files::

    {"file": "shard-000000.data.npy", "offsets": "shard-000000.offsets.npy", "rows": r,
     "length": n, "checksum": "sha256:<hex of data bytes>", "offsets_checksum": "sha256:<hex>"}

``rows`` counts items, ``length`` counts elements along the first axis (data rows). Both checksums
cover the data bytes of their file (not the header).

Sparse stores
-------------
``kind`` is ``"sparse"``. Row ``i`` is a vector of ``size`` elements of ``dtype`` (its *values* dtype),
stored CSR-style as the column indices of its stored entries and, optionally, their values
(without values every stored entry is 1). The manifest adds two keys and requires
``item_shape == [size]``:

=============== ==========================================================================
``size``        the dense length of a row, an int ``>= 0``
``index_dtype`` the column index dtype, a signed or unsigned integer dtype string (``"<i4"``),
                wide enough for ``size - 1``
=============== ==========================================================================

Each shard is two or three ``.npy`` files::

    shard-000000.indices.npy    # (nnz,) of index_dtype: column indices, rows concatenated
    shard-000000.offsets.npy    # (rows + 1,) '<i8', exactly as for ragged stores
    shard-000000.values.npy     # (nnz,) of dtype: the values (absent in stores without values)

with a shard entry ``{"file": <indices>, "offsets": ..., "values": ... (optional), "rows": r,
"length": nnz, "checksum", "offsets_checksum", "values_checksum"}``; either every shard has
``values`` or none. Every index is in ``[0, size)``; indices of a row need not be sorted, and a
repeated index adds its values (as ``scipy.sparse`` does when converting to dense).

Validation of ragged and sparse stores at open (``MemmapArray.open(..., validate=...)``): always the
manifest, every ``.npy`` header against it and every file size (O(number of shards), as for dense
stores); with the default ``validate="offsets"`` also every offsets file (O(rows): 8 bytes per item,
read in chunks), so malformed offsets are refused at open. ``validate="lazy"`` checks a shard's
offsets when the shard is first read, before any of its items is returned (for stores with so
many items that reading 8 bytes per item at open is too slow). Sparse indices (O(nnz)) are
range-checked on every read for the rows read; ``validate="full"`` and ``verify()`` check all of
them at once.
"""
import ast
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import (ArgumentTypeError, FormatError, ShardMismatchError, StoreNotFoundError, TruncatedStoreError,
                      UnsafePathError, UnsupportedDtypeError)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "ARRAY_ALIGN", "DATA_ALIGN", "KINDS", "OFFSETS_DTYPE", "ShardInfo",
           "Manifest", "check_dtype", "check_meta", "encode_manifest", "npy_header_bytes", "final_npy_header", "read_npy_header", "shard_name",
           "describe"]

FORMAT_NAME = "fastai_memmap"
FORMAT_VERSION = 1            # bump on any change a version-1 reader would misread
MANIFEST_NAME = "manifest.json"
NPY_MAGIC = b"\x93NUMPY"      # numpy.lib.format.MAGIC_PREFIX
ARRAY_ALIGN = 64              # numpy.lib.format.ARRAY_ALIGN: the alignment numpy writes (stores before DATA_ALIGN)
DATA_ALIGN = 4096             # data of new shards start on a page: a row <= 4 KiB dividing 4096 spans one page
MAX_ROWS_DIGITS = 19          # len(str(2**63 - 1)): room reserved for the row count in a header
MAX_MANIFEST_BYTES = 64 << 20  # a manifest larger than this is refused, not parsed
MAX_META_BYTES = MAX_MANIFEST_BYTES - (1 << 20)   # the rest is room for the shard list (~150 bytes a shard)
MAX_NPY_HEADER = 10000        # numpy's own default max_header_size for untrusted headers
MAX_INDEX = 2 ** 63 - 1       # numpy's largest dimension and off_t's largest size: beyond, refuse, never allocate
KINDS = ("dense", "ragged", "sparse")
OFFSETS_DTYPE = np.dtype("<i8")  # ragged/sparse offsets: little-endian int64 whatever the machine
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """Return `dtype` as a ``np.dtype`` if it can be memory-mapped safely.

    Accepted: booleans, integers, unsigned integers, floats and complex numbers (any byte order).
    Raises ``UnsupportedDtypeError`` (a ``TypeError``) for object, structured/void, string,
    datetime and other dtypes: these need pickle or have no fixed numeric meaning.
    """
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError) as e:   # numpy parses some strings as comma formats
        raise UnsupportedDtypeError(f"{what}: expected a numeric numpy dtype, found {dtype!r:.100} "
                                    f"({type(e).__name__}: {e})") from None
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
        raise UnsupportedDtypeError(
            f"{what}: expected a numeric dtype (bool, int, uint, float, complex), found {dt!r}; "
            "object, structured, string and datetime dtypes cannot be stored")
    return dt


def shard_name(i: int, part: Optional[str] = None) -> str:
    """File name of shard number `i` as written by `MemmapWriter`: ``shard-000000.npy``, or
    ``shard-000000.{part}.npy`` for a `part` (``data``, ``offsets``, ``indices``, ``values``) of a
    ragged or sparse shard."""
    return f"shard-{i:06d}.npy" if part is None else f"shard-{i:06d}.{part}.npy"


def _header_dict(dtype: np.dtype, shape: Tuple[int, ...]) -> str:
    descr = np.lib.format.dtype_to_descr(dtype)
    return "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))


def npy_header_bytes(dtype: np.dtype, shape: Tuple[int, ...], reserve: bool = False,
                     length: Optional[int] = None) -> bytes:
    """Bytes of a version-1.0 ``.npy`` header for a C-order array of `dtype` and `shape`.

    With ``reserve=True`` the header is sized for any row count up to ``2**63 - 1`` (so it can be
    rewritten in place later); with `length` it is padded to exactly `length` bytes, else to a
    multiple of ``DATA_ALIGN`` (4096: the data start on a page), or of ``ARRAY_ALIGN`` (64) for an
    array of no data bytes (numpy cannot map a file that ends where its data start). Raises
    ``FormatError`` if the header does not fit in `length`.
    """
    if reserve:
        shape = (10 ** (MAX_ROWS_DIGITS - 1),) + tuple(shape[1:])
    text = _header_dict(dtype, shape)
    need = len(NPY_MAGIC) + 2 + 2 + len(text) + 1
    align = ARRAY_ALIGN if math.prod(shape) * dtype.itemsize == 0 else DATA_ALIGN
    total = length if length is not None else -(-need // align) * align
    if need > total or total - 10 > 0xFFFF:
        raise FormatError(f"npy header for shape {shape}: needs {need} bytes, only {total} reserved")
    body = text + " " * (total - need) + "\n"
    return NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


def final_npy_header(dtype: np.dtype, shape: Tuple[int, ...], reserved: int) -> bytes:
    """The header a writer puts back at byte 0 of a finished shard that reserved `reserved` bytes:
    exactly `reserved` bytes, or the short header of an array without data bytes (the writer then
    truncates the file to it: numpy cannot map a file that ends where its data start)."""
    if math.prod(shape) * np.dtype(dtype).itemsize == 0:
        return npy_header_bytes(dtype, shape)
    return npy_header_bytes(dtype, shape, length=reserved)


def read_npy_header(path: Path) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """Read the header of the ``.npy`` file at `path`.

    Returns ``(dtype, shape, data_offset)`` where `data_offset` is the header size in bytes.
    Raises ``StoreNotFoundError`` if the file is missing, ``FormatError`` for a bad magic, an
    unsupported version, an unparsable header or Fortran order, ``UnsupportedDtypeError`` for
    non-numeric dtypes. Never unpickles anything.
    """
    with open_regular(path, "shard file not found (store incomplete or moved?)") as f:
        magic = f.read(8)
        if len(magic) < 8 or magic[:6] != NPY_MAGIC:
            raise FormatError(f"{path}: expected .npy magic {NPY_MAGIC!r}, found {magic[:6]!r}; not a .npy file")
        major = magic[6]
        if major not in (1, 2, 3):
            raise FormatError(f"{path}: expected .npy format version 1, 2 or 3, found {major}.{magic[7]}")
        size_fmt = "<H" if major == 1 else "<I"
        raw = f.read(struct.calcsize(size_fmt))
        if len(raw) < struct.calcsize(size_fmt):
            raise TruncatedStoreError(f"{path}: expected a {struct.calcsize(size_fmt)}-byte .npy header length "
                                      f"after the magic, found {len(raw)} bytes; file truncated")
        (hlen,) = struct.unpack(size_fmt, raw)
        if hlen > MAX_NPY_HEADER:
            raise FormatError(f"{path}: expected a .npy header of at most {MAX_NPY_HEADER} bytes, found {hlen}")
        text = f.read(hlen)
        offset = f.tell()
    if len(text) < hlen:
        raise TruncatedStoreError(f"{path}: expected a {hlen}-byte .npy header, found {len(text)} bytes")
    try:
        d = ast.literal_eval(text.decode("utf8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise FormatError(f"{path}: expected a Python literal dict as .npy header, found unparsable text "
                          f"{text[:80]!r} ({type(e).__name__})") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise FormatError(f"{path}: expected .npy header keys descr, fortran_order, shape; found {d!r:.200}")
    shape = d["shape"]
    if not (isinstance(shape, tuple) and all(type(s) is int and 0 <= s <= MAX_INDEX for s in shape)):
        raise FormatError(f"{path}: expected a tuple of non-negative ints as .npy shape, found {shape!r:.200}")
    if d["fortran_order"] is not False:
        raise FormatError(f"{path}: expected C order (fortran_order False), found {d['fortran_order']!r}; "
                          "save with np.ascontiguousarray")
    if not isinstance(d["descr"], str):
        raise UnsupportedDtypeError(f"{path}: expected a simple numeric dtype, found descr {d['descr']!r:.200}")
    dtype = check_dtype(d["descr"], what=str(path))
    if math.prod(shape) * dtype.itemsize > MAX_INDEX:
        raise FormatError(f"{path}: expected at most {MAX_INDEX} data bytes, found shape {shape} {dtype.name}")
    return dtype, shape, offset


def open_regular(path: Path, missing: str):
    """Open `path` read-only, as a binary file object, if it is a regular file (symlinks followed).

    Never blocks on a FIFO nor reads a device: both, and directories, raise ``FormatError``;
    a missing file raises ``StoreNotFoundError`` with the explanation `missing`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: {missing}") from None
    except IsADirectoryError:
        fd = None
    mode = stat.S_IFDIR if fd is None else os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        if fd is not None:
            os.close(fd)
        kind = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
                stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "special file")
        raise FormatError(f"{path}: expected a regular file, found a {kind}")
    return os.fdopen(fd, "rb")


def _is_int(x: Any) -> bool:
    return type(x) is int


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a store: file name (inside the store directory), row count, checksum or None.

    Ragged and sparse shards also name their `offsets` file and, for sparse stores with values,
    their `values` file, with checksums; `length` is the number of data elements (first-axis rows
    of `file`). These fields are None for dense shards.
    """
    file: str
    rows: int
    checksum: Optional[str] = None
    offsets: Optional[str] = None
    offsets_checksum: Optional[str] = None
    length: Optional[int] = None
    values: Optional[str] = None
    values_checksum: Optional[str] = None

    @property
    def files(self) -> Tuple[str, ...]:
        "Every file of the shard: ``(file,)`` or ``(file, offsets[, values])``."
        return tuple(f for f in (self.file, self.offsets, self.values) if f is not None)


@dataclass(frozen=True)
class Manifest:
    """The validated header of a store (see module docstring). Frozen: build a new one to change it.

    `item_shape` is a tuple of ints, `dtype` a ``np.dtype``, `rows` the total row count,
    `shards` a tuple of ``ShardInfo`` in row order, `meta` a JSON-compatible dict. Sparse stores
    also have `size` (int) and `index_dtype` (``np.dtype``); both are None for other kinds.
    """
    dtype: np.dtype
    item_shape: Tuple[int, ...]
    shards: Tuple[ShardInfo, ...]
    meta: Dict[str, Any] = field(default_factory=dict)
    kind: str = "dense"
    version: int = FORMAT_VERSION
    size: Optional[int] = None
    index_dtype: Optional[np.dtype] = None

    @property
    def rows(self) -> int:
        "Total number of rows (sum over shards)."
        return sum(s.rows for s in self.shards)

    @property
    def length(self) -> int:
        "Total number of data elements of a ragged or sparse store (sum of the shards' `length`)."
        return sum(s.length or 0 for s in self.shards)

    @property
    def has_values(self) -> bool:
        "Whether a sparse store stores values (else every stored entry is 1)."
        return bool(self.shards) and self.shards[0].values is not None

    @property
    def row_bytes(self) -> int:
        "Bytes of one row: ``prod(item_shape) * itemsize``."
        return math.prod(self.item_shape) * self.dtype.itemsize   # exact Python int: no int64 overflow

    def to_dict(self) -> Dict[str, Any]:
        "The manifest as a JSON-compatible dict (the exact content of ``manifest.json``)."
        d = {"format": FORMAT_NAME, "version": self.version, "kind": self.kind,
             "dtype": self.dtype.str, "item_shape": list(self.item_shape), "rows": self.rows,
             "shards": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.shards],
             "meta": self.meta}
        if self.kind == "sparse":
            d.update(size=self.size, index_dtype=self.index_dtype.str)
        return d

    def to_json(self) -> str:
        "The manifest serialised as strict JSON text (``ValueError`` for NaN/inf in `meta`: see `encode_manifest`)."
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        """Validate a parsed manifest and build a `Manifest`.

        Raises ``FormatError`` for a wrong format name, version, kind, missing keys or fields of the
        wrong type, ``UnsupportedDtypeError`` for a bad dtype, ``UnsafePathError`` for shard names
        that would leave the store directory, ``ShardMismatchError`` when rows do not add up.
        """
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: expected format {FORMAT_NAME!r}, found {d.get('format')!r}; not a fastai_memmap store")
        if not _is_int(d.get("version")) or d["version"] != FORMAT_VERSION:
            raise FormatError(f"{where}: expected format version {FORMAT_VERSION}, found {d.get('version')!r}; "
                              "written by a newer fastai_memmap? upgrade the package")
        kind = d.get("kind", "dense")
        if kind not in KINDS:
            raise FormatError(f"{where}: expected kind in {KINDS}, found {kind!r}")
        for key, typ in (("dtype", str), ("item_shape", list), ("rows", int), ("shards", list), ("meta", dict)):
            if key not in d:
                raise FormatError(f"{where}: expected key {key!r}, found keys {sorted(d)}")
            if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
                raise FormatError(f"{where}: expected {key!r} of type {typ.__name__}, found {type(d[key]).__name__}")
        dtype = check_dtype(d["dtype"], what=f"{where}: dtype")
        shape = d["item_shape"]
        if not all(_is_int(s) and s >= 0 for s in shape):
            raise FormatError(f"{where}: expected item_shape of non-negative ints, found {shape!r:.200}")
        shards = tuple(cls._shard_from_dict(s, where, kind) for s in d["shards"])
        names = [f for s in shards for f in s.files]
        if len(set(names)) != len(names):
            raise FormatError(f"{where}: expected distinct shard files, found duplicates in {names!r:.200}")
        size, index_dtype = cls._sparse_fields(d, where, shards) if kind == "sparse" else (None, None)
        m = cls(dtype=dtype, item_shape=tuple(shape), shards=shards, meta=d["meta"], kind=kind,
                size=size, index_dtype=index_dtype)
        if m.rows != d["rows"]:
            raise ShardMismatchError(f"{where}: expected rows == sum of shard rows, found rows={d['rows']} "
                                     f"and shards summing to {m.rows}")
        if max(shape, default=0) > MAX_INDEX or m.rows > MAX_INDEX or max(m.rows, 1) * m.row_bytes > MAX_INDEX:
            raise FormatError(f"{where}: expected at most {MAX_INDEX} rows, elements and bytes, found "
                              f"{describe(dtype, shape, m.rows)}; manifest corrupt")
        return m

    @staticmethod
    def _sparse_fields(d: Dict[str, Any], where: str, shards: Tuple[ShardInfo, ...]) -> Tuple[int, np.dtype]:
        size = d.get("size")
        if not _is_int(size) or size < 0:
            raise FormatError(f"{where}: expected 'size' (an int >= 0, the dense row length) in a sparse store, "
                              f"found {size!r:.100}")
        if d["item_shape"] != [size]:
            raise FormatError(f"{where}: expected item_shape [size] = [{size}] in a sparse store, "
                              f"found {d['item_shape']!r:.100}")
        if not isinstance(d.get("index_dtype"), str):
            raise FormatError(f"{where}: expected 'index_dtype' (a dtype string) in a sparse store, "
                              f"found {d.get('index_dtype')!r:.100}")
        index_dtype = check_dtype(d["index_dtype"], what=f"{where}: index_dtype")
        if index_dtype.kind not in "iu" or (size and size - 1 > np.iinfo(index_dtype).max):
            raise FormatError(f"{where}: expected an integer index_dtype that holds {max(size - 1, 0)}, "
                              f"found {index_dtype.str}")
        with_values = {s.values is not None for s in shards}
        if len(with_values) > 1:
            raise FormatError(f"{where}: expected 'values' in every shard entry or in none, found it in "
                              f"{sum(s.values is not None for s in shards)} of {len(shards)}")
        return size, index_dtype

    @staticmethod
    def _shard_from_dict(s: Any, where: str, kind: str = "dense") -> ShardInfo:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _is_int(s.get("rows")):
            raise FormatError(f"{where}: expected shard entries {{'file': str, 'rows': int}}, found {s!r:.200}")
        name, rows = _check_name(s["file"], where), s["rows"]
        if rows < 0:
            raise FormatError(f"{where}: shard {name}: expected rows >= 0, found {rows}")
        ck = _checksum(s, "checksum", name, where)
        if kind == "dense":
            return ShardInfo(name, rows, ck)
        if not isinstance(s.get("offsets"), str) or not _is_int(s.get("length")) or s["length"] < 0:
            raise FormatError(f"{where}: shard {name}: expected 'offsets' (a file name) and 'length' (an int >= 0) "
                              f"in a {kind} store's shard entry, found {s!r:.200}")
        values = s.get("values")
        if values is not None and (kind != "sparse" or not isinstance(values, str)):
            raise FormatError(f"{where}: shard {name}: expected no 'values' file in a {kind} store's shard entry "
                              f"(only sparse stores have one, a file name), found {values!r:.100}")
        return ShardInfo(name, rows, ck, offsets=_check_name(s["offsets"], where),
                         offsets_checksum=_checksum(s, "offsets_checksum", name, where), length=s["length"],
                         values=None if values is None else _check_name(values, where),
                         values_checksum=_checksum(s, "values_checksum", name, where))

    @classmethod
    def load(cls, store_dir: Path) -> "Manifest":
        "Read and validate ``store_dir/manifest.json`` (raises like `from_dict`, plus ``StoreNotFoundError``)."
        path = Path(store_dir) / MANIFEST_NAME
        with open_regular(path, "manifest not found; expected a store directory written by MemmapWriter "
                                "(or a .npy file)") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise FormatError(f"{path}: expected a manifest of at most {MAX_MANIFEST_BYTES} bytes, found {size}")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        return cls.from_dict(parse_json(raw, str(path)), where=str(path))


def _refuse_constant(name: str) -> Any:
    raise FormatError(f"non-standard JSON token {name}")


def parse_json(raw: bytes, where: str) -> Any:
    """Parse strict UTF-8 JSON (``NaN``, ``Infinity``, ``-Infinity`` refused). Raises ``FormatError``."""
    try:
        return json.loads(raw.decode("utf8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN, int digits limit
        raise FormatError(f"{where}: expected strict UTF-8 JSON, found unparsable content ({e})") from None


def check_meta(meta: Any, where: str) -> None:
    """Refuse `meta` that a manifest cannot hold: not strict JSON (NaN, inf, non-str keys, objects) or
    so large that the manifest would pass ``MAX_MANIFEST_BYTES``. Raises ``FormatError`` (NaN, inf, too
    large) or ``ArgumentTypeError`` (a value or key JSON has no type for)."""
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:   # a TypeError stays one: an object, a non-str key
        cls = ArgumentTypeError if isinstance(e, TypeError) else FormatError
        raise cls(f"{where}: expected meta of strict JSON values (str, int, finite float, bool, None, "
                  f"list, dict with str keys), found: {e}") from None
    if len(text) > MAX_META_BYTES:
        raise FormatError(f"{where}: expected meta of at most {MAX_META_BYTES:,} bytes as JSON (the manifest limit "
                          f"less room for the shard list), found {len(text):,}; keep large data in a store, not in meta")


def encode_manifest(m: "Manifest", where: str) -> bytes:
    """The bytes of ``manifest.json`` for `m`, checked as the reader will check them: strict JSON, at
    most ``MAX_MANIFEST_BYTES``, and parsed back by `Manifest.from_dict` to an equal manifest. The
    writer commits nothing that the reader refuses. Raises ``FormatError``."""
    check_meta(m.meta, where)
    raw = m.to_json().encode("utf8")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: expected a manifest of at most {MAX_MANIFEST_BYTES} bytes, found {len(raw)} "
                          f"({len(m.shards)} shards); use larger shards (shard_bytes) or less meta")
    if Manifest.from_dict(parse_json(raw, where), where=where).to_dict() != m.to_dict():
        raise FormatError(f"{where}: manifest does not read back as written (meta not JSON round-trippable?)")
    return raw


def _check_name(name: str, where: str) -> str:
    if not _SHARD_RE.fullmatch(name) or name in (".", "..") or name == MANIFEST_NAME:
        raise UnsafePathError(f"{where}: expected a bare file name inside the store for a shard, found {name!r}; "
                              "absolute paths, '/' and '..' are refused")
    return name


def _checksum(s: Dict[str, Any], key: str, name: str, where: str) -> Optional[str]:
    ck = s.get(key)
    if ck is not None and not (isinstance(ck, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", ck)):
        raise FormatError(f"{where}: shard {name}: expected {key} 'sha256:<64 hex>', found {ck!r:.100}")
    return ck


def confined_path(store_dir: Path, name: str) -> Path:
    """Path of shard `name` inside `store_dir`; refuses symlinks that resolve outside the store.

    Raises ``UnsafePathError``.
    """
    p = Path(store_dir) / name
    if p.is_symlink():
        target = p.resolve()
        if Path(store_dir).resolve() not in target.parents:
            raise UnsafePathError(f"{p}: expected a shard inside {store_dir}, found a symlink to {target}")
    return p


def describe(dtype: np.dtype, item_shape: Sequence[int], rows: Optional[int] = None) -> str:
    "Human description such as ``1000 rows of (1024,) float32``."
    s = f"{tuple(item_shape)} {np.dtype(dtype).name}"
    return s if rows is None else f"{rows} rows of {s}"
