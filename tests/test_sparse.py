"""Sparse stores (fastai_memmap.store.sparse) and SparseItemList: round trips against scipy (all-zero rows,
duplicates, no values), malformed stores and indices refused with typed errors, batch expansion equal
to ``scipy_matrix[rows].toarray()``, learners on dense and on torch-sparse batches."""
import hashlib
import json
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import example, given, settings, strategies as st

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_data import DatasetType
from fastai.basic_train import Learner, load_learner
from fastai_memmap import MemmapArray, MemmapItemList, MemmapWriter, save_memmap
from fastai_memmap.errors import (ArgumentError, ArgumentTypeError, ChecksumError, FormatError, ItemShapeError,
                                  OffsetsError, ShardMismatchError, SparseIndexError)
from fastai_memmap.store.format import MANIFEST_NAME, read_npy_header
from fastai_memmap.store.sparse import SparseArray, SparseWriter, csr_to_dense
from fastai_memmap.data.sparse_items import SparseItem, SparseItemList, SparseLinear, sparse_batch




def random_csr(rows, size, density, seed, dtype=np.float32, zero_rows=0.3):
    "A random CSR matrix with about `zero_rows` of its rows all zero."
    rng = np.random.default_rng(seed)
    m = sp.random(rows, size, density=density, format="csr", dtype=dtype, random_state=rng)
    keep = sp.diags((rng.random(rows) >= zero_rows).astype(dtype))
    m = (keep @ m).tocsr()
    m.eliminate_zeros()
    return m


def check_sparse(a, m, rng):
    "Every way of reading `a` matches scipy's `m`."
    n, size = m.shape
    dense = m.toarray()
    assert a.shape == (n, size) and len(a) == n and a.nnz == m.nnz
    r = a[:]
    assert type(r) is np.ndarray and r.dtype == a.dtype and np.array_equal(r, dense)
    if n:
        idx = rng.integers(-n, n, 2 * n + 1)                 # unsorted, duplicates, negatives
        assert np.array_equal(a[idx], dense[idx]) and np.array_equal(a.read(idx), dense[idx])
        assert np.array_equal(a[int(idx[0])], dense[idx[0]])
        assert (a.to_scipy(idx) != m[idx % n]).nnz == 0
        for output in ("dense", "csr", "coo"):
            t = sparse_batch(a, idx % n, output)
            assert t.dtype == torch.float32 and t.shape == (len(idx), size)
            assert np.array_equal(t.to_dense().numpy(), dense[idx].astype(np.float32))
        mask = rng.random(n) < 0.5
        assert np.array_equal(a[mask], dense[mask])
    assert a[[]].shape == (0, size)


# ---------------------------------------------------------------- round trips
@settings(max_examples=30, deadline=None)
@given(rows=st.sampled_from([0, 1, 5, 40]), size=st.sampled_from([1, 7, 300]), density=st.sampled_from([0, 0.05, 0.5]),
       values=st.booleans(), dtype=st.sampled_from(["f4", "f8", "i2", "?"]), shard_rows=st.integers(1, 50),
       batch_rows=st.integers(1, 50), index_dtype=st.sampled_from([None, "<i8", "<u2"]), seed=st.integers(0, 999))
@example(rows=5, size=7, density=0, values=True, dtype="f4", shard_rows=2, batch_rows=3, index_dtype=None, seed=0)
def test_round_trip(rows, size, density, values, dtype, shard_rows, batch_rows, index_dtype, seed):
    m = random_csr(rows, size, density, seed, dtype=np.float64)
    m = (m > 0).astype(dtype) if not values or dtype == "?" else (m * 10).astype(dtype)
    m.eliminate_zeros()
    with tempfile.TemporaryDirectory() as d:
        p = save_memmap(Path(d) / "s", m, batch_rows=batch_rows, shard_rows=shard_rows, values=values,
                        index_dtype=index_dtype)
        a = MemmapArray.open(p, validate="full")
        assert isinstance(a, SparseArray) and a.has_values == values and a.dtype == np.dtype(dtype)
        assert a.index_dtype == np.dtype(index_dtype or "<i4") and a.size == size
        rng = np.random.default_rng(seed)
        check_sparse(a, m, rng)
        check_sparse(pickle.loads(pickle.dumps(a)), m, rng)
        a.verify()


