"""Locality-aware shuffling: `BlockShuffleSampler` and the `BlockShuffle` option of the data bunches.

A fully random order touches the whole store in every batch: warm (in the page cache) that costs
nothing, cold it makes every page fault pull the kernel's readahead window (8 MiB on some disks)
around a single 4 KiB row, so the first batches read most of the file at random-I/O speed. Block
shuffling keeps the order random enough for SGD and the reads sequential enough for the disk:

1. rows are cut into *blocks* of `block_rows` rows contiguous on disk (default: 16 MiB of rows);
2. the blocks are shuffled;
3. rows are shuffled within each *window* of `window_blocks` consecutive shuffled blocks (default
   8, so a batch mixes rows from 8 random places of the store);
4. for distributed training the epoch's order is cut into `num_replicas` contiguous parts, one per
   `rank` (sizes differ by at most one row): each rank reads its own blocks, and the union over ranks
   is every row exactly once.

The order is a pure function of ``(n, block_rows, window_blocks, seed, epoch, num_replicas, rank)``:
every rank computes the same permutation from the same seed. With ``readahead``, a background thread
reads the next windows while the current one is consumed and maps them into the process
(``madvise(MADV_POPULATE_READ)``, which releases the GIL): cold reads become large sequential
requests, each byte is read from disk once, and the gathers take no page fault.

Use it through ``databunch(shuffle='block')`` or ``databunch(shuffle=BlockShuffle(seed=..., ...))``
on a `MemmapItemList`: the training loader then samples with a `BlockShuffleSampler`; the other
loaders keep fastai's order.
"""
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from ..arguments import SEED_LIMIT, check_int as _int, check_positive as _positive, check_rank as _check_rank, \
    check_seed as _check_seed
from ..errors import ArgumentError, ArgumentTypeError
from ..store.memory import memory_budget
from .random_order import RandomShuffle, ReadStrategyWarning, large_stores, store_bytes, use_pread
from ..store.readahead import (READAHEAD_WINDOWS, WINDOW_TIMEOUT, Readahead, StoreReadahead, iter_windows, store_rows,
                               store_targets)

__all__ = ["BlockShuffleSampler", "BlockShuffle", "StoreReadahead", "block_shuffle_order", "use_sampler",
           "shuffle_option", "DEFAULT_BLOCK_BYTES", "DEFAULT_WINDOW_BLOCKS", "READAHEAD_WINDOWS",
           "WINDOW_TIMEOUT", "RandomShuffle", "fit_in_flight", "MIN_BLOCK_BYTES"]

DEFAULT_BLOCK_BYTES = 16 << 20  # bytes of contiguous rows per block: sequential reads at disk speed (4 MiB: ~20% slower)
DEFAULT_WINDOW_BLOCKS = 8       # blocks whose rows are mixed together; 8 x 16 MiB stays small next to RAM
MIN_BLOCK_BYTES = 4 << 20       # blocks under memory pressure: mid-sized requests, many in flight
IN_FLIGHT_SHARE = 8             # bytes in flight <= budget / 8: the process's own code pages and heap grow into the
                                # budget while it runs, and read-ahead pages are the first the kernel reclaims
QUEUED_BLOCKS = 8               # blocks read ahead under memory pressure (cgroup runs: 4 MiB x 8 beat 8 MiB x 2)
MAX_WINDOW_LOOP = 4096          # up to this many windows, each is permuted on its own (faster than one argsort)


def rank_slice(n: int, num_replicas: int, rank: int) -> slice:
    "Rank `rank`'s contiguous part of `n` positions: the first ``n % num_replicas`` ranks get one more."
    q, r = divmod(n, num_replicas)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


def _base_order(n: int, keys: Optional[np.ndarray]) -> np.ndarray:
    "Positions in disk order: ``argsort(keys)`` (stable), or ``0 .. n-1``."
    return np.arange(n, dtype=np.int64) if keys is None else np.argsort(keys, kind="stable").astype(np.int64)


