"""Scale-out benchmark: conversion speed with 1 vs 2 workers on this machine.

    python benchmarks/bench_scaleout.py [--images 4000] [--rows 400000]

1. `images_to_memmap` of a folder of PNGs (64x64 RGB, class folders) with workers=1 and workers=2.
2. `save_memmap` of a dask array whose chunks cost CPU to compute (a float32 transform), with a
   `dask.distributed.LocalCluster` of 1 and then 2 worker processes (one thread each).
Prints seconds, throughput and the 2-vs-1 speed-up side by side from one run.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_pngs(root: Path, n: int) -> None:
    import PIL.Image
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")


def bench_images(tmp: Path, n: int) -> dict:
    from fastai_memmap import images_to_memmap
    _make_pngs(tmp / "pngs", n)
    res = {}
    for workers in (1, 2):
        t = time.perf_counter()
        images_to_memmap(tmp / "pngs", tmp / f"store{workers}", workers=workers, progress=False)
        res[workers] = time.perf_counter() - t
    return res


def _heavy(block: np.ndarray) -> np.ndarray:
    "A CPU-bound transform per chunk (stands in for feature extraction)."
    out = block
    for _ in range(20):
        out = np.tanh(out * 1.01 + 0.1)
    return out.astype(np.float32)


def bench_dask(tmp: Path, rows: int) -> dict:
    import dask.array as da
    import distributed
    from fastai_memmap import save_memmap
    res = {}
    for workers in (1, 2):
        arr = da.random.RandomState(0).random_sample((rows, 256), chunks=(rows // 16, 256)).map_blocks(_heavy, dtype=np.float32)
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster):
            t = time.perf_counter()
            save_memmap(tmp / f"dask{workers}", arr)
            res[workers] = time.perf_counter() - t
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--rows", type=int, default=400_000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = bench_images(tmp, a.images)
        dsk = bench_dask(tmp, a.rows)
    mb = a.rows * 256 * 4 / 2 ** 20
    print(f"{'conversion':40s} {'1 worker':>10s} {'2 workers':>10s} {'speed-up':>9s}")
    print(f"{f'images_to_memmap, {a.images} PNGs 64x64':40s} {img[1]:9.1f}s {img[2]:9.1f}s {img[1] / img[2]:8.2f}x")
    print(f"{f'dask -> store, {mb:.0f} MiB, LocalCluster':40s} {dsk[1]:9.1f}s {dsk[2]:9.1f}s {dsk[1] / dsk[2]:8.2f}x")


if __name__ == "__main__":
    main()
