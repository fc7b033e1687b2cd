"""Larger than RAM (issue 13): page-aligned shards, pread reads, the memory budget, the read strategy
chosen by ``databunch(shuffle=...)``, and the amplification measured under a real memory cgroup."""
import json
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastai_memmap  # noqa: F401
from fastai_memmap import MemmapArray, MemmapItemList, MemmapWriter, save_memmap
from fastai_memmap.data import random_order
from fastai_memmap.data import sampling
from fastai_memmap.cli.bench import evict, resident_fraction
from fastai_memmap.errors import ArgumentError, ArgumentTypeError, StoreChangedError
from fastai_memmap.store.format import DATA_ALIGN, MANIFEST_NAME, read_npy_header
from fastai_memmap.store.memory import cgroup_room, memory_budget
from fastai_memmap.data.random_order import InOrderSampler, RandomOrderSampler, RandomShuffle, ReadStrategyWarning
from fastai_memmap.store.readahead import StoreReadahead
from fastai_memmap.data.sampling import BlockShuffle, BlockShuffleSampler, fit_in_flight

ROOT = Path(__file__).resolve().parents[1]
N, D = 3000, 1024     # 4 KiB rows


def _fs_type(p: Path) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if str(p).startswith(mnt) and len(mnt) >= len(best):
                best, kind = mnt, fs
    return kind


@pytest.fixture
def disk_dir():
    "A directory on a disk-backed filesystem (the checkout), where the page cache can be observed."
    where = Path(__file__).parent
    if _fs_type(where) in ("tmpfs", "ramfs", "", "overlay"):
        pytest.skip(f"{where} is on {_fs_type(where) or 'an unknown filesystem'}: no page cache to observe")
    with tempfile.TemporaryDirectory(dir=where) as d:
        yield Path(d)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    "x: N rows of D float32 whose every value is the row number, 3 shards; y: int64 row % 7."
    root = tmp_path_factory.mktemp("big")
    x = np.repeat(np.arange(N, dtype=np.float32)[:, None], D, axis=1)
    save_memmap(root / "x", x, shard_rows=1100)
    save_memmap(root / "y", np.arange(N, dtype=np.int64) % 7)
    return root / "x", root / "y"


# ---------------------------------------------------------------- page-aligned shards
def test_new_shards_start_their_data_on_a_page_and_numpy_reads_them(stores, tmp_path):
    x = MemmapArray.open(stores[0])
    for f in x.shard_files:
        assert read_npy_header(f)[2] % DATA_ALIGN == 0
        np.testing.assert_array_equal(np.load(f, mmap_mode="r")[:, 0], np.load(f)[:, 0])
    for kind, data in (("dense", np.zeros((0, 3), np.float32)), ("ragged", [np.zeros(0, np.int32)])):
        p = save_memmap(tmp_path / kind, data, kind=kind)   # no data bytes: numpy's 64-byte alignment, mappable
        for f in MemmapArray.open(p).shard_files if kind == "dense" else sorted(p.glob("*.npy")):
            assert np.array_equal(np.load(f, mmap_mode="r"), np.load(f))   # mappable, even with no data bytes


def test_stores_written_before_page_alignment_still_open(stores, tmp_path):
    "A store whose shards were written with numpy's own 64-byte alignment reads the same."
    old = tmp_path / "old"
    old.mkdir()
    x = MemmapArray.open(stores[0])
    for f in x.shard_files:
        np.save(old / f.name, np.load(f))               # numpy's header: data at byte 128
        assert read_npy_header(old / f.name)[2] == 128
    (old / MANIFEST_NAME).write_bytes((stores[0] / MANIFEST_NAME).read_bytes())
    a = MemmapArray.open(old)
    idx = np.random.default_rng(0).integers(0, N, 500)
    assert a.read(idx).tobytes() == x.read(idx).tobytes()
    assert a.set_read_mode("pread").read(idx).tobytes() == x.read(idx).tobytes()


