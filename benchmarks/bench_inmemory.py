"""Samples/s of fastai DataLoaders over PNG files, ImageListInMemory and a plain in-RAM uint8 tensor.

    python benchmarks/bench_inmemory.py [--n 20000] [--side 64] [--batches 100] [--workers 2] [--quick]

Writes `n` random side x side RGB PNGs in 10 class folders of a temporary directory, then for each
source, without and with ``get_transforms()`` (train transforms, ``size=side``; without: also
ImageListInMemory with ``num_workers='auto'`` on the batch fast path, float32 and ``uint8=True``), times ``--batches``
batches of ``--bs`` through ``DataBunch.train_dl`` (the fastai path: LabelList, transforms, collate,
DeviceDataLoader) after a warm-up batch (worker start-up excluded), and prints samples/s with ratios.
Then times spawn start-up (first batch) with 1/10 of the images and with all of them. Also prints
the ``load_data()`` time and the PSS (proportional set size, psutil) of the main process
plus DataLoader workers while iterating, next to the decoded bytes. A benchmark, not a test: figures
depend on the machine (cores, disk cache, other load).
"""
import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_data import DataBunch
from fastai.vision import Image, ImageList, get_transforms

from fastai_memmap.vision.inmemory import ImageListInMemory

N_CLASSES = 10


def _write_chunk(args):
    root, start, stop, side = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        PIL.Image.fromarray(a).save(root / f"c{i % N_CLASSES}" / f"{i:06d}.png")


def make_pngs(root: Path, n: int, side: int, workers: int) -> float:
    "Write `n` random PNGs in `N_CLASSES` folders; returns seconds."
    t = time.perf_counter()
    for c in range(N_CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    step = max(1, n // (workers * 8))
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_chunk, [(root, a, min(a + step, n), side) for a in range(0, n, step)]))
    return time.perf_counter() - t


class TensorImages(torch.utils.data.Dataset):
    "The baseline: images already decoded in one uint8 tensor (N, 3, H, W); fastai transforms on request."

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, tfms=None, size: int = None):
        self.pixels, self.labels, self.tfms, self.size = pixels, labels, tfms, size
        self.c = int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        x = self.pixels[i].float().div_(255)
        if self.tfms:
            x = Image(x).apply_tfms(self.tfms, size=self.size).data
        return x, int(self.labels[i])


def pss_of(procs) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run(dl, batches: int):
    "``(samples/s, max PSS of main + workers)`` over `batches` batches after one warm-up batch."
    it = iter(dl)
    next(it)                                                  # workers started, first batch ready
    procs = [psutil.Process()] + psutil.Process().children()  # the DataLoader workers
    pss, done, t = 0, 0, time.perf_counter()
    for k in range(batches):
        try:
            xb, _ = next(it)
        except StopIteration:                                 # small set: next epoch
            it = iter(dl)
            xb, _ = next(it)
        done += len(xb)
        if k % 25 == 24:
            pss = max(pss, pss_of(procs))
    rate = done / (time.perf_counter() - t)
    pss = max(pss, pss_of(procs))
    del it
    return rate, pss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="n=2000, 30 batches")
    ap.add_argument("--no-spawn", dest="spawn", action="store_false",
                    help="skip the spawn start-up timing (1/10 of the images vs all)")
    ap.add_argument("--dir", help="keep the PNGs here (default: a temporary directory, removed at the end)")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.batches = min(a.n, 2000), min(a.batches, 30)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_inmemory-"))
    try:
        return _bench(a, root)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


