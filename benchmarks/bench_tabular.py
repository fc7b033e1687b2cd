"""Benchmark of the tabular pipeline (not a test).

1. Writes a synthetic CSV of `--rows` rows (4 categorical, 6 continuous columns with missing values,
   a binary target), several times larger than `--chunksize`.
2. Converts it with `tabular_to_memmap` in a fresh process and prints its peak RSS growth next to the
   CSV size and next to what fastai needs to load and process the same CSV in RAM (also a fresh process).
3. Measures training throughput (rows/s) of `MemmapTabularList` vs fastai's `TabularList` on the same
   rows and split: data loading alone, then `tabular_learner(layers=[200, 100])` training, for
   `--batches` batches each.

    python benchmarks/bench_tabular.py [--rows 500000] [--chunksize 50000] [--bs 512] [--batches 200] [--repeats 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

CATS = ["c_low", "c_mid", "c_high", "c_text"]
CONTS = [f"x{i}" for i in range(6)]


def write_csv(path: Path, rows: int, seed: int = 0, block: int = 100_000) -> None:
    "Synthetic table written block by block (the benchmark itself never holds it whole)."
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        df = pd.DataFrame({"c_low": rng.integers(0, 8, n), "c_mid": rng.integers(0, 200, n),
                           "c_high": rng.integers(0, 5000, n),
                           "c_text": rng.choice(["alpha", "beta", "gamma", "delta", None], n)})
        for i, c in enumerate(CONTS):
            df[c] = rng.normal(i, 1 + i, n)
        logit = df.x0 - df.x1 / 2 + (df.c_low % 3 == 0) - (df.c_text == "beta")
        df["target"] = np.where(logit + rng.normal(0, 1, n) > 0.3, "yes", "no")
        for c in ("x0", "x3"):
            df.loc[rng.random(n) < 0.05, c] = np.nan
        df.to_csv(path, mode="a" if start else "w", header=not start, index=False)


_RSS = """
import json, resource, sys, threading, time, warnings
warnings.filterwarnings('ignore')
import psutil
{imports}
proc = psutil.Process()
peak = [0]
def sample():
    while not done:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
