"""Mid-epoch checkpoints that survive a kill, and exact resume: the `Checkpoint` callback.

``learn.fit_one_cycle(5, 1e-3, callbacks=...)`` with ``callback_fns=[partial(Checkpoint, path=p, every=100)]``
writes a checkpoint every 100 training batches (and/or every `seconds`, and at each epoch end). Run the same
training call again in a new process with the same `path` and it continues at the next unseen batch.

What a checkpoint holds (one ``torch.save`` file, loaded with ``weights_only=True``):

- ``model``: the model's ``state_dict`` (the bare module under ``DistributedDataParallel``);
- ``opt``: the torch optimizer's ``state_dict`` and fastai's ``OptimWrapper`` hyper-parameters
  (``lr``, ``mom``, ``beta``, ``wd``, one per layer group);
- ``position``: epoch, batches done in it, fastai's iteration count, and the training positions each
  rank consumed (``consumed[r]`` of rank ``r`` out of ``num_replicas``);
- ``recorder``: the `Recorder`'s history (losses, lrs, moms, val_losses, metrics, nb_batches) and the
  loss smoother of fastai's `CallbackHandler` (so the recorded smooth losses continue);
- ``sampler``: the training sampler's seed and first epoch;
- ``rng``: python ``random``, numpy's global generator, torch's CPU generator (and CUDA's, when
  initialised) of the main process, as they were after the batch;
- ``fingerprint``: what identifies the run (see *Refusal*).

How resume is exact
    - Order: the training sampler is a pure function of ``(seed, epoch, num_replicas, rank)``: a
      package sampler (`RandomOrderSampler`, `BlockShuffleSampler`) is kept; torch's ``RandomSampler``
      (fastai's ``shuffle=True`` while the stores fit in RAM) is replaced for the run by a
      `RandomOrderSampler` seeded by the checkpoint's `seed`, ``SequentialSampler`` by `InOrderSampler`.
      On resume the sampler leaves out the consumed positions (``sampler.skip``) *before* the epoch's
      loader starts: skipped batches are never read.
    - Schedule: fastai replays whole epochs through ``jump_to_epoch`` (the callback returns the
      resumed ``epoch``/``iteration`` from ``on_train_begin``); the batches done in the resumed epoch
      are replayed on the LR/momentum schedulers (``OneCycleScheduler``, ``GeneralScheduler``), then
      the optimizer's hyper-parameters are set to the saved ones.
    - Augmentation: every training batch is read with python ``random``, numpy's and torch's CPU
      generators seeded from ``(seed, epoch, batch number, rank)`` (in the worker that reads it, or in
      the main process around the read, whose own generators are restored afterwards): per-item
      transforms draw the same numbers whatever ``num_workers`` (0, 2, ``'auto'``) and wherever the run
      was resumed. The DataLoader's own base seed comes from a private generator, so starting the
      loader consumes nothing of the main process's generators; per-batch transforms (``dl_tfms``)
      and dropout draw from the main process's generators, restored from the checkpoint.
      Training with the callback therefore draws other augmentation numbers than training without it.
    - Writes: to ``.NAME.tmp-PID`` in the same directory, ``fsync``, ``os.replace``, ``fsync`` of
      the directory: a write killed at any point leaves the previous checkpoint whole.

Distributed (`fastai_memmap.to_memmap_distributed`)
    Rank 0 writes, every rank reads. A job resumed with another number of ranks re-divides what
    remains of the epoch (`BlockShuffleSampler.skip` with one count per old rank): over the ranks
    every item of the epoch is trained exactly once. Each rank's generators restart from rank 0's
    saved state (not its own), and with another number of ranks the schedule's length changes: such
    a resume keeps the data exact, not the weights.

Refusal
    A checkpoint whose fingerprint differs from this run's (model parameter names/shapes/dtypes,
    number of epochs, schedule, optimizer, training set size/contents hash, batch size, batches per
    epoch at equal world size) raises `CheckpointMismatchError` naming the field.
"""
import contextlib
import glob
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from fastai.basic_train import Learner, LearnerCallback
from fastai.callback import CallbackHandler, Scheduler
from torch.utils.data import RandomSampler, Sampler, SequentialSampler

from ..arguments import check_positive, check_seed
from .batching import takes_fast_path
from ..errors import ArgumentError, ArgumentTypeError, CheckpointFormatError, CheckpointMismatchError
from .random_order import InOrderSampler, RandomOrderSampler
from .sampling import BlockShuffleSampler, rank_slice

