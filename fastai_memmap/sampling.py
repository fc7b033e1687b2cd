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
import os
import queue
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import ArgumentError, ArgumentTypeError

__all__ = ["BlockShuffleSampler", "BlockShuffle", "StoreReadahead", "block_shuffle_order", "use_sampler",
           "shuffle_option", "DEFAULT_BLOCK_BYTES", "DEFAULT_WINDOW_BLOCKS", "READAHEAD_WINDOWS",
           "WINDOW_TIMEOUT"]

DEFAULT_BLOCK_BYTES = 16 << 20  # bytes of contiguous rows per block: sequential reads at disk speed (4 MiB: ~20% slower)
DEFAULT_WINDOW_BLOCKS = 8       # blocks whose rows are mixed together; 8 x 16 MiB stays small next to RAM
READAHEAD_WINDOWS = 2           # windows asked for ahead of the one being read: keeps the disk queue busy
WINDOW_TIMEOUT = 60.0           # seconds the reader waits for a window's readahead before reading it itself
MAX_WINDOW_LOOP = 4096          # up to this many windows, each is permuted on its own (faster than one argsort)
SEED_LIMIT = 2 ** 63            # seeds in [0, SEED_LIMIT): each gives its own order (none wraps onto another)


def _int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    "`value` as an int in ``[lo, hi)``: ``ArgumentTypeError`` for a non-int (bools too), ``ArgumentError`` out of range."
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"expected {name} to be an int, found {value!r:.100} ({type(value).__name__})")
    if value < lo or (hi is not None and value >= hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ArgumentError(f"expected {name} {bound}, found {value}")
    return int(value)


def _positive(name: str, value: Any) -> int:
    return _int(name, value, 1)


def _check_rank(num_replicas: Any, rank: Any) -> None:
    _int("rank", rank, 0, _positive("num_replicas", num_replicas))


def _check_seed(seed: Any, num_replicas: int) -> Optional[int]:
    """`seed` as an int in ``[0, SEED_LIMIT)``, or None (one process only: each rank would draw its own
    seed, so their parts of the epoch would overlap and miss rows)."""
    if seed is None:
        if num_replicas > 1:
            raise ArgumentError(f"seed: expected an int shared by every rank with num_replicas={num_replicas}, found "
                                "None (each rank would draw its own order: parts overlap and rows are missed); "
                                "pass the same seed=... on every rank")
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)) and not 0 <= seed < SEED_LIMIT:
        raise ArgumentError(f"seed: expected an int in [0, 2**63), found {seed}; a seed outside would wrap onto "
                            "another seed's order")
    return _int("seed", seed, 0, SEED_LIMIT)


def _rank_slice(n: int, num_replicas: int, rank: int) -> slice:
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
    part = _rank_slice(n, num_replicas, rank)
    return order[part], window[part]