before = proc.memory_info().rss
done = False
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
{work}
secs = time.perf_counter() - t0
done = True; t.join()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({{"before": before, "peak": peak[0], "secs": secs, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def measure(imports: str, work: str) -> dict:
    "Run `work` in a fresh interpreter (after `imports`); RSS growth sampled every 5 ms."
    code = _RSS.format(imports=textwrap.dedent(imports), work=textwrap.dedent(work))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(x: float) -> str:
    return f"{x / 2**20:8.1f} MiB"


def time_training(data, batches: int) -> tuple:
    "(data-loading rows/s, training rows/s) over `batches` batches of the training loader."
    import torch
    from fastai.basic_train import LearnerCallback
    from fastai.tabular import tabular_learner
    it, t0, rows = iter(data.train_dl), time.perf_counter(), 0
    for _ in range(batches):
        rows += len(next(it)[1])
    load = rows / (time.perf_counter() - t0)
    limit = [5]

    class Stop(LearnerCallback):
        "End the (single) epoch after `limit[0]` batches, without validation."
        def on_epoch_begin(self, **kwargs):
            self.n = 0

        def on_batch_end(self, **kwargs):
            self.n += 1
            if self.n >= limit[0]:
                return {"stop_epoch": True, "stop_training": True, "skip_validate": True}

    torch.manual_seed(0)
    learn = tabular_learner(data, layers=[200, 100], callback_fns=[Stop])
    learn.fit(1, 1e-2)          # warm-up: optimizer state, allocator
    limit[0] = batches
    t0 = time.perf_counter()
    learn.fit(1, 1e-2)
    train = batches * data.train_dl.batch_size / (time.perf_counter() - t0)
    return load, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--chunksize", type=int, default=50_000)
    ap.add_argument("--bs", type=int, default=512)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=str, default=None, help="default: a temporary directory")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    tmp = tempfile.TemporaryDirectory(dir=a.workdir)
    work = Path(tmp.name)
    csv, store = work / "table.csv", work / "store"

    t0 = time.perf_counter()
    write_csv(csv, a.rows)
    size = csv.stat().st_size
    print(f"CSV: {a.rows} rows, {mb(size)} ({time.perf_counter() - t0:.1f} s to write); "
          f"chunksize {a.chunksize} = {a.rows / a.chunksize:.0f} chunks")

    conv = measure("from fastai_memmap.tabular.item_list import tabular_to_memmap",
                   f"tabular_to_memmap({str(csv)!r}, {str(store)!r}, {CATS}, {CONTS}, 'target', "
                   f"chunksize={a.chunksize}, valid_pct=0.2, seed=0, progress=False)")
    ref = measure("import pandas as pd\nfrom fastai.tabular import TabularList, FillMissing, Categorify, Normalize\n"
                  "import fastai_memmap.data.compat as c; c.apply()",
                  f"df = pd.read_csv({str(csv)!r})\n"
                  f"src = (TabularList.from_df(df, cat_names={CATS}, cont_names={CONTS}, "
                  f"procs=[FillMissing, Categorify, Normalize]).split_by_rand_pct(0.2, seed=0)"
                  f".label_from_df(cols='target'))")
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    print("\n== memory (fresh process each; RSS growth = peak RSS during the work - RSS before it)")
    print(f"{'':40s} {'RSS growth':>12s} {'peak RSS':>12s} {'time':>8s}")
    print(f"{'tabular_to_memmap (streamed)':40s} {mb(conv['peak'] - conv['before']):>12s} {mb(conv['peak']):>12s} {conv['secs']:7.1f}s")
    print(f"{'pd.read_csv + TabularList procs (RAM)':40s} {mb(ref['peak'] - ref['before']):>12s} {mb(ref['peak']):>12s} {ref['secs']:7.1f}s")
    print(f"CSV size {mb(size)}; store size {mb(store_bytes)}; streamed growth / CSV size = "
          f"{(conv['peak'] - conv['before']) / size:.2f}; in-RAM growth / CSV size = {(ref['peak'] - ref['before']) / size:.2f}")

    # ------------------------------------------------------------------ throughput, same rows and split
    from fastai_memmap.tabular.item_list import MemmapTabularList
    from fastai.tabular import Categorify, FillMissing, Normalize, TabularList
    mdata = (MemmapTabularList.from_memmap(store).split_from_memmap().label_from_memmap()
             .databunch(bs=a.bs, num_workers=0))
    valid = np.asarray(MemmapTabularList.from_memmap(store).store.valid[:])
    df = pd.read_csv(csv)
    fdata = (TabularList.from_df(df, cat_names=CATS, cont_names=CONTS, procs=[FillMissing, Categorify, Normalize])
             .split_by_idx(valid).label_from_df(cols="target").databunch(bs=a.bs, num_workers=0))
    del df
    res = {"MemmapTabularList": (0, 0), "fastai TabularList": (0, 0)}
    for _ in range(a.repeats):      # alternate the pipelines, keep the best run of each: the CPU may be shared
        for name, d in (("MemmapTabularList", mdata), ("fastai TabularList", fdata)):
            res[name] = tuple(map(max, res[name], time_training(d, a.batches)))
    m, f = res["MemmapTabularList"], res["fastai TabularList"]
    print(f"\n== throughput, {a.batches} batches of {a.bs} rows, num_workers=0, CPU ({os.cpu_count()} cores), "
          f"best of {a.repeats} alternating runs")
    print(f"{'':22s} {'loading rows/s':>16s} {'training rows/s':>16s}")
    for name, (load, train) in res.items():
        print(f"{name:22s} {load:16,.0f} {train:16,.0f}")
    print(f"{'ratio memmap/fastai':22s} {m[0] / f[0]:16.2f} {m[1] / f[1]:16.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
