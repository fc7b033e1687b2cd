"""Batching ragged items: padding to the longest item of a batch, and bucketing by length.

`pad_ragged` pads a batch given as flat data + lengths (what `RaggedArray.gather` reads) without a
Python loop per item; `RaggedCollate` is the collate function of ragged item lists (fastai's
``collate_fn``: pads per-item samples the same way, passes batches of the fast path through);
`BucketSampler` orders items so that a batch holds items of similar length; `RaggedDataBunch`
builds loaders with both (bucketing the training set, as fastai's ``TextClasDataBunch`` does with
``SortishSampler``).
"""
from typing import Any, Optional

import numpy as np
import torch
from fastai.basic_data import DataBunch
from fastai.core import defaults, ifnone
from fastai.torch_core import data_collate, to_data
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from .batching import Collated

__all__ = ["pad_ragged", "RaggedCollate", "BucketSampler", "RaggedDataBunch", "PAD_OUTPUTS", "BUCKET_BATCHES"]

PAD_OUTPUTS = ("lengths", "mask", None)   # what a padded batch carries besides the padded tensor
BUCKET_BATCHES = 50                        # batches per bucket (fastai's SortishSampler sorts 50 * bs items)


def pad_ragged(data: np.ndarray, lengths: np.ndarray, pad_value: Any = 0, pad_first: bool = False,
               output: Optional[str] = "lengths", dtype: Any = None) -> Any:
    """Pad a batch of ragged items to the longest, without a Python loop per item.

    Parameters
    ----------
    data : ndarray of shape ``(lengths.sum(), *trailing)``
        The items, concatenated (as returned by `RaggedArray.gather`).
    lengths : int array of shape ``(n,)``
    pad_value : scalar
        Value of the padding positions.
    pad_first : bool
        Pad before the items (items end at the last position) instead of after.
    output : ``"lengths"``, ``"mask"`` or None
        What to return with the padded tensor: the lengths (int64 tensor ``(n,)``), a bool mask
        ``(n, max_len)`` that is **True at padding positions** (as ``key_padding_mask`` of torch's
        attention layers and fastai's ``masked_concat_pool`` expect), or nothing.
    dtype : torch dtype, optional
        Default: int64 for integer and bool data, float32 otherwise.

    Returns
    -------
    ``[x, lengths]``, ``[x, mask]`` or ``x``, where `x` is a new tensor of shape ``(n, max_len, *trailing)``
    (``max_len`` = 0 for a batch of empty items).
    """
    if output not in PAD_OUTPUTS:
        raise ValueError(f"output: expected one of {PAD_OUTPUTS}, found {output!r}")
    lengths = np.asarray(lengths, np.int64)
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    if dtype is None:
        dtype = torch.int64 if data.dtype.kind in "biu" else torch.float32
    x = torch.full((n, width) + tuple(data.shape[1:]), pad_value, dtype=dtype)
    if len(data):
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(len(data)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        if pad_first:
            cols += np.repeat(width - lengths, lengths)
        x[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(np.ascontiguousarray(data)).to(dtype)
    if output is None:
        return x
    t = torch.from_numpy(lengths)
    if output == "lengths":
        return [x, t]
    pos = torch.arange(width)[None]
    return [x, pos < (width - t)[:, None] if pad_first else pos >= t[:, None]]


class RaggedCollate:
    """Collate function of ragged item lists: pads the inputs of a list of ``(x, y)`` samples with
    `pad_ragged` and collates the targets with ``default_collate``; a `Collated` batch (the fast
    path, already padded) passes through. Picklable (spawned workers)."""

    def __init__(self, pad_value: Any = 0, pad_first: bool = False, output: Optional[str] = "lengths"):
        if output not in PAD_OUTPUTS:
            raise ValueError(f"output: expected one of {PAD_OUTPUTS}, found {output!r}")
        self.pad_value, self.pad_first, self.output = pad_value, pad_first, output

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, Collated):
            return list(batch)
        samples = to_data(batch)
        xs = [np.asarray(s[0]) for s in samples]
        lengths = np.array([len(x) for x in xs], np.int64)
        trailing = xs[0].shape[1:] if xs else ()
        flat = np.concatenate(xs) if xs and lengths.sum() else np.zeros((0,) + trailing, xs[0].dtype if xs else np.int64)
        x = pad_ragged(flat, lengths, self.pad_value, self.pad_first, self.output,
                       dtype=samples[0][0].dtype if xs and isinstance(samples[0][0], torch.Tensor) else None)
        return [x, default_collate([s[1] for s in samples])]

    def __repr__(self) -> str:
        return f"RaggedCollate(pad_value={self.pad_value!r}, pad_first={self.pad_first}, output={self.output!r})"


class BucketSampler(Sampler):
    """Sample indices so that consecutive groups of `bs` hold items of similar length.

    With ``shuffle=True`` (training) each epoch: a random permutation, cut into buckets of
    `bucket_size` items (default ``BUCKET_BATCHES * bs``), each sorted by decreasing length and cut
    into batches of `bs`; full batches are shuffled, the one with the longest item goes first (an
    out-of-memory error shows at once) and the incomplete batch, if any, last (so a loader with
    ``batch_size=bs`` and ``drop_last=True`` drops it). With ``shuffle=False``: by decreasing length.
    Every index in ``range(len(lengths))`` is yielded exactly once per epoch. Vectorised: O(n log n)
    per epoch, no Python call per item. Randomness from ``np.random`` (seed it with fastai's
    ``set_seed`` or ``np.random.seed``).

    Parameters
    ----------
    lengths : int array-like of shape ``(n,)``
        Length of each item of the dataset, in dataset order.
    bs : int
        Batch size of the loader using the sampler.
    """

    def __init__(self, lengths: Any, bs: int, shuffle: bool = True, bucket_size: Optional[int] = None):
        self.lengths = np.asarray(lengths, np.int64)
        if self.lengths.ndim != 1 or bs < 1:
            raise ValueError(f"BucketSampler: expected 1-d lengths and bs >= 1, found shape {self.lengths.shape}, bs={bs}")
        self.bs, self.shuffle = int(bs), shuffle
        size = ifnone(bucket_size, BUCKET_BATCHES * self.bs)
        self.bucket_size = max(self.bs, size // self.bs * self.bs)   # whole batches per bucket

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(self.order().tolist())

    def order(self) -> np.ndarray:
        "The indices of one epoch, as a new int64 array (draws from ``np.random`` if shuffling)."
        n = len(self.lengths)
        if not self.shuffle:
            return np.argsort(-self.lengths, kind="stable")
        perm = np.random.permutation(n)
        bucket = np.arange(n) // self.bucket_size
        perm = perm[np.lexsort((-self.lengths[perm], bucket))]   # sorted by decreasing length within a bucket
        full = n // self.bs
        batches = perm[:full * self.bs].reshape(full, self.bs)
        if full > 1:
            batches = batches[np.random.permutation(full)]
            longest = int(np.argmax(self.lengths[batches[:, 0]]))
            batches[[0, longest]] = batches[[longest, 0]]
        return np.concatenate([batches.reshape(-1), perm[full * self.bs:]])


def _lengths(ds: Any) -> np.ndarray:
    "Item lengths of a `LabelList` over a ragged item list."
    return ds.x.lengths()


class RaggedDataBunch(DataBunch):
    """`DataBunch` of ragged item lists: loaders pad batches with the lists' `RaggedCollate` and, with
    ``bucket=True`` (default), sample the training set with a shuffling `BucketSampler`. The
    validation, fix and test loaders keep the datasets' order (so ``get_preds`` is aligned with
    ``valid_ds``/``test_ds``, unlike fastai's ``TextClasDataBunch``, which sorts them by length)."""

    @classmethod
    def create(cls, train_ds: Any, valid_ds: Any, test_ds: Optional[Any] = None, path: Any = ".", bs: int = 64,
               val_bs: Optional[int] = None, num_workers: int = defaults.cpus, dl_tfms: Any = None, device: Any = None,
               collate_fn: Any = data_collate, no_check: bool = False, bucket: bool = True,
               bucket_size: Optional[int] = None, **dl_kwargs: Any) -> "RaggedDataBunch":
        "Create a `RaggedDataBunch` from `train_ds`, `valid_ds` and maybe `test_ds` (training bucketed unless ``bucket=False``)."
        datasets = cls._init_ds(train_ds, valid_ds, test_ds)
        val_bs = ifnone(val_bs, bs)
        if collate_fn is data_collate:
            x = train_ds.x
            collate_fn = RaggedCollate(x.pad_value, x.pad_first, x.output)
        sampler = BucketSampler(_lengths(train_ds), bs, bucket_size=bucket_size) if bucket else None
        dls = [DataLoader(train_ds, bs, shuffle=not bucket, sampler=sampler, drop_last=True, num_workers=num_workers,
                          **dl_kwargs)]
        dls += [DataLoader(ds, val_bs, shuffle=False, drop_last=False, num_workers=num_workers, **dl_kwargs)
                for ds in datasets[1:]]
        return cls(*dls, path=path, device=device, dl_tfms=dl_tfms, collate_fn=collate_fn, no_check=no_check)
