"""The last stage: batches onto the device. uint8 images become float there, and reading can run
ahead in a background thread instead of worker processes.

uint8 → float on the device
    Image lists built with ``uint8=True`` return batches of uint8 NCHW pixels: 4× fewer bytes to
    gather, to ship from workers and to copy to the GPU. `to_float_tfm`, a fastai *dl_tfm* (run by
    ``DeviceDataLoader.proc_batch`` after the batch reached ``data.device``), turns them into float32
    in [0, 1] (``x.float() / 255``: the same IEEE operations as fastai's ``open_image``, so values are
    equal bit for bit). It must run before ``normalize``: `with_to_float` puts it first in a
    ``dl_tfms`` list, and `DataBunch.normalize` appends its transform after it. Float batches
    (the per-item fallback when ``tfms`` are set) pass through unchanged.

Reading in a background thread
    `PrefetchDataLoader` is a torch ``DataLoader`` that, with ``num_workers=0``, produces batches in
    one background thread, `prefetch` batches ahead. Gathering rows releases the GIL (numpy copies
    without it), so reading overlaps the training step without the per-batch shared-memory copy of
    worker processes.
"""
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["to_float", "to_float_tfm", "with_to_float", "insert_to_float", "PrefetchDataLoader",
           "use_prefetch_thread", "DEFAULT_PREFETCH"]

DEFAULT_PREFETCH = 2          # batches read ahead by the background thread: one being consumed, one ready
_STOP_POLL = 0.1              # seconds between checks of the stop flag while the queue is full


def to_float(x: Any) -> Any:
    """uint8 pixels `x` as float32 in [0, 1] (``x.float() / 255``), contiguous, on `x`'s device.

    Parameters
    ----------
    x : torch.Tensor or list/tuple of tensors
        Anything else, and tensors of another dtype, are returned as they are (not copied).

    Returns
    -------
    torch.Tensor or same container
        A new float32 tensor of `x`'s shape in the default (contiguous) memory format for uint8
        input, equal bit for bit to fastai's ``pil2tensor(...).float().div_(255)`` of the same pixels.
    """
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:
            return x
        return x.contiguous().to(torch.float32).div_(255.)   # transposing uint8 first moves 4x fewer bytes
    if isinstance(x, (list, tuple)):
        return type(x)(to_float(o) for o in x)
    return x


def to_float_tfm(b: Sequence[Any]) -> Any:
    "dl_tfm: inputs of batch ``b = (x, y)`` from uint8 to float32 in [0, 1] on their device; targets unchanged."
    x, y = b
    return to_float(x), y


def with_to_float(dl_tfms: Optional[Iterable[Callable]]) -> List[Callable]:
    """`dl_tfms` (None, one callable or a list) as a list that starts with `to_float_tfm` (once).

    Pass the result as ``dl_tfms`` when building a data bunch whose inputs are uint8; fastai's
    ``normalize`` later appends its transform after it.
    """
    tfms = [] if dl_tfms is None else [dl_tfms] if callable(dl_tfms) else list(dl_tfms)
    return [to_float_tfm] + [t for t in tfms if t is not to_float_tfm]


def insert_to_float(data: Any) -> Any:
    """Add `to_float_tfm` first to every loader of the fastai `DataBunch` `data` (and to
    ``data.dl_tfms``), before ``normalize`` even if it was already called. Idempotent; returns `data`."""
    data.dl_tfms = with_to_float(getattr(data, "dl_tfms", None))
    for dl in data.dls:
        dl.tfms = with_to_float(dl.tfms)
    return data


class PrefetchDataLoader(DataLoader):
    """A torch `DataLoader` that, when ``num_workers == 0``, reads in a background thread.

    Parameters
    ----------
    dataset, *args, **kwargs
        As ``DataLoader``.
    prefetch : int
        Batches read ahead (0: no thread, a plain DataLoader). Kept in ``init_kwargs``, so
        fastai's ``DeviceDataLoader.new`` and ``batch_size`` setter keep it.

    With ``num_workers > 0`` it is a plain DataLoader. Batches come in the sampler's order; an
    exception raised while reading is raised again in the consuming thread. Breaking out of the
    loop stops the thread after the batch it is reading.
    """

    def __init__(self, dataset: Any, *args: Any, prefetch: int = DEFAULT_PREFETCH, **kwargs: Any):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int):
            raise ArgumentTypeError(f"prefetch: expected an int >= 0 (batches read ahead), found "
                                    f"{type(prefetch).__name__} {prefetch!r:.50}")
        if prefetch < 0:
            raise ArgumentError(f"prefetch: expected an int >= 0 (batches read ahead), found {prefetch!r}")
        super().__init__(dataset, *args, **kwargs)
        self.prefetch = prefetch
        if isinstance(getattr(self, "init_kwargs", None), dict):
            self.init_kwargs["prefetch"] = prefetch

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        if self.num_workers > 0 or self.prefetch == 0:
            return it
        return _in_thread(it, self.prefetch)


def _in_thread(it: Iterator[Any], depth: int) -> Iterator[Any]:
    "Run iterator `it` in a daemon thread, `depth` items ahead of the consumer."
    q: "queue.Queue" = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_STOP_POLL)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for b in it:
                if not put(("batch", b)):
                    return
            put(("end", None))
        except BaseException as e:   # handed to the consumer, raised there
            put(("error", e))

    t = threading.Thread(target=work, name="fastai_memmap-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, b = q.get()
            if kind == "batch":
                yield b
            elif kind == "end":
                return
            else:
                raise b
    finally:
        stop.set()
        t.join()


def use_prefetch_thread(ddl: Any, prefetch: int = DEFAULT_PREFETCH) -> Any:
    """Rebuild the `DataLoader` inside fastai's `DeviceDataLoader` `ddl` as a `PrefetchDataLoader`.

    Everything else is kept (sampler, batch size, workers, collate function, transforms). Returns
    `ddl`, changed in place.
    """
    dl = ddl.dl
    kwargs = {**dl.init_kwargs, "prefetch": prefetch}
    ddl.dl = PrefetchDataLoader(dl.dataset, **kwargs)
    ddl.dl.collate_fn = ddl.collate_fn
    return ddl
