"""Batching ragged items: padding to the longest item of a batch, and bucketing by length.

`pad_ragged` pads a batch given as flat data + lengths (what `RaggedArray.gather` reads) without a
Python loop per item; `RaggedCollate` is the collate function of ragged item lists (fastai's
``collate_fn``: pads per-item samples the same way, passes batches of the fast path through);
`BucketSampler` orders items so that a batch holds items of similar length; `RaggedDataBunch`
builds loaders with both (bucketing the training set, as fastai's ``TextClasDataBunch`` does with
``SortishSampler``).
"""
import math
from typing import Any, Optional

import numpy as np
import torch
from fastai.basic_data import DataBunch
from fastai.core import defaults, ifnone
from fastai.torch_core import data_collate, to_data
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from .batching import Collated
from ..errors import ArgumentError, ArgumentTypeError, LossyCastError
from .sampling import BlockShuffle, shuffle_option

__all__ = ["pad_ragged", "RaggedCollate", "BucketSampler", "RaggedDataBunch", "PAD_OUTPUTS", "BUCKET_BATCHES",
           "check_pad_value", "batch_dtype"]

PAD_OUTPUTS = ("lengths", "mask", None)   # what a padded batch carries besides the padded tensor
BUCKET_BATCHES = 50                        # batches per bucket (fastai's SortishSampler sorts 50 * bs items)


def batch_dtype(dtype: np.dtype) -> torch.dtype:
    "The dtype of the padded batches of items of numpy `dtype`: int64 for integer and bool data, float32 otherwise."
    return torch.int64 if np.dtype(dtype).kind in "biu" else torch.float32


def _pad_scalar(pad_value: Any) -> Any:
    "`pad_value` as a Python bool, int or float; ``ArgumentTypeError`` for anything else (strings, arrays, complex)."
    if isinstance(pad_value, (torch.Tensor, np.ndarray)) and pad_value.ndim == 0:
        pad_value = pad_value.item()
    if isinstance(pad_value, (bool, np.bool_, int, np.integer, float, np.floating)):
        return pad_value.item() if isinstance(pad_value, np.generic) else pad_value
    raise ArgumentTypeError(f"pad_value: expected a real number, found {pad_value!r:.100} ({type(pad_value).__name__})")


def check_pad_value(pad_value: Any, dtype: torch.dtype) -> Any:
    """Refuse a `pad_value` that batches of `dtype` cannot hold exactly (``LossyCastError``); return it
    as the Python scalar to fill with (a float for float batches: torch refuses ints beyond int64 there).

    Integer batches need an integer in the dtype's range (``0.5`` would pad with 0, a real token id;
    ``2**63`` would wrap); float batches take any float (rounding to float32 is allowed) but not a
    finite value that overflows to ``inf``. ``ArgumentTypeError`` for a value that is not a real number.
    """
    v = _pad_scalar(pad_value)
    if dtype.is_floating_point:
        try:
            f = float(v)
        except OverflowError:   # an int beyond every float
            f = math.inf
        if (math.isfinite(v) if isinstance(v, float) else True) and abs(f) > torch.finfo(dtype).max:
            raise LossyCastError(f"pad_value: expected a value {dtype} can hold (|v| <= {torch.finfo(dtype).max:.4g}), "
                                 f"found {v!r}; it would pad with inf")
        return f
    info = torch.iinfo(dtype) if dtype != torch.bool else None
    lo, hi = (0, 1) if info is None else (info.min, info.max)
    exact = isinstance(v, (bool, int)) or (math.isfinite(v) and float(v).is_integer())
    if not exact or not lo <= v <= hi:
        raise LossyCastError(f"pad_value: expected an integer in [{lo}, {hi}] for {dtype} batches (integer store), "
                             f"found {v!r}; it would pad with another value, maybe a real token id")
    return v


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

    Raises ``LossyCastError`` for a `pad_value` that `dtype` cannot hold exactly (see `check_pad_value`),
    ``ArgumentError`` for an unknown `output`.
    """
    if output not in PAD_OUTPUTS:
        raise ArgumentError(f"output: expected one of {PAD_OUTPUTS}, found {output!r}")
    lengths = np.asarray(lengths, np.int64)
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    if dtype is None:
        dtype = batch_dtype(data.dtype)
    fill = check_pad_value(pad_value, dtype)
    x = torch.full((n, width) + tuple(data.shape[1:]), fill, dtype=dtype)
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
            raise ArgumentError(f"output: expected one of {PAD_OUTPUTS}, found {output!r}")
        _pad_scalar(pad_value)   # the batch dtype is known per batch: `pad_ragged` checks the value fits it
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
        if isinstance(bs, (bool, np.bool_)) or not isinstance(bs, (int, np.integer)):
            raise ArgumentTypeError(f"BucketSampler: expected bs to be an int >= 1, found {bs!r:.100}")
        self.lengths = np.asarray(lengths, np.int64)
        if self.lengths.ndim != 1 or bs < 1:
            raise ArgumentError(f"BucketSampler: expected 1-d lengths and bs >= 1, found shape {self.lengths.shape}, "
                                f"bs={bs}")
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
               bucket_size: Optional[int] = None, shuffle: Any = True, **dl_kwargs: Any) -> "RaggedDataBunch":
        """Create a `RaggedDataBunch` from `train_ds`, `valid_ds` and maybe `test_ds` (training bucketed unless
        ``bucket=False``; ``shuffle='block'`` or a `BlockShuffle` samples it in block order instead of buckets)."""
        option = shuffle_option(shuffle)   # refuses unknown values before any work
        datasets = cls._init_ds(train_ds, valid_ds, test_ds)
        val_bs = ifnone(val_bs, bs)
        if collate_fn is data_collate:
            x = train_ds.x
            collate_fn = RaggedCollate(x.pad_value, x.pad_first, x.output)
        if isinstance(option, BlockShuffle):   # shuffle=True: buckets of similar lengths, in random order
            sampler = option.sampler(train_ds, who=cls.__name__)
        else:
            sampler = BucketSampler(_lengths(train_ds), bs, bucket_size=bucket_size) if bucket else None
        dls = [DataLoader(train_ds, bs, shuffle=sampler is None, sampler=sampler, drop_last=True,
                          num_workers=num_workers, **dl_kwargs)]
        dls += [DataLoader(ds, val_bs, shuffle=False, drop_last=False, num_workers=num_workers, **dl_kwargs)
                for ds in datasets[1:]]
        return cls(*dls, path=path, device=device, dl_tfms=dl_tfms, collate_fn=collate_fn, no_check=no_check)