__all__ = ["Checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "write_atomic"]

CHECKPOINT_FORMAT = "fastai_memmap.checkpoint"   # the file's "format" field: refuses other torch.save files
CHECKPOINT_VERSION = 1
_HANDLER_DEPTH = 8                               # frames between CallbackHandler.on_train_begin and the callback


# ------------------------------------------------------------------------------------------- file level
def write_atomic(obj: Any, path: Union[str, Path]) -> int:
    """``torch.save`` `obj` to `path` atomically; returns the bytes written.

    Writes ``.NAME.tmp-PID`` next to `path` (created with ``O_EXCL``; a stale one of a killed
    writer with the same pid is replaced), ``fsync``s it, renames it over `path` with
    ``os.replace`` and ``fsync``s the directory: a reader sees the old file or the new one, never
    a part; a killed write leaves the old file and a temporary file (removed by the next
    write, ignored by readers). Raises ``OSError`` from the file system.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_stale(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size


def _remove_stale(path: Path) -> None:
    "Remove the temporary files of `path` left by killed writers (their pid is gone) and by this process."
    for tmp in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint dict at `path` (see the module docstring), loaded with ``weights_only=True``
    (no code runs) on the CPU. Raises ``FileNotFoundError`` if absent; `CheckpointFormatError` (a ``ValueError``) for a file that is not a checkpoint of this
    format version (truncated, another ``torch.save`` file, a newer version)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:   # pickle / zip errors: the file is not a whole checkpoint
        raise CheckpointFormatError(f"{path}: expected a fastai_memmap checkpoint (torch.save zip), found a file "
                                    f"that does not load ({type(e).__name__}: {str(e)[:200]}); truncated or "
                                    "not a checkpoint?") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointFormatError(f"{path}: expected format {CHECKPOINT_FORMAT!r}, found {found!r:.80}; "
                                    "not a file Checkpoint wrote")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointFormatError(f"{path}: expected checkpoint version {CHECKPOINT_VERSION}, found "
                                    f"{ckpt.get('version')!r:.40}; written by another fastai_memmap version?")
    return _decode(ckpt)


def _encode(o: Any) -> Any:
    "`o` with numpy arrays and scalars as tagged tuples of tensors, which ``weights_only`` loading accepts."
    if isinstance(o, np.ndarray) or isinstance(o, np.generic):
        a = np.asarray(o)
        return ("__numpy__", a.dtype.str, isinstance(o, np.generic), torch.from_numpy(a.copy().reshape(-1).view(np.uint8)),
                list(a.shape))
    if isinstance(o, dict):
        return {k: _encode(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_encode(v) for v in o)
    return o


def _decode(o: Any) -> Any:
    if isinstance(o, tuple) and len(o) == 5 and o[0] == "__numpy__":
        a = o[3].numpy().view(np.dtype(o[1])).reshape(o[4])
        return a[()] if o[2] else a
    if isinstance(o, dict):
        return {k: _decode(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_decode(v) for v in o)
    return o


# ------------------------------------------------------------------------------------------- generators
def rng_state() -> Dict[str, Any]:
    "The main process's generators: python ``random``, numpy's global one, torch CPU (and CUDA once initialised)."
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    "Restore what `rng_state` returned."
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _seeded(key: tuple) -> Iterator[None]:
    "Python, numpy and torch CPU generators seeded from `key` (ints) inside, restored after."
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    s = np.random.SeedSequence([int(k) for k in key]).generate_state(4, np.uint32)
    random.seed(int(s[0]) << 32 | int(s[1]))
    np.random.seed(s[2])
    torch.default_generator.manual_seed(int(s[3]) << 31 | int(s[1]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededBatch(list):
    "The positions of one training batch, with the `key` ``(seed, epoch, batch, rank)`` its randomness comes from."

    def __init__(self, positions: Any = (), key: tuple = ()):
        super().__init__(positions)
        self.key = tuple(key)

    def __reduce__(self):
        return SeededBatch, (list(self), self.key)


class SeededBatches(Sampler):
    """torch's ``BatchSampler`` over `sampler`, yielding `SeededBatch` lists numbered from `start`
    (the batches of the epoch already done, for the first ``iter()`` after a resume)."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, seed: int, rank: int = 0):
        self.sampler, self.batch_size, self.drop_last = sampler, check_positive("batch_size", batch_size), drop_last
        self.seed, self.rank, self.start = seed, rank, 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[SeededBatch]:
        epoch, b, self.start = getattr(self.sampler, "epoch", 0), self.start, 0   # epoch read before iter() advances it
        batch: List[int] = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield SeededBatch(batch, (self.seed, epoch, b, self.rank))
                batch, b = [], b + 1
        if batch and not self.drop_last:
            yield SeededBatch(batch, (self.seed, epoch, b, self.rank))


class SeededDataset:
    """The training dataset `ds` for the run: reads each `SeededBatch` with seeded generators (`_seeded`)
    when `seeded` (items with per-item work), else as `ds` does. Every other attribute is `ds`'s."""

    def __init__(self, ds: Any, seeded: bool):
        self.ds, self.seeded = ds, seeded

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]

    def __getitems__(self, batch: List[int]) -> Any:
        key = getattr(batch, "key", None)
        if not self.seeded or key is None:
            return self._read(batch)
        with _seeded(key):
            return self._read(batch)

    def _read(self, batch: List[int]) -> Any:
        many = getattr(self.ds, "__getitems__", None)
        return many(list(batch)) if many is not None else [self.ds[int(i)] for i in batch]

    def __getattr__(self, k: str) -> Any:
        if k in ("ds", "seeded") or k.startswith("__"):
            raise AttributeError(k)
        return getattr(self.ds, k)


