"""The batch fast path: a whole batch read with one gather per shard, no per-item objects.

torch's DataLoader calls ``dataset.__getitems__(indices)`` for a whole batch when the dataset
defines it (torch >= 1.13), then ``collate_fn`` on the result. `FastLabelList` (the `LabelList`
that `MemmapItemList` builds) answers with a `Collated` batch when neither inputs nor targets need
per-item work (no tfms, no inference item), and `memmap_collate` passes it through; otherwise both
fall back to fastai's per-item path (``LabelList.__getitem__`` + ``data_collate``) with identical
results. `MemmapDataBunch` / `MemmapImageDataBunch` install `memmap_collate` by default, and add:

- ``shuffle=True`` (the default, or a `fastai_memmap.data.random_order.RandomShuffle`): uniform random
  order; fastai's sampler while the stores fit in memory, `RandomOrderSampler` (``pread`` reads,
  the next batches' rows queued ahead) once they are larger than the memory budget, said once in a
  `ReadStrategyWarning`;
- ``shuffle='block'`` (or a `fastai_memmap.data.sampling.BlockShuffle`): locality-aware shuffling of
  the training loader, for cold or larger-than-RAM stores, at the disk's bandwidth;
- ``num_workers='auto'``: on the fast path no worker processes (they would copy every batch
  through shared memory, which costs more than reading it) but a background prefetch thread;
  fastai's ``defaults.cpus`` workers when items need per-item work (``tfms``). It is the default:
  a ``.databunch()`` without ``num_workers`` (fastai passes its ``defaults.cpus``, marked by
  `fastai_memmap.data.compat.FastaiDefaultWorkers`) takes it silently. An explicit
  ``num_workers > 0`` on the fast path is kept, with a `WorkersSlowerWarning`;
- uint8 image lists (``uint8=True``): `fastai_memmap.data.device.to_float_tfm` first in ``dl_tfms``.
"""
import ctypes
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from fastai.basic_data import DataBunch
from fastai.core import defaults
from fastai.data_block import CategoryList, FloatList, LabelList
from fastai.torch_core import data_collate
from fastai.vision.data import ImageDataBunch

from ..errors import ArgumentError, ArgumentTypeError
from .compat import FastaiDefaultWorkers
from .device import use_prefetch_thread, with_to_float
from .random_order import eval_sampler
from .sampling import BlockShuffle, shuffle_option, use_sampler

__all__ = ["Collated", "memmap_collate", "FastLabelList", "MemmapDataBunch", "MemmapImageDataBunch", "batch_of",
           "takes_fast_path", "WorkersSlowerWarning"]


class WorkersSlowerWarning(UserWarning):
    "Worker processes were asked for where the batch fast path makes them slower than none."


class Collated(list):
    "A batch that is already collated: ``[x_tensor, y_tensor]``, returned as is by `memmap_collate`."


WORKER_MMAP_THRESHOLD = 1 << 20   # bytes: in workers, blocks this large are mmapped and returned to the OS on free
_M_MMAP_THRESHOLD = -3            # glibc mallopt parameter number (malloc.h)
_heap_fixed_pid = None


def _fix_worker_heap() -> None:
    """In a DataLoader worker, pin glibc's mmap threshold to `WORKER_MMAP_THRESHOLD` (once per process).

    Batch-sized tensors built in a worker are freed once they have been moved to shared memory. With
    glibc's default *dynamic* threshold, the first free of a large block raises the threshold, later
    blocks come from the heap, and the heap fragments: measured +360 MiB of worker heap per epoch
    (12 MiB batches), gone with a fixed threshold. No-op outside glibc or outside workers.
    """
    global _heap_fixed_pid
    if _heap_fixed_pid == os.getpid() or torch.utils.data.get_worker_info() is None:
        return
    _heap_fixed_pid = os.getpid()
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def memmap_collate(batch: Any) -> Any:
    "Pass a `Collated` batch through; collate anything else with fastai's `data_collate`."
    if isinstance(batch, Collated):
        _fix_worker_heap()
        return list(batch)
    return data_collate(batch)


def _batch_reader(il: Any) -> Optional[Callable[[np.ndarray], torch.Tensor]]:
    "Function reading a collated batch of positions of `il`, or None if `il` has no batch read."
    get_batch = getattr(il, "get_batch", None)
    if get_batch is not None:
        return get_batch
    if type(il) is CategoryList and il.items.dtype.kind in "iu":
        return lambda idxs: torch.from_numpy(il.items[idxs].astype(np.int64))
    if type(il) is FloatList and not il.log:
        return lambda idxs: torch.from_numpy(np.ascontiguousarray(il.items[idxs]))
    return None


def batch_of(il: Any, idxs: np.ndarray) -> Optional[torch.Tensor]:
    """Collated tensor of items `idxs` (positions in `il`) if `il` supports batch reads, else None.

    Item lists of this package define ``get_batch`` (which may return None for a batch it cannot
    read whole: `FastLabelList` then falls back to items); fastai's processed `CategoryList` (int
    codes) and `FloatList` (float32 array) are read straight from their ``items``.
    """
    read = _batch_reader(il)
    return None if read is None else read(idxs)


def takes_fast_path(ds: Any) -> bool:
    "Whether `ds` (a dataset) builds whole batches in `__getitems__` (`FastLabelList` without per-item work)."
    return isinstance(ds, FastLabelList) and ds.batchable() and _batch_reader(ds.x) is not None \
        and _batch_reader(ds.y) is not None


