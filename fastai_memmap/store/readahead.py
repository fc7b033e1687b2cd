"""Reading the rows of upcoming batches in the background, and letting go of consumed ones.

Samplers that know their order ahead of time (`fastai_memmap.data.sampling.BlockShuffleSampler`,
`fastai_memmap.data.random_order.RandomOrderSampler`) cut it into *windows* (a block-shuffle window, or
one batch of a random order) and hand each upcoming window to a `Readahead` thread, which calls a
`StoreReadahead` on the positions: kernel hints on the rows behind them (``madvise``), so the disk
reads them while the current window is consumed. Once a window is consumed (a few windows later,
so that batches still in flight in DataLoader workers are not affected), the thread can *drop* it:
unmap its pages from this process (``MADV_DONTNEED``) and, for stores larger than memory, remove
them from the page cache (``POSIX_FADV_DONTNEED``), so that the pages the kernel must reclaim are
the consumed ones, never those read ahead for the next batches.

Hints never change results: a failed hint warns once and the epoch goes on without readahead.
"""
import os
import queue
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, List, Optional

import numpy as np

__all__ = ["Readahead", "StoreReadahead", "iter_windows", "store_readahead", "store_rows", "READAHEAD_WINDOWS",
           "WINDOW_TIMEOUT", "DROP_LAG"]

READAHEAD_WINDOWS = 2           # windows asked for ahead of the one being read: keeps the disk queue busy
WINDOW_TIMEOUT = 60.0           # seconds the reader waits for a window's readahead before reading it itself
DROP_LAG = 8                    # windows kept after they were yielded before a drop: batches in flight in workers


class Readahead:
    """Runs `prefetch` (and `drop`) on the windows asked for, in order, in a daemon thread.

    `ask` returns an event set once the window is read (or readahead gave up), so the reader can
    wait for it instead of faulting the same pages in concurrently (two competing streams of reads
    on one disk). A failure warns once; later windows are then released at once, unread.
    """

    def __init__(self, prefetch: Callable[[np.ndarray], None], drop: Optional[Callable[[np.ndarray], None]] = None,
                 who: str = "readahead"):
        self.prefetch, self.drop, self.who = prefetch, drop, who
        self.q: "queue.Queue" = queue.Queue()
        self.stopped = threading.Event()
        self.dead = False
        self.thread = threading.Thread(target=self._run, name="fastai_memmap-readahead", daemon=True)
        self.thread.start()

    def ask(self, positions: np.ndarray) -> threading.Event:
        """Queue the window of `positions`; the event is set once it is read. A `prefetch` with a
        ``start`` method gets it called here, in the asking thread, first (cheap asynchronous hints,
        so the disk queues this window while the thread still works on earlier ones)."""
        done = threading.Event()
        if self.dead:
            done.set()
            return done
        start = getattr(self.prefetch, "start", None)
        if start is not None:
            try:
                start(positions)
            except Exception as e:   # a hint that fails must not stop training
                self.dead = True
                warnings.warn(f"{self.who}: readahead failed ({type(e).__name__}: {e}); continuing without it")
                done.set()
                return done
        self.q.put((self.prefetch, positions, done))
        return done

    def release(self, positions: np.ndarray) -> None:
        "Queue a drop of the consumed window of `positions` (a no-op without `drop`)."
        if self.drop is not None and not self.dead:
            self.q.put((self.drop, positions, None))

    def close(self) -> None:
        "Stop after the window in progress; the thread ends on its own (an abandoned epoch does not wait)."
        self.stopped.set()
        self.q.put(None)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None or self.stopped.is_set():
                return
            fn, positions, done = item
            try:
                if not self.dead:
                    fn(positions)
            except Exception as e:   # a hint that fails must not stop training
                self.dead = True
                warnings.warn(f"{self.who}: readahead failed ({type(e).__name__}: {e}); continuing without it")
            finally:
                if done is not None:
                    done.set()


def iter_windows(order: np.ndarray, window: np.ndarray, readahead: Readahead, ahead: int = READAHEAD_WINDOWS,
                 lag: int = DROP_LAG) -> Iterator[int]:
    """Yield `order` (int positions) window by window (`window`: the window number of each entry,
    non-decreasing), asking `readahead` for `ahead` windows beyond the one being yielded and waiting
    (at most `WINDOW_TIMEOUT` s) until the current one is read; windows `lag` behind are released."""
    cuts = np.flatnonzero(np.diff(window)) + 1
    parts = np.split(order, cuts) if len(order) else []
    try:
        ready = [readahead.ask(parts[w]) for w in range(min(ahead, len(parts)))]
        for w, part in enumerate(parts):
            if w + ahead < len(parts):
                ready.append(readahead.ask(parts[w + ahead]))
            if w >= lag:
                readahead.release(parts[w - lag])
            ready[w].wait(WINDOW_TIMEOUT)   # read by the thread: no competing page faults on the disk
            ready[w] = None
            yield from part.tolist()
    finally:
        readahead.close()