def _bench(a, root: Path) -> int:
    cpus = os.cpu_count()
    print(f"{a.n} random {a.side}x{a.side} RGB PNGs, bs={a.bs}, {a.batches} batches per run, {a.workers} DataLoader "
          f"workers (fork), {cpus} cores, torch {torch.__version__}")
    if not any(root.glob("c0/*.png")):
        print(f"writing PNGs: {make_pngs(root, a.n, a.side, cpus):.1f}s")
    tf = get_transforms()
    dl_kw = dict(bs=a.bs, num_workers=a.workers)

    def ll(cls):
        return cls.from_folder(root).split_by_rand_pct(0.1, seed=0).label_from_folder()

    disk = ll(ImageList)
    ram = ll(ImageListInMemory)
    t = time.perf_counter()
    ram.load_data(progress=False)
    t_load = time.perf_counter() - t
    decoded = ram.train.x.nbytes
    print(f"ImageListInMemory.load_data(): {t_load:.1f}s for {len(ram.train) + len(ram.valid)} images "
          f"({decoded / 2**20:.1f} MiB uint8; fastai's float32 Images would be {4 * decoded / 2**20:.1f} MiB); "
          f"{(len(ram.train) + len(ram.valid)) / t_load:,.0f} images/s")
    # plain uint8 tensor: the same pixels, already decoded (what a hand-written in-RAM Dataset does)
    buf = ram.train.x.pixels
    slots = buf.slots(ram.train.x.items)
    pixels = torch.from_numpy(np.stack([buf.image(int(s)) for s in slots]).transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(np.asarray(ram.train.y.items, np.int64))
    results = {}
    for tname, tfms in (("none", None), ("get_transforms", tf)):
        for name, lst in (("ImageList (PNG)", disk), ("ImageListInMemory", ram)):
            data = lst.transform(tfms, size=a.side).databunch(**dl_kw) if tfms else lst.transform(None).databunch(**dl_kw)
            results[(name, tname)] = run(data.train_dl, a.batches)
        if not tfms:   # the batch fast path (one gather per batch), float32 and uint8, workers 'auto'
            for name, u8 in (("InMemory batched", False), ("InMemory uint8", True)):
                lst = (ImageListInMemory.from_folder(root, uint8=u8, pixels=buf).split_by_rand_pct(0.1, seed=0)
                       .label_from_folder())   # the same buffer: nothing decoded again
                data = lst.databunch(**{**dl_kw, "num_workers": "auto"})
                results[(name, tname)] = run(data.train_dl, a.batches)
        ds = TensorImages(pixels, labels, tfms[0] if tfms else None, a.side)
        data = DataBunch.create(ds, TensorImages(pixels[:a.bs], labels[:a.bs]), **dl_kw)
        results[("uint8 tensor", tname)] = run(data.train_dl, a.batches)
    print()
    print(f"{'source':<20}{'transforms':<16}{'samples/s':>11}{'vs PNG':>9}{'vs tensor':>11}{'PSS main+workers':>19}")
    for (name, tname), (rate, pss) in results.items():
        png, ten = results[("ImageList (PNG)", tname)][0], results[("uint8 tensor", tname)][0]
        print(f"{name:<20}{tname:<16}{rate:>11,.0f}{rate / png:>8.2f}x{rate / ten:>10.2f}x{pss / 2**20:>15,.0f} MiB")
    print(f"\ndecoded pixels in RAM: {decoded / 2**20:.1f} MiB; PSS of ImageListInMemory minus PNG run (no transforms): "
          f"{(results[('ImageListInMemory', 'none')][1] - results[('ImageList (PNG)', 'none')][1]) / 2**20:+.0f} MiB")
    if a.spawn:
        print()
        small = ll_sub(ImageListInMemory, root, 10)
        small.load_data(progress=False)
        for name, lst in (("1/10 of the images", small), ("all images", ram)):
            blob = len(pickle.dumps(lst.train))
            t = spawn_first_batch(lst, a.bs, a.workers)
            print(f"spawn start-up, {name}: {len(lst.train.x):>6} images, {lst.train.x.nbytes / 2**20:6.1f} MiB decoded, "
                  f"train set pickles to {blob / 1024:,.0f} KiB, first batch after {t:.1f}s")
        small.purge()
    ram.purge()
    return 0


def ll_sub(cls, root: Path, every: int):
    "Every `every`-th image of `root`, split and labelled like the full set."
    return (cls.from_folder(root).filter_by_func(lambda p: int(p.stem) % every == 0)
            .split_by_rand_pct(0.1, seed=0).label_from_folder())


def spawn_first_batch(lst, bs: int, workers: int) -> float:
    "Seconds from starting `workers` spawn DataLoader workers to the first batch."
    data = lst.transform(None).databunch(bs=bs, num_workers=workers, multiprocessing_context="spawn")
    t = time.perf_counter()
    it = iter(data.train_dl)
    next(it)
    dt = time.perf_counter() - t
    del it
    return dt


if __name__ == "__main__":
    sys.exit(main())
