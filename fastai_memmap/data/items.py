"""`MemmapItemList`: the rows of a store as items of fastai v1's data block API.

Items are int64 row indices (a `RowIndex`, which also carries the store handle), never the data:
splitting, filtering and pickling for DataLoader workers move indices, and every worker reads rows
from the page cache through its own map of the same files.
"""
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from fastai.core import ItemBase
from fastai.data_block import ItemList, PreProcessor

from .batching import FastLabelList, MemmapDataBunch
from ..errors import ArgumentError, ItemShapeError, MemmapError, ShardMismatchError, StoreNotFoundError, UnsupportedDtypeError
from ..store.format import describe
from ..store.ragged import RaggedArray
from ..store.reader import MemmapArray
from ..store.sparse import SparseArray

__all__ = ["RowIndex", "MemmapItem", "MemmapProcessor", "MemmapItemList", "as_store", "check_label_rows",
           "register_list_class", "register_label_rule"]

PathOrStore = Union[str, Path, MemmapArray]


STORE_CLASSES = (MemmapArray, RaggedArray, SparseArray)   # an open store of any kind


def as_store(path: PathOrStore) -> MemmapArray:
    "`path` if it is already an open store (dense, ragged or sparse), else ``MemmapArray.open(path)`` (raises its errors)."
    return path if isinstance(path, STORE_CLASSES) else MemmapArray.open(path)


_LIST_CLASSES: Dict[str, type] = {}          # store kind -> item list class; filled by ragged_items, sparse_items
_LABEL_RULES: List[Callable[..., Optional[type]]] = []   # filled by labels (and higher layers)


def register_list_class(kind: str, cls: type) -> None:
    """Make `cls` (a `MemmapItemList` subclass) the list ``MemmapItemList.from_memmap`` builds for stores
    of `kind` (``"ragged"``, ``"sparse"``; registered by their modules in `fastai_memmap.data`)."""
    _LIST_CLASSES[kind] = cls


def register_label_rule(rule: Callable[..., Optional[type]]) -> None:
    """Add `rule(ystore, classes, x)` → a label list class or None, tried before the rules registered
    earlier by `MemmapItemList.get_label_cls` (`fastai_memmap.data.labels` registers the default one)."""
    _LABEL_RULES.insert(0, rule)


def check_label_rows(n_items: int, n_labels: int, items: Any, labels: Any, allow_longer: bool = False) -> None:
    """Raise ``ItemShapeError`` unless the label store (`labels`, `n_labels` rows) has one row per row
    of the item store (`items`, `n_items` rows); with `allow_longer`, more label rows are accepted."""
    if n_labels == n_items or (allow_longer and n_labels > n_items):
        return
    hint = ("; label row i labels item row i, so a shorter label store leaves items without a label"
            if n_labels < n_items else
            "; rows are matched by number: pass allow_longer=True if the extra last label rows are to be ignored")
    raise ItemShapeError(f"{labels}: expected {n_items} label rows, one per row of the item store {items}, "
                         f"found {n_labels}{hint}")


def _list_class(cls: type, store: Any) -> type:
    "The registered list class of a ragged / sparse store when `from_memmap` is called on `MemmapItemList`."
    kind = getattr(store, "kind", "dense")
    if cls is not MemmapItemList or kind == "dense":
        return cls
    try:
        return _LIST_CLASSES[kind]
    except KeyError:
        raise ArgumentError(f"{store.where}: no item list is registered for stores of kind {kind!r} "
                            f"(registered: {sorted(_LIST_CLASSES)}); import fastai_memmap.data") from None


class RowIndex(np.ndarray):
    """A 1-d int64 array of row numbers that remembers which store (`MemmapArray`) they index.

    Slicing and fancy indexing keep the store (``__array_finalize__``), so a sub-list built by
    fastai from ``list.items[idx]`` (splits, `add_test`) still reads the right file. Pickles as
    the indices plus the store handle (path + manifest), never the data.
    """

    def __new__(cls, rows: Any, store: Optional[MemmapArray] = None) -> "RowIndex":
        a = np.asarray(rows)
        if a.size == 0:
            a = a.astype(np.int64).reshape(0)
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise ItemShapeError(f"expected a 1-d array of integer row indices, found shape {a.shape} dtype {a.dtype}")
        obj = a.astype(np.int64, copy=False).view(cls)
        obj.store = store if store is not None else getattr(rows, "store", None)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.store = getattr(obj, "store", None)

    def __reduce__(self):
        return (_unpack_rows, (_pack_rows(np.asarray(self)), self.store))


