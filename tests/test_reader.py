"""Tests of the reader (fastai_memmap.store.reader.MemmapArray): indexing semantics against numpy on real
stores, owned results, bare .npy files, pickling across processes, the open-map bound, verify()."""
import mmap
import multiprocessing as mp
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from fastai_memmap import MemmapArray, MemmapWriter, open_memmap, save_memmap
from fastai_memmap.errors import (ChecksumError, MemmapError, RowIndexError, RowIndexTypeError, StoreChangedError,
                                  TruncatedStoreError)

from store_data import DTYPES, item_shapes, make_data


def assert_owned(r):
    "`r` is a plain, writable ndarray that does not view a file map."
    assert type(r) is np.ndarray and r.flags.writeable
    b = r
    while b is not None:
        assert not isinstance(b, (np.memmap, mmap.mmap))
        b = getattr(b, "base", None)


def same(r, expect):
    "Same dtype, shape and bytes (NaN payloads included), and `r` is owned."
    expect = np.asarray(expect)
    assert r.dtype == expect.dtype and r.shape == expect.shape
    assert r.tobytes() == expect.tobytes()
    assert_owned(r)


def check_reads(a, x, rng):
    "Every kind of index on `a` gives what numpy gives on `x`."
    n = len(x)
    assert len(a) == n and a.shape == x.shape and a.dtype == x.dtype and a.ndim == x.ndim
    assert a.nbytes == x.nbytes
    same(a[:], x)
    for i in ([0, n - 1, -1, -n] + rng.integers(-n, n, 5).tolist()) if n else []:
        same(a[i], x[i, ...])
        same(a[np.int64(i)], x[i, ...])
    for _ in range(6):
        lo, hi = rng.integers(-n - 2, n + 3, 2).tolist()
        step = int(rng.choice([1, 2, 3, -1, -2, n + 1]))
        for sl in (slice(lo, hi, step), slice(None, None, step), slice(lo, None), slice(None, hi, -step)):
            same(a[sl], x[sl])
    if n:
        idx = rng.integers(-n, n, 2 * n + 3)             # unsorted, duplicates, negatives
        same(a[idx], x[idx])
        same(a[idx.tolist()], x[idx])
        same(a[np.abs(idx).astype(np.uint16) % n], x[np.abs(idx) % n])
        same(a.read(idx), x[idx])
        out = np.empty((len(idx),) + x.shape[1:], x.dtype)
        assert a.read(idx, out=out) is out and out.tobytes() == x[idx].tobytes()
    same(a[[]], x[np.zeros(0, int)])
    mask = rng.random(n) < 0.4
    same(a[mask], x[mask])
    same(a[mask.tolist()], x[mask])
    same(a[np.ones(n, bool)], x)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), item_shape=item_shapes, rows=st.sampled_from([0, 1, 2, 7, 33]),
       shard_rows=st.integers(1, 34), seed=st.integers(0, 2 ** 32 - 1))
