"""``fastai-memmap bench``: loader throughput of this package against the usual alternatives, side by side.

Workloads
    W1: `rows` × `dim` float32 rows (default 200,000 × 1024, 800 MB) with int64 class labels,
    batch `bs` (256), shuffled. W2: `images` RGB images of `side` × `side` pixels (20,000 × 64 × 64)
    with labels, as PNG files in class folders and as a uint8 store.

Loaders (each with ``num_workers`` in `workers`, default 0 and 2, unless marked)
    W1: in-RAM tensor gather without a loader (``t[idx]``, marked "-") and through a DataLoader
    (``__getitems__``); a naive per-item ``np.memmap`` Dataset; h5py per item (file opened lazily
    in each worker); fastai's per-item path over in-RAM rows (``LabelList`` + ``data_collate``);
    ours per item; ours batched (``databunch()``, random order); ours batched with
    ``num_workers='auto'`` (prefetch thread) and ours with ``shuffle='block'``.
    W2: fastai ``ImageList.from_folder`` (PNG); an in-RAM pre-decoded per-item ``ImageList``; ours
    per item, batched float32, batched uint8 (float on the device by ``to_float_tfm``); with
    ``get_transforms()``: the in-RAM per-item list and ours (which falls back to per item).

States
    warm: files in the page cache; the first `WARMUP_BATCHES` batches of each measurement are not
    timed (workers starting); each measurement is repeated `repeats` times, interleaved with the
    others, and the fastest is reported (the one least disturbed by other load on the machine).
    cold: the files are evicted (``fsync`` + ``posix_fadvise(DONTNEED)``, checked with ``mincore``),
    then one whole pass is timed including start-up (building the data bunch, first batches):
    sequential read of the store file (the disk's bandwidth), ours with block shuffle, ours with
    random order, and bytes read from disk (``/proc/self/io`` ``read_bytes``) against the file size.

Measures
    rows/s; GB/s = rows/s × stored bytes per row (4 KiB for W1, 12 KiB of uint8 pixels for W2);
    ``vs ref``: ratio to the reference of its row (W1: the in-RAM tensor DataLoader with the same
    workers; W2: ``ImageList.from_folder`` with the same workers; cold: the sequential read). The
    ratios of the issue's targets (`TARGETS`) are computed and marked met or not. ``--json PATH``
    writes everything (config, environment, every measurement, ratios).
"""
import argparse
import ctypes
import gc
import json
import mmap
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ArgumentError, FormatError

__all__ = ["bench_main", "run_bench", "BenchConfig", "TARGETS", "evict", "resident_fraction", "read_bytes",
           "WARMUP_BATCHES"]

WARMUP_BATCHES = 2        # untimed batches per warm measurement: workers start, first maps are made
SEQ_CHUNK = 8 << 20       # bytes per read() of the sequential-read reference: like the kernel's readahead
CLASSES = 10              # label classes of both workloads
CPU = torch.device("cpu")

FULL = dict(rows=200_000, dim=1024, images=20_000, side=64, bs=256, item_cap=65_536, image_cap=8_192, tfm_cap=4_096,
            repeats=3)
QUICK = dict(rows=16_384, dim=256, images=2_048, side=32, bs=128, item_cap=4_096, image_cap=1_024, tfm_cap=512,
             repeats=2)

# (key, description, comparison, target): ratios the issue asks for, computed from one run
TARGETS = [
    ("w1_warm_best_vs_tensor_dl0", "W1 warm: best of ours / in-RAM tensor DataLoader, num_workers=0", ">=", 0.8),
    ("w1_warm_best_vs_fastai_item", "W1 warm: best of ours / fastai per-item over in-RAM rows (its best)", ">=", 8.0),
    ("w1_warm_nw2_vs_tensor_dl2", "W1 warm, num_workers=2: ours batched / in-RAM tensor DataLoader", ">=", 0.9),
    ("w1_cold_block_vs_seq", "W1 cold first epoch, block shuffle (whole pass) / sequential read", ">=", 0.7),
    ("w1_cold_block_bytes", "W1 cold block-shuffle epoch: bytes read from disk / file size", "<=", 1.1),
    ("w2_best_vs_from_folder", "W2 warm, no tfms: best of ours / ImageList.from_folder PNG (its best)", ">=", 10.0),
    ("w2_tfms_vs_ram_item", "W2 warm, get_transforms(): ours / in-RAM per-item list (best of each)", ">=", 0.95),
]


