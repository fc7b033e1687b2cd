"""`SparseItemList`: the rows of a sparse store as fastai items, expanded per batch.

``MemmapItemList.from_memmap(sparse_store)`` returns one. ``get(i)`` gives a dense `SparseItem`;
the batch fast path (`FastLabelList`) reads the batch's CSR parts with one sorted gather per shard
and expands them at once (`sparse_batch`): a dense float32 tensor ``(bs, size)``, or a torch sparse
CSR/COO tensor (``output="csr"``/``"coo"``) that `SparseLinear` consumes without ever building the
dense batch.
"""
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import ArgumentError, ArgumentTypeError, ItemShapeError
from .items import MemmapItem, MemmapItemList
from .items import register_list_class
from .ragged_items import RaggedProcessor, item_array, lossless, register_one_item
from ..store.sparse import csr_to_dense

__all__ = ["SparseItem", "SparseItemList", "sparse_batch", "SparseLinear", "SPARSE_OUTPUTS"]

SPARSE_OUTPUTS = ("dense", "csr", "coo")


def sparse_batch(store: Any, rows: Any, output: str = "dense") -> torch.Tensor:
    """Rows `rows` of the `SparseArray` `store` as one float32 tensor of shape ``(n, size)``.

    ``output="dense"``: a new dense tensor (``n * size * 4`` bytes); ``"csr"``: a
    ``torch.sparse_csr_tensor`` (int64 indices); ``"coo"``: a coalesced ``torch.sparse_coo_tensor``.
    No Python loop per row or per stored entry. Raises what ``SparseArray.read_csr`` raises.
    """
    if output not in SPARSE_OUTPUTS:
        raise ArgumentError(f"output: expected one of {SPARSE_OUTPUTS}, found {output!r}")
    indptr, indices, values = store.read_csr(rows)
    values = values.astype(np.float32, copy=False)
    n = len(indptr) - 1
    if output == "dense":
        return torch.from_numpy(csr_to_dense(indptr, indices, values, store.size, dtype=np.float32))
    crow, col = torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64))
    if output == "csr":
        return torch.sparse_csr_tensor(crow, col, torch.from_numpy(values), size=(n, store.size),
                                       check_invariants=False)   # offsets and indices were validated on read
    row = torch.repeat_interleave(torch.arange(n), crow.diff())
    return torch.sparse_coo_tensor(torch.stack([row, col]), torch.from_numpy(values), (n, store.size)).coalesce()


class SparseItem(MemmapItem):
    "One row of a sparse store: `data` is the dense float32 tensor ``(size,)``."

    def __str__(self) -> str:
        nz = torch.nonzero(self.data).reshape(-1)
        shown = ", ".join(f"{int(i)}: {float(self.data[i]):.4g}" for i in nz[:6])
        return f"{{{shown}{', ...' if len(nz) > 6 else ''}}} of {self.data.numel()}"


class SparseItemList(MemmapItemList):
    """An `ItemList` over the rows of a sparse store; create it with ``MemmapItemList.from_memmap(path)``.

    ``get(i)`` returns a `SparseItem` (dense float32 ``(size,)``). On the batch fast path a batch is
    ``(bs, size)``: dense float32 (``output="dense"``) or a torch sparse tensor (``"csr"``, ``"coo"``;
    use a model that accepts one, e.g. `SparseLinear` first). Batches that need per-item work
    (transforms) are collated from the dense items.
    """
    _processor = RaggedProcessor

    def __init__(self, items: Any, store: Optional[Any] = None, output: str = "dense", **kwargs):
        super().__init__(items, store=store, **kwargs)
        if self.store is not None and self.store.kind != "sparse":
            raise ItemShapeError(f"{self.store.where}: expected a sparse store for {type(self).__name__}, found "
                                 f"kind {self.store.kind!r}")
        if output not in SPARSE_OUTPUTS:
            raise ArgumentError(f"output: expected one of {SPARSE_OUTPUTS}, found {output!r}")
        self.output = output
        self.copy_new.append("output")

    @property
    def size(self) -> int:
        "Dense length of a row."
        return self.store.size if self.store is not None else self.processor[0].shape[0]

    def get(self, i: int) -> SparseItem:
        "Row `self.items[i]` as a `SparseItem` (dense float32 tensor, a copy)."
        return SparseItem(torch.from_numpy(self._store()[int(self.items[i])].astype(np.float32)))

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        "Rows at positions `idxs` as one ``(n, size)`` float32 tensor, dense or sparse per `output` (batch fast path)."
        return sparse_batch(self._store(), np.asarray(self.items)[idxs], self.output)

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> SparseItem:
        "Rebuild a `SparseItem` from its (dense or sparse) data `t`."
        return SparseItem(t.to_dense() if t.layout != torch.strided else t)


class SparseLinear(nn.Module):
    """``y = x @ weight + bias`` for ``x`` of shape ``(bs, size)``: dense, sparse CSR or sparse COO.

    A sparse batch costs O(stored entries × `out_features`) through ``F.embedding_bag`` (sum of the
    weight rows of the stored indices, weighted by their values): the dense ``(bs, size)`` batch is
    never built. `weight` has shape ``(size, out_features)``, initialised like ``nn.Linear``.
    A batch of another width than `size` is refused (``ItemShapeError``): a CSR batch's column
    indices would otherwise pick wrong weight rows (or none) without an error.
    """

    def __init__(self, size: int, out_features: int, bias: bool = True):
        for name, v in (("size", size), ("out_features", out_features)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ArgumentTypeError(f"SparseLinear: expected {name} to be an int >= 0, found {v!r:.100}")
            if v < 0:
                raise ArgumentError(f"SparseLinear: expected {name} >= 0, found {v}")
        super().__init__()
        bound = 1 / math.sqrt(max(size, 1))
        self.weight = nn.Parameter(torch.empty(size, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        "``x @ weight.T + bias`` for a dense, sparse CSR or sparse COO batch ``(bs, in_features)``."
        if x.dim() != 2 or x.shape[1] != self.weight.shape[0]:
            raise ItemShapeError(f"SparseLinear: expected a batch of shape (bs, {self.weight.shape[0]}) "
                                 f"(in_features = size), found {tuple(x.shape)} ({x.layout})")
        if x.layout == torch.sparse_coo:
            x = x.to_sparse_csr()
        if x.layout == torch.sparse_csr:
            y = F.embedding_bag(x.col_indices(), self.weight, x.crow_indices(), mode="sum",
                                per_sample_weights=x.values(), include_last_offset=True)
        else:
            y = x @ self.weight
        return y if self.bias is None else y + self.bias


def sparse_one_item(processor: RaggedProcessor, item: Any) -> "SparseItem":
    """`RaggedProcessor.process_one` for a sparse store: a raw row (dense array-like or a scipy.sparse
    row) of the fitted width as a dense float32 `SparseItem`. Raises ``ItemShapeError`` for another
    width, ``LossyCastError`` for values float32 cannot hold."""
    a = item.toarray().reshape(-1) if hasattr(item, "toarray") else item_array(item)
    if processor.shape is not None and a.shape != processor.shape:
        raise ItemShapeError(f"predict: expected a row of shape {processor.shape}, found {a.shape}")
    return SparseItem(torch.from_numpy(np.array(lossless(a, np.dtype(np.float32), "predict"))))


register_one_item("sparse", sparse_one_item)
register_list_class("sparse", SparseItemList)