def _pack_rows(rows: np.ndarray) -> tuple:
    """Compact picklable form of row numbers (what DataLoader workers receive under spawn).

    ``('range', start, stop)`` for consecutive rows, ``('mask', start, bits)`` for strictly
    increasing rows (one bit per row of the span, e.g. a training split), else the rows as the
    smallest unsigned dtype that holds them (``u2``/``u4``) or int64.
    """
    n = len(rows)
    if n == 0:
        return ("array", rows.astype(np.int64))
    lo, hi = int(rows.min()), int(rows.max())
    d = np.diff(rows)
    if lo >= 0 and (d == 1).all():
        return ("range", lo, hi + 1)
    if lo >= 0 and (d > 0).all() and (hi - lo + 1) < 64 * n:
        bits = np.zeros(hi - lo + 1, bool)
        bits[rows - lo] = True
        return ("mask", lo, hi - lo + 1, np.packbits(bits))
    small = np.uint16 if lo >= 0 and hi < 2 ** 16 else np.uint32 if lo >= 0 and hi < 2 ** 32 else np.int64
    return ("array", rows.astype(small))


def _unpack_rows(packed: tuple, store: Optional["MemmapArray"]) -> RowIndex:
    kind = packed[0]
    if kind == "range":
        rows = np.arange(packed[1], packed[2], dtype=np.int64)
    elif kind == "mask":
        rows = packed[1] + np.flatnonzero(np.unpackbits(packed[3], count=packed[2]))
    else:
        rows = packed[1]
    return RowIndex(rows, store)