def test_writer_inputs_and_duplicates_sum_like_scipy(tmp_path):
    m = random_csr(30, 50, 0.1, 0)
    with MemmapWriter(tmp_path / "s", np.float32, kind="sparse", size=50, shard_rows=7) as w:
        assert isinstance(w, SparseWriter)
        w.append(m[:10])                                               # scipy
        w.append(m[10:20].toarray())                                   # dense rows
        w.append((m.indptr[20:], m.indices, m.data))                   # CSR parts, indptr not from 0
        w.append_csr([0, 3, 3], [4, 4, 1], [1.0, 2.0, 5.0])            # a repeated index, unsorted
    a = MemmapArray.open(tmp_path / "s")
    dup = sp.csr_matrix((np.array([1.0, 2.0, 5.0], np.float32), [4, 4, 1], [0, 3, 3]), shape=(2, 50))
    expect = sp.vstack([m, dup]).toarray()
    assert np.array_equal(a[:], expect) and a[30][4] == 3.0
    assert np.array_equal(a.to_scipy().toarray(), expect)


def test_store_readable_with_plain_numpy_and_follows_spec(tmp_path):
    m = random_csr(12, 20, 0.2, 1)
    p = save_memmap(tmp_path / "s", m, shard_rows=5)
    d = json.loads((p / MANIFEST_NAME).read_text())
    assert (d["kind"], d["size"], d["item_shape"], d["index_dtype"], d["dtype"]) == ("sparse", 20, [20], "<i4", "<f4")
    rows = []
    for s in d["shards"]:
        assert set(s) == {"file", "offsets", "values", "rows", "length", "checksum", "offsets_checksum",
                          "values_checksum"}
        indices, offsets, values = (np.load(p / s[k]) for k in ("file", "offsets", "values"))
        rows.append(sp.csr_matrix((values, indices, offsets), shape=(s["rows"], 20)))
    assert (sp.vstack(rows) != m).nnz == 0
    a = SparseArray.open(p)
    assert a.nbytes < a.dense_nbytes and "12 rows of (20,) float32" in repr(a)
    with pytest.raises(ShardMismatchError, match="expected a store of kind 'sparse', found 'dense'"):
        SparseArray.open(save_memmap(tmp_path / "d", np.zeros((2, 3))))


def test_csr_to_dense_out_and_sizes():
    out = np.full((2, 4), 9.0)
    r = csr_to_dense(np.array([0, 1, 3]), np.array([3, 0, 0]), np.array([1.0, 2.0, 3.0]), 4, out=out)
    assert r is out and r.tolist() == [[0, 0, 0, 1], [5, 0, 0, 0]]
    with pytest.raises(ItemShapeError, match="expected out of shape"):
        csr_to_dense(np.array([0, 1]), np.array([0]), np.array([1.0]), 4, out=out)


# ---------------------------------------------------------------- writer errors
@pytest.mark.parametrize("call,match", [
    (lambda w: w.append_csr([0, 2], [1, 10], [1.0, 1.0]), r"column indices in \[0, 10\), found 10"),
    (lambda w: w.append_csr([0, 1], [-1], [1.0]), "found -1"),
    (lambda w: w.append_csr([0, 2, 1], [1, 2], [1.0, 1.0]), "non-decreasing indptr"),
    (lambda w: w.append_csr([0, 3], [1, 2], [1.0, 1.0, 1.0]), "len\\(indices\\)"),
    (lambda w: w.append_csr([0, 2], [1, 2], [1.0]), "values of shape"),
    (lambda w: w.append_csr([0, 1], [1.5], [1.0]), "integer indices"),
    (lambda w: w.append(sp.csr_matrix((2, 11))), r"shape \(n, 10\)"),
    (lambda w: w.append_csr([0, 1], [1], [1 + 2j]), "expected values that float32 holds exactly, found \\(1\\+2j\\)"),
])
def test_bad_rows_refused(tmp_path, call, match):
    with pytest.raises(ItemShapeError, match=match):
        with MemmapWriter(tmp_path / "s", np.float32, (10,), kind="sparse") as w:
            call(w)
    assert not (tmp_path / "s").exists()