class _Readahead:
    """Runs `prefetch` on the windows asked for, in order, in a daemon thread.

    `ask` returns an event set once the window is read (or readahead gave up), so the reader can
    wait for it instead of faulting the same pages in concurrently (two competing streams of reads
    on one disk). A failure warns once; later windows are then released at once, unread.
    """

    def __init__(self, prefetch: Any):
        self.prefetch = prefetch
        self.q: "queue.Queue" = queue.Queue()
        self.stopped = threading.Event()
        self.dead = False
        self.thread = threading.Thread(target=self._run, name="fastai_memmap-readahead", daemon=True)
        self.thread.start()

    def ask(self, positions: np.ndarray) -> threading.Event:
        "Queue the window of `positions`; the event is set once it is read."
        done = threading.Event()
        if self.dead:
            done.set()
        else:
            self.q.put((positions, done))
        return done

    def close(self) -> None:
        "Stop after the window in progress; the thread ends on its own (an abandoned epoch does not wait)."
        self.stopped.set()
        self.q.put(None)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None or self.stopped.is_set():
                return
            positions, done = item
            try:
                if not self.dead:
                    self.prefetch(positions)
            except Exception as e:   # a hint that fails must not stop training
                self.dead = True
                warnings.warn(f"BlockShuffleSampler: readahead failed ({type(e).__name__}: {e}); "
                              "continuing without it")
            finally:
                done.set()


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
    epoch : int
        First epoch. Each ``iter()`` uses the current epoch and then advances it, so successive
        epochs differ without a ``set_epoch`` call; `set_epoch` pins it explicitly.
    """

    def __init__(self, n: int, block_rows: int = DEFAULT_BLOCK_BYTES // 4096,
                 window_blocks: int = DEFAULT_WINDOW_BLOCKS, seed: Optional[int] = None, num_replicas: int = 1,
                 rank: int = 0, keys: Optional[Any] = None, prefetch: Any = None, epoch: int = 0):
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
        self._base = None if self.n == 0 else _base_order(self.n, self.keys)
        self._cached: Optional[tuple] = None   # (epoch, order, window): the plan is computed once per epoch

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

    def __len__(self) -> int:
        part = _rank_slice(self.n, self.num_replicas, self.rank)
        return part.stop - part.start

    def __iter__(self) -> Iterator[int]:
        order, window = self._plan(self.epoch)
        self.epoch += 1
        if self.prefetch is None:
            return iter(order.tolist())
        return self._iter_prefetching(order, window)

    def _iter_prefetching(self, order: np.ndarray, window: np.ndarray) -> Iterator[int]:
        cuts = np.flatnonzero(np.diff(window)) + 1
        parts = np.split(order, cuts) if len(order) else []
        ahead = _Readahead(self.prefetch)
        try:
            ready = [ahead.ask(parts[w]) for w in range(min(READAHEAD_WINDOWS, len(parts)))]
            for w, part in enumerate(parts):
                if w + READAHEAD_WINDOWS < len(parts):
                    ready.append(ahead.ask(parts[w + READAHEAD_WINDOWS]))
                ready[w].wait(WINDOW_TIMEOUT)   # read by the thread: no competing page faults on the disk
                yield from part.tolist()
        finally:
            ahead.close()


class StoreReadahead:
    """Readahead of the store rows behind dataset positions, for `BlockShuffleSampler`.

    Called with the positions of an upcoming window, it reads their rows and maps them into this
    process (``advise('populate')``, ``MADV_POPULATE_READ``): the page faults (and the kernel's
    readahead, sequential within each block) happen in the readahead thread, so the reading thread
    takes none. Before Linux 5.14 it asks for them with ``advise('willneed')`` instead. (Measured on
    a virtual disk: ``populate`` alone kept the disk busier than ``willneed`` + ``populate``.)

    Parameters
    ----------
    targets : list of (MemmapArray, int64 array)
        Each store with the store row of every dataset position.
    """

    def __init__(self, targets: List[tuple]):
        self.targets = targets
        self.hint = "populate" if _kernel_at_least(5, 14) else "willneed"

    def __call__(self, positions: np.ndarray) -> None:
        "Read (and map) the rows of `positions`; blocks until done with ``'populate'``."
        for store, rows in self.targets:
            store.advise(self.hint, rows[positions])


def _kernel_at_least(major: int, minor: int) -> bool:
    "Whether this is Linux >= major.minor (where ``MADV_POPULATE_READ`` exists)."
    if not sys.platform.startswith("linux"):
        return False
    try:
        found = tuple(int(v) for v in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


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

    def sampler(self, dataset: Any) -> BlockShuffleSampler:
        """A `BlockShuffleSampler` for `dataset` (a `LabelList` or `ItemList`).

        Blocks follow the store rows of ``dataset.x`` when it is a store-backed list (any object
        with ``items`` and a ``store``); readahead covers the stores of ``x`` and ``y``.
        """
        x = getattr(dataset, "x", dataset)
        store, rows = getattr(x, "store", None), _rows(x)
        row_bytes = store.manifest.row_bytes if store is not None else 4096
        block_rows = max(1, self.block_bytes // max(1, row_bytes))
        prefetch = _store_prefetch([x, getattr(dataset, "y", None)]) if self.readahead else None
        return BlockShuffleSampler(len(dataset), block_rows, self.window_blocks, self.seed, self.num_replicas,
                                   self.rank, keys=rows, prefetch=prefetch)


def _rows(il: Any) -> Optional[np.ndarray]:
    "Store rows of the items of `il` if it is a store-backed list with one row per item, else None."
    items = getattr(il, "items", None)
    if getattr(il, "store", None) is None or not isinstance(items, np.ndarray) or items.ndim != 1 \
            or items.dtype.kind not in "iu" or len(items) != len(il):
        return None
    return np.asarray(items)


def _store_prefetch(lists: List[Any]) -> Optional[StoreReadahead]:
    "A `StoreReadahead` over the stores of the store-backed lists of `lists`, or None if there are none."
    targets = [(il.store, rows) for il in lists if il is not None for rows in [_rows(il)] if rows is not None]
    return StoreReadahead(targets) if targets else None


def shuffle_option(shuffle: Union[bool, str, BlockShuffle]) -> Optional[BlockShuffle]:
    """Parse the ``shuffle`` option of the data bunches: True (fastai's random order) gives None,
    ``'block'`` or a `BlockShuffle` gives a `BlockShuffle`. Raises ``ArgumentError`` otherwise."""
    if shuffle is True or shuffle == "random":
        return None
    if shuffle == "block":
        return BlockShuffle()
    if isinstance(shuffle, BlockShuffle):
        return shuffle
    raise ArgumentError(f"expected shuffle=True, 'random', 'block' or a BlockShuffle, found {shuffle!r:.100}")


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
