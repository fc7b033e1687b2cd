"""Ragged stores (fastai_memmap.store.ragged) and their item lists (ragged_items, padding): round trips
against the source items, plain-numpy readability, malformed offsets refused with typed errors,
padding and bucketing, a learner on padded batches."""
import json
from collections import Counter
import multiprocessing as mp
import pickle
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_train import Learner, load_learner
from fastai_memmap import MemmapArray, MemmapItemList, MemmapWriter, save_memmap
from fastai_memmap.errors import (ArgumentError, ArgumentTypeError, FormatError, ItemShapeError, LabelError,
                                  LossyCastError, MemmapError, OffsetsError, RowIndexError, RowIndexTypeError,
                                  ShardMismatchError, StoreNotFoundError, TruncatedStoreError, WriterStateError)
from fastai_memmap.store.format import MANIFEST_NAME, read_npy_header
from fastai_memmap.data.padding import BucketSampler, RaggedCollate, RaggedDataBunch, pad_ragged
from fastai_memmap.store.ragged import RaggedArray, RaggedWriter, check_offsets, ragged_ranges
from fastai_memmap.data.ragged_items import RaggedItem, RaggedItemList, RaggedProcessor



DTYPES = ["?", "i1", "i4", "u2", "i8", "f2", "f4", "f8", "c8", ">f4", ">i2"]
trailing_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple)


def make_items(dtype, trailing, lengths, seed):
    "Random items of `dtype` (raw bytes: NaNs and all), item i of shape (lengths[i], *trailing)."
    rng, dt = np.random.default_rng(seed), np.dtype(dtype)
    out = []
    for n in lengths:
        shape = (n,) + trailing
        if dt.kind == "b":
            out.append(rng.integers(0, 2, shape).astype(dt))
        else:
            out.append(rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape))
    return out


def assert_owned(r):
    "`r` is a writable ndarray whose buffer chain holds no file map."
    assert type(r) is np.ndarray and r.flags.writeable
    b = r
    while b is not None:
        assert not isinstance(b, np.memmap)
        b = getattr(b, "base", None)


def same(r, expect):
    assert r.dtype == expect.dtype and r.shape == expect.shape and r.tobytes() == expect.tobytes()
    assert_owned(r)


def check_store(a, items, rng):
    "Every way of reading `a` gives `items`, byte for byte."
    n = len(items)
    assert len(a) == n and a.nelements == sum(len(x) for x in items)
    assert a.lengths().tolist() == [len(x) for x in items]
    for i in list(range(n)) + [-1, -n] if n else []:
        same(a[i], items[i])
    if n:
        idx = rng.integers(-n, n, 2 * n + 3)                 # unsorted, duplicates, negatives
        for got, i in zip(a[idx], idx):
            same(got, items[i])
        data, lengths = a.gather(idx)
        assert lengths.tolist() == [len(items[i]) for i in idx]
        expect = np.concatenate([items[i] for i in idx]).astype(a.dtype)   # concatenate drops '>'
        same(data, expect)
        assert a.lengths(idx).tolist() == lengths.tolist()
        mask = rng.random(n) < 0.5
        assert [x.tobytes() for x in a[mask]] == [items[i].tobytes() for i in np.flatnonzero(mask)]
    assert [x.tobytes() for x in a[::-2]] == [x.tobytes() for x in items[::-2]]
    assert a[[]] == [] and a.gather([])[0].shape == (0,) + a.trailing_shape


# ---------------------------------------------------------------- round trips
@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(DTYPES), trailing=trailing_shapes,
       lengths=st.lists(st.integers(0, 6), max_size=25), shard_rows=st.integers(1, 30),
       shard_bytes=st.sampled_from([1, 17, 64, 1 << 30]), seed=st.integers(0, 2 ** 32 - 1))