def _block_plan(n: int, block_rows: int, window_blocks: int, seed: int, epoch: int, base: np.ndarray) -> tuple:
    "(order of every position this epoch, window number of each entry of that order)."
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)])
    n_blocks = -(-n // block_rows)
    blocks = rng.permutation(n_blocks)
    sizes = np.minimum(block_rows, n - blocks * block_rows)          # the last block may be short
    starts = np.repeat(blocks * block_rows - np.cumsum(sizes) + sizes, sizes)
    seq = np.arange(n, dtype=np.int64) + starts                      # block-shuffled positions into `base`
    ends = np.cumsum(sizes)
    bounds = np.unique(np.concatenate([[0], ends[window_blocks - 1::window_blocks], [n]]))
    window = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    if len(bounds) <= MAX_WINDOW_LOOP:                               # shuffle within each window only
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            seq[a:b] = seq[a:b][rng.permutation(b - a)]
    else:
        seq = seq[np.argsort(window + rng.random(n), kind="stable")]
    return base[seq], window


def block_shuffle_order(n: int, block_rows: int, window_blocks: int = DEFAULT_WINDOW_BLOCKS, seed: int = 0,
                        epoch: int = 0, num_replicas: int = 1, rank: int = 0,
                        keys: Optional[Any] = None) -> np.ndarray:
    """The positions rank `rank` visits in epoch `epoch` (see the module docstring for the algorithm).

    Parameters
    ----------
    n : int
        Number of positions (dataset length).
    block_rows : int
        Positions per block (contiguous on disk when `keys` are store row numbers).
    window_blocks : int
        Consecutive shuffled blocks whose positions are mixed together.
    seed, epoch : int
        The permutation is a pure function of these (and the sizes).
    num_replicas, rank : int
        Distributed training: this rank's contiguous part of the epoch order.
    keys : int array-like of length `n`, optional
        Where each position lives on disk (e.g. its store row): blocks are cut in `keys` order, so
        a split whose positions are not sorted by row still reads contiguous rows. Default: the
        positions themselves.

    Returns
    -------
    np.ndarray
        int64 positions, shape ``(len of this rank's part,)``: over all ranks, every position in
        ``0 .. n-1`` exactly once. A new array.

    Raises
    ------
    ArgumentError (a ValueError)
        Non-positive sizes, negative `n` or `epoch`, `seed` outside ``[0, 2**63)``, `rank` outside
        ``[0, num_replicas)``, `keys` of the wrong length.
    ArgumentTypeError (a TypeError)
        A size, `seed`, `epoch` or `rank` that is not an int.
    """
    order, _ = _plan(n, block_rows, window_blocks, seed, epoch, num_replicas, rank, keys)
    return order


def _plan(n, block_rows, window_blocks, seed, epoch, num_replicas, rank, keys, base=None) -> tuple:
    block_rows, window_blocks = _positive("block_rows", block_rows), _positive("window_blocks", window_blocks)
    _check_rank(num_replicas, rank)
    n, epoch = _int("n", n, 0), _int("epoch", epoch, 0)
    if _check_seed(seed, 1) is None:
        raise ArgumentError("seed: expected an int in [0, 2**63), found None; BlockShuffleSampler draws one")
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (n,):
            raise ArgumentError(f"expected keys of shape ({n},) (one per position), found {keys.shape}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    base = _base_order(n, keys) if base is None else base
    order, window = _block_plan(n, block_rows, window_blocks, seed, epoch, base)
    part = rank_slice(n, num_replicas, rank)
    return order[part], window[part]


class BlockShuffleSampler(Sampler):
    """Sampler yielding a block-shuffled order of ``range(n)`` (see the module docstring).

    Parameters
    ----------
    n : int
        Dataset length.
    block_rows : int
        Positions per block (default: enough 4 KiB rows for `DEFAULT_BLOCK_BYTES`, i.e. 4096).
    window_blocks : int
        Blocks mixed together (default `DEFAULT_WINDOW_BLOCKS`).
    seed : int, optional
        In ``[0, 2**63)``. Default: drawn from torch's global generator at construction (so
        ``torch.manual_seed`` makes runs repeatable, as for torch's ``RandomSampler``); refused with
        ``num_replicas > 1``, where every rank must pass the same seed.
    num_replicas, rank : int
        As torch's ``DistributedSampler``, but without padding: rank parts differ by at most one
        position and together hold every position once.
    keys : int array-like, optional
        Disk order of the positions (store rows); see `block_shuffle_order`.
    prefetch : callable, optional
        Readahead (e.g. a `StoreReadahead`), called in a background thread (started with each
        epoch, stopped at its end) with the positions of each upcoming window (int64 array, any
        order), in order, at most `READAHEAD_WINDOWS` windows ahead of the reader; the sampler
        yields a window once its readahead returned (at most `WINDOW_TIMEOUT` seconds later). A
        failure warns once and ends readahead for the epoch.
    readahead_windows : int
        Windows asked for ahead of the one being read (default `READAHEAD_WINDOWS`).
    drop_consumed : bool
        Call ``prefetch.drop(positions)`` on each window once the next one is being read (stores
        larger than memory: consumed pages are the ones the kernel reclaims).
    epoch : int
        First epoch. Each ``iter()`` uses the current epoch and then advances it, so successive
        epochs differ without a ``set_epoch`` call; `set_epoch` pins it explicitly.
    """

    def __init__(self, n: int, block_rows: int = DEFAULT_BLOCK_BYTES // 4096,
                 window_blocks: int = DEFAULT_WINDOW_BLOCKS, seed: Optional[int] = None, num_replicas: int = 1,
                 rank: int = 0, keys: Optional[Any] = None, prefetch: Any = None, epoch: int = 0,
                 readahead_windows: int = READAHEAD_WINDOWS, drop_consumed: bool = False):
        self.n, self.block_rows, self.window_blocks = _int("n", n, 0), _positive("block_rows", block_rows), \
            _positive("window_blocks", window_blocks)
        _check_rank(num_replicas, rank)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        seed = _check_seed(seed, self.num_replicas)
        self.seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else seed
        self.keys = None if keys is None else np.asarray(keys)
        if self.keys is not None and self.keys.shape != (self.n,):
            raise ArgumentError(f"expected keys of shape ({self.n},) (one per position), found {self.keys.shape}")
        self.prefetch, self.epoch = prefetch, _int("epoch", epoch, 0)
        self.readahead_windows, self.drop_consumed = _positive("readahead_windows", readahead_windows), bool(drop_consumed)
        self._base = None if self.n == 0 else _base_order(self.n, self.keys)
        self._cached: Optional[tuple] = None   # (epoch, order, window): the plan is computed once per epoch
        self._skip: Optional[List[int]] = None   # positions consumed per part, left out by the next iter()

    def set_epoch(self, epoch: int) -> None:
        "Make the next ``iter()`` produce the order of `epoch` (and advance from there)."
        self.epoch = _int("epoch", epoch, 0)

    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        "This rank's positions for `epoch` (default: the current one), int64, a new array."
        return self._plan(self.epoch if epoch is None else _int("epoch", epoch, 0))[0].copy()

    def _plan(self, epoch: int) -> tuple:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch,) + _plan(self.n, self.block_rows, self.window_blocks, self.seed, epoch,
                                            self.num_replicas, self.rank, self.keys, self._base)
        return self._cached[1:]

    def skip(self, consumed: Union[int, List[int]]) -> None:
        """Make the next ``iter()`` leave out the positions of its epoch already consumed (a run resumed
        mid-epoch, `fastai_memmap.checkpoint`); ``len()`` counts the others until then.

        `consumed` is an int (the first `consumed` positions of this rank's part) or a list with one
        count per rank of the run that consumed them: the epoch's order is cut into ``len(consumed)``
        parts as that run cut it, the first ``consumed[r]`` of part ``r`` are left out, and what remains
        (in order) is cut anew into `num_replicas` parts, so a job resumed with another number of ranks
        still visits every position of the epoch exactly once over its ranks. Raises ``ArgumentError``
        / ``ArgumentTypeError`` for a negative or non-int count or an empty list.
        """
        if isinstance(consumed, (int, np.integer)) and not isinstance(consumed, (bool, np.bool_)):
            self._skip = [_int("consumed", consumed, 0)] * self.num_replicas
            return
        if not isinstance(consumed, (list, tuple)) or not consumed:
            raise ArgumentTypeError(f"consumed: expected an int or a non-empty list of ints (one per rank), found "
                                    f"{consumed!r:.100}")
        self._skip = [_int("consumed", c, 0) for c in consumed]

    def _remaining(self) -> np.ndarray:
        "Positions of the full epoch order left after `_skip`, and this rank's slice of them."
        parts = [rank_slice(self.n, len(self._skip), r) for r in range(len(self._skip))]
        keep = np.concatenate([np.arange(min(p.start + c, p.stop), p.stop) for p, c in zip(parts, self._skip)])
        return keep[rank_slice(len(keep), self.num_replicas, self.rank)]

    def __len__(self) -> int:
        if self._skip is not None and self.n:
            return len(self._remaining())
        part = rank_slice(self.n, self.num_replicas, self.rank)
        return part.stop - part.start

    def __iter__(self) -> Iterator[int]:
        if self._skip is not None and self.n:
            mine, self._skip = self._remaining(), None
            order, window = _block_plan(self.n, self.block_rows, self.window_blocks, self.seed, self.epoch, self._base)
            order, window = order[mine], window[mine]
        else:
            self._skip = None
            order, window = self._plan(self.epoch)
        self.epoch += 1
        if self.prefetch is None:
            return iter(order.tolist())
        return self._iter_prefetching(order, window)

    def _iter_prefetching(self, order: np.ndarray, window: np.ndarray) -> Iterator[int]:
        drop = getattr(self.prefetch, "drop", None) if self.drop_consumed else None
        ahead = Readahead(self.prefetch, drop, who="BlockShuffleSampler")
        return iter_windows(order, window, ahead, self.readahead_windows, lag=1)


@dataclass(frozen=True)
class BlockShuffle:
    """How the training loader of a data bunch shuffles: ``databunch(shuffle=BlockShuffle(...))``.

    ``shuffle='block'`` is ``BlockShuffle()``. Sizes are in bytes of store rows, so the same option
    suits any row size.

    Parameters
    ----------
    block_bytes : int
        Bytes of contiguous rows per block (rounded to whole rows, at least one).
    window_blocks : int
        Blocks whose rows are mixed together.
    seed : int, optional
        Seed of the permutation, in ``[0, 2**63)`` (default: drawn from torch's generator); required,
        the same on every rank, with ``num_replicas > 1``.
    num_replicas, rank : int
        This process's part of each epoch (see `BlockShuffleSampler`).
    readahead : bool
        Read and map upcoming windows in a background thread (`StoreReadahead`).

    When the stores (x and y) are larger than the memory this process may use
    (`fastai_memmap.store.memory.memory_budget`), the sampler keeps the bytes in flight (windows read
    ahead, the current one, the one just consumed) under an eighth of it (`IN_FLIGHT_SHARE`): fewer windows ahead
    first, then fewer blocks per window, then smaller blocks (down to 1 MiB), and it drops
    consumed windows from the page cache; said once in a `ReadStrategyWarning`.
    """
    block_bytes: int = DEFAULT_BLOCK_BYTES
    window_blocks: int = DEFAULT_WINDOW_BLOCKS
    seed: Optional[int] = None
    num_replicas: int = 1
    rank: int = 0
    readahead: bool = True

    def __post_init__(self):
        _positive("block_bytes", self.block_bytes)
        _positive("window_blocks", self.window_blocks)
        _check_rank(self.num_replicas, self.rank)
        _check_seed(self.seed, self.num_replicas)
        if not isinstance(self.readahead, (bool, np.bool_)):
            raise ArgumentTypeError(f"expected readahead to be a bool, found {self.readahead!r:.100}")

    def sampler(self, dataset: Any, who: str = "databunch", workers: Any = 0) -> BlockShuffleSampler:
        """A `BlockShuffleSampler` for `dataset` (a `LabelList` or `ItemList`).

        Blocks follow the store rows of ``dataset.x`` when it is a store-backed list (any object
        with ``items`` and a ``store``); readahead covers the stores of ``x`` and ``y``. With
        `workers` > 0 (DataLoader worker processes) over stores larger than memory, the large stores
        read with ``pread`` (`fastai_memmap.data.random_order.use_pread`): pages mapped by the workers
        could not be dropped from the page cache by this process.
        """
        x = getattr(dataset, "x", dataset)
        store, rows = getattr(x, "store", None), store_rows(x)
        row_bytes = max(1, store.manifest.row_bytes if store is not None else 4096)
        block_rows = max(1, self.block_bytes // row_bytes)
        targets = store_targets([x, getattr(dataset, "y", None)])
        ahead, window_blocks, big = READAHEAD_WINDOWS, self.window_blocks, False
        if targets and self.readahead:
            size, budget = store_bytes(targets), memory_budget()
            big = size > budget
            if big:
                ahead, window_blocks, block_rows = fit_in_flight(budget // IN_FLIGHT_SHARE, row_bytes, block_rows, window_blocks)
                if isinstance(workers, int) and workers > 0:
                    use_pread(targets, budget)
                warnings.warn(f"{who}: shuffle='block' over {size / 1e9:.2f} GB of stores, more than the "
                              f"{budget / 1e9:.2f} GB of memory this process may use: windows of {window_blocks} x "
                              f"{block_rows * row_bytes / 2 ** 20:.1f} MiB, {ahead} ahead, consumed windows dropped "
                              "from the page cache", ReadStrategyWarning, stacklevel=4)
        prefetch = None
        if targets and self.readahead:
            prefetch = (StoreReadahead(targets, hint=None, early="willneed", evict=True,
                                       drop_only=large_stores(targets, budget)) if big
                        else StoreReadahead(targets))
        return BlockShuffleSampler(len(dataset), block_rows, window_blocks, self.seed, self.num_replicas,
                                   self.rank, keys=rows, prefetch=prefetch, readahead_windows=ahead,
                                   drop_consumed=big)


def fit_in_flight(limit: int, row_bytes: int, block_rows: int, window_blocks: int) -> tuple:
    """``(windows ahead, window_blocks, block_rows)`` for a store larger than memory, with at most
    `limit` bytes in flight: ``(ahead + 2)`` windows (those read ahead, the current one, the one just
    consumed). Blocks of at most `MIN_BLOCK_BYTES` (4 MiB) of rows; about `QUEUED_BLOCKS` blocks
    queued ahead (measured under a memory cgroup: many mid-sized requests in flight keep the disk
    busier than a few large ones); the most blocks per window (mixing) that fit, then fewer windows
    ahead (at least one). Sizes in rows and bytes."""
    block_rows = max(1, min(block_rows, MIN_BLOCK_BYTES // row_bytes))
    block = block_rows * row_bytes
    wb = window_blocks
    while True:
        ahead = max(1, -(-QUEUED_BLOCKS // wb))
        if (ahead + 2) * wb * block <= limit or wb == 1:
            break
        wb = max(1, wb // 2)
    while ahead > 1 and (ahead + 2) * wb * block > limit:
        ahead -= 1
    return ahead, wb, block_rows


def shuffle_option(shuffle: Union[bool, str, BlockShuffle, RandomShuffle]) -> Union[BlockShuffle, RandomShuffle]:
    """Parse the ``shuffle`` option of the data bunches: True or ``'random'`` gives ``RandomShuffle()``
    (uniform random order; fastai's sampler unless the stores are larger than memory), ``'block'`` or
    a `BlockShuffle` gives a `BlockShuffle`, a `RandomShuffle` itself. Raises ``ArgumentError`` otherwise."""
    if shuffle is True or (isinstance(shuffle, str) and shuffle == "random"):
        return RandomShuffle()
    if isinstance(shuffle, str) and shuffle == "block":
        return BlockShuffle()
    if isinstance(shuffle, (BlockShuffle, RandomShuffle)):
        return shuffle
    raise ArgumentError(f"expected shuffle=True, 'random', 'block', a BlockShuffle or a RandomShuffle, found "
                        f"{shuffle!r:.100}")


def use_sampler(ddl: Any, sampler: Sampler) -> Any:
    """Rebuild the `DataLoader` inside fastai's `DeviceDataLoader` `ddl` to draw from `sampler`.

    Everything else (batch size, ``drop_last``, workers, collate function, transforms) is kept.
    The sampler is recorded in the loader's ``init_kwargs``, so ``ddl.new(...)`` and the
    ``batch_size`` setter keep it (``ddl.new(shuffle=True)`` then raises torch's ``ValueError``:
    pass ``sampler=None`` with it). Returns `ddl`, changed in place.
    """
    dl = ddl.dl
    kwargs = {**dl.init_kwargs, "shuffle": False, "sampler": sampler, "batch_sampler": None}
    ddl.dl = dl.__class__(dl.dataset, **kwargs)
    ddl.dl.collate_fn = ddl.collate_fn
    return ddl