@dataclass
class BenchConfig:
    """Sizes and switches of one bench run (see the module docstring).

    `item_cap` / `image_cap` / `tfm_cap` bound the rows per measurement of the per-item loaders of
    W1, of W2, and of the loaders with ``get_transforms()`` (the slow ones), so a full run stays
    within minutes.
    """
    rows: int = FULL["rows"]
    dim: int = FULL["dim"]
    images: int = FULL["images"]
    side: int = FULL["side"]
    bs: int = FULL["bs"]
    workers: Tuple[int, ...] = (0, 2)
    repeats: int = FULL["repeats"]
    item_cap: int = FULL["item_cap"]
    image_cap: int = FULL["image_cap"]
    tfm_cap: int = FULL["tfm_cap"]
    cold: bool = True
    w1: bool = True
    w2: bool = True
    tfms: bool = True
    dir: Optional[str] = None
    keep: bool = False
    seed: int = 0
    quick: bool = False


@dataclass
class Result:
    "One measurement: `rows` delivered (`expected` asked for), `rate` rows/s over the timed part."
    workload: str
    state: str
    loader: str
    workers: str
    rows: int
    expected: int
    seconds: float
    rate: float
    gbps: float
    ref: Optional[str] = None
    vs_ref: Optional[float] = None
    bytes_read: Optional[int] = None
    file_bytes: Optional[int] = None
    resident_before: Optional[float] = None
    runs: List[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ page cache
def evict(paths: Iterable[Path]) -> None:
    """Drop `paths` from the page cache: ``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)``.

    Pages still mapped by a process stay; check with `resident_fraction`.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Fraction of the pages of `paths` in the page cache, by ``mincore`` (via ctypes).

    Returns
    -------
    float
        In [0, 1]; pages over all files. NaN where ``mincore`` is unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return float("nan")
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                return float("nan")
            total += pages
            resident += int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def read_bytes() -> int:
    "Bytes this process caused to be read from storage so far (``/proc/self/io``, else psutil)."
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import psutil
    return int(psutil.Process().io_counters().read_bytes)


# ------------------------------------------------------------------------------------------ data sets
class TensorBatches(torch.utils.data.Dataset):
    "In-RAM tensors read a batch at a time (``__getitems__``): the in-RAM tensor DataLoader reference."

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __getitems__(self, idx: Sequence[int]):
        i = torch.as_tensor(idx)
        return [torch.index_select(self.x, 0, i), torch.index_select(self.y, 0, i)]


def _pass_through(b: Any) -> Any:
    return b


class NpMemmapItems(torch.utils.data.Dataset):
    "The naive per-item Dataset: an ``np.load(mmap_mode='r')`` opened lazily, one row per ``__getitem__``."

    def __init__(self, x_file: Path, y: np.ndarray):
        self.x_file, self.y, self.x = x_file, y, None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.x is None:
            self.x = np.load(self.x_file, mmap_mode="r")
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


class H5Items(torch.utils.data.Dataset):
    "h5py per item; the file is opened lazily, so each worker opens its own."

    def __init__(self, h5_file: Path, n: int):
        self.h5_file, self.n, self.f = h5_file, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.f is None:
            import h5py
            self.f = h5py.File(self.h5_file, "r")
            self.x, self.y = self.f["x"], self.f["y"]
        return torch.from_numpy(self.x[i]), int(self.y[i])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class PerItem(torch.utils.data.Dataset):
    "Hides ``__getitems__`` of `ds`: torch then reads item by item (fastai's per-item path)."

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _ram_image_list():
    "An `ImageList` of pre-decoded uint8 images in RAM, converted per item like ``open_image``."
    from fastai.vision.data import ImageList
    from fastai.vision.image import Image

    class RamImageList(ImageList):
        def __init__(self, items: Any, pixels: Optional[np.ndarray] = None, **kwargs):
            super().__init__(items, **kwargs)
            self.pixels = pixels
            self.copy_new.append("pixels")

        def get(self, i: int) -> Image:
            a = self.pixels[int(self.items[i])]
            return Image(torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)).div_(255.))

    return RamImageList


# ------------------------------------------------------------------------------------------ measuring
def _n_rows(b: Any) -> int:
    return len(b[0])


def _drain(make: Callable[[], Iterable], n_batches: int, warmup: int) -> Tuple[int, int, float]:
    """Iterate `n_batches` batches of ``make()``; return (rows, timed rows, timed seconds).

    Timing starts after `warmup` batches; with ``warmup=0`` it includes ``make()`` and ``iter()``.
    """
    random.seed(0), np.random.seed(0), torch.manual_seed(0)   # every loader draws the same order and tfms
    t_start = time.perf_counter()
    it = iter(make())
    rows = timed = 0
    t0 = t_start if warmup == 0 else None
    for i in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n = _n_rows(b)
        rows += n
        if t0 is not None:
            timed += n
        if i == warmup - 1:
            t0 = time.perf_counter()
        del b
    t1 = time.perf_counter()
    del it
    gc.collect()
    if t0 is None or timed == 0:   # fewer batches than the warm-up: time them all
        return rows, rows, t1 - t_start
    return rows, timed, t1 - t0


@dataclass
class Case:
    "A measurement to run: `make()` returns an iterable of ``(x, y)`` batches."
    workload: str
    loader: str
    workers: str
    make: Callable[[], Iterable]
    n_batches: int
    bs: int
    row_bytes: int
    ref: Optional[str] = None
    runs: List[Tuple[int, int, float]] = field(default_factory=list)

    def result(self, state: str) -> Result:
        rates = [t / s if s > 0 else 0.0 for _, t, s in self.runs]
        best = int(np.argmax(rates))
        rows, timed, secs = self.runs[best]
        rate = rates[best]
        return Result(self.workload, state, self.loader, self.workers, rows, self.n_batches * self.bs, secs, rate,
                      rate * self.row_bytes / 1e9, self.ref, runs=[round(r, 1) for r in rates])


def _batches(n: int, bs: int, cap: Optional[int] = None) -> int:
    "Full batches in an epoch of `n` rows (drop_last), at most enough for `cap` rows."
    nb = n // bs
    return nb if cap is None else max(1, min(nb, -(-cap // bs)))


def _run_warm(cases: List[Case], repeats: int, log: Callable[[str], None]) -> List[Result]:
    for r in range(repeats):
        for c in cases:
            c.runs.append(_drain(c.make, c.n_batches, WARMUP_BATCHES))
            if r == 0:
                rows, t, s = c.runs[-1]
                log(f"  {c.workload} {c.loader} [workers {c.workers}]: {t / s if s else 0:,.0f} rows/s")
    return [c.result("warm") for c in cases]


# ------------------------------------------------------------------------------------------ W1
@dataclass
class W1:
    "Files and in-RAM copies of workload 1."
    x: np.ndarray
    y: np.ndarray
    store: Path
    labels: Path
    h5: Path

    @property
    def x_files(self) -> List[Path]:
        from ..store.reader import MemmapArray
        return MemmapArray.open(self.store).shard_files

    @property
    def files(self) -> List[Path]:
        from ..store.reader import MemmapArray
        return self.x_files + MemmapArray.open(self.labels).shard_files


def make_w1(cfg: BenchConfig, root: Path, log: Callable[[str], None]) -> W1:
    "Write workload 1 (store, label store, HDF5 file) under `root`; keep it in RAM too."
    import h5py
    from ..store.save import save_memmap
    rng = np.random.default_rng(cfg.seed)
    x = np.empty((cfg.rows, cfg.dim), np.float32)
    for a in range(0, cfg.rows, 16384):
        x[a:a + 16384] = rng.standard_normal((min(16384, cfg.rows - a), cfg.dim), dtype=np.float32)
    y = rng.integers(0, CLASSES, cfg.rows).astype(np.int64)
    log(f"W1: writing {cfg.rows:,} x {cfg.dim} float32 ({x.nbytes / 1e6:,.0f} MB) as a store and an HDF5 file")
    save_memmap(root / "w1_x", x, meta={"bench": "W1"})
    save_memmap(root / "w1_y", y, meta={"classes": [str(c) for c in range(CLASSES)]})
    with h5py.File(root / "w1.h5", "w") as f:
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=y)
    return W1(x, y, root / "w1_x", root / "w1_y", root / "w1.h5")


def _ours_w1(w: W1, bs: int, workers: Any, shuffle: Any = True, no_check: bool = False):
    from ..data.items import MemmapItemList
    lls = MemmapItemList.from_memmap(w.store).split_none().label_from_memmap(w.labels)
    return lls.databunch(bs=bs, num_workers=workers, shuffle=shuffle, device=CPU, no_check=no_check)


def _w1_cases(cfg: BenchConfig, w: W1) -> List[Case]:
    from fastai.data_block import CategoryList, ItemList, LabelList
    from fastai.torch_core import data_collate
    DL = torch.utils.data.DataLoader
    bs, n, rb = cfg.bs, cfg.rows, cfg.dim * 4
    full, capped = _batches(n, bs), _batches(n, bs, cfg.item_cap)
    tx, ty = torch.from_numpy(w.x), torch.from_numpy(w.y)
    classes = [str(c) for c in range(CLASSES)]
    fastai_ds = LabelList(ItemList(w.x), CategoryList(w.y, classes=classes))

    def direct():
        perm = torch.randperm(n)
        return ((torch.index_select(tx, 0, i), torch.index_select(ty, 0, i)) for i in perm[:full * bs].view(full, bs))

    cases = [Case("W1", "in-RAM tensor gather (no loader)", "-", direct, full, bs, rb)]
    for nw in cfg.workers:
        ref = f"in-RAM tensor DataLoader|{nw}"
        kw = dict(batch_size=bs, shuffle=True, drop_last=True, num_workers=nw, pin_memory=False)
        cases += [
            Case("W1", "in-RAM tensor DataLoader", str(nw),
                 lambda kw=kw: DL(TensorBatches(tx, ty), collate_fn=_pass_through, **kw), full, bs, rb, ref),
            Case("W1", "np.memmap per item (naive)", str(nw),
                 lambda kw=kw: DL(NpMemmapItems(_single_shard(w), w.y), **kw), capped, bs, rb, ref),
            Case("W1", "h5py per item", str(nw), lambda kw=kw: _closing(H5Items(w.h5, n), kw), capped, bs, rb, ref),
            Case("W1", "fastai per item, in-RAM rows", str(nw),
                 lambda kw=kw: DL(fastai_ds, collate_fn=data_collate, **kw), capped, bs, rb, ref),
            Case("W1", "ours per item", str(nw),
                 lambda nw=nw: _per_item(_ours_w1(w, bs, 0).train_ds, bs, nw), capped, bs, rb, ref),
            Case("W1", "ours batched", str(nw), lambda nw=nw: _quiet(_ours_w1, w, bs, nw).train_dl, full, bs, rb, ref),
        ]
    ref0 = f"in-RAM tensor DataLoader|{cfg.workers[0]}"
    cases += [
        Case("W1", "ours batched, num_workers='auto' (thread)", "auto",
             lambda: _ours_w1(w, bs, "auto").train_dl, full, bs, rb, ref0),
        Case("W1", "ours batched, shuffle='block'", "0",
             lambda: _ours_w1(w, bs, 0, shuffle="block").train_dl, full, bs, rb, ref0),
    ]
    return cases


def _single_shard(w: W1) -> Path:
    files = w.x_files
    if len(files) != 1:
        raise FormatError(f"{w.store}: expected one shard for the np.memmap reference, found {len(files)}")
    return files[0]


def _closing(ds: H5Items, kw: Dict[str, Any]):
    "A DataLoader over `ds` that closes the parent's HDF5 handle when iteration ends (before the next fork)."
    dl = torch.utils.data.DataLoader(ds, **kw)

    class Closing:
        def __iter__(self):
            try:
                yield from dl
            finally:
                ds.close()
    return Closing()


def _per_item(ds: Any, bs: int, nw: int):
    from fastai.torch_core import data_collate
    return torch.utils.data.DataLoader(PerItem(ds), batch_size=bs, shuffle=True, drop_last=True, num_workers=nw,
                                       collate_fn=data_collate, pin_memory=False)


def _quiet(f: Callable, *args: Any, **kwargs: Any) -> Any:
    "Call `f` without `WorkersSlowerWarning` (the bench asks for workers on purpose)."
    from ..data.batching import WorkersSlowerWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WorkersSlowerWarning)
        return f(*args, **kwargs)


def _cold_w1(cfg: BenchConfig, w: W1, log: Callable[[str], None]) -> List[Result]:
    """Sequential read, then ours block-shuffled and random, each a whole first epoch from a cold cache;
    `cfg.repeats` rounds, interleaved; the fastest run of each is reported."""
    bs, rb = cfg.bs, cfg.dim * 4
    x_file = _single_shard(w)
    size = os.path.getsize(x_file)
    full = _batches(cfg.rows, bs)

    def sequential():
        with open(x_file, "rb", buffering=0) as f:
            buf = bytearray(SEQ_CHUNK)
            while f.readinto(buf):
                pass
        return [(np.empty(size // rb),)]   # one "batch" of every row

    seq = "sequential read (os.read, 8 MiB)"
    cases = [(seq, sequential, 1, size // rb)]
    cases += [(f"ours batched, shuffle={s!r}, first epoch", lambda s=s: _ours_w1(w, bs, 0, shuffle=s).train_dl,
               full, full * bs) for s in ("block", "random")]
    best: Dict[str, Result] = {}
    for r in range(cfg.repeats):
        for name, make, nb, expected in cases:
            gc.collect()
            evict(w.files + [w.h5])
            before = resident_fraction(w.files)
            b0 = read_bytes()
            rows, timed, secs = _drain(make, nb, 0)
            got = read_bytes() - b0
            res = Result("W1", "cold", name, "0", rows, expected, secs, rows / secs, size / secs / 1e9,
                         ref=f"{seq}|0", bytes_read=got, file_bytes=size, resident_before=round(before, 4))
            log(f"  W1 cold {name}: {res.gbps:.2f} GB/s, {got / size:.2f} x file read, {before:.1%} resident before")
            runs = best[name].runs if name in best else []
            if name not in best or res.rate > best[name].rate:
                best[name] = res
            best[name].runs = runs + [round(res.rate, 1)]
    return [best[name] for name, *_ in cases]


# ------------------------------------------------------------------------------------------ W2
@dataclass
class W2:
    "Files and in-RAM copy of workload 2."
    pixels: np.ndarray
    codes: np.ndarray
    png_dir: Path
    store: Path
    labels: Path


def make_w2(cfg: BenchConfig, root: Path, log: Callable[[str], None]) -> W2:
    "Write workload 2 (PNG files in class folders, uint8 HWC store, label store) under `root`."
    import PIL.Image
    from ..store.save import save_memmap
    rng = np.random.default_rng(cfg.seed + 1)
    n, s = cfg.images, cfg.side
    log(f"W2: writing {n:,} PNG images of {s}x{s} RGB and a uint8 store")
    small = rng.integers(0, 256, (n, s // 4, s // 4, 3), dtype=np.uint8)   # smooth-ish pixels: PNG compresses
    pixels = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
    pixels = np.clip(pixels.astype(np.int16) + rng.integers(-8, 9, pixels.shape, dtype=np.int16), 0, 255)
    pixels = pixels.astype(np.uint8)
    codes = rng.integers(0, CLASSES, n).astype(np.int64)
    png = root / "w2_png"
    for c in range(CLASSES):
        (png / f"c{c}").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        p = png / f"c{codes[i]}" / f"{i:06d}.png"
        PIL.Image.fromarray(pixels[i]).save(p)
        names.append(p)
    save_memmap(root / "w2_x", pixels, meta={"layout": "HWC"})
    save_memmap(root / "w2_y", codes, meta={"classes": [f"c{c}" for c in range(CLASSES)]})
    return W2(pixels, codes, png, root / "w2_x", root / "w2_y")


def _w2_cases(cfg: BenchConfig, w: W2) -> List[Case]:
    from fastai.vision.data import ImageList
    from fastai.vision.transform import get_transforms
    from ..vision.images import MemmapImageList
    bs, n, rb = cfg.bs, cfg.images, cfg.side * cfg.side * 3
    full, capped, tcap = _batches(n, bs), _batches(n, bs, cfg.image_cap), _batches(n, bs, cfg.tfm_cap)
    RamImageList = _ram_image_list()
    names = [f"c{c}" for c in range(CLASSES)]

    def folder(nw, tfms=False):
        lls = ImageList.from_folder(w.png_dir).split_none().label_from_folder()
        lls = lls.transform(get_transforms()) if tfms else lls
        return lls.databunch(bs=bs, num_workers=nw, device=CPU).train_dl

    def ram(nw, tfms=False):
        il = RamImageList(np.arange(n), pixels=w.pixels, path=w.png_dir)
        lls = il.split_none().label_from_func(lambda i: names[w.codes[int(i)]])
        lls = lls.transform(get_transforms()) if tfms else lls
        return lls.databunch(bs=bs, num_workers=nw, device=CPU).train_dl

    def ours(nw, uint8=False, tfms=False):
        lls = MemmapImageList.from_memmap(w.store, uint8=uint8).split_none().label_from_memmap(w.labels)
        lls = lls.transform(get_transforms()) if tfms else lls
        return _quiet(lls.databunch, bs=bs, num_workers=nw, device=CPU).train_dl

    cases = []
    for nw in cfg.workers:
        ref = f"fastai ImageList.from_folder (PNG)|{nw}"
        cases += [
            Case("W2", "fastai ImageList.from_folder (PNG)", str(nw), lambda nw=nw: folder(nw), capped, bs, rb, ref),
            Case("W2", "in-RAM per item (pre-decoded ImageList)", str(nw), lambda nw=nw: ram(nw), capped, bs, rb, ref),
            Case("W2", "ours per item", str(nw),
                 lambda nw=nw: _per_item(ours(0).dataset, bs, nw), capped, bs, rb, ref),
            Case("W2", "ours batched float32", str(nw), lambda nw=nw: ours(nw), full, bs, rb, ref),
            Case("W2", "ours batched uint8 (+to_float_tfm)", str(nw), lambda nw=nw: ours(nw, True), full, bs, rb, ref),
        ]
        if cfg.tfms:
            tref = f"in-RAM per item + get_transforms()|{nw}"
            cases += [
                Case("W2", "in-RAM per item + get_transforms()", str(nw), lambda nw=nw: ram(nw, tfms=True), tcap, bs,
                     rb, tref),
                Case("W2", "ours + get_transforms() (per item)", str(nw), lambda nw=nw: ours(nw, True, tfms=True),
                     tcap, bs, rb, tref),
            ]
    return cases


# ------------------------------------------------------------------------------------------ report
def _refs(results: List[Result]) -> None:
    "Fill ``vs_ref`` of each result from the result its ``ref`` (``'loader|workers'``) names."
    by = {(r.workload, r.state, f"{r.loader}|{r.workers}"): r for r in results}
    for r in results:
        ref = by.get((r.workload, r.state, r.ref)) if r.ref else None
        if ref is not None and ref.rate > 0:
            r.vs_ref = (r.gbps / ref.gbps) if r.state == "cold" else r.rate / ref.rate


def _best(results: List[Result], workload: str, state: str, prefix: str, tfms: Optional[bool] = None,
          workers: Optional[str] = None) -> Optional[Result]:
    rows = [r for r in results if r.workload == workload and r.state == state and r.loader.startswith(prefix)
            and (workers is None or r.workers == workers)
            and (tfms is None or ("get_transforms" in r.loader) == tfms)]
    return max(rows, key=lambda r: r.rate) if rows else None


def ratios(results: List[Result]) -> List[Dict[str, Any]]:
    "The `TARGETS` ratios that this run's results allow computing, each marked met or not."
    def ratio(a: Optional[Result], b: Optional[Result], attr: str = "rate") -> Optional[float]:
        return None if a is None or b is None or not getattr(b, attr) else getattr(a, attr) / getattr(b, attr)

    ours_w1 = _best(results, "W1", "warm", "ours batched")
    cold_block = _best(results, "W1", "cold", "ours batched, shuffle='block'")
    values = {
        "w1_warm_best_vs_tensor_dl0": ratio(ours_w1, _best(results, "W1", "warm", "in-RAM tensor DataLoader",
                                                           workers="0")),
        "w1_warm_best_vs_fastai_item": ratio(ours_w1, _best(results, "W1", "warm", "fastai per item")),
        "w1_warm_nw2_vs_tensor_dl2": ratio(_best(results, "W1", "warm", "ours batched", workers="2"),
                                           _best(results, "W1", "warm", "in-RAM tensor DataLoader", workers="2")),
        "w1_cold_block_vs_seq": ratio(cold_block, _best(results, "W1", "cold", "sequential read"), "gbps"),
        "w1_cold_block_bytes": None if cold_block is None or not cold_block.file_bytes
        else cold_block.bytes_read / cold_block.file_bytes,
        "w2_best_vs_from_folder": ratio(_best(results, "W2", "warm", "ours", tfms=False),
                                        _best(results, "W2", "warm", "fastai ImageList.from_folder")),
        "w2_tfms_vs_ram_item": ratio(_best(results, "W2", "warm", "ours", tfms=True),
                                     _best(results, "W2", "warm", "in-RAM per item", tfms=True)),
    }
    out = []
    for key, desc, op, target in TARGETS:
        v = values.get(key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        out.append({"key": key, "description": desc, "value": v, "op": op, "target": target, "met": met})
    return out


def format_table(results: List[Result], rts: List[Dict[str, Any]]) -> str:
    "The results and ratios as a fixed-width text table."
    head = f"{'workload':8} {'state':5} {'loader':46} {'wrk':>4} {'rows':>8} {'s':>7} {'rows/s':>11} {'GB/s':>6} " \
           f"{'vs ref':>7} {'read/file':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        vs = f"{r.vs_ref:7.2f}" if r.vs_ref is not None else f"{'':7}"
        rd = f"{r.bytes_read / r.file_bytes:9.2f}" if r.bytes_read is not None and r.file_bytes else f"{'':9}"
        lines.append(f"{r.workload:8} {r.state:5} {r.loader[:46]:46} {r.workers:>4} {r.rows:8d} {r.seconds:7.3f} "
                     f"{r.rate:11,.0f} {r.gbps:6.2f} {vs} {rd}")
    lines += ["", "targets (ratios from this run):"]
    for t in rts:
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        mark = "" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {t['description']}: {v} (target {t['op']} {t['target']}) {mark}")
    return "\n".join(lines)


def _environment() -> Dict[str, Any]:
    import fastai
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "fastai": fastai.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg())}


# ------------------------------------------------------------------------------------------ driver
def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the bench described by `cfg`; return ``{'config', 'env', 'results', 'ratios', 'table'}``.

    Writes its files under ``cfg.dir`` (default: a new temporary directory on the same disk as
    the system temp dir, removed at the end unless ``cfg.keep``). Cold measurements need a real
    disk (not tmpfs) to mean anything.
    """
    from ..data import compat
    compat.apply()
    root = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="fastai_memmap_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # intra-op threads fight loader workers for the cores (and tensor gathers slow down)
    env = _environment()
    results: List[Result] = []
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            if cfg.w1:
                w = make_w1(cfg, root, log)
                results += _run_warm(_w1_cases(cfg, w), cfg.repeats, log)
                if cfg.cold:
                    results += _cold_w1(cfg, w, log)
                del w
                gc.collect()
            if cfg.w2:
                w2 = make_w2(cfg, root, log)
                results += _run_warm(_w2_cases(cfg, w2), cfg.repeats, log)
                del w2
    finally:
        torch.set_num_threads(threads)
        if not cfg.keep and not cfg.dir:
            shutil.rmtree(root, ignore_errors=True)
    _refs(results)
    rts = ratios(results)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    return {"config": asdict(cfg), "env": env, "results": [asdict(r) for r in results], "ratios": rts,
            "table": format_table(results, rts)}


# the --help text: the module docstring's first paragraph, in plain text (no reST markup)
DESCRIPTION = "fastai-memmap bench: loader throughput of this package against the usual alternatives, side by side."


def build_parser() -> argparse.ArgumentParser:
    "Arguments of ``fastai-memmap bench``."
    p = argparse.ArgumentParser(prog="fastai-memmap bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and 2 repeats: about a minute")
    p.add_argument("--json", metavar="PATH", help="write config, environment, every measurement and ratios here")
    p.add_argument("--dir", help="work directory on the disk to test (default: a temporary one, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    for name in ("rows", "dim", "images", "side", "bs", "repeats", "item-cap", "image-cap", "tfm-cap"):
        p.add_argument(f"--{name}", type=int, help=f"override the {name.replace('-', '_')} of the chosen size")
    p.add_argument("--workers", default="0,2", help="comma-separated num_workers values (default 0,2)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache measurements")
    p.add_argument("--no-w1", action="store_true", help="skip workload 1 (rows)")
    p.add_argument("--no-w2", action="store_true", help="skip workload 2 (images)")
    p.add_argument("--no-tfms", action="store_true", help="skip the get_transforms() measurements")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data and orders (default 0)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    "A `BenchConfig` from parsed arguments (``--quick`` sizes, then explicit overrides)."
    sizes = dict(QUICK if args.quick else FULL)
    for name in ("rows", "dim", "images", "side", "bs", "repeats", "item_cap", "image_cap", "tfm_cap"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise ArgumentError(f"expected --{name.replace('_', '-')} >= 1, found {v}")
            sizes[name] = v
    parts = [w.strip() for w in args.workers.split(",") if w.strip()]
    workers = tuple(int(w) for w in parts if w.isdigit())
    if not workers or len(workers) != len(parts):
        raise ArgumentError(f"expected --workers as comma-separated ints >= 0, found {args.workers!r}")
    if sizes["side"] % 4:
        raise ArgumentError(f"expected --side to be a multiple of 4, found {sizes['side']}")
    for n, what in ((sizes["rows"], "rows"), (sizes["images"], "images")):
        if n < sizes["bs"] * (WARMUP_BATCHES + 1):
            raise ArgumentError(f"expected --{what} >= {sizes['bs'] * (WARMUP_BATCHES + 1)} (3 batches of --bs), found {n}")
    return BenchConfig(**sizes, workers=workers, cold=not args.no_cold, w1=not args.no_w1, w2=not args.no_w2,
                       tfms=not args.no_tfms, dir=args.dir, keep=args.keep, seed=args.seed, quick=args.quick)


def bench_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fastai-memmap bench`` (arguments as `build_parser`); prints the table.

    Returns
    -------
    int
        0 when every measurement delivered the rows it asked for, 1 otherwise, 2 on bad arguments.
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"fastai-memmap bench: {e}", file=sys.stderr)
        return 2
    out = run_bench(cfg, log=lambda s: print(s, flush=True))
    print()
    print(out["table"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1))
        print(f"\nwrote {args.json}")
    short = [r for r in out["results"] if r["rows"] != r["expected"]]
    for r in short:
        print(f"fastai-memmap bench: {r['loader']} [{r['workers']}] delivered {r['rows']} rows, expected "
              f"{r['expected']}", file=sys.stderr)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(bench_main())