@example(dtype="f4", trailing=(), lengths=[0, 0, 0], shard_rows=2, shard_bytes=1 << 30, seed=0)   # all empty
@example(dtype="i8", trailing=(2,), lengths=[], shard_rows=1, shard_bytes=8, seed=0)              # no items
def test_round_trip(dtype, trailing, lengths, shard_rows, shard_bytes, seed):
    items = make_items(dtype, trailing, lengths, seed)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        with MemmapWriter(Path(d) / "s", dtype, trailing, kind="ragged", shard_rows=shard_rows,
                          shard_bytes=shard_bytes) as w:
            assert isinstance(w, RaggedWriter)
            cut = sorted(rng.integers(0, len(items) + 1, 3).tolist())    # several appends, some empty
            for a, b in zip([0] + cut, cut + [len(items)]):
                if rng.random() < 0.5:
                    w.append(items[a:b])
                else:
                    part = items[a:b]
                    flat = np.concatenate(part) if part else np.zeros((0,) + trailing, dtype)
                    w.append_flat(flat, [len(x) for x in part])
        a = MemmapArray.open(Path(d) / "s")
        assert isinstance(a, RaggedArray) and a.dtype == np.dtype(dtype) and a.trailing_shape == trailing
        assert all(s.rows <= shard_rows for s in a.manifest.shards)
        row_bytes = int(np.prod(trailing)) * np.dtype(dtype).itemsize
        assert all(s.length * row_bytes <= shard_bytes or s.rows == 1 for s in a.manifest.shards)
        check_store(a, items, rng)
        check_store(pickle.loads(pickle.dumps(a)), items, rng)
        a.verify()


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), max_size=12), seed=st.integers(0, 1000))
def test_save_memmap_conversions(lengths, seed):
    items = make_items("u2", (3,), lengths, seed)
    with tempfile.TemporaryDirectory() as d:
        obj = np.empty(len(items), object)
        obj[:] = items
        for name, data, kw in [("list", items, dict(kind="ragged")), ("gen", iter(items), dict(kind="ragged", dtype="u2", item_shape=(3,))),
                               ("object array", obj, dict(batch_rows=4))]:
            if not items and name != "gen":     # nothing to infer the dtype from (see test_empty_iterable_needs_dtype)
                continue
            a = MemmapArray.open(save_memmap(Path(d) / name, data, **kw))
            check_store(a, items, np.random.default_rng(seed))


def test_empty_iterable_needs_dtype(tmp_path):
    with pytest.raises(ArgumentError, match="expected items or a dtype, found an empty iterable"):
        save_memmap(tmp_path / "e", [], kind="ragged")
    a = MemmapArray.open(save_memmap(tmp_path / "e", [], kind="ragged", dtype="f4", item_shape=(2,)))
    assert len(a) == 0 and a.trailing_shape == (2,) and a.lengths().shape == (0,)


