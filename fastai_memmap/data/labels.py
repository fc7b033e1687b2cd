"""Label lists over a label store: classification codes (`MemmapCategoryList`) and float targets
(`MemmapFloatList`), each a list of row numbers into the label store, like `MemmapItemList`."""
from typing import Any, List, Optional

import numpy as np
import torch
from fastai.core import Category, FloatItem
from fastai.layers import CrossEntropyFlat, MSELossFlat
from fastai.data_block import PreProcessor

from ..errors import LabelError
from .items import register_label_rule, MemmapItemList, MemmapProcessor
from ..store.reader import MemmapArray

__all__ = ["MemmapLabelList", "MemmapCategoryList", "MemmapFloatList", "MemmapCategoryProcessor",
           "label_cls_for", "store_label_cls", "read_scalars", "CODE_CHUNK_ROWS"]

CODE_CHUNK_ROWS = 1 << 20   # label rows checked per vectorised read (8 MiB of int64 codes)


def read_scalars(store: MemmapArray, rows: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Rows `rows` of a store of one value per row as one flat array of `dtype` (default the store's),
    read in vectorised chunks of `CODE_CHUNK_ROWS` rows (a copy)."""
    out = np.empty(len(rows), store.dtype if dtype is None else dtype)
    for a in range(0, len(rows), CODE_CHUNK_ROWS):
        out[a:a + CODE_CHUNK_ROWS] = store.read(rows[a:a + CODE_CHUNK_ROWS]).reshape(-1)
    return out


def _codes(store: MemmapArray, rows: np.ndarray) -> np.ndarray:
    "Class codes of `rows` as one int64 array (a copy); ``LabelError`` for a uint64 code that int64 cannot hold."
    if store.dtype.kind == "u" and store.dtype.itemsize == 8:   # int64 would wrap 2**63 to a negative code
        codes = read_scalars(store, rows)
        if len(codes) and int(codes.max()) > np.iinfo(np.int64).max:
            raise LabelError(f"{store.path}: expected class codes below 2**63, found {int(codes.max())}")
        return codes.astype(np.int64)
    return read_scalars(store, rows, np.int64)


def _check_code_store(store: MemmapArray) -> None:
    if getattr(store, "kind", "dense") == "ragged":
        raise LabelError(f"{store.path}: expected a label store of one row per item (dense or sparse), found a "
                         "ragged store (items of varying length); save one class code per row")
    if store.dtype.kind not in "biu" or int(np.prod(store.item_shape)) != 1:
        raise LabelError(f"{store.path}: expected one integer class code per row for classification, found rows of "
                         f"{store.item_shape} {store.dtype}; pass label_cls=MemmapFloatList for regression")


class MemmapCategoryProcessor(PreProcessor):
    """Holds the class names (a list) of a classification label store; checks codes are in range.

    Class names come from, in order: the `classes` given to ``label_from_memmap``, ``meta['classes']``
    of the label store, else ``range(max_code + 1)`` over the training labels (one vectorised pass).
    """

    def __init__(self, ds: Optional["MemmapCategoryList"] = None):
        self.classes = None if ds is None else ds.classes
        store = getattr(ds, "store", None)
        if self.classes is None and store is not None:
            _check_code_store(store)
            self.classes = store.meta.get("classes")
            if self.classes is None:
                codes = _codes(store, np.asarray(ds.items))
                if len(codes) and int(codes.min()) < 0:
                    raise LabelError(f"{store.path}: expected class codes >= 0, found {int(codes.min())}")
                self.classes = list(range(int(codes.max()) + 1 if len(codes) else 0))
        if self.classes is not None:
            self.classes = list(self.classes)

    def process(self, ds: "MemmapCategoryList") -> None:
        "Set `ds.classes`; raise ``LabelError`` if a code of `ds` is outside ``[0, len(classes))``."
        ds.classes = self.classes
        if ds.store is None or not len(ds.items):
            return
        _check_code_store(ds.store)
        codes = _codes(ds.store, np.asarray(ds.items))
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= len(self.classes):
            k = int(np.flatnonzero((codes < 0) | (codes >= len(self.classes)))[0])
            raise LabelError(f"{ds.store.path}: expected class codes in [0, {len(self.classes)}) for classes "
                             f"{self.classes[:5]}..., found codes from {lo} to {hi} (first: code {int(codes[k])} in "
                             f"row {int(ds.items[k])}); pass every class name in `classes`")


class MemmapLabelList(MemmapItemList):
    "Base of the label lists: items are row numbers into the label store `store`."

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, classes: Optional[List] = None, **kwargs):
        super().__init__(items, store=store, **kwargs)
        self.filter_missing_y = False   # codes are range-checked by the processor, no None labels


class MemmapCategoryList(MemmapLabelList):
    "`ItemList` of class codes read from a label store (single-label classification)."
    _processor = MemmapCategoryProcessor

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, classes: Optional[List] = None, **kwargs):
        super().__init__(items, store=store, **kwargs)
        self.classes = None if classes is None else list(classes)
        self.copy_new.append("classes")
        self.loss_func = CrossEntropyFlat()

    @property
    def c(self) -> int:
        "Number of classes (the model's output size)."
        return len(self.classes)

    def get(self, i: int) -> Category:
        "Class of item `i` as a fastai `Category` (code, name)."
        code = int(self._store()[int(self.items[i])].reshape(-1)[0])
        return Category(code, self.classes[code])

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        "Codes of positions `idxs` as one int64 tensor ``(n,)`` (batch fast path)."
        return torch.from_numpy(_codes(self._store(), np.asarray(self.items)[idxs]))

    def analyze_pred(self, pred: torch.Tensor, thresh: float = 0.5) -> torch.Tensor:
        "Index of the most likely class."
        return pred.argmax()

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> Category:
        "`Category` of code `t`."
        return Category(t, self.classes[int(t)])


class MemmapFloatList(MemmapLabelList):
    """`ItemList` of float targets (regression) of any shape read from a label store.

    ``c`` is the number of values per target (``prod(item_shape)``, 1 for scalars); the loss is
    `MSELossFlat`, which flattens predictions ``(bs, c)`` and targets ``(bs, *item_shape)`` alike.
    """
    _processor = MemmapProcessor

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, classes: Optional[List] = None, **kwargs):
        super().__init__(items, store=store, **kwargs)
        self.loss_func = MSELossFlat()

    @property
    def c(self) -> int:
        "Values per target, ``prod(item_shape)`` (1 for scalars): the model's output size."
        shape = self.store.item_shape if self.store is not None else self.processor[0].item_shape
        return int(np.prod(shape)) if shape else 1

    def get(self, i: int) -> FloatItem:
        "Target of item `i` as a fastai `FloatItem` (float32 array of the label shape)."
        return FloatItem(np.asarray(self._store()[int(self.items[i])], dtype=np.float32))

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        "Targets of positions `idxs` as one float32 tensor ``(n, *item_shape)`` (batch fast path)."
        a = self._store().read(np.asarray(self.items)[idxs])
        return torch.from_numpy(a if a.dtype == np.float32 else a.astype(np.float32))

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> FloatItem:
        "`FloatItem` of the values in `t`."
        return FloatItem(t.numpy())


def label_cls_for(ystore: MemmapArray, classes: Optional[List], x: MemmapItemList) -> type:
    """The label list class of `ystore` for the item list `x`: ``x.get_label_cls(ystore, classes=classes)``
    (the registered label rules; see `store_label_cls`). Raises ``LabelError`` for a ragged label store
    that is not a code store."""
    return x.get_label_cls(ystore, classes=classes)


def store_label_cls(ystore: MemmapArray, classes: Optional[List], x: MemmapItemList) -> type:
    """The default label rule: classification (`MemmapCategoryList`) for integer or `classes`-given
    labels, regression (`MemmapFloatList`) for float labels. Raises ``LabelError`` for a ragged label
    store that is not a code store."""
    if getattr(ystore, "kind", "dense") == "ragged":
        _check_code_store(ystore)
    if classes is not None or "classes" in ystore.meta or ystore.dtype.kind in "biu":
        return MemmapCategoryList
    return MemmapFloatList


register_label_rule(store_label_cls)
