"""Benchmark of sparse stores (not a test): a 1M x 100,000 store with ~50 stored entries per row.

1. Writes `--rows` rows of `--size` features, Poisson(`--nnz`) stored float32 entries per row at
   random columns (half of them in the first 1% of the columns), chunk by chunk (`--chunk` rows in RAM at a time), with a binary label store
   (sign of a hidden linear score). Prints write time, size on disk, and the dense-equivalent size.
2. Batch throughput (rows/s) of random batches of `--bs` rows through the item list's batch fast
   path: CSR parts only, expanded to a dense float32 tensor ``(bs, size)``, and as a torch sparse
   CSR tensor.
3. Trains ``SparseLinear(size, 64) -> ReLU -> Linear(64, 2)`` on a subset (`--train-rows`) for
   `--batches` batches with CSR batches, and a few batches with dense batches and ``nn.Linear`` for
   comparison; prints seconds per batch and the validation accuracy.

    python benchmarks/bench_sparse.py [--rows 1000000] [--size 100000] [--nnz 50] [--bs 256] [--batches 300]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_train import Learner
from fastai.callback import Callback
from fastai.metrics import accuracy
from fastai_memmap import MemmapArray, MemmapItemList, save_memmap
from fastai_memmap.store.sparse import SparseWriter
from fastai_memmap.data.sparse_items import SparseLinear


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def write_store(root: Path, rows: int, size: int, nnz: float, chunk: int, seed: int = 0):
    "The sparse store x and label store y, written chunk by chunk."
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=size).astype(np.float32)
    labels = []
    with SparseWriter(root / "x", np.float32, size=size, total=rows) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            lengths = rng.poisson(nnz, n)
            indptr = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=indptr[1:])
            frequent = rng.random(indptr[-1]) < 0.5       # half the entries in 1% of the columns (skewed, as in text)
            indices = np.where(frequent, rng.integers(0, max(size // 100, 1), indptr[-1]),
                               rng.integers(0, size, indptr[-1])).astype(np.int32)
            values = rng.random(indptr[-1], dtype=np.float32)
            w.append_csr(indptr, indices, values)
            score = np.add.reduceat(w_true[indices] * values, indptr[:-1]) if indptr[-1] else np.zeros(n)
            score[lengths == 0] = 0                       # reduceat repeats a value for empty rows
            labels.append(score > 0)
    save_memmap(root / "y", np.concatenate(labels).astype(np.int64), meta={"classes": ["neg", "pos"]})


def throughput(data, bs: int, batches: int, output: str) -> float:
    "Rows/s of random batches through the training set's batch fast path (`FastLabelList.__getitems__`)."
    ds = data.train_ds
    ds.x.output = output
    rng = np.random.default_rng(1)
    idx = [rng.integers(0, len(ds), bs) for _ in range(batches)]
    ds.__getitems__(idx[0])                               # warm the maps
    t = time.perf_counter()
    for i in idx:
        ds.__getitems__(i)
    return bs * batches / (time.perf_counter() - t)


def csr_only(store, bs: int, batches: int) -> float:
    rng = np.random.default_rng(2)
    idx = [rng.integers(0, len(store), bs) for _ in range(batches)]
    t = time.perf_counter()
    for i in idx:
        store.read_csr(i)
    return bs * batches / (time.perf_counter() - t)


class StopAfter(Callback):
    "Stop the epoch after `n` training batches and time them; skip validation unless `validate`."

    def __init__(self, n: int, validate: bool):
        self.n, self.validate, self.seen, self.t0, self.t1 = n, validate, 0, None, None

    def on_epoch_begin(self, **kwargs):
        return {"skip_validate": not self.validate}

    def on_batch_begin(self, train: bool = True, **kwargs):
        if train and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_batch_end(self, train: bool = True, **kwargs):
        if not train:
            return None
        self.seen += 1
        if self.seen >= self.n:
            self.t1 = time.perf_counter()
        return {"stop_epoch": self.seen >= self.n}


def train(root: Path, train_rows: int, bs: int, batches: int, output: str, model: torch.nn.Module,
          validate: bool):
    "Seconds per training batch over `batches` batches of the first `train_rows` rows (10% held out)."
    data = (MemmapItemList.from_memmap(root / "x", rows=np.arange(train_rows), output=output)
            .split_by_rand_pct(0.1, seed=0).label_from_memmap(root / "y").databunch(bs=bs, num_workers=0))
    learn = Learner(data, model, metrics=[accuracy])
    stop = StopAfter(min(batches, len(data.train_dl)), validate)
    learn.fit(1, 3e-3, callbacks=[stop])
    return (stop.t1 - stop.t0) / stop.seen, stop.seen, learn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--nnz", type=float, default=50)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--dense-batches", type=int, default=10)
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a small shared machine)")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_sparse-", dir=args.dir))
    try:
        t = time.perf_counter()
        write_store(root, args.rows, args.size, args.nnz, args.chunk)
        wrote = time.perf_counter() - t
        x = MemmapArray.open(root / "x")
        t = time.perf_counter()
        MemmapArray.open(root / "x", validate="full")
        full_open = time.perf_counter() - t
        print(f"store: {len(x):,} rows x {x.size:,} features, {x.nnz:,} stored entries "
              f"({x.nnz / len(x):.1f} per row), float32 values, {x.index_dtype} indices")
        print(f"write: {wrote:.1f} s ({len(x) / wrote:,.0f} rows/s); open with validate='full' (all indices): "
              f"{full_open:.2f} s")
        print(f"size on disk: {human(disk_bytes(root / 'x'))}; dense float32 equivalent: {human(x.dense_nbytes)} "
              f"({x.dense_nbytes / disk_bytes(root / 'x'):,.0f}x larger)")

        data = (MemmapItemList.from_memmap(root / "x").split_by_rand_pct(0.01, seed=0)
                .label_from_memmap(root / "y").databunch(bs=args.bs, num_workers=0))
        print(f"batch throughput, bs={args.bs}, random rows:")
        print(f"  CSR parts only (read_csr):          {csr_only(x, args.bs, 200):>12,.0f} rows/s")
        print(f"  torch sparse CSR batch (fast path): {throughput(data, args.bs, 200, 'csr'):>12,.0f} rows/s")
        print(f"  dense float32 (bs, {x.size}) batch: {throughput(data, args.bs, 30, 'dense'):>12,.0f} rows/s "
              f"({human(args.bs * x.size * 4)} per batch)")

        n_train = min(args.train_rows, len(x))
        torch.manual_seed(0)
        model = torch.nn.Sequential(SparseLinear(args.size, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        sec, seen, learn = train(root, n_train, args.bs, args.batches, "csr", model, validate=True)
        loss, acc = learn.recorder.val_losses[-1], learn.recorder.metrics[-1][0]
        print(f"train (CSR batches, SparseLinear(size, 64) -> ReLU -> Linear(64, 2)), {n_train:,}-row subset: "
              f"{seen} batches of {args.bs}, {sec * 1000:.1f} ms/batch "
              f"({args.bs / sec:,.0f} rows/s); validation loss {float(loss):.4f}, accuracy {float(acc):.3f}")
        torch.manual_seed(0)
        dense_model = torch.nn.Sequential(torch.nn.Linear(args.size, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        sec_d, seen_d, _ = train(root, n_train, args.bs, args.dense_batches, "dense", dense_model, validate=False)
        print(f"train (dense batches, nn.Linear(size, 64) -> ReLU -> Linear(64, 2)), same subset: "
              f"{seen_d} batches, {sec_d * 1000:.1f} ms/batch ({args.bs / sec_d:,.0f} rows/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