# ------------------------------------------------------------------------------------------- the run
def _bare(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def _find_handler(cb: Any) -> Optional[CallbackHandler]:
    "The `CallbackHandler` calling `cb` (fastai passes callbacks no reference to it): found on the call stack."
    f = sys._getframe(1)
    for _ in range(_HANDLER_DEPTH):
        f = f.f_back
        if f is None:
            return None
        h = f.f_locals.get("self")
        if isinstance(h, CallbackHandler) and any(c is cb for c in h.callbacks):
            return h
    return None


def _schedulers(handler: Optional[CallbackHandler]) -> List[Any]:
    "Callbacks of the run that step `Scheduler` objects on each training batch (OneCycleScheduler, GeneralScheduler...)."
    return [] if handler is None else [c for c in handler.callbacks if _scheds_of(c)]


def _scheds_of(cb: Any) -> List[Scheduler]:
    found = []
    for v in vars(cb).values():
        vs = v if isinstance(v, (list, tuple)) else [v]
        for o in vs:
            if isinstance(o, Scheduler):
                found.append(o)
            elif isinstance(o, dict):
                found.extend(s for s in o.values() if isinstance(s, Scheduler))
    return found


def _plain(v: Any) -> Any:
    "`v` as plain python values (numpy arrays and scalars as lists and floats), for comparing fingerprints."
    if isinstance(v, (np.ndarray, np.generic, torch.Tensor)):
        return np.asarray(v).tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(o) for o in v]
    if isinstance(v, dict):
        return {str(k): _plain(o) for k, o in v.items()}
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _items_digest(ds: Any) -> str:
    "blake2b of the training inputs' and targets' ``items`` (row numbers, codes...): the data, cheaply."
    h = hashlib.blake2b(digest_size=16)
    for part in (getattr(ds, "x", None), getattr(ds, "y", None)):
        items = getattr(part, "items", None)
        if isinstance(items, np.ndarray) and items.dtype.kind in "biuf":
            h.update(items.dtype.str.encode() + str(items.shape).encode())
            h.update(np.ascontiguousarray(items).view(np.uint8).reshape(-1).data)
        else:
            h.update(repr(None if items is None else len(items)).encode())
    return h.hexdigest()


def _world() -> tuple:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)