class StoreReadahead:
    """Readahead of the store rows behind dataset positions, for the samplers.

    Called with the positions of an upcoming window, it hints the kernel about their rows:
    ``'populate'`` (``MADV_POPULATE_READ``: read them and map them into this process, so the reading
    thread takes no page fault; before Linux 5.14 ``'willneed'``) for block order, or ``'willneed'``
    (start the reads, return at once: many requests in flight) for random order, where rows are read
    with ``pread`` and must not be mapped. `drop` lets go of a consumed window (see the module).

    Parameters
    ----------
    targets : list of (store, int64 array)
        Each store (`MemmapArray`, `RaggedArray` or `SparseArray`) with the store row of every position.
    hint : str, optional
        ``'populate'``, ``'willneed'``, ``'auto'`` (populate where the kernel has it, else willneed)
        or None (nothing), applied by the background thread (`__call__`).
    early : str, optional
        A hint applied by `start`, when the window is asked for (``'willneed'`` for stores larger than
        memory: the exact ranges are queued at once, several windows ahead, and no readahead beyond
        them starts, which a populating page fault would do).
    merge_bytes : int, optional
        Rows of dense stores closer than this are hinted as one range (default: the store's own,
        256 KiB); 0 for random order, where the gap would be read for nothing.
    evict : bool
        `drop` also removes the consumed rows from the page cache (stores larger than memory).
    drop_only : list of stores, optional
        The stores `drop` applies to (default: every store of `targets`). Leave small stores (labels)
        out: one of their pages holds the rows of several windows, and a page dropped under a window
        still to come is read again, with the kernel's readahead around it (measured: +10-40%).
    """

    def __init__(self, targets: List[tuple], hint: Optional[str] = "auto", merge_bytes: Optional[int] = None,
                 evict: bool = False, early: Optional[str] = None, drop_only: Optional[List[Any]] = None):
        self.targets = targets
        self.drop_only = drop_only
        self.hint = ("populate" if kernel_at_least(5, 14) else "willneed") if hint == "auto" else hint
        self.early, self.merge_bytes, self.evict = early, merge_bytes, bool(evict)

    def _kw(self, store: Any) -> dict:
        return {} if self.merge_bytes is None or store.kind != "dense" else {"merge_bytes": self.merge_bytes}

    def __call__(self, positions: np.ndarray) -> None:
        "Hint the rows of `positions`; blocks until they are read with ``'populate'``."
        if self.hint is None:
            return
        for store, rows in self.targets:
            store.advise(self.hint, rows[positions], **self._kw(store))

    def start(self, positions: np.ndarray) -> None:
        "Apply the `early` hint (if any) to the rows of `positions`; returns at once (asynchronous hints)."
        if self.early is not None:
            for store, rows in self.targets:
                store.advise(self.early, rows[positions], **self._kw(store))

    def drop(self, positions: np.ndarray) -> None:
        "Unmap the rows of consumed `positions` (``'dontneed'``) and, with `evict`, drop them from the page cache."
        for store, rows in self.targets:
            if self.drop_only is not None and all(store is not s for s in self.drop_only):
                continue
            store.advise("dontneed", rows[positions], **self._kw(store))
            if self.evict:
                store.advise("evict", rows[positions], **self._kw(store))


def kernel_at_least(major: int, minor: int) -> bool:
    "Whether this is Linux >= major.minor (where ``MADV_POPULATE_READ`` exists)."
    if not sys.platform.startswith("linux"):
        return False
    try:
        found = tuple(int(v) for v in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def store_rows(il: Any) -> Optional[np.ndarray]:
    "Store rows of the items of `il` if it is a store-backed list with one row per item, else None."
    items = getattr(il, "items", None)
    if getattr(il, "store", None) is None or not isinstance(items, np.ndarray) or items.ndim != 1 \
            or items.dtype.kind not in "iu" or len(items) != len(il):
        return None
    return np.asarray(items)


def store_targets(lists: List[Any]) -> List[tuple]:
    "``(store, rows)`` of each store-backed list of `lists` (None entries skipped)."
    return [(il.store, rows) for il in lists if il is not None for rows in [store_rows(il)] if rows is not None]


def store_readahead(lists: List[Any], **kwargs: Any) -> Optional[StoreReadahead]:
    "A `StoreReadahead` over the stores of the store-backed lists of `lists`, or None if there are none."
    targets = store_targets(lists)
    return StoreReadahead(targets, **kwargs) if targets else None
