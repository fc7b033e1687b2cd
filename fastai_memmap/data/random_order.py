"""Uniform random order over stores larger than memory, at the disk's random-read rate.

fastai's ``shuffle=True`` draws a uniform random permutation (torch's ``RandomSampler``). Over a
store in the page cache that costs nothing; over one larger than the memory the process may use
(`fastai_memmap.store.memory.memory_budget`), every row is a cold read, and with the defaults each page
fault pulls the kernel's readahead window (128 KiB to 8 MiB) around a 4 KiB row, which memory
pressure evicts before it is used: measured at 256 rows/s and 1,136 bytes read per byte delivered.

`RandomOrderSampler` keeps the order uniform and fixes the reads:

1. the stores read rows with ``pread`` (`MemmapArray.set_read_mode`): exactly the rows' pages,
   never mapped into the process, so the page cache the kernel must reclaim is made of consumed rows;
2. a `fastai_memmap.store.readahead.Readahead` thread hints the rows of the next `batches_ahead` batches
   (``MADV_WILLNEED`` on each row's range, adjacent rows only merged): the kernel queues all of them
   at once, so the disk serves many reads in parallel (its IOPS at queue depth > 1, not one read
   per round trip) while the current batch is consumed.

``databunch(shuffle=True)`` uses it automatically when the training stores are larger than the
memory budget (`RandomShuffle` with ``readahead=None``), and says so once in a `ReadStrategyWarning`;
pass ``shuffle=RandomShuffle(readahead=False)`` for fastai's sampler whatever the size.
"""
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from ..arguments import check_int, check_positive, check_seed
from ..errors import ArgumentTypeError
from ..store.memory import memory_budget
from ..store.readahead import Readahead, StoreReadahead, iter_windows, store_targets

__all__ = ["RandomOrderSampler", "InOrderSampler", "eval_sampler", "RandomShuffle", "ReadStrategyWarning", "RANDOM_BATCHES_AHEAD", "store_bytes",
           "use_pread", "large_stores"]

RANDOM_BATCHES_AHEAD = 4   # batches hinted ahead: 4 x 256 rows in flight keep a disk's queue (QD 32-64) full


class ReadStrategyWarning(UserWarning):
    "Said once per data bunch when the read strategy changes because the stores are larger than memory."


def store_bytes(targets: List[tuple]) -> int:
    "Bytes of data of the distinct stores in `targets` (``(store, rows)`` pairs)."
    seen = {}
    for store, _ in targets:
        seen[id(store)] = int(store.nbytes)
    return sum(seen.values())


class RandomOrderSampler(Sampler):
    """Uniform random permutation of ``range(n)`` each epoch, with the next batches' rows read ahead.

    Parameters
    ----------
    n : int
        Dataset length.
    batch_size : int
        Positions per batch (the readahead window; the loader's own batch size).
    seed : int, optional
        In ``[0, 2**63)``; default drawn from torch's global generator at construction (so
        ``torch.manual_seed`` makes runs repeatable). Epoch ``e``'s order is a pure function of
        ``(seed, e)``.
    prefetch : callable, optional
        Called in a background thread with the positions of each upcoming batch (a `StoreReadahead`).
    batches_ahead : int
        Batches hinted ahead of the one being read.
    epoch : int
        First epoch; each ``iter()`` advances it.

    Raises ``ArgumentError`` / ``ArgumentTypeError`` for a bad size, seed or epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: Optional[int] = None, prefetch: Any = None,
                 batches_ahead: int = RANDOM_BATCHES_AHEAD, epoch: int = 0):
        self.n, self.batch_size = check_int("n", n, 0), check_positive("batch_size", batch_size)
        self.batches_ahead, self.epoch = check_positive("batches_ahead", batches_ahead), check_int("epoch", epoch, 0)
        seed = check_seed(seed, 1)
        self.seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else seed
        self.prefetch = prefetch
        self._skip = 0   # positions the next iter() leaves out (a run resumed mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        "Make the next ``iter()`` produce the order of `epoch`."
        self.epoch = check_int("epoch", epoch, 0)

    def skip(self, k: int) -> None:
        """Make the next ``iter()`` leave out the first `k` positions of its epoch's order (already
        consumed by a run resumed mid-epoch, `fastai_memmap.checkpoint`); ``len()`` counts the others
        until then. Raises ``ArgumentError`` / ``ArgumentTypeError`` unless `k` is an int >= 0."""
        self._skip = check_int("k", k, 0)

    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        "The positions of `epoch` (default: the current one): int64, a permutation of ``range(n)``, a new array."
        e = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFFFFFFFFFF, int(e), 0x52414E44])   # 'RAND'
        return rng.permutation(self.n).astype(np.int64)

    def __len__(self) -> int:
        return self.n - min(self._skip, self.n)

    def __iter__(self) -> Iterator[int]:
        k, self._skip = min(self._skip, self.n), 0
        order = self.order()[k:]
        self.epoch += 1
        if self.prefetch is None:
            return iter(order.tolist())
        window = np.arange(k, self.n, dtype=np.int64) // self.batch_size
        ahead = Readahead(self.prefetch, None, who="RandomOrderSampler")
        return iter_windows(order, window, ahead, self.batches_ahead, lag=self.n + 1)


class InOrderSampler(RandomOrderSampler):
    """Positions ``0 .. n-1`` in order, with the rows of the next `batches_ahead` batches read ahead:
    the validation and test loaders over stores larger than memory, whose rows (a random split)
    are as scattered as a random order's. Same parameters as `RandomOrderSampler` (no seed needed)."""

    def __init__(self, n: int, batch_size: int, prefetch: Any = None, batches_ahead: int = RANDOM_BATCHES_AHEAD):
        super().__init__(n, batch_size, seed=0, prefetch=prefetch, batches_ahead=batches_ahead)

    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        "``0 .. n-1`` (int64, a new array), whatever the epoch."
        return np.arange(self.n, dtype=np.int64)


