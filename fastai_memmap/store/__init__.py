"""The store layer: the on-disk format and its readers and writers. numpy only: importing it imports
neither torch nor fastai (a test checks ``sys.modules``).

============  ===================================================================================
module        concept
============  ===================================================================================
format        the format's specification, manifests, ``.npy`` headers, safe paths
kinds         the registry of store kinds (``dense``, ``ragged``, ``sparse``): reader and writer
reader        `MemmapArray`: a dense store (or one ``.npy`` file), rows as owned copies; `open_store`
writer        `MemmapWriter`: append rows, commit atomically; staging, locks, group commit
casting       the ``lossless`` cast of appended batches to the store's dtype
ragged        `RaggedArray` / `RaggedWriter`: variable-length items (data + int64 offsets)
sparse        `SparseArray` / `SparseWriter`: CSR rows (values + column indices + offsets)
parallel      `save_dask`: one shard per dask chunk, written in parallel, committed once
save          `save_memmap`: any array-like or iterable to a store of the fitting kind
memory        the memory the reading process may use (MemAvailable, cgroup limits)
readahead     background reads of the next batch's rows (``pread`` / ``madvise``)
shm           `SharedBuffer`: a file-backed buffer that pickles by name (no copy per worker)
sources       readers of user inputs (CSV, JSON lines, text files) for the converters
progress      `Progress`: the progress bar the writers and converters share
============  ===================================================================================
"""
from .format import FORMAT_VERSION, Manifest
from .kinds import register_kind, registered_kinds
from .reader import MemmapArray, open_memmap
from .writer import MemmapWriter, WriterGroup
from .ragged import RaggedArray, RaggedWriter, save_ragged
from .sparse import SparseArray, SparseWriter, csr_to_dense, save_sparse
from .parallel import save_dask
from .save import save_memmap

__all__ = ["FORMAT_VERSION", "Manifest", "MemmapArray", "MemmapWriter", "RaggedArray", "RaggedWriter", "SparseArray",
           "SparseWriter", "WriterGroup", "csr_to_dense", "open_memmap", "register_kind", "registered_kinds",
           "save_dask", "save_memmap", "save_ragged", "save_sparse"]
