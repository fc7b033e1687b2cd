"""`RaggedItemList`: the items of a ragged store (token ids, point clouds...) in fastai v1's data block API.

``MemmapItemList.from_memmap(ragged_store)`` returns one. Items are row numbers (a `RowIndex`) as for
dense stores; ``get(i)`` reads one item, ``get_batch`` (the batch fast path of `FastLabelList`) reads
a whole batch with one sorted gather per shard and pads it with `pad_ragged`. ``databunch()`` builds
a `RaggedDataBunch` (padding collate, `BucketSampler` unless ``bucket=False``).
"""
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from fastai.core import ItemBase, is_listy
from fastai.data_block import PreProcessor

from ..errors import ArgumentError, ItemShapeError, LossyCastError, ShardMismatchError
from ..store.format import describe
from .items import MemmapItem, MemmapItemList, register_list_class
from .padding import PAD_OUTPUTS, RaggedDataBunch, batch_dtype, check_pad_value, pad_ragged
from ..store.ragged import ragged_shape

__all__ = ["RaggedItem", "RaggedProcessor", "RaggedItemList", "item_array", "item_tensor", "lossless",
           "register_one_item"]


def item_tensor(a: np.ndarray) -> torch.Tensor:
    """`a` as a tensor: int64 for integer and bool data (token ids, classes), float32 otherwise (a copy).

    Raises ``LossyCastError`` for uint64 values above int64's maximum (2**63 - 1): they would wrap."""
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        k = int(np.argmax(a.reshape(-1) > np.iinfo(np.int64).max))
        raise LossyCastError(f"expected uint64 values <= {np.iinfo(np.int64).max} (batches are int64), found "
                             f"{int(a.reshape(-1)[k])} at element {k}; it would wrap to a negative value")
    return torch.from_numpy(np.array(a, dtype=np.int64 if a.dtype.kind in "biu" else np.float32))


class RaggedItem(MemmapItem):
    """One ragged item: `data` is a tensor of shape ``(length, *trailing_shape)`` (int64 for integer
    stores, float32 otherwise)."""

    def __str__(self) -> str:
        d = self.data
        if d.ndim == 1 and d.numel() <= 12:
            return str(d.tolist())
        return f"{tuple(d.shape)} {d.dtype}"


_ONE_ITEM: Dict[str, Callable[["RaggedProcessor", Any], Any]] = {}   # kind -> maker of one item at predict


def register_one_item(kind: str, make: Callable[["RaggedProcessor", Any], Any]) -> None:
    """Make `make(processor, raw_item)` the `RaggedProcessor.process_one` of stores of `kind` other than
    ragged (``"sparse"``: registered by `fastai_memmap.data.sparse_items`)."""
    _ONE_ITEM[kind] = make


class RaggedProcessor(PreProcessor):
    """Records a ragged or sparse store's kind, dtype and item shape; checks lists against them.

    State (kept by `export` for `load_learner`): ``kind``, ``dtype`` (str), ``shape`` (the trailing
    shape of a ragged item, ``(size,)`` for sparse rows), ``meta``. Never a reference to the data.
    """

    def __init__(self, ds: Optional[Any] = None):
        store = getattr(ds, "store", None)
        self.kind = None if store is None else store.kind
        self.dtype = None if store is None else store.dtype.str
        self.shape = None if store is None else tuple(_shape(store))
        self.meta = {} if store is None else dict(store.meta)

    def process(self, ds: Any) -> None:
        "Check that `ds`'s store has the kind, dtype and item shape this processor was fitted on."
        store = ds.store
        if store is None or self.kind is None:
            return
        if (store.kind, store.dtype.str, tuple(_shape(store))) != (self.kind, self.dtype, self.shape):
            raise ShardMismatchError(
                f"{store.where}: expected a {self.kind} store of {describe(np.dtype(self.dtype), self.shape)} items "
                f"(as in the training store), found a {store.kind} store of {describe(store.dtype, _shape(store))}")

    def process_one(self, item: Any) -> Any:
        "Turn a raw item (array, tensor or list; a dense or scipy row for sparse lists) into an item."
        if isinstance(item, ItemBase):
            return item
        if self.kind in _ONE_ITEM:
            return _ONE_ITEM[self.kind](self, item)
        a = item_array(item)
        if self.shape is not None and (a.ndim != len(self.shape) + 1 or a.shape[1:] != self.shape):
            raise ItemShapeError(f"predict: expected an item of shape {ragged_shape(self.shape)} (? = any length), "
                                 f"found {a.shape}")
        return RaggedItem(item_tensor(lossless(a, np.dtype(self.dtype), "predict") if self.dtype else a))