def test_writer_arguments(tmp_path):
    with pytest.raises(ItemShapeError, match="expected size"):
        SparseWriter(tmp_path / "s", np.float32)
    with pytest.raises(ItemShapeError, match="holds 99999"):
        SparseWriter(tmp_path / "s", np.float32, size=100_000, index_dtype=np.int16)
    with pytest.raises(ItemShapeError, match="values equal to 1"):
        save_memmap(tmp_path / "s", sp.csr_matrix(np.array([[0, 2.0]])), values=False)
    with pytest.raises(ValueError, match="empty iterable"):
        save_memmap(tmp_path / "s", [], kind="sparse")
    chunks = [random_csr(4, 9, 0.3, s) for s in range(3)]
    a = MemmapArray.open(save_memmap(tmp_path / "it", iter(chunks), kind="sparse"))
    assert np.array_equal(a[:], sp.vstack(chunks).toarray())


# ---------------------------------------------------------------- malformed stores
I0, O0 = "shard-000000.indices.npy", "shard-000000.offsets.npy"


def _patch_npy(fp, fn):
    "Rewrite the data of .npy `fp` in place (same header, same size)."
    a = np.load(fp)
    fn(a)
    offset = read_npy_header(fp)[2]
    raw = bytearray(fp.read_bytes())
    raw[offset:] = a.tobytes()
    fp.write_bytes(bytes(raw))