class MemmapItem(ItemBase):
    """One row of a store as a fastai item: `data` is a float tensor of the row's shape.

    `obj` is the same tensor. `show` draws a line plot for 1-d rows and an image for 2-d/3-d rows.
    """

    def __init__(self, data: torch.Tensor):
        self.data = self.obj = data

    def __str__(self) -> str:
        d = self.data
        if d.numel() <= 6:
            return str([round(v, 4) for v in d.flatten().tolist()])
        return f"{tuple(d.shape)} mean={d.float().mean():.4g}"

    def show(self, ax=None, title: Optional[str] = None, figsize=(3, 3), **kwargs) -> Any:
        """Plot the row: 1-d as a line; 2-d ``(C, L)`` signals with a few channels (C <= `MAX_SIGNAL_CHANNELS`,
        L >= 4 C) as C lines; other 2-d rows as a grayscale image; 3-d (CHW or HWC) as an image."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=figsize)
        t = self.data.detach().cpu().float()
        if t.ndim <= 1:
            ax.plot(t.reshape(-1).numpy(), **kwargs)
        elif is_signal(tuple(t.shape)):
            for c, line in enumerate(t.numpy()):
                ax.plot(line, label=f"channel {c}", **kwargs)
            if len(t) > 1:
                ax.legend(fontsize="small")
        else:
            img = t.numpy()
            if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
                img = img.transpose(1, 2, 0)
            if img.ndim == 3 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim == 3 and img.shape[-1] not in (3, 4):
                img = img.mean(-1)
            lo, hi = float(img.min()), float(img.max())
            ax.imshow((img - lo) / (hi - lo) if hi > lo else img * 0, cmap="gray" if img.ndim == 2 else None)
            ax.axis("off")
        if title is not None:
            ax.set_title(title)
        return ax


class MemmapProcessor(PreProcessor):
    """Records a store's dtype and item shape, checks every list it processes against them.

    Does not keep a reference to the dataset (fastai's ``PreProcessor.__init__`` would, and
    `export` would then pickle it): the state is ``dtype`` (str), ``item_shape`` (tuple) and
    ``meta`` (dict), so `load_learner` can check and convert raw items at predict time.
    """

    def __init__(self, ds: Optional["MemmapItemList"] = None):
        store = getattr(ds, "store", None)
        self.dtype = None if store is None else store.dtype.str
        self.item_shape = None if store is None else tuple(store.item_shape)
        self.meta = {} if store is None else dict(store.meta)

    def process(self, ds: "MemmapItemList") -> None:
        "Check that `ds`'s store has the dtype and item shape this processor was fitted on."
        store = ds.store
        if store is None or self.item_shape is None:
            return
        if tuple(store.item_shape) != self.item_shape or store.dtype.str != self.dtype:
            raise ShardMismatchError(
                f"{store.where}: expected rows of {describe(np.dtype(self.dtype), self.item_shape)} "
                f"(as in the training store), found {describe(store.dtype, store.item_shape)}")

    def process_one(self, item: Any) -> Any:
        "Turn a raw row (ndarray, tensor, list) of the training item shape into a `MemmapItem`."
        if isinstance(item, ItemBase):
            return item
        a = np.asarray(item.cpu() if isinstance(item, torch.Tensor) else item)
        if self.item_shape is not None and tuple(a.shape) != self.item_shape:
            raise ItemShapeError(f"predict: expected a row of shape {self.item_shape}, found {a.shape}")
        return MemmapItem(torch.from_numpy(np.array(a, dtype=np.float32)))


class MemmapItemList(ItemList):
    """An `ItemList` over the rows of a store; create it with `MemmapItemList.from_memmap(path)`.

    ``items`` is a `RowIndex` (int64 row numbers into `store`); ``get(i)`` reads row ``items[i]``
    (a copy) and returns a `MemmapItem` holding a float32 tensor of shape ``store.item_shape``.
    Functions given to ``label_from_func`` / ``filter_by_func`` receive the row number (an int).
    """
    _processor = MemmapProcessor
    _bunch = MemmapDataBunch

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, **kwargs):
        own = getattr(items, "store", None)   # rows from another store (add_test) keep their store
        store = own if own is not None else store
        super().__init__(RowIndex(items, store), **kwargs)
        self.store = store
        self.copy_new.append("store")
        self._label_list = FastLabelList

    @classmethod
    def from_memmap(cls, path: PathOrStore, rows: Optional[Any] = None, inner_df: Any = None,
                    item_path: Optional[Union[str, Path]] = None, **kwargs) -> "MemmapItemList":
        """Create a list over the store at `path` (directory, ``manifest.json``, ``.npy`` or `MemmapArray`).

        Parameters
        ----------
        rows : int array-like, optional
            Row numbers to use (default: every row, ``0 .. len(store) - 1``).
        inner_df : DataFrame, optional
            One row per *item* (aligned with `rows`), for ``label_from_df`` / ``split_from_df``.
        item_path : path, optional
            fastai's ``path`` (where ``models/`` and ``export.pkl`` go); default: the store's parent.

        On `MemmapItemList` itself, a ragged store gives a `RaggedItemList` and a sparse store a
        `SparseItemList` (their keywords, e.g. ``pad_value``, pass through `kwargs`).

        Raises the errors of ``MemmapArray.open``; ``ItemShapeError`` if `inner_df` is not aligned.
        """
        store = as_store(path)
        cls = _list_class(cls, store)
        if store.dtype.kind == "c":   # items are float32 tensors: the imaginary part would be dropped
            raise UnsupportedDtypeError(f"{store.where}: expected a real dtype for {cls.__name__} (items are float32 "
                                        f"tensors), found {store.dtype}; store the real and imaginary parts as two "
                                        "channels (np.stack([z.real, z.imag], -1))")
        rows = np.arange(len(store), dtype=np.int64) if rows is None else RowIndex(rows, store)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(store)):
            raise ItemShapeError(f"{store.where}: expected rows in [0, {len(store)}), found {rows.min()}..{rows.max()}")
        if inner_df is not None and len(inner_df) != len(rows):
            raise ItemShapeError(f"{store.where}: expected inner_df with one row per item ({len(rows)}), found {len(inner_df)}")
        item_path = Path(item_path) if item_path is not None else store.path.parent
        return cls(RowIndex(rows, store), store=store, path=item_path, inner_df=inner_df, **kwargs)

    def _store(self) -> MemmapArray:
        if self.store is None:
            raise StoreNotFoundError(f"{self.__class__.__name__} has no store (an empty list built by load_learner?); "
                              "pass raw rows to learn.predict, or build the list with from_memmap")
        return self.store

    def get(self, i: int) -> MemmapItem:
        "Row `self.items[i]` of the store as a `MemmapItem` (float32 tensor, a copy)."
        return MemmapItem(torch.from_numpy(np.asarray(self._store()[int(self.items[i])], dtype=np.float32)))

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        "Rows at positions `idxs` as one float32 tensor ``(n, *item_shape)`` (batch fast path; a copy)."
        a = self._store().read(np.asarray(self.items)[idxs])
        return torch.from_numpy(a if a.dtype == np.float32 else a.astype(np.float32))

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> MemmapItem:
        "Rebuild a `MemmapItem` from its data `t`."
        return MemmapItem(t)

    def filter_by_func(self, func) -> "MemmapItemList":
        "Only keep rows for which `func(row_number)` returns `True`."
        keep = np.fromiter((bool(func(int(o))) for o in self.items), dtype=bool, count=len(self.items))
        self.items = self.items[keep]
        return self

    def get_label_cls(self, labels: Any, label_cls: Optional[type] = None, label_delim: Optional[str] = None,
                      classes: Optional[Any] = None, **kwargs: Any) -> type:
        """fastai's hook for the label list class: `label_cls` if given; for a label store (`labels`
        an open dense or ragged store), the first registered label rule that answers
        (`register_label_rule`; `fastai_memmap.data.labels`: integer or `classes` → `MemmapCategoryList`,
        float → `MemmapFloatList`; `MemmapImageList` adds segmentation masks); else fastai's choice."""
        if label_cls is not None:
            return label_cls
        if isinstance(labels, STORE_CLASSES):
            for rule in _LABEL_RULES:
                found = rule(labels, classes, self)
                if found is not None:
                    return found
            raise ArgumentError(f"{labels.path}: no label list class fits this label store (no label rule "
                                "registered; import fastai_memmap.data)")
        return super().get_label_cls(labels, label_cls=label_cls, label_delim=label_delim, **kwargs)

    def label_from_memmap(self, path: PathOrStore, classes: Optional[Any] = None, label_cls: Any = None,
                          from_item_lists: bool = False, allow_longer: bool = False, **kwargs):
        """Label each item with the row of the same number in the label store at `path`.

        Integer labels with `classes` (or ``meta['classes']`` in the label store, or integer dtype)
        give classification (`MemmapCategoryList`); float labels give regression
        (`MemmapFloatList`, any label shape). The label store must have as many rows as the item
        store (rows are matched by number: a different length usually means misaligned labels);
        `allow_longer` accepts a longer label store, whose extra last rows are then unused. Raises
        ``ItemShapeError`` for a label store of another length, ``ValueError`` if the list is not
        split yet.
        """
        if not from_item_lists:
            raise ArgumentError("Your data isn't split; call a split_* method (split_none for no validation set) first")
        ystore = as_store(path)
        xstore = self._store()
        check_label_rows(len(xstore), len(ystore), xstore.where, ystore.where, allow_longer)
        label_cls = self.get_label_cls(ystore, label_cls=label_cls, classes=classes)
        y = label_cls(RowIndex(np.asarray(self.items), ystore), store=ystore, classes=classes,
                      path=self.path, **kwargs)
        return self._label_list(x=self, y=y)

    def show_xys(self, xs, ys, imgsize: int = 4, figsize=None, **kwargs) -> None:
        "Show the `xs` (inputs) and `ys` (targets) on a figure of `figsize`."
        axs = _axes(len(xs), imgsize, figsize)
        for x, y, ax in zip(xs, ys, axs):
            x.show(ax=ax, title=str(y), **kwargs)

    def show_xyzs(self, xs, ys, zs, imgsize: int = 4, figsize=None, **kwargs) -> None:
        "Show `xs` (inputs), `ys` (targets) and `zs` (predictions) on a figure of `figsize`."
        axs = _axes(len(xs), imgsize, figsize)
        for x, y, z, ax in zip(xs, ys, zs, axs):
            x.show(ax=ax, title=f"{y}\n{z}", **kwargs)


# a 2-d row (C, L) is drawn as C lines (a multichannel signal) up to this many channels, else as an image
MAX_SIGNAL_CHANNELS = 16


def is_signal(shape: Tuple[int, ...]) -> bool:
    "True if a row of `shape` reads as a 1-d signal with channels ``(C, L)``: few channels, much longer than wide."
    return len(shape) == 2 and 1 <= shape[0] <= MAX_SIGNAL_CHANNELS and shape[1] >= 4 * shape[0]


def _axes(n: int, imgsize: int, figsize) -> list:
    "Exactly `n` axes on a near-square grid (the grid's unused cells get no axes at all)."
    import matplotlib.pyplot as plt
    cols = int(np.ceil(np.sqrt(max(n, 1))))
    rows = int(np.ceil(max(n, 1) / cols))
    fig, axs = plt.subplots(rows, cols, figsize=figsize or (imgsize * cols, imgsize * rows), squeeze=False)
    axs = list(axs.flatten())
    for ax in axs[n:]:
        fig.delaxes(ax)
    fig.tight_layout()
    return axs[:n]