def test_readable_with_plain_numpy_and_manifest_follows_spec(tmp_path):
    items = [np.arange(i * 2, dtype="<i4").reshape(i, 2) for i in (3, 0, 5, 1)]
    p = save_memmap(tmp_path / "r", items, kind="ragged", shard_rows=3, meta={"what": "pairs"})
    d = json.loads((p / MANIFEST_NAME).read_text())
    assert (d["kind"], d["dtype"], d["item_shape"], d["rows"], d["meta"]) == ("ragged", "<i4", [2], 4, {"what": "pairs"})
    got = []
    for s in d["shards"]:
        assert set(s) == {"file", "offsets", "rows", "length", "checksum", "offsets_checksum"}
        assert s["file"].endswith(".data.npy") and s["offsets"].endswith(".offsets.npy")
        data, offsets = np.load(p / s["file"]), np.load(p / s["offsets"])
        assert offsets.dtype == np.dtype("<i8") and offsets.shape == (s["rows"] + 1,) and offsets[0] == 0
        assert offsets[-1] == s["length"] == len(data)
        got += [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        assert read_npy_header(p / s["file"])[2] % 64 == 0
    assert [g.tobytes() for g in got] == [x.tobytes() for x in items]
    assert "4 items of (?, 2) int32" in repr(MemmapArray.open(p))


def test_ragged_ranges():
    assert ragged_ranges([5, 0, 9], [2, 0, 3]).tolist() == [5, 6, 9, 10, 11]
    assert ragged_ranges([], []).dtype == np.int64


def test_shard_bytes_never_splits_an_item(tmp_path):
    items = [np.zeros(n, "f8") for n in (1, 10, 1, 1, 1, 1)]    # 8-byte elements, 32-byte shards
    a = MemmapArray.open(save_memmap(tmp_path / "r", items, kind="ragged", shard_bytes=32))
    assert [s.length for s in a.manifest.shards] == [1, 10, 4]  # the 80-byte item alone
    assert a.lengths().tolist() == [1, 10, 1, 1, 1, 1]


# ---------------------------------------------------------------- writer errors
@pytest.mark.parametrize("call,match", [
    (lambda w: w.append([np.zeros((2, 3), "f4")]), r"expected items of shape \(\?, 2\) .*found \(2, 3\)"),
    (lambda w: w.append([np.zeros(2, "f4")]), r"expected items of shape"),
    (lambda w: w.append([np.full((2, 2), 1j, "c8")]), r"item 1: row 0: expected values that float32 holds exactly"),
    (lambda w: w.append([np.array([["a", "b"]])]), r"expected numeric values castable to float32, found dtype <U1"),
    (lambda w: w.append_flat(np.full((1, 2), 1e300), [1]), r"row 0: expected values that float32 holds exactly"),
    (lambda w: w.append_flat(np.zeros((4, 2)), [1, 2]), r"sum\(lengths\) = 3 rows, found 4"),
    (lambda w: w.append_flat(np.zeros((4, 2)), [5, -1]), "lengths >= 0"),
    (lambda w: w.append_flat(np.zeros((4, 2)), [[4]]), "1-d integer array"),
])
def test_bad_items_refused_and_nothing_written(tmp_path, call, match):
    with pytest.raises(ItemShapeError, match=match):
        with MemmapWriter(tmp_path / "r", "f4", (2,), kind="ragged") as w:
            w.append([np.zeros((1, 2))])
            call(w)
    assert not (tmp_path / "r").exists()


def test_unknown_kind_refused(tmp_path):
    with pytest.raises(ValueError, match="expected one of 'dense', 'ragged', 'sparse', found 'jagged'"):
        MemmapWriter(tmp_path / "x", "f4", kind="jagged")
    with pytest.raises(ValueError, match="expected 'dense', 'ragged' or 'sparse'"):
        save_memmap(tmp_path / "x", [np.zeros(2)], kind="jagged")


# ---------------------------------------------------------------- malformed stores
S0, O0, O1 = "shard-000000.data.npy", "shard-000000.offsets.npy", "shard-000001.offsets.npy"


def _edit_offsets(fp, fn):
    "Rewrite the values of offsets file `fp` in place (same header, same size)."
    o = np.load(fp)
    fn(o)
    offset = read_npy_header(fp)[2]
    raw = bytearray(fp.read_bytes())
    raw[offset:] = o.astype("<i8").tobytes()
    fp.write_bytes(bytes(raw))


def _edit_manifest(store, fn):
    d = json.loads((store / MANIFEST_NAME).read_text())
    fn(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


def _set_shard(i, key, value):
    return lambda s: _edit_manifest(s, lambda d: d["shards"][i].__setitem__(key, value))


# store: 2 shards of 3 items, lengths (2, 0, 3 | 1, 4, 0), int16
MALFORMED = [
    ("decreasing offsets", lambda s: _edit_offsets(s / O1, lambda o: o.__setitem__(2, 0)), OffsetsError, O1,
     "non-decreasing"),
    ("offset past data end", lambda s: _edit_offsets(s / O0, lambda o: o.__setitem__(2, 99)), OffsetsError, O0,
     r"in \[0, 5\].*offsets\[2\] = 99"),
    ("negative offset", lambda s: _edit_offsets(s / O0, lambda o: o.__setitem__(1, -4)), OffsetsError, O0,
     r"offsets\[1\] = -4"),
    ("negative first offset", lambda s: _edit_offsets(s / O0, lambda o: o.__setitem__(0, -1)), OffsetsError, O0,
     r"offsets\[0\] == 0, found -1"),
    ("last offset != data length", lambda s: _edit_offsets(s / O1, lambda o: o.__setitem__(3, 4)), OffsetsError,
     O1, r"offsets\[3\] == 5 .*found 4"),
    ("offsets of another dtype", lambda s: np.save(s / O0, np.array([0, 2, 2, 5], "<i4")), ShardMismatchError, O0,
     "expected"),
    ("offsets with a row too many", lambda s: np.save(s / O0, np.array([0, 2, 2, 5, 5], "<i8")),
     ShardMismatchError, O0, "expected"),
    ("data truncated", lambda s: (s / S0).write_bytes((s / S0).read_bytes()[:-2]), TruncatedStoreError, S0,
     "truncated"),
    ("offsets file missing", lambda s: (s / O1).unlink(), StoreNotFoundError, O1, "not found"),
    ("length != data rows", _set_shard(0, "length", 6), ShardMismatchError, S0, "expected"),
    ("manifest without offsets", lambda s: _edit_manifest(s, lambda d: d["shards"][0].pop("offsets")),
     FormatError, MANIFEST_NAME, "expected 'offsets'"),
    ("manifest without length", lambda s: _edit_manifest(s, lambda d: d["shards"][0].pop("length")),
     FormatError, MANIFEST_NAME, "'length'"),
    ("values in a ragged store", _set_shard(0, "values", "v.npy"), FormatError, MANIFEST_NAME,
     "expected no 'values'"),
    ("offsets file escaping the store", _set_shard(0, "offsets", "../" + O0), MemmapError, MANIFEST_NAME,
     "bare file name"),
    ("offsets and data the same file", _set_shard(0, "offsets", S0), FormatError, MANIFEST_NAME, "distinct"),
    ("bad offsets checksum string", _set_shard(1, "offsets_checksum", "md5:0"), FormatError, MANIFEST_NAME,
     "sha256"),
]


def _store(tmp_path):
    items = [np.arange(n, dtype="<i2") for n in (2, 0, 3, 1, 4, 0)]
    return save_memmap(tmp_path / "store", items, kind="ragged", shard_rows=3), items


@pytest.mark.parametrize("mutate,error,named,pattern", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_store_refused_at_open(tmp_path, mutate, error, named, pattern):
    store, _ = _store(tmp_path)
    MemmapArray.open(store)
    mutate(store)
    with pytest.raises(error, match=pattern) as ei:
        MemmapArray.open(store)
    assert isinstance(ei.value, ValueError if error is not StoreNotFoundError else FileNotFoundError)
    assert str(store / named) in str(ei.value)
    if error is not StoreNotFoundError:
        assert "expected" in str(ei.value) and "found" in str(ei.value)


def test_lazy_validation_checks_a_shard_before_its_first_read(tmp_path):
    store, items = _store(tmp_path)
    _edit_offsets(store / O1, lambda o: o.__setitem__(2, 0))
    a = MemmapArray.open(store, validate="lazy")         # O(shards) only: the bad offsets are not read yet
    same(a[0], items[0])                                  # shard 0 is fine
    with pytest.raises(OffsetsError, match="non-decreasing") as ei:
        a[4]
    assert str(store / O1) in str(ei.value)
    with pytest.raises(OffsetsError):
        a.lengths()
    with pytest.raises(OffsetsError):
        MemmapArray.open(store).verify()
    with pytest.raises(ValueError, match="validate"):
        MemmapArray.open(store, validate="never")


def test_check_offsets_in_chunks(monkeypatch):
    import fastai_memmap.store.ragged as ragged
    monkeypatch.setattr(ragged, "OFFSETS_CHECK_CHUNK", 3)
    o = np.arange(11, dtype=np.int64)
    check_offsets(o, 10, "f")
    o[6] = 4                                               # a decrease across a chunk boundary
    with pytest.raises(OffsetsError, match=r"offsets\[5\] = 5 > offsets\[6\] = 4"):
        check_offsets(o, 10, "f")


BAD_INDEX = [(6, RowIndexError), (-7, RowIndexError), ([0, 6], RowIndexError), (np.ones(5, bool), RowIndexError),
             (1.0, RowIndexTypeError), ("1", RowIndexTypeError), ((1, 2), RowIndexTypeError), (None, RowIndexTypeError),
             (np.array([0.5]), RowIndexTypeError), (slice(0.5, 2), RowIndexTypeError)]


@pytest.mark.parametrize("key,error", BAD_INDEX, ids=[repr(k)[:20] for k, _ in BAD_INDEX])
def test_bad_row_index_refused(tmp_path, key, error):
    a = MemmapArray.open(_store(tmp_path)[0])
    with pytest.raises(error) as ei:
        a[key]
    assert str(a.path) in str(ei.value)


# ---------------------------------------------------------------- processes
CHILD = textwrap.dedent("""
    import sys, pickle
    import fastai_memmap.store                         # numpy only: imports neither torch nor fastai
    a = pickle.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps([x.tobytes() for x in a[::-1]]))
""")


def _child_items(a, q):
    q.put([x.tobytes() for x in a[::-1]])


def test_pickle_small_and_read_in_other_processes(tmp_path):
    store, items = _store(tmp_path)
    a = MemmapArray.open(store)
    a[0]                                                  # maps open: not pickled
    blob = pickle.dumps(a)
    assert len(blob) < 4096
    expect = [x.tobytes() for x in items[::-1]]
    r = subprocess.run([sys.executable, "-c", CHILD, str(Path(fastai_memmap.__file__).parent)], input=blob,
                       capture_output=True, timeout=60)      # a fresh interpreter, as a spawned worker
    assert r.returncode == 0, r.stderr.decode()
    assert pickle.loads(r.stdout) == expect
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_items, args=(a, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and got == expect


# ---------------------------------------------------------------- padding
def manual_pad(items, pad_value, pad_first, dtype):
    width = max([len(x) for x in items] + [0])
    out = []
    for x in items:
        pad = np.full((width - len(x),) + x.shape[1:], pad_value, x.dtype)
        out.append(np.concatenate([pad, x] if pad_first else [x, pad]))
    return torch.from_numpy(np.stack(out).astype(dtype)) if out else None


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=9), trailing=st.sampled_from([(), (2,)]),
       pad_first=st.booleans(), pad_value=st.sampled_from([0, 1, -3]), integer=st.booleans(), seed=st.integers(0, 99))
def test_pad_ragged_equals_manual_padding(lengths, trailing, pad_first, pad_value, integer, seed):
    items = make_items("i4" if integer else "f4", trailing, lengths, seed)
    items = [np.nan_to_num(x) for x in items]
    flat = np.concatenate(items)
    dtype = np.int64 if integer else np.float32
    expect = manual_pad(items, pad_value, pad_first, dtype)
    x, n = pad_ragged(flat, np.array(lengths), pad_value, pad_first, "lengths")
    assert x.dtype == (torch.int64 if integer else torch.float32) and torch.equal(x, expect)
    assert n.tolist() == lengths
    x2, mask = pad_ragged(flat, np.array(lengths), pad_value, pad_first, "mask")
    assert torch.equal(x2, expect) and mask.dtype == torch.bool and mask.shape == x.shape[:2]
    assert (~mask).sum(1).tolist() == lengths                      # True marks padding
    assert torch.equal(mask, manual_pad([np.zeros(k, bool) for k in lengths], True, pad_first, bool))
    assert torch.equal(pad_ragged(flat, np.array(lengths), pad_value, pad_first, None), expect)


# ---------------------------------------------------------------- bucketing
@pytest.mark.parametrize("n,bs,bucket_size", [(0, 4, None), (1, 4, None), (37, 4, None), (100, 8, 16), (64, 64, 10)])
def test_bucket_sampler_yields_every_index_once(n, bs, bucket_size):
    lengths = np.random.default_rng(n).integers(0, 100, n)
    s = BucketSampler(lengths, bs, bucket_size=bucket_size)
    for _ in range(3):
        order = list(s)
        assert sorted(order) == list(range(n)) and len(s) == n
    if n >= 2 * bs:
        full = np.array(order[:n // bs * bs]).reshape(-1, bs)
        assert lengths[full[0]].max() == lengths.max()             # the longest batch first
        bucketed = (lengths[full].max(1) - lengths[full].min(1)).mean()
        random = np.mean([np.ptp(lengths[np.random.permutation(n)[:bs]]) for _ in range(50)])
        assert bucketed < random                                   # similar lengths together
    assert list(BucketSampler(lengths, bs, shuffle=False)) == np.argsort(-lengths, kind="stable").tolist()


# ---------------------------------------------------------------- item lists
@pytest.fixture
def token_stores(tmp_path, rng):
    "300 int32 token sequences of length 0..24 (value = 1 + position); class = long or short."
    lengths = rng.integers(0, 25, 300)
    items = [(np.arange(n) + 1).astype(np.int32) for n in lengths]
    save_memmap(tmp_path / "x", items, kind="ragged", shard_rows=80)
    save_memmap(tmp_path / "y", (lengths > 12).astype(np.int64), meta={"classes": ["short", "long"]})
    return tmp_path, items, lengths


class MeanEmbed(torch.nn.Module):
    "Mean of token embeddings over the real (unpadded) positions; forward(x, lengths)."
    def __init__(self, vocab=30, c=2):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(9, c)

    def forward(self, x, lengths):
        keep = (torch.arange(x.shape[1])[None] < lengths[:, None]).float()
        mean = (self.emb(x) * keep[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
        return self.out(torch.cat([mean, lengths[:, None].float() / 25], 1))


@pytest.mark.parametrize("pad_first,output", [(False, "lengths"), (True, "mask"), (False, None)])
def test_ragged_item_list_batches_equal_manual_padding(token_stores, pad_first, output):
    path, items, lengths = token_stores
    il = MemmapItemList.from_memmap(path / "x", pad_value=-1, pad_first=pad_first, output=output)
    assert isinstance(il, RaggedItemList) and len(il) == 300
    item = il[7]
    assert isinstance(item, RaggedItem) and item.data.dtype == torch.int64 and item.data.tolist() == items[7].tolist()
    data = il.split_by_idx(list(range(250, 300))).label_from_memmap(path / "y").databunch(bs=16, num_workers=0)
    assert isinstance(data, RaggedDataBunch) and isinstance(data.train_dl.dl.sampler, BucketSampler)
    assert data.train_ds.y.classes == ["short", "long"]
    for dl, ds in ((data.train_dl, data.train_ds), (data.valid_dl, data.valid_ds)):
        seen = []
        for xb, yb in dl:               # item i holds tokens 1..len_i: a padded row tells its item's length
            x = xb if output is None else xb[0]
            n = (x != -1).sum(1) if output is None else (xb[1] if output == "lengths" else (~xb[1]).sum(1))
            expect = manual_pad([np.arange(1, k + 1, dtype=np.int32) for k in n.tolist()], -1, pad_first, np.int64)
            assert torch.equal(x.cpu(), expect)
            assert yb.tolist() == [int(k > 12) for k in n.tolist()]
            seen += n.tolist()
        all_lengths = Counter(lengths[np.asarray(ds.x.items)].tolist())
        if dl is data.train_dl:         # drop_last: every full batch, each item at most once
            assert len(seen) == len(ds) // 16 * 16 and not Counter(seen) - all_lengths
        else:                           # validation keeps the dataset's order (get_preds aligned with valid_ds)
            assert seen == lengths[np.asarray(ds.x.items)].tolist()
    # the per-item path (fastai's LabelList.__getitem__ + the collate function) gives the same batch
    ds = data.valid_ds
    idx = [3, 0, 7, 7]
    fast = data.valid_dl.collate_fn(ds.__getitems__(idx))
    slow = data.valid_dl.collate_fn([ds[i] for i in idx])
    for f, s in zip(fast if output is not None else [fast[0]], slow if output is not None else [slow[0]]):
        assert all(torch.equal(a, b) for a, b in zip(f, s)) if isinstance(f, list) else torch.equal(f, s)


def test_learner_trains_on_padded_batches_and_show_batch(token_stores):
    import matplotlib.pyplot as plt
    path, _, _ = token_stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    learn = Learner(data, MeanEmbed())
    learn.fit(1, 1e-2)
    assert np.isfinite(learn.validate()[0])
    xb, _ = data.one_batch()
    back = data.train_ds.x.reconstruct([xb[0][0], xb[1][0]])
    assert back.data.tolist() == list(range(1, int(xb[1][0]) + 1))
    data.show_batch(rows=3)
    plt.close("all")


def test_export_load_learner_predict(token_stores):
    path, items, _ = token_stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    learn = Learner(data, MeanEmbed())
    learn.fit(1, 1e-2)
    before = learn.predict(items[5])
    learn.export()
    inf = load_learner(path)
    after = inf.predict(items[5])
    assert str(after[0]) == str(before[0]) and torch.allclose(after[2], before[2])
    assert str(inf.predict(np.arange(1, 30))[0]) in ("short", "long")     # a raw item of a new length
    with pytest.raises(ItemShapeError, match=r"expected an item of shape \(\?,\) .*found \(2, 2\)"):
        inf.predict(np.zeros((2, 2), np.int32))


def test_bucketing_off_and_processor_checks(token_stores, tmp_path):
    path, items, _ = token_stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0)
            .label_from_memmap(path / "y").databunch(bs=8, num_workers=0, bucket=False))
    assert not isinstance(data.train_dl.dl.sampler, BucketSampler)
    xb, _ = next(iter(data.fix_dl))
    assert xb[1].tolist() == [len(items[int(r)]) for r in np.asarray(data.train_ds.x.items)[:8]]
    save_memmap(tmp_path / "f", [np.zeros(3, "f4")], kind="ragged")
    ll = MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y")
    with pytest.raises(ShardMismatchError, match="expected a ragged store of .*int32.*found .*float32"):
        ll.add_test(MemmapItemList.from_memmap(tmp_path / "f"))
    with pytest.raises(ItemShapeError, match="expected a ragged store"):
        RaggedItemList.from_memmap(save_memmap(tmp_path / "dense", np.zeros((3, 2))))
    with pytest.raises(ValueError, match="output"):
        MemmapItemList.from_memmap(path / "x", output="lens")
    assert repr(RaggedCollate()) == "RaggedCollate(pad_value=0, pad_first=False, output='lengths')"


# ---------------------------------------------------------------- nothing silently changed (issue 12)
pad_values = st.one_of(st.integers(-2 ** 64, 2 ** 64), st.sampled_from([10 ** 400, -10 ** 39]), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.5, -1.0, 2.0 ** 63, 2 ** 63 - 1, -2 ** 63, True, np.int8(3), np.float32(1.5)]))


@settings(max_examples=80, deadline=None)
@given(pad_value=pad_values, integer=st.booleans())
def test_pad_value_is_refused_unless_the_batch_holds_it_exactly(pad_value, integer):
    "pad_value=0.5 on integer items used to pad with 0 (a real token id); 2**63 wrapped."
    data = np.arange(1, 4, dtype=np.int32 if integer else np.float32)
    v = pad_value.item() if isinstance(pad_value, np.generic) else pad_value
    if integer:
        fits = (isinstance(v, (bool, int)) or (np.isfinite(v) and float(v).is_integer())) and -2 ** 63 <= v < 2 ** 63
    else:
        fits = (isinstance(v, float) and not np.isfinite(v)) or abs(v) <= float(np.finfo(np.float32).max)
    if not fits:
        with pytest.raises(LossyCastError, match="pad_value: expected .*found"):
            pad_ragged(data, np.array([1, 2]), pad_value=pad_value)
        return
    x, _ = pad_ragged(data, np.array([1, 2]), pad_value=pad_value)
    pad = x[0, 1].item()
    assert pad == v or (v != v and pad != pad) or (not integer and pad == np.float32(v))


@pytest.mark.parametrize("pad_value", ["0", [0], None, 1j])
def test_pad_value_of_another_type_refused(pad_value):
    with pytest.raises(ArgumentTypeError, match="pad_value: expected a real number"):
        pad_ragged(np.arange(3), np.array([1, 2]), pad_value=pad_value)
    with pytest.raises(ArgumentTypeError):
        RaggedCollate(pad_value=pad_value)


def test_item_list_refuses_a_pad_value_its_batches_cannot_hold(token_stores, tmp_path):
    path, _, _ = token_stores
    with pytest.raises(LossyCastError, match=r"pad_value: expected an integer .*found 0.5"):
        MemmapItemList.from_memmap(path / "x", pad_value=0.5)     # refused at construction, before any batch
    f = save_memmap(tmp_path / "f", [np.zeros(3, "f4")], kind="ragged")
    x = MemmapItemList.from_memmap(f, pad_value=0.5).get_batch(np.array([0]))[0]
    assert x.dtype == torch.float32                                # float items: 0.5 pads exactly


@pytest.fixture(scope="module")
def int_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("int_stores")
    return {dt: MemmapArray.open(save_memmap(root / dt, [np.zeros(2, dt)], kind="ragged"))
            for dt in ("i1", "u1", "i2", "u8", "?")}


@settings(max_examples=80, deadline=None)
@given(dt=st.sampled_from(["i1", "u1", "i2", "u8", "?"]),
       values=st.one_of(st.lists(st.integers(-2 ** 63, 2 ** 64 - 1), min_size=1, max_size=5),
                        st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=5)))
def test_predict_input_is_refused_unless_the_store_dtype_holds_it(int_stores, dt, values):
    "A ragged `predict` on an int8 store fed token 300 as 44."
    proc = RaggedProcessor(type("DS", (), {"store": int_stores[dt]})())
    dtype = np.dtype(dt)
    lo, hi = (0, 1) if dt == "?" else (int(np.iinfo(dtype).min), min(int(np.iinfo(dtype).max), 2 ** 63 - 1))
    fits = all(float(v).is_integer() and lo <= v <= hi for v in values)   # int64 batches: uint64 >= 2**63 refused
    a = np.array(values, np.float64 if isinstance(values[0], float) else
                 (np.uint64 if any(v >= 2 ** 63 for v in values) else np.int64))
    if not fits:
        with pytest.raises(LossyCastError, match=rf"(predict: expected values that {dtype} holds exactly|expected uint64 values <= {2**63 - 1}).*found"):
            proc.process_one(a)
        return
    item = proc.process_one(a)
    assert item.data.dtype == torch.int64 and item.data.tolist() == [int(v) for v in values]


def test_learner_predict_on_an_int8_store_refuses_token_300(tmp_path):
    x = save_memmap(tmp_path / "x", [np.arange(n % 5 + 1, dtype=np.int8) for n in range(40)], kind="ragged")
    save_memmap(tmp_path / "y", np.arange(40, dtype=np.int64) % 2)
    data = (MemmapItemList.from_memmap(x).split_by_rand_pct(0.2, seed=0)
            .label_from_memmap(tmp_path / "y").databunch(bs=8, num_workers=0))
    learn = Learner(data, MeanEmbed(vocab=400))
    with pytest.raises(LossyCastError, match=r"expected values that int8 holds exactly .*found 300 at element 1"):
        learn.predict(np.array([1, 300, 2]))
    assert str(learn.predict(np.array([1, 100, 2]))[0]) in ("0", "1")


def test_block_shuffle_on_a_ragged_list_delivers_each_training_item_at_most_once(token_stores, monkeypatch):
    "shuffle='block' used to crash (\"multiple values for keyword argument 'shuffle'\") and readahead warned."
    path, items, lengths = token_stores
    calls = []
    real = MemmapArray.advise
    monkeypatch.setattr(MemmapArray, "advise", lambda self, hint, rows=None: (calls.append((self, hint, rows)),
                                                                          real(self, hint, rows))[1])
    ll = MemmapItemList.from_memmap(path / "x", pad_value=-1).split_by_idx(list(range(250, 300))) \
        .label_from_memmap(path / "y")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ll.databunch(bs=16, num_workers=0, shuffle="block")
        from fastai_memmap.data.sampling import BlockShuffleSampler
        assert isinstance(data.train_dl.dl.sampler, BlockShuffleSampler)
        for _ in range(2):
            seen = []
            for (xb, lb), yb in data.train_dl:
                assert yb.tolist() == (lb > 12).long().tolist()
                for row, n in zip(xb.tolist(), lb.tolist()):
                    assert row[:n] == list(range(1, n + 1)) and all(v == -1 for v in row[n:])
                seen += lb.tolist()
            assert len(seen) == 250 // 16 * 16 and not Counter(seen) - Counter(lengths[:250].tolist())
    assert not [w for w in caught if "readahead" in str(w.message)]
    store = ll.train.x.store                    # readahead covered every element of the training items
    want = store.element_index(np.asarray(ll.train.x.items))[0]
    got = np.unique(np.concatenate([np.asarray(r) for p, h, r in calls
                                    if p is store.elements and h in ("willneed", "populate") and r is not None]))
    gap = max(1, (256 << 10) // store.elements.manifest.row_bytes)
    pos = np.clip(np.searchsorted(got, want), 1, len(got) - 1)
    assert (np.minimum(np.abs(got[pos] - want), np.abs(got[pos - 1] - want)) <= gap).all()


def test_advise_covers_every_element_of_long_items(tmp_path):
    "Items longer than the advise gap: the sampled rows stay within one gap of each other, end to end."
    a = MemmapArray.open(save_memmap(tmp_path / "r", [np.zeros(n, "f8") for n in (0, 70000, 3, 100000)],
                                     kind="ragged", shard_rows=2))
    rows = np.array([3, 1, 0])
    sample = np.unique(a._element_sample(rows, a.elements.manifest.row_bytes))
    want = a.element_index(rows)[0]
    assert sample.min() == want.min() and sample.max() == want.max() and set(sample) <= set(want)
    segments = np.split(np.sort(want), np.flatnonzero(np.diff(np.sort(want)) > 1) + 1)
    gap = (256 << 10) // 8
    for seg in segments:
        s = sample[(sample >= seg[0]) & (sample <= seg[-1])]
        assert s[0] == seg[0] and s[-1] == seg[-1] and (np.diff(s) <= gap).all()
    a.advise("willneed", rows)
    a.advise("random")
    assert a.elements._access == "random"


@pytest.mark.parametrize("make,error,words", [
    (lambda: BucketSampler([1, 2], 0), ArgumentError, "bs >= 1"),
    (lambda: BucketSampler([1, 2], 1.5), ArgumentTypeError, "bs to be an int"),
    (lambda: pad_ragged(np.arange(3), np.array([3]), output="lens"), ArgumentError, "output"),
    (lambda: RaggedCollate(output="lens"), ArgumentError, "output"),
])
def test_bad_padding_arguments_refused_with_typed_errors(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_writer_errors_are_typed(tmp_path):
    with pytest.raises(ArgumentError, match="expected kind='ragged'"):
        RaggedWriter(tmp_path / "x", "f4", kind="sparse")
    with RaggedWriter(tmp_path / "x", "f4") as w:
        w.append([np.zeros(2, "f4")])
    with pytest.raises(WriterStateError, match="expected an open writer .*found one already closed"):
        w.append_flat(np.zeros(2, "f4"), [2])
    with pytest.raises(ArgumentError, match="validate: expected one of"):
        MemmapArray.open(tmp_path / "x", validate="sometimes")


def test_ragged_label_store_refused_at_labelling(token_stores):
    path, _, _ = token_stores
    with pytest.raises(LabelError, match="expected a label store of one row per item .*found a ragged store"):
        MemmapItemList.from_memmap(path / "x").split_none().label_from_memmap(path / "x")


@pytest.mark.parametrize("kind", ["ragged", "sparse"])
def test_ragged_and_sparse_writers_never_wrap_values(tmp_path, kind):
    "int64 300 into an int8 ragged or sparse store was stored as 44 (same_kind casting); now refused, nothing written."
    size = dict(size=4) if kind == "sparse" else {}
    with pytest.raises(LossyCastError, match=r"row \d+: expected values that int8 holds exactly, found 300"):
        with MemmapWriter(tmp_path / "s", "i1", kind=kind, **size) as w:
            w.append(np.array([[0, 300, 0, 1]]) if kind == "sparse" else [np.array([1, 300])])
    assert not (tmp_path / "s").exists()
    with MemmapWriter(tmp_path / "s", "i1", kind=kind, casting="unsafe", **size) as w:   # numpy's cast, on request
        w.append(np.array([[0, 300, 0, 1]]) if kind == "sparse" else [np.array([1, 300])])
    a = MemmapArray.open(tmp_path / "s")
    got = a[0] if kind == "ragged" else a.read([0])[0]
    assert 44 in np.asarray(got).tolist()