def _edit(store, fn):
    d = json.loads((store / MANIFEST_NAME).read_text())
    fn(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


MALFORMED_MANIFEST = [
    ("no size", lambda d: d.pop("size"), FormatError, "'size'"),
    ("item_shape != [size]", lambda d: d.__setitem__("item_shape", [7]), FormatError, r"item_shape \[size\]"),
    ("float index dtype", lambda d: d.__setitem__("index_dtype", "<f4"), FormatError, "integer index_dtype"),
    ("index dtype too small", lambda d: d.__setitem__("index_dtype", "|i1"), FormatError, "holds 299"),
    ("values in one shard only", lambda d: d["shards"][1].pop("values"), FormatError, "in every shard entry or in none"),
    ("indices dtype != manifest", lambda d: d.__setitem__("index_dtype", "<i8"), ShardMismatchError, "expected"),
]


@pytest.mark.parametrize("edit,error,match", [c[1:] for c in MALFORMED_MANIFEST], ids=[c[0] for c in MALFORMED_MANIFEST])
def test_malformed_manifest_refused(tmp_path, edit, error, match):
    p = save_memmap(tmp_path / "s", random_csr(10, 300, 0.05, 0), shard_rows=5)
    _edit(p, edit)
    with pytest.raises(error, match=match) as ei:
        MemmapArray.open(p)
    assert "expected" in str(ei.value) and "found" in str(ei.value) and str(p) in str(ei.value)


def test_out_of_range_index_refused(tmp_path):
    m = random_csr(10, 300, 0.05, 0, zero_rows=0)
    p = save_memmap(tmp_path / "s", m, shard_rows=5)
    _patch_npy(p / I0, lambda a: a.__setitem__(3, 300))        # the 4th stored entry of shard 0
    with pytest.raises(SparseIndexError, match=r"in \[0, 300\).*found 300 at position 3") as ei:
        MemmapArray.open(p, validate="full")                    # refused at open: O(nnz)
    assert isinstance(ei.value, ValueError) and str(p / I0) in str(ei.value)
    a = MemmapArray.open(p)                                     # default: offsets only at open ...
    assert np.array_equal(a[5:], m[5:].toarray())               # ... the other shard reads fine
    with pytest.raises(SparseIndexError, match="found 300 at position 3") as ei:
        a[[0, 1, 2, 3]]                                         # ... and the bad index is never used
    assert str(p / I0) in str(ei.value)
    with pytest.raises(ChecksumError):
        a.verify()                                              # the checksum catches the edit first ...
    data = (p / I0).read_bytes()[read_npy_header(p / I0)[2]:]
    _edit(p, lambda d: d["shards"][0].__setitem__("checksum", "sha256:" + hashlib.sha256(data).hexdigest()))
    with pytest.raises(SparseIndexError, match="found 300"):
        MemmapArray.open(p).verify()                            # ... and the index check without it


def test_bad_offsets_of_a_sparse_store_refused_at_open(tmp_path):
    p = save_memmap(tmp_path / "s", random_csr(10, 300, 0.05, 0, zero_rows=0), shard_rows=5)
    _patch_npy(p / O0, lambda a: a.__setitem__(2, a[4] + 1))
    with pytest.raises(OffsetsError) as ei:
        MemmapArray.open(p)
    assert str(p / O0) in str(ei.value)


# ---------------------------------------------------------------- item lists and learners
N, SIZE = 400, 60


@pytest.fixture
def sparse_stores(tmp_path):
    "400 rows of 60 features (~10% stored); the class is whether feature 0..9 hold more than 10..19."
    m = random_csr(N, SIZE, 0.1, 3, zero_rows=0.05)
    d = m.toarray()
    y = (d[:, :10].sum(1) > d[:, 10:20].sum(1)).astype(np.int64)
    save_memmap(tmp_path / "x", m, shard_rows=150)
    save_memmap(tmp_path / "y", y)
    return tmp_path, m, y


def test_sparse_item_list_batches_equal_scipy(sparse_stores):
    path, m, y = sparse_stores
    il = MemmapItemList.from_memmap(path / "x")
    assert isinstance(il, SparseItemList) and il.size == SIZE
    item = il[5]
    assert isinstance(item, SparseItem) and np.array_equal(item.data.numpy(), m[5].toarray()[0])
    assert str(item).endswith(f"of {SIZE}")
    data = il.split_by_idx(list(range(300, 400))).label_from_memmap(path / "y").databunch(bs=32, num_workers=0)
    xb, yb = data.one_batch(DatasetType.Fix)           # training rows in list order
    rows = np.asarray(data.train_ds.x.items)[:32]
    assert xb.dtype == torch.float32 and np.array_equal(xb.numpy(), m[rows].toarray())
    assert np.array_equal(yb.numpy(), y[rows])
    ds = data.valid_ds
    fast = ds.__getitems__([4, 1, 4])
    slow = [ds[i] for i in (4, 1, 4)]
    assert torch.equal(fast[0], torch.stack([s[0].data for s in slow]))


@pytest.mark.parametrize("output", ["dense", "csr"])
def test_learner_trains_one_epoch(sparse_stores, output):
    path, m, _ = sparse_stores
    data = (MemmapItemList.from_memmap(path / "x", output=output).split_by_rand_pct(0.25, seed=0)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    xb, _ = data.one_batch()
    assert xb.layout == (torch.sparse_csr if output == "csr" else torch.strided)
    model = torch.nn.Sequential(SparseLinear(SIZE, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    learn = Learner(data, model)
    before = learn.validate()[0]
    learn.fit(2, 3e-2)
    after = learn.validate()[0]
    assert np.isfinite(after) and after < before


def test_export_load_learner_predict(sparse_stores):
    path, m, _ = sparse_stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.25, seed=0)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    learn = Learner(data, torch.nn.Sequential(SparseLinear(SIZE, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    learn.fit(1, 1e-2)
    before = learn.predict(m[7].toarray()[0])
    learn.export()
    inf = load_learner(path)
    assert inf.data.single_ds.x.size == SIZE
    for raw in (m[7].toarray()[0], m[7]):                      # a dense row or a scipy row
        after = inf.predict(raw)
        assert str(after[0]) == str(before[0]) and torch.allclose(after[2], before[2])
    with pytest.raises(ItemShapeError, match=rf"expected a row of shape \({SIZE},\), found \(3,\)"):
        inf.predict(np.zeros(3, np.float32))


def test_sparse_linear_same_for_every_layout():
    m = random_csr(6, 9, 0.4, 2)
    x = torch.from_numpy(m.toarray())
    lin = SparseLinear(9, 3)
    dense = lin(x)
    assert torch.allclose(lin(x.to_sparse_csr()), dense, atol=1e-6)
    assert torch.allclose(lin(x.to_sparse_coo()), dense, atol=1e-6)
    lin(x.to_sparse_csr()).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------- refused, never moved (issue 12)
@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 9), data=st.data())
def test_csr_to_dense_refuses_indices_outside_the_row(size, data):
    "An index >= size used to land in the next row (and -1 in the previous one); in range it expands like scipy."
    lengths = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.array(data.draw(st.lists(st.integers(-3, size + 3), min_size=int(indptr[-1]),
                                          max_size=int(indptr[-1]))), np.int64)
    values = np.arange(1, len(indices) + 1, dtype=np.float32)
    bad = np.flatnonzero((indices < 0) | (indices >= size))
    if len(bad):
        row = int(np.searchsorted(indptr, bad[0], side="right") - 1)
        with pytest.raises(SparseIndexError) as ei:
            csr_to_dense(indptr, indices, values, size)
        msg = str(ei.value)
        assert f"expected column indices in [0, {size})" in msg and f"found {indices[bad[0]]} in row {row}" in msg
    else:
        expect = sp.csr_matrix((values, indices, indptr), shape=(len(lengths), size)).toarray()
        assert np.array_equal(csr_to_dense(indptr, indices, values, size), expect)


@pytest.mark.parametrize("indptr,indices,values,error,words", [
    ([1, 2], [0, 1], [1, 1], OffsetsError, "from 0"),
    ([0, 2, 1], [0, 1], [1, 1], OffsetsError, "non-decreasing"),
    ([0, 1], [0, 1], [1, 1], OffsetsError, "len(indices) = 2"),
    ([0, 2], [0, 1], [1], ItemShapeError, "one value per index (2), found 1"),
])
def test_csr_to_dense_refuses_inconsistent_parts(indptr, indices, values, error, words):
    with pytest.raises(error) as ei:
        csr_to_dense(np.array(indptr), np.array(indices), np.array(values, np.float32), 3)
    assert words in str(ei.value)


@pytest.mark.parametrize("layout", ["dense", "csr", "coo"])
@pytest.mark.parametrize("width", [5, 11])
def test_sparse_linear_refuses_a_batch_of_another_width(layout, width):
    "SparseLinear(10, ...) used to take a width-5 CSR batch (its column indices pick the first 5 weight rows)."
    x = torch.from_numpy(random_csr(3, width, 0.5, 1).toarray())
    x = {"dense": x, "csr": x.to_sparse_csr(), "coo": x.to_sparse_coo()}[layout]
    with pytest.raises(ItemShapeError, match=rf"expected a batch of shape \(bs, 10\) .*found \(3, {width}\)"):
        SparseLinear(10, 2)(x)


@pytest.mark.parametrize("args,error", [((-1, 2), ArgumentError), ((10, 2.5), ArgumentTypeError), ((True, 2), ArgumentTypeError)])
def test_sparse_linear_refuses_bad_sizes(args, error):
    with pytest.raises(error, match="expected"):
        SparseLinear(*args)


def test_unknown_output_refused_with_a_typed_error(sparse_stores):
    path, _, _ = sparse_stores
    with pytest.raises(ArgumentError, match=r"output: expected one of .*found 'lens'"):
        MemmapItemList.from_memmap(path / "x", output="lens")
    with pytest.raises(ArgumentError, match="output"):
        sparse_batch(MemmapArray.open(path / "x"), [0], "lens")
    with pytest.raises(ArgumentError, match="empty iterable"):
        fastai_memmap.store.sparse.save_sparse(path / "e", iter([]))


def test_block_shuffle_reads_ahead_every_value_and_index_silently(sparse_stores, monkeypatch):
    "Sparse stores had no `advise`: readahead warned 'readahead failed' every epoch and read nothing ahead."
    path, m, _ = sparse_stores
    calls = []
    real = MemmapArray.advise
    monkeypatch.setattr(MemmapArray, "advise", lambda self, hint, rows=None: (calls.append((self, hint, rows)),
                                                                          real(self, hint, rows))[1])
    il = MemmapItemList.from_memmap(path / "x").split_by_idx(list(range(300, 400))).label_from_memmap(path / "y")
    store = il.train.x.store
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = il.databunch(bs=32, num_workers=0, shuffle="block")
        rows = [r for _ in range(2) for xb, _ in data.train_dl for r in xb.tolist()]
    assert not [w for w in caught if "readahead" in str(w.message)]
    dense = {tuple(r) for r in m.toarray()[np.asarray(il.train.x.items)].tolist()}
    assert len(rows) == 2 * (300 // 32 * 32) and all(tuple(r) in dense for r in rows)
    covered = {}
    for part, hint, asked in calls:
        if hint in ("willneed", "populate") and asked is not None:
            covered.setdefault(id(part), set()).update(np.asarray(asked).tolist())
    index_rows = store.pattern.element_index(np.asarray(il.train.x.items))[0]
    for part in (store.pattern.elements, store.values):   # every element row falls in an advised range
        got = np.array(sorted(covered[id(part)]))
        gap = max(1, (256 << 10) // part.manifest.row_bytes)
        pos = np.searchsorted(got, index_rows)
        near = np.minimum(np.abs(got[np.clip(pos, 0, len(got) - 1)] - index_rows),
                          np.abs(got[np.clip(pos - 1, 0, len(got) - 1)] - index_rows))
        assert (near <= gap).all()
