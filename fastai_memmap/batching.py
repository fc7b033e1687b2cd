"""The batch fast path: a whole batch read with one sorted gather per shard, no per-item objects.

torch's DataLoader calls ``dataset.__getitems__(indices)`` for a whole batch when the dataset
defines it (torch >= 1.13), then ``collate_fn`` on the result. `FastLabelList` (the `LabelList`
that `MemmapItemList` builds) answers with a `Collated` batch when neither inputs nor targets need
per-item work (no tfms, no inference item), and `memmap_collate` passes it through; otherwise both
fall back to fastai's per-item path (``LabelList.__getitem__`` + ``data_collate``) with identical
results. `MemmapDataBunch` / `MemmapImageDataBunch` install `memmap_collate` by default.
"""
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from fastai.basic_data import DataBunch
from fastai.data_block import CategoryList, FloatList, LabelList
from fastai.torch_core import data_collate
from fastai.vision.data import ImageDataBunch

__all__ = ["Collated", "memmap_collate", "FastLabelList", "MemmapDataBunch", "MemmapImageDataBunch", "batch_of"]


class Collated(list):
    "A batch that is already collated: ``[x_tensor, y_tensor]``, returned as is by `memmap_collate`."


def memmap_collate(batch: Any) -> Any:
    "Pass a `Collated` batch through; collate anything else with fastai's `data_collate`."
    if isinstance(batch, Collated):
        return list(batch)
    return data_collate(batch)


def batch_of(il: Any, idxs: np.ndarray) -> Optional[torch.Tensor]:
    """Collated tensor of items `idxs` (positions in `il`) if `il` supports batch reads, else None.

    Item lists of this package define ``get_batch``; fastai's processed `CategoryList` (int codes)
    and `FloatList` (float32 array) are read straight from their ``items``.
    """
    get_batch = getattr(il, "get_batch", None)
    if get_batch is not None:
        return get_batch(idxs)
    if type(il) is CategoryList and il.items.dtype.kind in "iu":
        return torch.from_numpy(il.items[idxs].astype(np.int64))
    if type(il) is FloatList and not il.log:
        return torch.from_numpy(np.ascontiguousarray(il.items[idxs]))
    return None


class FastLabelList(LabelList):
    "A `LabelList` that can return a whole collated batch from `__getitems__`."

    def __getitems__(self, indices: Sequence[int]) -> Any:
        "Batch `indices` as a `Collated` ``[x, y]`` if no per-item work is needed, else a list of items."
        if self.item is None and not (self.tfms or self.tfmargs or (self.tfm_y and getattr(self, "tfms_y", None))):
            idxs = np.asarray(indices, dtype=np.int64)
            xb = batch_of(self.x, idxs)
            yb = batch_of(self.y, idxs) if xb is not None else None
            if yb is not None:
                return Collated([xb, yb])
        return [self[int(i)] for i in indices]


def _create(cls, base, *args, collate_fn=data_collate, **kwargs):
    if collate_fn is data_collate:
        collate_fn = memmap_collate
    return super(base, cls).create(*args, collate_fn=collate_fn, **kwargs)


class MemmapDataBunch(DataBunch):
    "`DataBunch` whose loaders collate with `memmap_collate` (batch fast path) by default."

    @classmethod
    def create(cls, *args, collate_fn=data_collate, **kwargs) -> "MemmapDataBunch":
        "Create a `DataBunch` as fastai does, with `memmap_collate` unless another `collate_fn` is given."
        return _create(cls, MemmapDataBunch, *args, collate_fn=collate_fn, **kwargs)


class MemmapImageDataBunch(ImageDataBunch):
    "`ImageDataBunch` whose loaders collate with `memmap_collate` (batch fast path) by default."

    @classmethod
    def create(cls, *args, collate_fn=data_collate, **kwargs) -> "MemmapImageDataBunch":
        "Create an `ImageDataBunch` as fastai does, with `memmap_collate` unless another `collate_fn` is given."
        return _create(cls, MemmapImageDataBunch, *args, collate_fn=collate_fn, **kwargs)