class Checkpoint(LearnerCallback):
    """Write the whole training state atomically every `every` batches (and/or `seconds`, and at
    each epoch end); resume from it when the same training call runs again (see the module docstring).

    Use as ``Learner(..., callback_fns=[partial(Checkpoint, path='run.ckpt', every=50)])`` or pass
    ``Checkpoint(learn, ...)`` in ``callbacks=``.

    Parameters
    ----------
    learn : Learner
    path : str or Path
        The checkpoint file (its directory must exist). If it exists when training begins (and
        `resume`), training continues from it.
    every : int, optional
        Write after every `every` training batches (counted over the whole run).
    seconds : float, optional
        Write after the first training batch that ends `seconds` or more after the last write.
    at_epoch_end : bool
        Also write at the end of each epoch (after validation and metrics).
    seed : int, optional
        In ``[0, 2**63)``: seeds the per-batch augmentation generators and the training order when
        it is torch's ``RandomSampler``. Default: drawn from torch's generator when a run starts
        (``torch.manual_seed`` makes it repeatable); a resumed run takes the checkpoint's.
    resume : bool
        False: ignore an existing file (overwritten by the first write).

    Attributes
    ----------
    last_write : dict or None
        ``{'seconds': float, 'bytes': int, 'epoch': int, 'batches': int}`` of the last write.
    resumed_from : dict or None
        The ``position`` of the checkpoint this run resumed from.

    Raises
    ------
    CheckpointMismatchError (a ValueError)
        On train begin, for a checkpoint of another run (names the field that differs).
    CheckpointFormatError (a ValueError)
        On train begin, for a file at `path` that is not a checkpoint.
    ArgumentError, ArgumentTypeError
        At construction, for a bad `every`, `seconds` or `seed`.
    """
    _order = 100   # after every other callback: schedulers have stepped, the recorder has recorded

    def __init__(self, learn: Learner, path: Union[str, Path], every: Optional[int] = None,
                 seconds: Optional[float] = None, at_epoch_end: bool = True, seed: Optional[int] = None,
                 resume: bool = True):
        super().__init__(learn)
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path: expected a str or Path (the checkpoint file), found {type(path).__name__}")
        self.path = Path(path)
        self.every = None if every is None else check_positive("every", every)
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
            raise ArgumentTypeError(f"seconds: expected a number > 0 or None, found {seconds!r:.50}")
        if seconds is not None and not seconds > 0:
            raise ArgumentError(f"seconds: expected a number > 0 or None, found {seconds!r}")
        self.seconds, self.at_epoch_end, self.resume = seconds, bool(at_epoch_end), bool(resume)
        self.seed = check_seed(seed, 1)
        self.last_write: Optional[Dict[str, Any]] = None
        self.resumed_from: Optional[Dict[str, Any]] = None
        self._pending: Optional[Dict[str, Any]] = None

    # -------------------------------------------------------------- fastai events
    def on_train_begin(self, n_epochs: int, **kwargs: Any) -> Optional[dict]:
        "Install the resumable training loader; resume from `path` if it holds a checkpoint of this run."
        self.handler = _find_handler(self)
        self.n_epochs = n_epochs
        ckpt = load_checkpoint(self.path) if self.resume and self.path.exists() else None
        if ckpt is not None:
            self.seed = ckpt["seed"]
        elif self.seed is None:
            self.seed = int(torch.randint(0, 2 ** 62, ()).item())
        self._install_loader(ckpt)
        self.fingerprint = self._fingerprint()
        self._last_time = time.monotonic()
        if ckpt is None:
            return None
        self._check(ckpt["fingerprint"])
        return self._restore(ckpt)

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> Optional[dict]:
        "Point the sampler at this epoch; in the resumed epoch, skip what was done and catch the schedule up."
        self.sampler.set_epoch(self.epoch0 + epoch)
        p, self._pending = self._pending, None
        if p is None or p["epoch"] != epoch:
            return None
        self.sampler.skip(p["consumed"] if isinstance(self.sampler, BlockShuffleSampler) else p["consumed"][0])
        self.batches.start = p["batches"]
        for cb in _schedulers(self.handler):
            for _ in range(p["batches"]):
                cb.on_batch_end(train=True)
        for name, v in p["hypers"].items():
            if v is not None:
                setattr(self.learn.opt, name, v)
        if p["finished"]:
            self._finished = p["history"]
            if self.handler is not None:   # no batch will set it: the recorder's epoch-end row needs one
                self.handler.state_dict["smooth_loss"] = self.handler.smoothener.smooth
            return {"num_batch": p["batches"], "skip_validate": True}
        return {"num_batch": p["batches"]}

    def on_batch_end(self, train: bool, epoch: int, num_batch: int, iteration: int, **kwargs: Any) -> None:
        "Write a checkpoint when `every` batches or `seconds` have passed."
        if not train:
            return
        due = (self.every is not None and (iteration + 1) % self.every == 0) or \
              (self.seconds is not None and time.monotonic() - self._last_time >= self.seconds)
        if due:
            self.write(epoch, num_batch + 1, iteration + 1)

    def on_epoch_end(self, epoch: int, iteration: int, **kwargs: Any) -> Optional[dict]:
        "Write a checkpoint of the finished epoch (resume starts the next one)."
        done, self._finished = getattr(self, "_finished", None), None
        if done is not None:   # the empty epoch of a finished run: keep its recorded history as it was
            for k, v in done.items():
                setattr(self.learn.recorder, k, v)
            return {"stop_training": True}
        if self.at_epoch_end:
            self.write(epoch + 1, 0, iteration)
        return None

    def on_train_end(self, **kwargs: Any) -> None:
        "Give the training loader back its own DataLoader."
        if getattr(self, "_old_dl", None) is not None:
            self._ddl.dl, self._old_dl, self._ddl = self._old_dl, None, None

    # -------------------------------------------------------------- state
    def write(self, epoch: int, batches: int, iteration: int) -> None:
        """Write the checkpoint of the state after `batches` training batches of `epoch` (fastai's
        `iteration` count after them). Rank 0 only under ``torch.distributed``; fills `last_write`."""
        world, rank = _world()
        if rank != 0:
            return
        t0 = time.perf_counter()
        n, bs = self.sampler.n, self.batches.batch_size
        parts = [rank_slice(n, world, r) for r in range(world)] if isinstance(self.sampler, BlockShuffleSampler) \
            else [slice(0, n)]
        opt = self.learn.opt
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "seed": self.seed,
            "fingerprint": self.fingerprint,
            "position": {"epoch": epoch, "batches": batches, "iteration": iteration, "num_replicas": len(parts),
                         "consumed": [min(batches * bs, p.stop - p.start) for p in parts],
                         "finished": epoch >= self.n_epochs},
            "model": _bare(self.learn.model).state_dict(),
            "opt": {"state": opt.opt.state_dict(),
                    "hypers": {k: getattr(opt, "_" + k, None) for k in ("lr", "mom", "beta", "wd")}},
            "recorder": self._recorder_state(),
            "sampler": {"seed": getattr(self.sampler, "seed", None), "epoch0": self.epoch0},
            "schedulers": [[s.n for s in _scheds_of(cb)] for cb in _schedulers(self.handler)],
            "rng": rng_state(),
        }
        size = write_atomic(_encode(state), self.path)
        self._last_time = time.monotonic()
        self.last_write = {"seconds": time.perf_counter() - t0, "bytes": size, "epoch": epoch, "batches": batches}

    def _recorder_state(self) -> Dict[str, Any]:
        rec = getattr(self.learn, "recorder", None)
        names = ("losses", "val_losses", "lrs", "moms", "metrics", "nb_batches")
        state = {k: list(getattr(rec, k, [])) for k in names} if rec is not None else {}
        sm = getattr(self.handler, "smoothener", None)
        state["smoother"] = None if sm is None else {"n": sm.n, "mov_avg": sm.mov_avg, "smooth": getattr(sm, "smooth", None)}
        return state

    def _restore(self, ckpt: Dict[str, Any]) -> dict:
        "Load model, optimizer, history, sampler and generators; returns fastai's resumed epoch/iteration."
        p = ckpt["position"]
        _bare(self.learn.model).load_state_dict(ckpt["model"])
        self.learn.opt.opt.load_state_dict(ckpt["opt"]["state"])
        rec, saved = getattr(self.learn, "recorder", None), ckpt["recorder"]
        if rec is not None:
            for k, v in saved.items():
                if k != "smoother":
                    setattr(rec, k, list(v))
        sm = getattr(self.handler, "smoothener", None)
        if sm is not None and saved.get("smoother") is not None:
            sm.n, sm.mov_avg = saved["smoother"]["n"], saved["smoother"]["mov_avg"]
            if saved["smoother"]["smooth"] is not None:
                sm.smooth = saved["smoother"]["smooth"]
        self.epoch0 = ckpt["sampler"]["epoch0"]
        if ckpt["sampler"]["seed"] is not None and hasattr(self.sampler, "seed"):
            self.sampler.seed, self.sampler._cached = ckpt["sampler"]["seed"], None
        self._pending = {"epoch": p["epoch"], "batches": p["batches"], "consumed": p["consumed"],
                         "hypers": ckpt["opt"]["hypers"], "finished": p["finished"]}
        if p["finished"]:   # fastai cannot start at epoch n_epochs: an empty last epoch, nothing read or trained
            n = len(self.batches)
            self._pending.update(epoch=self.n_epochs - 1, batches=n, consumed=[self.sampler.n] * p["num_replicas"],
                                 history={k: list(v) for k, v in saved.items() if k != "smoother"})
        self.resumed_from = dict(p)
        set_rng_state(ckpt["rng"])
        return {"epoch": self._pending["epoch"], "iteration": p["iteration"]}

    def _install_loader(self, ckpt: Optional[Dict[str, Any]]) -> None:
        "Rebuild the training DataLoader: resumable sampler, numbered batches, seeded reads, private base seed."
        ddl = self.learn.data.train_dl
        dl, world, rank = ddl.dl, *_world()
        sampler, bs = dl.sampler, dl.batch_size
        if bs is None:
            raise ArgumentError(f"Checkpoint: expected a training DataLoader with a batch_size and a sampler, found "
                                f"batch_sampler={type(dl.batch_sampler).__name__} (cannot resume it by position)")
        n = len(dl.dataset)
        if isinstance(sampler, RandomSampler):
            sampler = RandomOrderSampler(n, bs, seed=self.seed)
        elif isinstance(sampler, SequentialSampler):
            sampler = InOrderSampler(n, bs)
        elif not isinstance(sampler, (RandomOrderSampler, BlockShuffleSampler)):
            raise ArgumentError(f"Checkpoint: expected the training loader to sample with fastai's sampler, a "
                                f"RandomOrderSampler or a BlockShuffleSampler, found {type(sampler).__name__}")
        self.sampler, self.epoch0 = sampler, getattr(sampler, "epoch", 0)
        ds = dl.dataset
        seeded = not takes_fast_path(ds)
        self.batches = SeededBatches(sampler, bs, dl.drop_last, self.seed, rank)
        kwargs = {k: v for k, v in dl.init_kwargs.items() if k not in ("batch_size", "shuffle", "sampler", "drop_last")}
        kwargs["batch_sampler"] = self.batches
        if seeded and dl.num_workers == 0 and kwargs.get("prefetch"):
            kwargs["prefetch"] = 0   # a reading thread would interleave its draws with the main thread's
        new = dl.__class__(SeededDataset(ds, seeded), **kwargs)
        new.collate_fn = dl.collate_fn
        new.generator = torch.Generator().manual_seed(self.seed & (2 ** 63 - 1))
        self._ddl, self._old_dl, ddl.dl = ddl, dl, new

    def _fingerprint(self) -> Dict[str, Any]:
        "What identifies the run: a checkpoint whose fingerprint differs is refused (`_check`)."
        learn, ds = self.learn, self.learn.data.train_dl.dl.dataset
        world, _ = _world()
        sched = []
        for cb in _schedulers(self.handler):
            sched.append([type(cb).__name__] + [[_plain(s.start), _plain(s.end), s.n_iter, s.func.__name__]
                                                 for s in _scheds_of(cb)])
        opt_func = getattr(learn.opt_func, "func", learn.opt_func)
        return {
            "model": [[k, list(v.shape), str(v.dtype)] for k, v in _bare(learn.model).state_dict().items()],
            "n_epochs": self.n_epochs,
            "schedule": sched,
            "optimizer": [getattr(opt_func, "__name__", repr(opt_func)), _plain(getattr(learn.opt_func, "keywords", {})),
                          _plain(learn.wd), bool(learn.true_wd), bool(learn.bn_wd)],
            "train_items": len(ds),
            "train_digest": _items_digest(getattr(ds, "ds", ds)),
            "batch_size": self.batches.batch_size,
            "drop_last": bool(self.batches.drop_last),
            "sampler": type(self.sampler).__name__,
            "num_replicas": world,
            "batches_per_epoch": len(self.batches),
        }

    def _check(self, saved: Dict[str, Any]) -> None:
        "Refuse a checkpoint of another run: `CheckpointMismatchError` naming the first field that differs."
        mine = self.fingerprint
        for key, value in mine.items():
            if key == "num_replicas" or (key == "batches_per_epoch" and saved.get("num_replicas") != mine["num_replicas"]):
                continue   # another world size: the epoch's rest is re-divided
            if _plain(saved.get(key)) != _plain(value):
                raise CheckpointMismatchError(
                    f"{self.path}: expected a checkpoint of this run, found one whose {key} differs: this run "
                    f"{_describe(key, value, saved.get(key))}, the checkpoint {_describe(key, saved.get(key), value)}; pass another path "
                    "(or resume=False) to start afresh")


def _describe(key: str, v: Any, other: Any) -> str:
    "A short account of fingerprint field `key` = `v` (compared with `other`) for an error message."
    if key == "model" and isinstance(v, list) and isinstance(other, list):
        diff = [t for t, o in zip(v, other) if _plain(t) != _plain(o)] or v[len(other):] or [None]
        t = diff[0]
        return f"has {len(v)} tensors" + ("" if t is None else f", {t[0]} of shape {tuple(t[1])} {t[2]}")
    return f"has {v!r:.160}"