def eval_sampler(dataset: Any, batch_size: int, batches_ahead: int = RANDOM_BATCHES_AHEAD) -> Optional[InOrderSampler]:
    """An `InOrderSampler` for a validation or test `dataset` whose stores are larger than the memory
    budget (their large stores then read with ``pread``), or None where they fit or are not stores."""
    targets = store_targets([getattr(dataset, "x", dataset), getattr(dataset, "y", None)])
    if not targets:
        return None
    size, budget = store_bytes(targets), memory_budget()
    if size <= budget:
        return None
    use_pread(targets, budget)
    return InOrderSampler(len(dataset), batch_size, StoreReadahead(targets, hint="willneed", merge_bytes=0),
                          batches_ahead)


@dataclass(frozen=True)
class RandomShuffle:
    """``shuffle=True`` of the data bunches: a uniform random order (``databunch(shuffle=RandomShuffle(...))``).

    Parameters
    ----------
    readahead : bool, optional
        None (default): read with `RandomOrderSampler` (``pread`` + hints) when the training stores
        (x and y) are larger than the memory budget (`fastai_memmap.store.memory.memory_budget`), else
        keep fastai's sampler. True / False: always / never.
    seed : int, optional
        Seed of `RandomOrderSampler` (fastai's sampler draws from torch's generator).
    batches_ahead : int
        Batches read ahead.
    """
    readahead: Optional[bool] = None
    seed: Optional[int] = None
    batches_ahead: int = RANDOM_BATCHES_AHEAD

    def __post_init__(self):
        if self.readahead is not None and not isinstance(self.readahead, (bool, np.bool_)):
            raise ArgumentTypeError(f"readahead: expected None, True or False, found {self.readahead!r:.100}")
        check_positive("batches_ahead", self.batches_ahead)
        check_seed(self.seed, 1)

    def sampler(self, dataset: Any, batch_size: int, who: str = "databunch") -> Optional[RandomOrderSampler]:
        """A `RandomOrderSampler` for `dataset` (a `LabelList`), or None to keep fastai's sampler.

        With it, the stores of ``dataset.x`` and ``dataset.y`` read with ``pread`` from now on (this
        process, and DataLoader workers started later). Warns once (`ReadStrategyWarning`) when the
        choice was made because of the size.
        """
        targets = store_targets([getattr(dataset, "x", dataset), getattr(dataset, "y", None)])
        if not targets or self.readahead is False:
            return None
        size, budget = store_bytes(targets), memory_budget()
        if self.readahead is None:
            if size <= budget:
                return None
            warnings.warn(f"{who}: shuffle=True over {_gb(size)} of stores, more than the {_gb(budget)} of memory "
                          f"this process may use: reading each batch's rows with pread, {self.batches_ahead} batches "
                          "ahead (uniform random order kept; disk-bound); shuffle='block' reads at the disk's "
                          "bandwidth", ReadStrategyWarning, stacklevel=4)
        use_pread(targets, budget)
        prefetch = StoreReadahead(targets, hint="willneed", merge_bytes=0)
        return RandomOrderSampler(len(dataset), batch_size, self.seed, prefetch, self.batches_ahead)


def large_stores(targets: List[tuple], budget: int) -> List[Any]:
    """The distinct stores of `targets` that matter for memory: more than a quarter of `budget` bytes.
    The others (labels) stay hot in the page cache whatever the order."""
    found: List[Any] = []
    for store, _ in targets:
        if store.nbytes * 4 > budget and all(store is not s for s in found):
            found.append(store)
    return found


def use_pread(targets: List[tuple], budget: int) -> List[Any]:
    """Switch the dense `large_stores` of `targets` to ``pread`` reads (`MemmapArray.set_read_mode`);
    small ones (labels) keep their maps. Returns the stores switched."""
    switched = [s for s in large_stores(targets, budget) if hasattr(s, "set_read_mode")]
    for store in switched:
        store.set_read_mode("pread")
    return switched


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