def lossless(a: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """`a` cast to `dtype` (a view if it already is), refusing a cast that changes a value.

    Into integers: integers in the dtype's range, or integral finite floats in range (300 into int8
    would become 44, 0.5 would become 0). Into floats: real values whose finite ones stay finite
    (rounding to the nearest float is allowed). Raises ``LossyCastError`` naming the first offending
    element, ``ItemShapeError`` for a non-numeric `a`.
    """
    if a.dtype == dtype:
        return a
    if a.dtype.kind not in "biufc":
        raise ItemShapeError(f"{what}: expected numbers castable to {dtype}, found dtype {a.dtype}")
    flat = a.reshape(-1)
    if a.dtype.kind == "c" and dtype.kind != "c":
        bad = flat.imag != 0
    elif dtype.kind in "biu":
        lo, hi = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        if a.dtype.kind in "biu":   # exact Python-int comparisons (int64 vs uint64 bounds would go through float)
            fits = not len(flat) or lo <= int(flat.min()) <= int(flat.max()) <= hi
            bad = np.zeros(len(flat), bool) if fits else np.array([not lo <= v <= hi for v in flat.tolist()])
        else:   # floats: hi + 1 is a power of two, exact as a float
            bad = ~np.isfinite(flat) | (flat != np.floor(flat)) | (flat < lo) | (flat >= float(hi) + 1)
    else:
        with np.errstate(over="ignore"):
            bad = np.isfinite(flat) & ~np.isfinite(flat.astype(dtype))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise LossyCastError(f"{what}: expected values that {dtype} holds exactly (the store's dtype), found "
                             f"{flat[k]!r} at element {k}; it would change (wrap, round or overflow)")
    return a.astype(dtype)


def _shape(store: Any) -> tuple:
    return store.trailing_shape if store.kind == "ragged" else store.item_shape


def item_array(item: Any) -> np.ndarray:
    return np.asarray(item.cpu() if isinstance(item, torch.Tensor) else item)


class RaggedItemList(MemmapItemList):
    """An `ItemList` over the items of a ragged store; create it with ``MemmapItemList.from_memmap(path)``.

    ``get(i)`` returns a `RaggedItem` (tensor ``(length_i, *trailing_shape)``). Batches are padded to
    their longest item with `pad_value`, after the items (``pad_first=False``) or before them; the
    input of the model is ``[x, lengths]`` (``output="lengths"``: the model's ``forward(x, lengths)``),
    ``[x, mask]`` (``output="mask"``, True at padding) or ``x`` (``output=None``). Integer stores give
    int64 tensors, others float32.
    """
    _processor = RaggedProcessor
    _bunch = RaggedDataBunch

    def __init__(self, items: Any, store: Optional[Any] = None, pad_value: Any = 0, pad_first: bool = False,
                 output: Optional[str] = "lengths", **kwargs):
        super().__init__(items, store=store, **kwargs)
        if self.store is not None and self.store.kind != "ragged":
            raise ItemShapeError(f"{self.store.where}: expected a ragged store for {type(self).__name__}, found "
                                 f"kind {self.store.kind!r}")
        if output not in PAD_OUTPUTS:
            raise ArgumentError(f"output: expected one of {PAD_OUTPUTS}, found {output!r}")
        if self.store is not None:   # the batches' dtype: refuse a pad value it cannot hold before any batch
            check_pad_value(pad_value, batch_dtype(self.store.dtype))
        self.pad_value, self.pad_first, self.output = pad_value, pad_first, output
        self.copy_new += ["pad_value", "pad_first", "output"]

    def get(self, i: int) -> RaggedItem:
        "Item `self.items[i]` of the store as a `RaggedItem` (a copy)."
        return RaggedItem(item_tensor(self._store()[int(self.items[i])]))

    def get_batch(self, idxs: np.ndarray) -> Any:
        "Items at positions `idxs`, padded: ``[x, lengths]``, ``[x, mask]`` or ``x`` (batch fast path; one gather per shard)."
        data, lengths = self._store().gather(np.asarray(self.items)[idxs])
        return pad_ragged(data, lengths, self.pad_value, self.pad_first, self.output)

    def lengths(self) -> np.ndarray:
        "Lengths of the list's items, in list order (int64, O(len(self)) reads of 16 bytes)."
        if not len(self.items):      # e.g. the empty lists `load_learner` builds: no store to read
            return np.zeros(0, np.int64)
        return self._store().lengths(np.asarray(self.items))

    def reconstruct(self, t: Any, x: Any = None) -> RaggedItem:
        "Rebuild a `RaggedItem` from a padded row (and its length or mask, if the batch carries one)."
        if not is_listy(t):
            return RaggedItem(t)
        x, extra = t[0], t[1]
        n = int(extra) if extra.ndim == 0 else int((~extra.bool()).sum())
        return RaggedItem(x[len(x) - n:] if self.pad_first else x[:n])


register_list_class("ragged", RaggedItemList)