class FastLabelList(LabelList):
    "A `LabelList` that can return a whole collated batch from `__getitems__`."

    def batchable(self) -> bool:
        "Whether no per-item work is due: no tfms, no single inference item."
        return self.item is None and not (self.tfms or self.tfmargs or (self.tfm_y and getattr(self, "tfms_y", None)))

    def __getitems__(self, indices: Sequence[int]) -> Any:
        "Batch `indices` as a `Collated` ``[x, y]`` if no per-item work is needed, else a list of items."
        if self.batchable():
            readx, ready = _batch_reader(self.x), _batch_reader(self.y)
            if readx is not None and ready is not None:
                idxs = np.asarray(indices, dtype=np.int64)
                x = readx(idxs)   # None: this batch cannot be read whole (e.g. not all in RAM): per item
                y = None if x is None else ready(idxs)
                if y is not None:
                    return Collated([x, y])
        return [self[int(i)] for i in indices]


def _check_count(name: str, v: Any, low: int, optional: bool = False, words: Sequence[str] = ()) -> None:
    "Refuse `v` unless it is an int >= `low` (or None when `optional`, or one of `words`): typed, expected vs found."
    if (optional and v is None) or (isinstance(v, str) and v in words):
        return
    alts = "".join(f" or {w!r}" for w in words) + (" or None" if optional else "")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name}: expected an int >= {low}{alts}, found {type(v).__name__} {v!r:.50}")
    if v < low:
        raise ArgumentError(f"{name}: expected an int >= {low}{alts}, found {v}")


def _check_create_args(args: tuple, kwargs: dict, num_workers: Any) -> Tuple[tuple, dict, Any]:
    """Validate the loader arguments where they enter (torch and fastai raise bare builtins, or fail later).
    `args` follow `train_ds` as in ``DataBunch.create``: valid_ds, test_ds, path, bs, val_bs.
    Returns them with NumPy integers as Python ints (torch's samplers refuse ``np.int64``)."""
    args, kwargs = list(args), dict(kwargs)
    for pos, name, default, optional in ((3, "bs", 64, False), (4, "val_bs", None, True)):
        v = args[pos] if len(args) > pos else kwargs.get(name, default)
        _check_count(name, v, 1, optional=optional)
        v = None if v is None else int(v)
        if len(args) > pos:
            args[pos] = v
        elif name in kwargs:
            kwargs[name] = v
    _check_count("num_workers", num_workers, 0, optional=True, words=("auto",))
    return tuple(args), kwargs, (int(num_workers) if isinstance(num_workers, np.integer) else num_workers)


def _create(cls, base, train_ds, *args, collate_fn=data_collate, shuffle=True, num_workers="auto",
            dl_tfms=None, no_check=False, **kwargs):
    args, kwargs, num_workers = _check_create_args(args, kwargs, num_workers)
    option, fast = shuffle_option(shuffle), takes_fast_path(train_ds)
    if collate_fn is data_collate:
        collate_fn = memmap_collate
    if getattr(getattr(train_ds, "x", None), "uint8", False):
        dl_tfms = with_to_float(dl_tfms)
    auto = num_workers in ("auto", None) or isinstance(num_workers, FastaiDefaultWorkers)   # not the user's value
    workers = (0 if fast else defaults.cpus) if auto else num_workers
    if fast and not auto and workers > 0:
        warnings.warn(f"{cls.__name__}: num_workers={workers} on the batch fast path: each worker batch is copied "
                      "through shared memory, which costs more than reading it in the main process; pass "
                      "num_workers='auto' (a background prefetch thread) or 0", WorkersSlowerWarning, stacklevel=4)
    # checked once the sampler is in place: a first batch in fastai's order would read all over a cold store
    data = super(base, cls).create(train_ds, *args, collate_fn=collate_fn, num_workers=workers, dl_tfms=dl_tfms,
                                   no_check=True, **kwargs)
    sampler = (option.sampler(data.train_ds, who=cls.__name__, workers=workers) if isinstance(option, BlockShuffle)
               else option.sampler(data.train_ds, data.train_dl.batch_size, who=cls.__name__))
    if sampler is not None:
        use_sampler(data.train_dl, sampler)
    if option.readahead is not False:   # validation/test rows of a store larger than memory: read ahead too
        for dl in (data.valid_dl, data.test_dl):
            ahead = None if dl is None else eval_sampler(dl.dataset, dl.batch_size)
            if ahead is not None:
                use_sampler(dl, ahead)
    if not no_check:
        data.sanity_check()
        if sampler is not None:
            sampler.set_epoch(0)   # the check drew a batch of epoch 0: the first epoch is still epoch 0
    if auto and workers == 0:
        use_prefetch_thread(data.train_dl)
    return data


class MemmapDataBunch(DataBunch):
    "`DataBunch` whose loaders collate with `memmap_collate` (batch fast path) by default."

    @classmethod
    def create(cls, *args, collate_fn=data_collate, **kwargs) -> "MemmapDataBunch":
        "Create a `DataBunch` as fastai does, with `memmap_collate`; also ``shuffle='block'``, ``num_workers='auto'``."
        return _create(cls, MemmapDataBunch, *args, collate_fn=collate_fn, **kwargs)


class MemmapImageDataBunch(ImageDataBunch):
    "`ImageDataBunch` whose loaders collate with `memmap_collate` (batch fast path) by default."

    @classmethod
    def create(cls, *args, collate_fn=data_collate, **kwargs) -> "MemmapImageDataBunch":
        "Create an `ImageDataBunch` as fastai does, with `memmap_collate`; also ``shuffle='block'``, ``num_workers='auto'``."
        return _create(cls, MemmapImageDataBunch, *args, collate_fn=collate_fn, **kwargs)
