"""Larger than RAM, measured: a store several times a memory cgroup limit, read in random and block order.

    sudo python benchmarks/bench_larger_than_ram.py [--store-gb 2.5] [--room-gb 1.0] [--seconds 8] [--json OUT]
    python benchmarks/bench_larger_than_ram.py --small --json OUT    # 600 MB over 250 MB of room (the test suite's)

A memory cgroup caps page cache as well as process memory, so a large machine behaves as a small
one: the script writes a store of ``--store-gb`` (4 KiB float32 rows: 1024 per row, int64 labels)
outside the cgroup, then runs every measurement in a child process inside a cgroup whose limit
(v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) is set before each case to the processes' own
memory plus ``--room-gb`` of page cache (it needs root, and skips with a message where it cannot
make a cgroup). With the page cache emptied of the store before each case, it
prints, in one run:

1. the disk: random 4 KiB ``pread``s per second from 1 and 8 threads (QD1, QD8) and the sequential
   bandwidth (8 MiB reads), on the store's own files;
2. ``databunch(bs=256)`` with ``shuffle=True`` (the default: `RandomOrderSampler` once the store is
   larger than memory), with fastai's sampler (``RandomShuffle(readahead=False)``, the state before
   issue 13) and with ``shuffle='block'``, for ``num_workers`` 0, ``'auto'`` and 2: rows/s, GB/s,
   the ratio to the disk figure of that order (QD8 random reads; sequential bandwidth) and the
   amplification (bytes read from the disk / bytes delivered), counted for the measuring process
   and its workers only by a cgroup v1 blkio group (else machine-wide, from ``/sys/dev/block/*/stat``);
3. one training epoch of a linear model (`Learner.fit(1)`) in block order.

Each case stops after ``--seconds`` (or the whole epoch). A benchmark, not a test: figures depend on
the disk and on other load (the device counters are machine-wide); compare ratios within one run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from fastai_memmap.cli.bench import evict   # fsync + POSIX_FADV_DONTNEED: the page cache emptied of the files

ROW = 1024                  # float32 values per row: 4 KiB rows
BS = 256
CHUNK = 8 << 20             # bytes per read() of the sequential reference
WORKER_SLACK = 400 << 20    # anonymous memory a DataLoader worker may take while starting (the limit is tightened after)
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


# ------------------------------------------------------------------------------------------ cgroup
def make_cgroup() -> Optional[Path]:
    """A new memory cgroup (limits are set per case by `set_room`), or None (with the reason on
    stderr) where this process cannot make one (not root, no memory controller)."""
    name = f"fastai_memmap_bench_{os.getpid()}"
    try:
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            d = CGROUP_V1 / name
            d.mkdir()
            return d
        if (CGROUP_V2 / "cgroup.controllers").exists() and "memory" in (CGROUP_V2 / "cgroup.controllers").read_text():
            d = CGROUP_V2 / name
            d.mkdir()
            return d
        print("skipped: no memory cgroup controller (cgroup v1 memory or v2 memory) on this machine", file=sys.stderr)
    except OSError as e:
        print(f"skipped: cannot make a memory cgroup ({e}); run as root", file=sys.stderr)
    return None


def _anon(d: Path) -> int:
    """Memory of cgroup `d` that is not store cache (bytes): anonymous memory plus mapped files (the
    processes' own code: torch's libraries alone are hundreds of MB), what a limit must leave them."""
    st = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if len(line.split()) == 2)
    anon = int(st.get("total_rss", st.get("rss", st.get("anon", 0))))
    return anon + int(st.get("total_mapped_file", st.get("mapped_file", st.get("file_mapped", 0))))


def set_room(d: Path, room: int, slack: int = 0) -> int:
    """Limit cgroup `d` to its anonymous memory + `slack` (worker processes to come) + `room` bytes of
    page cache; returns the limit. (A fixed limit would leave a different room to each case.)"""
    limit = _anon(d) + slack + room
    (d / ("memory.limit_in_bytes" if (d / "memory.limit_in_bytes").exists() else "memory.max")).write_text(str(limit))
    return limit


def make_blkio_cgroup(name: str, device: str) -> Optional[Path]:
    """A cgroup v1 blkio group counting the bytes its processes read from `device` ("MAJ:MIN"), or None.
    The kernel keeps per-group counts only under a policy, so it gets a read limit no disk reaches."""
    d = Path("/sys/fs/cgroup/blkio") / name
    try:
        d.mkdir()
        (d / "blkio.throttle.read_bps_device").write_text(f"{device} {1 << 50}")
        return d
    except OSError:
        if d.exists():
            d.rmdir()
        return None


def group_read_bytes(d: Path, device: str) -> Optional[int]:
    "Bytes read from `device` by the processes of blkio group `d` (and its past members), None if unknown."
    try:
        for line in (d / "blkio.throttle.io_service_bytes").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == device and parts[1] == "Read":
                return int(parts[2])
        return 0
    except OSError:
        return None


def remove_cgroup(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------ disk
BLKIO: Optional[Path] = None      # this process's blkio group (set by `inner`): reads of this process tree only


def device_of(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def device_read_bytes(path: Path) -> Optional[int]:
    """Bytes read from the block device holding `path`: by this process tree (its blkio group) where
    there is one, else by the whole machine (``/sys/dev/block/*/stat``, sectors of 512 bytes), None
    if unknown."""
    if BLKIO is not None:
        got = group_read_bytes(BLKIO, device_of(path))
        if got is not None:
            return got
    st = os.stat(path)
    p = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    try:
        return int(p.read_text().split()[2]) * 512
    except (OSError, IndexError, ValueError):
        return None


def random_preads(files: List[Path], threads: int, seconds: float, seed: int = 0) -> float:
    "Random 4 KiB preads per second over the data pages of `files`, from `threads` threads (each page once)."
    from fastai_memmap.store.format import read_npy_header
    spans = []
    for p in files:
        _, _, off = read_npy_header(p)
        spans.append((p, off, (os.path.getsize(p) - off) // 4096))
    total = sum(s[2] for s in spans)
    pages = np.random.default_rng(seed).permutation(total)
    fds = [os.open(p, os.O_RDONLY) for p, _, _ in spans]
    starts = np.cumsum([0] + [s[2] for s in spans])
    counts, stop = [0] * threads, time.perf_counter() + seconds

    def work(t: int) -> None:
        for g in pages[t::threads].tolist():
            if time.perf_counter() > stop:
                return
            k = int(np.searchsorted(starts, g, side="right") - 1)
            os.pread(fds[k], 4096, spans[k][1] + (g - int(starts[k])) * 4096)
            counts[t] += 1
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    dt = time.perf_counter() - t0
    [os.close(fd) for fd in fds]
    return sum(counts) / dt


def sequential_read(files: List[Path], seconds: float) -> float:
    "Bytes per second of 8 MiB reads through `files` in order (stops after `seconds`)."
    buf, done, t0 = bytearray(CHUNK), 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while time.perf_counter() - t0 < seconds:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
    return done / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ loaders
def loader_case(x: Path, y: Path, order: str, workers: Any, seconds: float, cg: Path, room: int) -> Dict[str, Any]:
    "One databunch case, cold, with `room` bytes of page cache: rows/s, GB/s, amplification, the message."
    import fastai_memmap  # noqa: F401
    from fastai_memmap import MemmapArray, MemmapItemList
    from fastai_memmap.data.random_order import RandomShuffle, ReadStrategyWarning
    files = MemmapArray.open(x).shard_files + MemmapArray.open(y).shard_files
    evict(files)
    set_room(cg, room)                                 # the budget the databunch sees: `room`
    shuffle = {"random": True, "fastai": RandomShuffle(readahead=False), "block": "block"}[order]
    il = MemmapItemList.from_memmap(x).split_none().label_from_memmap(y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = il.databunch(bs=BS, num_workers=workers, shuffle=shuffle, no_check=True)
    said = [str(w.message) for w in caught if issubclass(w.category, ReadStrategyWarning)]
    row_bytes = ROW * 4 + 8
    set_room(cg, room, WORKER_SLACK * (workers if isinstance(workers, int) else 0))   # workers start
    d0 = device_read_bytes(x)                          # every byte read counts, from the first request on
    it = iter(data.train_dl)
    first = len(next(it)[0])                           # workers started: now the limit leaves exactly `room`
    limit = set_room(cg, room)
    t0, rows = time.perf_counter(), 0                  # the rate leaves out start-up and the first batch
    for xb, yb in it:
        rows += len(xb)
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    d1 = device_read_bytes(x)
    delivered = (first + rows) * row_bytes
    del it, data
    return dict(order=order, workers=str(workers), rows=rows, seconds=dt, rows_per_s=rows / dt, limit=limit,
                gb_per_s=rows * row_bytes / dt / 1e9, disk_bytes=None if d0 is None else d1 - d0,
                amplification=None if d0 is None else (d1 - d0) / max(1, delivered), said=said)


def train_epoch(x: Path, y: Path, cg: Path, room: int) -> Dict[str, Any]:
    "One epoch of a linear model in block order, cold: seconds and rows/s."
    import torch
    import fastai_memmap  # noqa: F401
    from fastai.basic_train import Learner
    from fastai_memmap import MemmapArray, MemmapItemList
    evict(MemmapArray.open(x).shard_files + MemmapArray.open(y).shard_files)
    set_room(cg, room)
    il = MemmapItemList.from_memmap(x).split_by_rand_pct(0.01, seed=0).label_from_memmap(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = il.databunch(bs=BS, num_workers="auto", shuffle="block", no_check=True)
    learn = Learner(data, torch.nn.Linear(ROW, 10), loss_func=torch.nn.CrossEntropyLoss())
    t0 = time.perf_counter()
    learn.fit(1)
    dt = time.perf_counter() - t0
    n = len(data.train_ds) + len(data.valid_ds)
    return dict(seconds=dt, rows_per_s=n / dt)


# ------------------------------------------------------------------------------------------ driver
def build_store(root: Path, gb: float) -> tuple:
    "Write x (rows of 1024 float32, value = row number) and y (int64 classes) under `root`, out of core."
    from fastai_memmap import MemmapWriter, save_memmap
    n = int(gb * 1e9) // (ROW * 4)
    step = 16384
    with MemmapWriter(root / "x", np.float32, (ROW,)) as w:
        for a in range(0, n, step):
            b = min(n, a + step)
            w.append(np.broadcast_to(np.arange(a, b, dtype=np.float32)[:, None], (b - a, ROW)))
    save_memmap(root / "y", (np.arange(n) % 10).astype(np.int64))
    return root / "x", root / "y", n


def inner(args: argparse.Namespace) -> Dict[str, Any]:
    "The measurements, in this process (already in the cgroup)."
    from fastai_memmap import MemmapArray
    from fastai_memmap.store.memory import memory_budget
    global BLKIO
    x, y, cg, room = Path(args.dir) / "x", Path(args.dir) / "y", Path(args.cgroup), int(args.room_gb * 1e9)
    BLKIO = Path(args.blkio) if args.blkio else None
    import fastai_memmap.data.items  # noqa: F401  (fastai and torch imported before the first limit)
    files = MemmapArray.open(x).shard_files
    set_room(cg, room)
    out: Dict[str, Any] = dict(budget=memory_budget(), room=room, store_bytes=sum(p.stat().st_size for p in files))
    evict(files)
    out["qd1"] = random_preads(files, 1, min(args.seconds, 4))
    evict(files)
    out["qd8"] = random_preads(files, 8, min(args.seconds, 4), seed=1)
    evict(files)
    out["seq"] = sequential_read(files, args.seconds)
    cases = []
    for order in args.orders.split(","):
        for workers in args.workers.split(","):
            w = workers if workers == "auto" else int(workers)
            secs = min(args.seconds, 3) if order == "fastai" else args.seconds
            cases.append(loader_case(x, y, order, w, secs, cg, room))
            print(_row(cases[-1], out), file=sys.stderr, flush=True)
    out["cases"] = cases
    if args.train:
        out["train"] = train_epoch(x, y, cg, room)
    return out


def _row(c: Dict[str, Any], d: Dict[str, Any]) -> str:
    ref = d["qd8"] if c["order"] != "block" else d["seq"] / (ROW * 4 + 8)
    amp = "?" if c["amplification"] is None else f"{c['amplification']:.2f}"
    return (f"| {c['order']:<6} | {c['workers']:>4} | {c['rows_per_s']:>10,.0f} | {c['gb_per_s']:6.3f} | "
            f"{c['rows_per_s'] / ref:6.2f} | {amp:>6} |")


def report(d: Dict[str, Any]) -> str:
    lines = [f"store {d['store_bytes'] / 1e9:.2f} GB; page cache room in the cgroup {d['room'] / 1e9:.2f} GB "
             f"(memory_budget() there: {d['budget'] / 1e9:.2f} GB; store / room {d['store_bytes'] / d['room']:.1f}x)",
             f"disk: random 4 KiB reads QD1 {d['qd1']:,.0f}/s, QD8 {d['qd8']:,.0f}/s; sequential {d['seq'] / 1e9:.2f} GB/s; "
             f"bytes read counted for the {d.get('disk_counter', '?')}",
             "",
             "| order  | workers | rows/s | GB/s | ratio | disk/delivered |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [_row(c, d) for c in d["cases"]]
    lines += ["", "ratio: rows/s over the QD8 random-read rate (random, fastai) or over the sequential bandwidth in rows "
              "(block). 'fastai' is fastai's own RandomSampler (RandomShuffle(readahead=False)), the state before."]
    said = sorted({s for c in d["cases"] for s in c["said"]})
    lines += [f"said: {s}" for s in said]
    if "train" in d:
        lines.append(f"train: one epoch, linear model, block order, 'auto': {d['train']['seconds']:.1f} s, "
                     f"{d['train']['rows_per_s']:,.0f} rows/s")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store-gb", type=float, default=2.5)
    p.add_argument("--room-gb", type=float, default=1.0,
                   help="page cache the cgroup leaves above the processes' own memory")
    p.add_argument("--seconds", type=float, default=8.0, help="per loader case")
    p.add_argument("--orders", default="random,fastai,block")
    p.add_argument("--workers", help="comma-separated num_workers values (default 0,auto,2; 0 with --small)")
    p.add_argument("--small", action="store_true", help="600 MB over 250 MB of room, 3 s per case, no training")
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--cgroup", help=argparse.SUPPRESS)
    p.add_argument("--blkio", help=argparse.SUPPRESS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.store_gb, args.room_gb, args.seconds, args.train = 0.6, 0.25, 3.0, False
    args.workers = args.workers or ("0" if args.small else "0,auto,2")
    if args.inner:
        out = inner(args)
        Path(args.json).write_text(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        x, y, n = build_store(Path(d), args.store_gb)
        cg = make_cgroup()
        if cg is None:
            return 0
        res = Path(d) / "result.json"
        blk = make_blkio_cgroup(cg.name, device_of(x))
        cmd = [sys.executable, __file__, "--inner", "--dir", d, "--cgroup", str(cg), "--room-gb", str(args.room_gb),
               "--blkio", str(blk or ""),
               "--json", str(res), "--seconds", str(args.seconds),
               "--orders", args.orders, "--workers", args.workers] + ([] if args.train else ["--no-train"])
        join = "; ".join(f"open({str(g / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))"
                         for g in (cg, blk) if g is not None)
        try:
            # the child joins the cgroup first, then runs this script's measurements
            rc = subprocess.call([sys.executable, "-c", f"{join}; import runpy, sys; sys.argv = {cmd[1:]!r}; "
                                  "runpy.run_path(sys.argv[0], run_name='__main__')"])
        finally:
            remove_cgroup(cg)
            if blk is not None:
                remove_cgroup(blk)
        if rc != 0:
            print(f"measurement process failed (exit {rc})", file=sys.stderr)
            return rc
        out = json.loads(res.read_text())
        out.update(rows=n, disk_counter="this process tree (blkio cgroup)" if blk else "whole machine (device stat)")
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