def _resident_pages(paths) -> int:
    sizes = [os.path.getsize(p) for p in paths]
    return round(resident_fraction(paths) * sum(-(-s // 4096) for s in sizes))


def test_a_cold_4k_row_costs_one_page_not_two(disk_dir):
    "The reason for page alignment: with data at byte 128 every 4 KiB row spans two pages."
    x = np.arange(64 * D, dtype=np.float32).reshape(64, D)
    new = MemmapArray.open(save_memmap(disk_dir / "new", x)).set_read_mode("pread")
    legacy = disk_dir / "legacy.npy"
    np.save(legacy, x)
    old = MemmapArray.open(legacy).set_read_mode("pread")
    for a in (new, old):
        evict(a.shard_files)
        assert _resident_pages(a.shard_files) == 0
        assert a.read([37])[0, 0] == 37 * D
    assert _resident_pages(new.shard_files) == 1
    assert _resident_pages(old.shard_files) == 2


# ---------------------------------------------------------------- pread reads
@settings(max_examples=60, deadline=None)
@given(idx=st.lists(st.integers(-N, N - 1), max_size=300))
def test_pread_reads_equal_mapped_reads(stores, idx):
    "Any rows, any order, duplicates, negative indices, across shards: byte for byte the same."
    a, b = MemmapArray.open(stores[0]), MemmapArray.open(stores[0]).set_read_mode("pread")
    assert b.read(idx).tobytes() == a.read(idx).tobytes()
    assert b[idx].tobytes() == a[idx].tobytes()


def test_pread_mode_survives_pickling_and_close(stores):
    b = MemmapArray.open(stores[0]).set_read_mode("pread")
    c = pickle.loads(pickle.dumps(b))
    assert c.read_mode == "pread" and c.read([5, 2000])[:, 0].tolist() == [5.0, 2000.0]
    b.read([1]); b.close()
    assert b.read([2999])[0, 0] == 2999.0            # descriptors reopen after close
    with pytest.raises(ArgumentError, match=r"read_mode: expected one of \('mmap', 'pread'\), found 'fast'"):
        b.set_read_mode("fast")


def test_pread_of_a_truncated_shard_is_a_typed_error(tmp_path):
    p = save_memmap(tmp_path / "s", np.ones((100, D), np.float32))
    a = MemmapArray.open(p).set_read_mode("pread")
    a.read([0])                                       # the descriptor is open on the validated file
    f = a.shard_files[0]
    os.truncate(f, os.path.getsize(f) - 3 * 4096)
    with pytest.raises(StoreChangedError, match=r"expected 4096 bytes at byte .* read 0; file truncated"):
        a.read([99])


def test_evict_hint_drops_rows_from_the_page_cache(disk_dir):
    a = MemmapArray.open(save_memmap(disk_dir / "s", np.ones((256, D), np.float32))).set_read_mode("pread")
    a.read(np.arange(256))
    assert resident_fraction(a.shard_files) > 0.9
    a.advise("evict", np.arange(128))
    assert 0.4 < resident_fraction(a.shard_files) < 0.6
    a.advise("evict")
    assert resident_fraction(a.shard_files) < 0.1


# ---------------------------------------------------------------- memory budget
def _v1(tmp_path, limit, rss, parent_limit=None):
    d = tmp_path / "memory" / "a" / "b"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.stat").write_text(f"cache 999\nrss {rss}\ntotal_rss {rss}\nmapped_file 7\ntotal_mapped_file 1000\n")
    if parent_limit is not None:
        (d.parent / "memory.limit_in_bytes").write_text(f"{parent_limit}\n")
        (d.parent / "memory.stat").write_text(f"total_rss {rss}\n")
    return "4:memory:/a/b\n3:cpu:/\n"


def test_cgroup_room_reads_v1_and_v2_limits_minus_anonymous_memory(tmp_path):
    assert cgroup_room(tmp_path, _v1(tmp_path, 2_000_000_000, 500_000_000)) == 1_500_000_000 - 1000
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("1000000000\n")
    (v2 / "job" / "memory.stat").write_text("anon 100000000\nfile 5\nfile_mapped 20\n")
    assert cgroup_room(v2, "0::/job\n") == 900_000_000 - 20
    (v2 / "job" / "memory.max").write_text("max\n")
    assert cgroup_room(v2, "0::/job\n") is None
    assert cgroup_room(tmp_path, "garbage") is None and cgroup_room(tmp_path / "none", "4:memory:/x\n") is None


def test_cgroup_room_takes_the_tightest_ancestor(tmp_path):
    text = _v1(tmp_path, 9223372036854771712, 100, parent_limit=5000)   # unlimited child, limited parent
    assert cgroup_room(tmp_path, text) == 5000 - 100 - 1000              # the child's rss + mapped files


def test_memory_budget_is_at_most_what_psutil_says_is_available():
    import psutil
    assert 0 < memory_budget() <= psutil.virtual_memory().available * 1.05


# ---------------------------------------------------------------- random order
def test_random_order_sampler_is_a_fresh_permutation_each_epoch_and_reads_ahead():
    asked = []
    s = RandomOrderSampler(1000, 64, seed=3, prefetch=lambda p: asked.append(np.sort(p)))
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == list(range(1000)) and e0 != e1
    assert RandomOrderSampler(1000, 64, seed=3).order(1).tolist() == e1          # pure function of (seed, epoch)
    batches = [np.sort(np.array(e1[i:i + 64])) for i in range(0, 1000, 64)]
    got = asked[len(asked) // 2:]                                               # the second epoch's
    assert len(got) == len(batches) and all((a == b).all() for a, b in zip(got, batches))


def test_random_order_is_uniform():
    "Where row 0 lands over 4000 epochs: no position range favoured (chi-square, 10 bins, p ~ 1e-4)."
    s = RandomOrderSampler(100, 10, seed=0)
    where = [int(np.flatnonzero(s.order(e) == 0)[0]) for e in range(4000)]
    counts = np.bincount(np.array(where) // 10, minlength=10)
    chi2 = ((counts - 400) ** 2 / 400).sum()
    assert chi2 < 33.7, counts


@pytest.mark.parametrize("kwargs, error", [(dict(readahead="yes"), ArgumentTypeError),
                                           (dict(batches_ahead=0), ArgumentError), (dict(seed=-1), ArgumentError)])
def test_random_shuffle_arguments(kwargs, error):
    with pytest.raises(error):
        RandomShuffle(**kwargs)


def _bunch(stores, **kw):
    il = MemmapItemList.from_memmap(stores[0]).split_by_idx(range(2800, N)).label_from_memmap(stores[1])
    return il.databunch(bs=100, num_workers=0, **kw)


def _epoch(data):
    xs, ys = zip(*[(xb[:, 0].long(), yb) for xb, yb in data.train_dl])
    return torch.cat(xs), torch.cat(ys)


def test_shuffle_true_keeps_fastais_sampler_when_the_stores_fit(stores):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReadStrategyWarning)
        data = _bunch(stores)
    assert isinstance(data.train_dl.dl.sampler, torch.utils.data.RandomSampler)
    assert data.train_ds.x.store.read_mode == "mmap"


def test_shuffle_true_over_stores_larger_than_memory_reads_ahead_with_pread(stores, monkeypatch):
    monkeypatch.setattr(random_order, "memory_budget", lambda: 4_000_000)       # x is 12 MB, y 24 kB
    with pytest.warns(ReadStrategyWarning, match=r"shuffle=True over 0.01 GB of stores, more than the 0.00 GB"):
        data = _bunch(stores)
    sampler = data.train_dl.dl.sampler
    assert isinstance(sampler, RandomOrderSampler) and sampler.batch_size == 100
    assert data.train_ds.x.store.read_mode == "pread" and data.train_ds.y.store.read_mode == "mmap"
    x, y = _epoch(data)
    assert sorted(x.tolist()) == list(range(2800)) and (y == x % 7).all()       # every row once, x and y aligned
    x2, _ = _epoch(data)
    assert x2.tolist() != x.tolist()


@pytest.mark.parametrize("shuffle", [True, "block"])
def test_validation_over_stores_larger_than_memory_reads_ahead_in_order(stores, monkeypatch, shuffle):
    "A random split scatters the validation rows as much as a random order: the same cliff, the same fix."
    for module in (random_order, sampling):
        monkeypatch.setattr(module, "memory_budget", lambda: 4_000_000)
    rows = np.random.default_rng(0).permutation(N)
    il = MemmapItemList.from_memmap(stores[0]).split_by_idx(rows[:300].tolist()).label_from_memmap(stores[1])
    with pytest.warns(ReadStrategyWarning):
        data = il.databunch(bs=64, num_workers=0, shuffle=shuffle)
    assert isinstance(data.valid_dl.dl.sampler, InOrderSampler)
    xs = torch.cat([xb[:, 0] for xb, _ in data.valid_dl]).long()
    assert xs.tolist() == [int(data.valid_ds.x.items[i]) for i in range(300)]     # fastai's order, every row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = il.databunch(bs=64, num_workers=0, shuffle=RandomShuffle(readahead=False))
    assert isinstance(plain.valid_dl.dl.sampler, torch.utils.data.SequentialSampler)


@pytest.mark.parametrize("readahead, expect", [(False, torch.utils.data.RandomSampler), (True, RandomOrderSampler)])
def test_random_shuffle_readahead_forced(stores, readahead, expect):
    data = _bunch(stores, shuffle=RandomShuffle(readahead=readahead, seed=1))
    assert isinstance(data.train_dl.dl.sampler, expect)
    x, _ = _epoch(data)
    assert sorted(x.tolist()) == list(range(2800))


@pytest.mark.parametrize("workers", [0, 2])
def test_pread_reads_in_dataloader_workers_are_exact(stores, monkeypatch, workers):
    monkeypatch.setattr(random_order, "memory_budget", lambda: 4_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        il = MemmapItemList.from_memmap(stores[0]).split_by_idx(range(2800, N)).label_from_memmap(stores[1])
        data = il.databunch(bs=100, num_workers=workers)
    x, y = _epoch(data)
    assert sorted(x.tolist()) == list(range(2800)) and (y == x % 7).all()


# ---------------------------------------------------------------- block order under memory pressure
@pytest.mark.parametrize("limit", [10 ** 12, 256 << 20, 40 << 20, 5 << 20, 1])
def test_fit_in_flight_keeps_the_bytes_in_flight_under_the_limit(limit):
    ahead, wb, br = fit_in_flight(limit, 4096, 4096, 8)
    assert br * 4096 <= 4 << 20 and 1 <= wb <= 8 and ahead >= 1
    if limit >= 10 * (4 << 20):
        assert (ahead + 2) * wb * br * 4096 <= limit
    if limit == 10 ** 12:
        assert (ahead, wb) == (1, 8)          # 8 blocks queued: one window of 8 blocks ahead


def test_block_order_over_stores_larger_than_memory_drops_consumed_windows(stores, monkeypatch):
    monkeypatch.setattr(sampling, "memory_budget", lambda: 8_000_000)   # x is 12 MB
    dropped = []
    real = StoreReadahead.drop
    monkeypatch.setattr(StoreReadahead, "drop", lambda self, p: (dropped.append(np.sort(p)), real(self, p)))
    with pytest.warns(ReadStrategyWarning, match=r"shuffle='block' over .* windows of \d+ x 4.0 MiB, \d+ ahead"):
        data = _bunch(stores, shuffle=BlockShuffle(seed=0))
    s = data.train_dl.dl.sampler
    assert isinstance(s, BlockShuffleSampler) and s.drop_consumed and s.block_rows == 1024
    assert s.prefetch.early == "willneed" and s.prefetch.hint is None and s.prefetch.evict
    x, y = _epoch(data)
    assert sorted(x.tolist()) == list(range(2800)) and (y == x % 7).all()
    assert dropped and len(np.concatenate(dropped)) < 2800      # consumed windows, not the last (lag 1)


# ---------------------------------------------------------------- measured under a memory cgroup
def test_amplification_under_a_memory_cgroup(tmp_path):
    """400 MB store, 150 MB of page cache room: bytes read from the disk per byte delivered. fastai's
    own sampler is the control (it read ~1,100 bytes per byte here): the measurement sees the cliff."""
    out = tmp_path / "r.json"
    env = {**os.environ, "BENCH_DIR": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_larger_than_ram.py"), "--small",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if not out.exists():
        pytest.skip(f"no memory cgroup here: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}")
    d = json.loads(out.read_text())
    print(p.stdout)
    amp = {c["order"]: c["amplification"] for c in d["cases"]}
    if any(v is None for v in amp.values()):
        pytest.skip("no block device counters for the store's filesystem")
    assert amp["fastai"] > 5, amp                      # the control: readahead windows evicted before use
    # block order: 1.03-1.09 alone on the machine; a window read ahead can be evicted before use when
    # other processes hold the CPUs (1.23 seen with two test runs beside it): a guard against the cliff,
    # the figure itself is the benchmark's to report
    assert amp["random"] <= 1.1 and amp["block"] <= 1.35, amp
    said = " ".join(s for c in d["cases"] for s in c["said"])
    assert "shuffle=True over" in said and "shuffle='block' over" in said