@example(dtype=">f4", item_shape=(), rows=7, shard_rows=3, seed=0)   # scalar rows keep their byte order
@example(dtype="f8", item_shape=(2, 0), rows=33, shard_rows=5, seed=1)
def test_indexing_matches_numpy(dtype, item_shape, rows, shard_rows, seed):
    x = make_data(dtype, (rows,) + item_shape, seed)
    with tempfile.TemporaryDirectory() as d:
        with MemmapWriter(Path(d) / "s", dtype, item_shape, shard_rows=shard_rows) as w:
            w.append(x)
        a = MemmapArray.open(Path(d) / "s")
        assert len(a.shard_files) == max(1, -(-rows // shard_rows))
        check_reads(a, x, np.random.default_rng(seed))
        check_reads(pickle.loads(pickle.dumps(a)), x, np.random.default_rng(seed + 1))


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(DTYPES + [">i2", ">c16"]), item_shape=item_shapes, rows=st.sampled_from([0, 1, 5, 20]),
       seed=st.integers(0, 2 ** 32 - 1))
@example(dtype=">i2", item_shape=(), rows=5, seed=0)
def test_bare_npy_opens_as_one_shard_store(dtype, item_shape, rows, seed):
    x = make_data(dtype, (rows,) + item_shape, seed)
    with tempfile.TemporaryDirectory() as d:
        fp = Path(d) / "plain array.npy"           # any file name, not only shard-like ones
        np.save(fp, x)
        for a in (MemmapArray.open(fp), open_memmap(str(fp))):
            assert a.shard_files == [fp] and a.meta == {}
            assert a.verify(allow_unchecked=True) == [   # no checksum in a bare .npy: size-checked only
                {"file": fp.name, "bytes_hashed": 0, "checksum": None, "status": "unchecked"}]
            check_reads(a, x, np.random.default_rng(seed))
        b = pickle.loads(pickle.dumps(a))
        same(b[:], x)


def test_zero_size_rows_of_a_huge_store_slice_in_constant_memory(tmp_path):
    "10**12 rows of shape (0,): slicing must not build an index of all rows (8 TB)."
    with MemmapWriter(tmp_path / "z", np.float32, (0,)) as w:
        w.append(np.empty((10 ** 12, 0), np.float32))
    a = MemmapArray.open(tmp_path / "z")
    assert a.shape == (10 ** 12, 0) and a.nbytes == 0
    assert a[5:7].shape == (2, 0) and a[-3:].shape == (3, 0) and a[::10 ** 11].shape == (10, 0)
    assert a[10 ** 12 - 1].shape == (0,)
    assert a[[0, 10 ** 12 - 1, 5]].shape == (3, 0)


def test_properties_and_repr(tmp_path):
    x = np.arange(24, dtype=np.int16).reshape(4, 2, 3)
    save_memmap(tmp_path / "s", x, shard_rows=3, meta={"layout": "CHW"})
    a = MemmapArray.open(tmp_path / "s" / "manifest.json")   # the manifest path opens the store too
    assert (a.shape, a.ndim, a.item_shape, a.dtype, a.nbytes) == ((4, 2, 3), 3, (2, 3), np.dtype("i2"), 48)
    assert a.meta == {"layout": "CHW"}
    assert [f.name for f in a.shard_files] == ["shard-000000.npy", "shard-000001.npy"]
    assert "4 rows of (2, 3) int16" in repr(a) and "2 shard(s)" in repr(a)
    a.close()
    same(a[:], x)                                  # maps reopen after close()


# ---------------------------------------------------------------- index errors
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    p = save_memmap(tmp_path_factory.mktemp("small") / "s", x, shard_rows=4)
    return MemmapArray.open(p), x


BAD_INDEX = [
    ("int past end", 10, RowIndexError, IndexError),
    ("int before start", -11, RowIndexError, IndexError),
    ("np.int64 past end", np.int64(10), RowIndexError, IndexError),
    ("huge int", 2 ** 70, RowIndexError, IndexError),
    ("array past end", np.array([0, 10]), RowIndexError, IndexError),
    ("array before start", [3, -11], RowIndexError, IndexError),
    ("uint64 wrapping negative", np.array([2 ** 64 - 1], dtype=np.uint64), RowIndexError, IndexError),
    ("mask too short", np.ones(9, bool), RowIndexError, IndexError),
    ("2-D mask", np.ones((10, 1), bool), RowIndexError, IndexError),
    ("float", 1.5, RowIndexTypeError, TypeError),
    ("np.float64", np.float64(1), RowIndexTypeError, TypeError),
    ("float array", np.array([0.0, 1.0]), RowIndexTypeError, TypeError),
    ("float list", [0.5], RowIndexTypeError, TypeError),
    ("float slice bound", slice(0.5, 3), RowIndexTypeError, TypeError),
    ("string", "3", RowIndexTypeError, TypeError),
    ("None", None, RowIndexTypeError, TypeError),
    ("tuple", (1, 2), RowIndexTypeError, TypeError),
    ("tuple with slice", (slice(None), 0), RowIndexTypeError, TypeError),
    ("2-D int array", np.array([[0, 1], [2, 3]]), RowIndexTypeError, TypeError),
]


@pytest.mark.parametrize("key,error,builtin", [c[1:] for c in BAD_INDEX], ids=[c[0] for c in BAD_INDEX])
def test_bad_index_refused(small, key, error, builtin):
    a, _ = small
    with pytest.raises(error) as ei:
        a[key]
    assert isinstance(ei.value, builtin) and isinstance(ei.value, MemmapError)
    assert str(a.path) in str(ei.value)


def test_empty_store_has_no_rows(tmp_path):
    a = MemmapArray.open(save_memmap(tmp_path / "e", np.zeros((0, 2), np.uint8)))
    assert a.shape == (0, 2) and a[:].shape == (0, 2) and a[[]].shape == (0, 2)
    for key in (0, -1, [0]):
        with pytest.raises(RowIndexError):
            a[key]


def test_read_out_of_wrong_shape_refused(small):
    a, _ = small
    with pytest.raises(RowIndexError, match="expected out"):
        a.read([1, 2], out=np.empty((3, 3), np.float32))


# ---------------------------------------------------------------- pickling and processes
def _make(path, mb, name):
    rows = mb * (1 << 20) // 256
    x = (np.arange(rows * 64, dtype=np.uint32) * 2654435761).astype(np.float32).reshape(rows, 64)
    return MemmapArray.open(save_memmap(path / name, x, shard_rows=rows // 3 + 1)), x


def test_pickle_is_small_and_independent_of_data_size(tmp_path):
    a1, x1 = _make(tmp_path, 1, "a01")
    a50, _ = _make(tmp_path, 50, "a50")
    a1[:], a50[::1000]                              # maps open: they must not be pickled
    p1, p50 = pickle.dumps(a1), pickle.dumps(a50)
    assert len(p1) < 2048 and len(p50) < 2048
    assert abs(len(p1) - len(p50)) < 16             # only the row counts' digits differ
    b = pickle.loads(p1)
    same(b[:], x1)
    assert b.manifest == a1.manifest and b.path == a1.path


def _child_read(a, q):
    idx = np.arange(len(a))[::-7]
    q.put((a[:].tobytes(), a[idx].tobytes(), pickle.loads(pickle.dumps(a))[5].tobytes()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_read_in_child_process(tmp_path, method):
    a, x = _make(tmp_path, 1, "s")
    a[0]                                            # the parent has a map open before the fork
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(a, q))
    p.start()
    try:
        whole, gathered, row5 = q.get(timeout=60)
    finally:
        p.join(60)
    assert p.exitcode == 0
    assert whole == x.tobytes() and gathered == x[::-7].tobytes() and row5 == x[5].tobytes()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_open_maps_bounded_by_max_open(tmp_path):
    x = np.arange(100 * 16, dtype=np.int64).reshape(100, 16)
    p = save_memmap(tmp_path / "many", x, shard_rows=1)
    assert len(list(p.glob("shard-*.npy"))) == 100
    before = _fd_count()
    a = MemmapArray.open(p, max_open=8)
    assert _fd_count() == before                    # opening maps nothing
    same(a[:], x)
    assert _fd_count() - before <= 8
    for i in range(99, -1, -1):                     # every shard again, reverse order: evict and remap
        same(a[i], x[i])
        assert _fd_count() - before <= 8
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 100, 300)
    same(a[idx], x[idx])
    assert 0 < _fd_count() - before <= 8
    a.close()
    assert _fd_count() == before


# ---------------------------------------------------------------- verify and changed files
def test_verify_intact_and_flipped_byte(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    p = save_memmap(tmp_path / "s", x, shard_rows=4)
    a = MemmapArray.open(p)
    a.verify()
    a.verify(progress=True)
    shard = p / "shard-000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01                                 # one bit of the data, header untouched
    shard.write_bytes(bytes(raw))
    b = MemmapArray.open(p)                         # open does not read data
    with pytest.raises(ChecksumError) as ei:
        b.verify()
    assert isinstance(ei.value, ValueError) and str(shard) in str(ei.value)
    assert "expected checksum sha256:" in str(ei.value) and "found sha256:" in str(ei.value)


def test_shard_truncated_after_open(tmp_path):
    p = save_memmap(tmp_path / "s", np.arange(40, dtype=np.float64).reshape(10, 4), shard_rows=4)
    a = MemmapArray.open(p)
    shard = p / "shard-000002.npy"
    os.truncate(shard, shard.stat().st_size - 8)
    a[0]                                            # other shards still read
    with pytest.raises(StoreChangedError) as ei:
        a[9]
    assert isinstance(ei.value, OSError) and str(shard) in str(ei.value)
    with pytest.raises(TruncatedStoreError, match="truncated"):
        a.verify()
