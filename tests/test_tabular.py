"""Tests of fastai_memmap.tabular.convert (tabular_to_memmap) and fastai_memmap.tabular.item_list (MemmapTabularList).

The reference is fastai's own ``TabularList.from_df(...).process()`` on the same table and split.
"""
import json
import pickle
import warnings
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastai_memmap.tabular.item_list import (ColumnNotFoundError, ColumnTypeError, ColumnValueError, MemmapTabularList,
                                             TabularError, TabularStore, tabular_to_memmap)
from fastai_memmap.tabular.convert import TabularState, iter_frames, read_tabular_json
from fastai_memmap.tabular.streaming_stats import _float_keys, _key_float, _RankSelector
from fastai_memmap.errors import FormatError, MemmapError, StoreExistsError
from fastai_memmap.store.reader import MemmapArray
from fastai.basic_data import DatasetType
from fastai.basic_train import load_learner
from fastai.metrics import accuracy
from fastai.tabular import Categorify, FillMissing, FillStrategy, Normalize, TabularList, tabular_learner

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),   # fastai's Categorify on pandas 1.5
              pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")]

CATS, CONTS = ["a", "b", "e"], ["c", "d", "f"]
N, SEED = 2000, 7


def make_table(n=N, seed=SEED):
    "Synthetic table: text and int categories with missing values, continuous columns with NaNs, targets."
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.choice(["x", "y", "z", "w"], n), "b": rng.integers(0, 6, n),
                       "e": rng.choice(["u", "v"], n), "c": rng.normal(size=n), "d": rng.normal(size=n) * 10 + 3,
                       "f": rng.random(n)})
    df["y"] = np.where((df.a == "x") ^ (df.c > 0.3), "pos", "neg")
    df["r"] = 2 * df.c + (df.e == "u") + 0.1 * rng.normal(size=n)
    df.loc[::7, "c"] = np.nan
    df.loc[::11, "a"] = None
    df.loc[[5, 100], "d"] = np.nan          # training rows only
    df.loc[13, "b"] = 5                     # int column stays int
    return df


VALID = np.sort(np.random.default_rng(3).choice(N, 400, replace=False))
VALID = VALID[(VALID != 5) & (VALID != 100)]


@pytest.fixture(scope="module")
def table():
    return make_table()


@pytest.fixture(scope="module")
def store(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("tab") / "store"
    tabular_to_memmap(table, out, CATS, CONTS, "y", chunksize=300, valid_idx=VALID, progress=False)
    return out


@pytest.fixture(scope="module")
def data(store):
    return MemmapTabularList.from_memmap(store).split_from_memmap().label_from_memmap().databunch(bs=64, num_workers=0)


@pytest.fixture(scope="module")
def learn(data):
    torch.manual_seed(0)
    learn = tabular_learner(data, layers=[200, 100], metrics=accuracy)
    learn.fit(1, 1e-2)
    return learn


def fastai_lists(df, procs, y="y"):
    return (TabularList.from_df(df, cat_names=list(CATS), cont_names=list(CONTS), procs=procs)
            .split_by_idx(VALID).label_from_df(cols=y))


def read_store(path):
    out = {n: MemmapArray.open(Path(path) / n)[:] for n in ("cats", "conts", "y", "valid") if (Path(path) / n).exists()}
    out["state"] = read_tabular_json(path)[1]
    return out


def assert_same_store(a, b):
    ra, rb = read_store(a), read_store(b)
    assert ra.keys() == rb.keys()
    assert ra["state"] == rb["state"]
    for k in ra:
        if k != "state":
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


# ------------------------------------------------------------------------------------------ fastai equality
PROCS = {"default": [FillMissing, Categorify, Normalize],
         "constant": [partial(FillMissing, fill_strategy=FillStrategy.CONSTANT, fill_val=-1.5), Categorify, Normalize],
         "no_indicator_no_norm": [partial(FillMissing, add_col=False), Categorify],
         "no_fill": [Categorify, Normalize]}


@pytest.mark.parametrize("variant", list(PROCS))
def test_matches_fastai_tabularlist(table, tmp_path, variant):
    procs = PROCS[variant]
    tabular_to_memmap(table, tmp_path / "s", CATS, CONTS, "y", procs=procs, chunksize=333, valid_idx=VALID, progress=False)
    ref = fastai_lists(table, [p for p in procs])
    x = MemmapTabularList.from_memmap(tmp_path / "s").split_from_memmap().label_from_memmap()
    for ours, theirs in ((x.train, ref.train), (x.valid, ref.valid)):
        assert ours.x.cat_names == theirs.x.cat_names and ours.x.col_names == theirs.x.col_names
        assert ours.x.cont_names == theirs.x.cont_names
        assert {k: [str(c) for c in v] for k, v in ours.x.classes.items()} == \
               {k: [str(c) for c in v] for k, v in theirs.x.classes.items()}
        s = ours.x.store
        rows = np.asarray(ours.x.items)
        np.testing.assert_array_equal(s.cats[rows], theirs.x.codes)
        np.testing.assert_allclose(s.conts[rows], theirs.x.conts, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert list(ours.y.classes) == list(theirs.y.classes)
        np.testing.assert_array_equal(s.y[rows], theirs.y.items.astype(np.int64))
    fm = [p for p in ref.train.x.processor[0].procs if isinstance(p, FillMissing)]
    st = x.train.x.state
    if fm:
        assert st.fill_values == pytest.approx(fm[0].na_dict, rel=0, abs=0)
    norm = [p for p in ref.train.x.processor[0].procs if isinstance(p, Normalize)]
    if norm:
        assert st.means == pytest.approx(norm[0].means, rel=1e-12) and st.stds == pytest.approx(norm[0].stds, rel=1e-12)


def test_even_count_median_and_float_categories(tmp_path):
    "Median of an even number of training values is the mean of the middle two; int/float chunks give float classes."
    df = pd.DataFrame({"k": [1, 2, 3, 1, 2.5, np.nan, 3, 1], "v": [4.0, np.nan, 1.0, 2.0, 8.0, 3.0, np.nan, 5.0],
                       "y": list("pqpqpqpq")})
    chunks = [df.iloc[:3].astype({"k": "int64"}), df.iloc[3:]]
    tabular_to_memmap(iter(chunks), tmp_path / "s", ["k"], ["v"], "y", progress=False)
    ref = (TabularList.from_df(df, cat_names=["k"], cont_names=["v"], procs=[FillMissing, Categorify, Normalize])
           .split_none().label_from_df(cols="y"))
    st = read_tabular_json(tmp_path / "s")[1]
    assert st.fill_values == {"v": 3.5} == ref.train.x.processor[0].procs[0].na_dict
    assert [str(c) for c in st.classes["k"]] == [str(c) for c in ref.train.x.classes["k"]]
    np.testing.assert_array_equal(MemmapArray.open(tmp_path / "s" / "cats")[:], ref.train.x.codes)


def test_multi_pass_median_matches_pandas(table, tmp_path, monkeypatch):
    "A tiny selection budget forces the radix histogram passes over the staged values: still pandas' median."
    from fastai_memmap.tabular import convert as records   # the module that reads both constants
    monkeypatch.setattr(records, "MIN_SELECT_BUDGET", 1)
    monkeypatch.setattr(records, "STATS_BLOCK_ROWS", 97)
    df = table.assign(d=np.round(table.d, 1))        # many duplicates
    tabular_to_memmap(df, tmp_path / "s", CATS, CONTS, chunksize=20, valid_idx=VALID, progress=False)
    train = df.drop(index=VALID)
    st = read_tabular_json(tmp_path / "s")[1]
    assert st.fill_values == {"c": train.c.median(), "d": train.d.median()}
    filled = train[CONTS].fillna(train[CONTS].median())
    assert st.means == pytest.approx(filled.mean().to_dict(), rel=1e-12)
    assert st.stds == pytest.approx(filled.std().to_dict(), rel=1e-12)


# ------------------------------------------------------------------------------------------ sources
def test_all_sources_identical(table, store, tmp_path):
    csv = tmp_path / "t.csv"
    table.to_csv(csv, index=False)
    records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
               for r in table.to_dict("records")]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    kw = dict(cat_names=CATS, cont_names=CONTS, y_names="y", valid_idx=VALID, progress=False)
    sources = {"csv": (str(csv), 256), "frames": ((table.iloc[i:i + 450] for i in range(0, N, 450)), 300),
               "records": (records, 500), "jsonl": (jsonl, 999)}
    for name, (src, chunk) in sources.items():
        # pandas' default float parser is not round-trip exact; 'round_trip' reads back the written floats
        tabular_to_memmap(src, tmp_path / name, chunksize=chunk, read_kwargs={"float_precision": "round_trip"}, **kw)
        assert_same_store(store, tmp_path / name)


def test_generator_source_streams_one_chunk_at_a_time(table, store, tmp_path):
    alive, peak = [], [0]

    def gen():
        for i in range(0, N, 250):
            df = table.iloc[i:i + 250].copy()
            alive.append(weakref.ref(df))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            yield df
            del df

    tabular_to_memmap(gen(), tmp_path / "g", CATS, CONTS, "y", chunksize=250, valid_idx=VALID, progress=False)
    assert len(alive) == 8 and peak[0] <= 2
    assert_same_store(store, tmp_path / "g")


def test_valid_pct_split_does_not_depend_on_chunksize(table, tmp_path):
    for cs in (170, 1000):
        tabular_to_memmap(table, tmp_path / f"p{cs}", CATS, CONTS, "y", chunksize=cs, valid_pct=0.2, seed=5, progress=False)
    assert_same_store(tmp_path / "p170", tmp_path / "p1000")
    n_valid = len(MemmapArray.open(tmp_path / "p170" / "valid"))
    assert 300 < n_valid < 500


def test_valid_col_split(table, tmp_path):
    df = table.assign(is_valid=np.isin(np.arange(N), VALID))
    tabular_to_memmap(df, tmp_path / "v", CATS, CONTS, "y", valid_col="is_valid", chunksize=300, progress=False)
    np.testing.assert_array_equal(MemmapArray.open(tmp_path / "v" / "valid")[:], VALID)


def test_store_holds_json_and_npy_only(store):
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".npy"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and head[:1] != b"\x80"   # no pickle stream
        if p.suffix == ".npy":
            np.load(p, allow_pickle=False)
    doc = json.loads((Path(store) / "tabular.json").read_text())
    assert TabularState.from_dict(doc["state"]) == read_tabular_json(store)[1]
    assert doc["rows"] == N and doc["n_valid"] == len(VALID)


# ------------------------------------------------------------------------------------------ training
def test_train_classification_and_show(data, learn, capsys):
    assert data.get_emb_szs() == [(5, 4), (7, 5), (3, 3), (3, 3), (3, 3)]
    assert len(data.cont_names) == 3 and data.c == 2
    assert learn.recorder.metrics[-1][0] > 0.6
    data.show_batch(rows=3)
    learn.show_results(rows=3)
    out = capsys.readouterr().out
    assert "c_na" in out and "prediction" in out and any(c in out for c in ("x", "y", "z", "w"))


def test_show_decodes_original_values(data, table):
    x = data.valid_ds.x
    i = int(np.flatnonzero(~table.loc[VALID, "c"].isna().to_numpy())[0])
    row = table.iloc[VALID[i]]
    line = x.get(i)
    dec = x.decode(line.cats, line.conts)
    assert dec["e"] == row.e and dec["b"] == row.b and dec["c_na"] is False
    assert dec["c"] == pytest.approx(row.c, rel=1e-5) and dec["f"] == pytest.approx(row.f, rel=1e-5)


def test_train_regression(store, tmp_path, table):
    tabular_to_memmap(table, tmp_path / "r", CATS, CONTS, "r", chunksize=500, valid_idx=VALID, progress=False)
    data = MemmapTabularList.from_memmap(tmp_path / "r").split_from_memmap().label_from_memmap().databunch(bs=64, num_workers=0)
    assert data.c == 1 and type(data.train_ds.y).__name__ == "MemmapFloatList"
    learn = tabular_learner(data, layers=[200, 100])
    learn.fit(1, 1e-2)
    assert np.isfinite(float(learn.recorder.val_losses[-1]))
    y, pred, raw = learn.predict(table.iloc[0])
    assert raw.shape == (1,)


def test_batches_with_two_workers_equal_single_process(data):
    dl0 = data.valid_dl
    dl2 = data.valid_dl.new(num_workers=2)
    for (x0, y0), (x2, y2) in zip(dl0, dl2):
        assert torch.equal(x0[0], x2[0]) and torch.equal(x0[1], x2[1]) and torch.equal(y0, y2)
    ds = data.valid_ds
    idx = [3, 0, 7, 7]
    fast = ds.__getitems__(idx)
    slow = [ds[i] for i in idx]
    for (fx, fy), (sx, sy) in zip(fast, slow):
        assert torch.equal(fx[0], sx.data[0]) and torch.equal(fx[1], sx.data[1]) and int(fy) == int(sy.data)


# ------------------------------------------------------------------------------------------ predict / export
def test_export_load_learner_same_probabilities(learn, table, tmp_path):
    rows = [table.iloc[VALID[0]], table.iloc[1].to_dict()]
    before = [learn.predict(r)[2] for r in rows]
    learn.export(tmp_path / "export.pkl")
    assert b"tabular.json" not in (tmp_path / "export.pkl").read_bytes()
    loaded = load_learner(tmp_path)
    assert loaded.data.train_ds.x.store is None
    for r, p in zip(rows, before):
        assert torch.allclose(loaded.predict(r)[2], p, atol=1e-6)
    # the item in the validation store encodes the same as the raw row processed at predict time
    line = learn.data.valid_ds.x.get(0)
    raw = learn.data.valid_ds.x.processor[0].process_one(table.iloc[VALID[0]])
    assert torch.equal(line.data[0], raw.data[0]) and torch.allclose(line.data[1], raw.data[1])


def fastai_process_one(table, row):
    ref = fastai_lists(table, [FillMissing, Categorify, Normalize])
    line = ref.train.x.processor[0].process_one(row)
    return np.asarray(line.cats), np.asarray(line.conts)


@pytest.mark.parametrize("change", [{}, {"a": "unseen", "b": 99}, {"c": None}, {"c": np.nan, "a": None}])
def test_predict_row_matches_fastai_process_one(data, table, change):
    row = {**table.iloc[0].to_dict(), **change}
    ours = data.train_ds.x.processor[0].process_one(row)
    cats, conts = fastai_process_one(table, row)
    np.testing.assert_array_equal(ours.data[0].numpy(), cats)
    np.testing.assert_allclose(ours.data[1].numpy(), conts, rtol=1e-6, atol=1e-6)
    if "a" in change:
        assert int(ours.data[0][0]) == 0                      # unknown / missing category -> '#na#'
    if "c" in change:
        st = data.train_ds.x.state
        assert int(ours.data[0][CATS.__len__()]) == list(st.classes["c_na"]).index(True)


@pytest.mark.parametrize("row_change, err, name", [
    ({"drop": "d"}, ColumnNotFoundError, "d"),
    ({"drop": "e"}, ColumnNotFoundError, "e"),
    ({"d": "3.5"}, ColumnTypeError, "d"),
    ({"b": "3"}, ColumnTypeError, "b"),
    ({"a": ["x"]}, ColumnTypeError, "a"),
    ({"f": None}, ColumnValueError, "f"),
    ({"d": np.inf}, ColumnValueError, "d"),          # inf would give a NaN prediction
    ({"c": -np.inf}, ColumnValueError, "c"),
])
def test_predict_bad_rows(data, table, row_change, err, name):
    row = table.iloc[0].to_dict()
    if "drop" in row_change:
        del row[row_change["drop"]]
    else:
        row.update(row_change)
    with pytest.raises(err, match=repr(name).replace("[", r"\[")) as e:
        data.train_ds.x.processor[0].process_one(row)
    assert isinstance(e.value, MemmapError)
    if err is ColumnNotFoundError:
        assert isinstance(e.value, KeyError)


def test_add_test_reads_the_test_store(learn, table, store, tmp_path):
    test_df = table.iloc[:50].drop(columns=["y", "r"])
    tabular_to_memmap(test_df, tmp_path / "test", state=store, progress=False)
    data = learn.data
    data.add_test(MemmapTabularList.from_memmap(tmp_path / "test"))
    xb, _ = next(iter(data.test_dl))
    np.testing.assert_allclose(xb[1].numpy(), MemmapArray.open(tmp_path / "test" / "conts")[:len(xb[1])])
    preds, _ = learn.get_preds(DatasetType.Test)
    assert preds.shape == (50, 2)
    tabular_to_memmap(test_df.assign(c=test_df.c.fillna(0)), tmp_path / "other", CATS, CONTS, progress=False)
    with pytest.raises(TabularError, match="another fitted state"):
        data.add_test(MemmapTabularList.from_memmap(tmp_path / "other"))


def test_unknown_valid_labels_dropped_like_fastai(table, tmp_path):
    df = table.copy()
    df.loc[VALID[:5], "y"] = "never_in_train"
    tabular_to_memmap(df, tmp_path / "s", CATS, CONTS, "y", valid_idx=VALID, progress=False)
    with warnings.catch_warnings(record=True):
        ours = MemmapTabularList.from_memmap(tmp_path / "s").split_from_memmap().label_from_memmap()
        ref = fastai_lists(df, [FillMissing, Categorify, Normalize])
    assert len(ours.valid) == len(ref.valid) == len(VALID) - 5
    assert list(ours.train.y.classes) == list(ref.train.y.classes) == ["neg", "pos"]


# ------------------------------------------------------------------------------------------ conversion errors
def test_conversion_errors_leave_nothing(table, tmp_path):
    out = tmp_path / "bad"
    cases = [
        (dict(source=table.drop(columns=["d"])), ColumnNotFoundError, "'d'"),
        (dict(source=table.assign(d=table.d.astype(object).where(table.index != 700, "n/a"))), ColumnTypeError, "'d'"),
        (dict(source=iter([table.iloc[:500], table.iloc[500:].assign(b="text")])), ColumnTypeError, "'b'"),
        (dict(source=table.assign(f=table.f.where(table.index != VALID[0]))), ColumnValueError, "'f'"),
        (dict(source=table, procs=[partial(FillMissing, fill_strategy=FillStrategy.COMMON), Categorify]), TabularError, "COMMON"),
        (dict(source=table, procs=[Normalize, FillMissing, Categorify]), TabularError, "before Normalize"),
        (dict(source=table, valid_idx=[N + 5]), TabularError, "valid_idx"),
        (dict(source=table, valid_idx=[1], valid_pct=0.1), TabularError, "at most one"),
        (dict(source=42), TabularError, "int"),
        (dict(source=tmp_path / "missing.csv"), FileNotFoundError, "missing.csv"),
    ]
    for kw, err, msg in cases:
        kw = {"cat_names": CATS, "cont_names": CONTS, "y_names": "y", "valid_idx": VALID, "progress": False, **kw}
        if "valid_pct" in kw:
            kw["valid_idx"] = [1]
        with pytest.raises(err, match=msg):
            tabular_to_memmap(kw.pop("source"), out, chunksize=400, **kw)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if ".fmtmp-" in p.name] == []


def test_overwrite_and_exists(table, tmp_path):
    out = tmp_path / "s"
    small = table.iloc[:300]
    tabular_to_memmap(small, out, CATS, CONTS, progress=True)
    with pytest.raises(StoreExistsError):
        tabular_to_memmap(small, out, CATS, CONTS, progress=False)
    tabular_to_memmap(table, out, CATS, CONTS, overwrite=True, progress=False)
    assert len(TabularStore.open(out)) == N


def test_iter_frames_rejects_bad_records(tmp_path):
    with pytest.raises(TabularError, match="record 1"):
        list(iter_frames([{"a": 1}, [1, 2]], chunksize=10))
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        list(iter_frames(p))


def test_tabular_store_pickles_small(store):
    s = TabularStore.open(store)
    blob = pickle.dumps(s)
    assert len(blob) < 20000
    s2 = pickle.loads(blob)
    np.testing.assert_array_equal(s2.cats[:5], s.cats[:5])
    assert s2.state == s.state


# ------------------------------------------------------------------------------------------ exact median
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=300),
       st.integers(1, 8), st.data())
def test_rank_selector_is_exact(values, budget, data):
    x = np.array(values, np.float64)
    k = data.draw(st.integers(0, len(x) - 1))
    keys = _float_keys(x)
    sel = _RankSelector(k, len(x), budget)
    parts = np.array_split(keys, 3)
    for _ in range(6):
        for p in parts:
            sel.feed(p)
        if sel.end_pass():
            break
    assert sel.result is not None
    assert _key_float(sel.result) == np.partition(x, k)[k]


# ------------------------------------------------------------------------------------------ nothing lost, nothing changed
def _leaves_nothing(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".fmtmp-" in p.name] == []


def test_header_only_csv_is_not_fitted(tmp_path):
    "A header-only CSV, or a split with every row in validation, fits on no rows: refused, nothing committed."
    csv = tmp_path / "head.csv"
    csv.write_text("a,c,y\n")
    out = tmp_path / "s"
    with pytest.raises(ColumnValueError, match=r"head\.csv: expected training rows .* found none \(0 row"):
        tabular_to_memmap(csv, out, ["a"], ["c"], "y", progress=False)
    _leaves_nothing(tmp_path, out)
    df = pd.DataFrame({"a": ["x", "y"], "c": [1.0, 2.0], "y": ["p", "q"], "v": [True, True]})
    with pytest.raises(ColumnValueError, match=r"found none \(2 row\(s\), 2 of them validation"):
        tabular_to_memmap(df, out, ["a"], ["c"], "y", valid_col="v", progress=False)
    _leaves_nothing(tmp_path, out)


def test_empty_header_only_test_set_applies(store, tmp_path):
    "Applying a fitted state to no rows fits nothing: an empty test store is valid."
    csv = tmp_path / "head.csv"
    csv.write_text(",".join(CATS + CONTS) + "\n")
    tabular_to_memmap(csv, tmp_path / "t", state=store, progress=False)
    assert len(TabularStore.open(tmp_path / "t")) == 0


def test_statistics_need_values(tmp_path):
    "Normalize on a column with fewer than 2 training values (std undefined) is refused, naming the column."
    df = pd.DataFrame({"a": ["x", "y", "z"], "c": [1.0, np.nan, np.nan], "k": [1.0, 2.0, 3.0], "y": ["p", "q", "p"]})
    out = tmp_path / "s"
    with pytest.raises(ColumnValueError, match=r"\['c'\]: Normalize needs at least 2 training values .* found \[1\]"):
        tabular_to_memmap(df, out, ["a"], ["c", "k"], "y", procs=[Categorify, Normalize], progress=False)
    _leaves_nothing(tmp_path, out)
    df = pd.DataFrame({"a": ["x", "y"], "c": [1e300, -1e300], "y": ["p", "q"]})
    with pytest.raises(ColumnValueError, match="'c'.*overflows"):
        tabular_to_memmap(df, out, ["a"], ["c"], "y", progress=False)
    with pytest.raises(ColumnValueError, match="'c'.*overflows the store's float32"):
        tabular_to_memmap(df, out, ["a"], ["c"], "y", procs=[FillMissing, Categorify], progress=False)
    _leaves_nothing(tmp_path, out)
    with pytest.raises(TabularError, match="fill_val: expected a finite number, found inf"):
        tabular_to_memmap(df, out, ["a"], ["c"], "y", progress=False,
                          procs=[partial(FillMissing, fill_strategy=FillStrategy.CONSTANT, fill_val=np.inf), Categorify])


@pytest.mark.parametrize("col", ["c", "r"])
def test_inf_input_refused_at_conversion(table, tmp_path, col):
    "inf in a continuous column (or a float target) would make means, stds and predictions NaN: refused with its row."
    df = table.copy()
    df.loc[1234, col] = np.inf
    out = tmp_path / "s"
    y = "r" if col == "r" else "y"
    with pytest.raises(ColumnValueError, match=rf"'{col}', row 1234: expected a finite number .* found inf"):
        tabular_to_memmap(df, out, CATS, CONTS, y, chunksize=500, progress=False)
    _leaves_nothing(tmp_path, out)


def test_inf_input_refused_with_a_fitted_state(table, store, tmp_path):
    df = table.iloc[:100].copy()
    df.loc[42, "d"] = -np.inf
    with pytest.raises(ColumnValueError, match=r"rows 0\.\.99: column 'd', row 42"):
        tabular_to_memmap(df, tmp_path / "t", state=store, progress=False)
    _leaves_nothing(tmp_path, tmp_path / "t")


def _edit_state(store, tmp_path, **change):
    "A copy of `store` whose tabular.json state has `change` applied (dict keys -> {col: value})."
    import shutil
    dst = tmp_path / "edited"
    shutil.copytree(store, dst)
    doc = json.loads((dst / "tabular.json").read_text())
    for k, v in change.items():
        doc["state"][k] = {**doc["state"][k], **v} if isinstance(v, dict) else v
    (dst / "tabular.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("change, err, match", [
    ({"means": {"c": None}}, ColumnValueError, r"finite mean for continuous column\(s\) \['c'\]"),
    ({"stds": {"d": None}}, ColumnValueError, r"finite std for continuous column\(s\) \['d'\]"),
    ({"fill_values": {"c": None}}, ColumnValueError, r"finite fill value for continuous column\(s\) \['c'\]"),
    ({"stds": {"d": "1.0"}}, FormatError, r"expected a number or null for stds\['d'\], found '1.0'"),
    ({"means": {"c": 10 ** 400}}, FormatError, r"means\['c'\]"),
    ({"y_classes": 3}, FormatError, "y_classes to be a list"),
    ({"classes": {"a": ["#na#", {"x": 1}]}}, FormatError, r"classes\['a'\]"),
])
def test_hostile_state_refused_at_load(store, tmp_path, change, err, match):
    "Null (non-finite) statistics give NaN predictions; malformed ones escape as builtins: both typed, naming the file."
    bad = _edit_state(store, tmp_path, **change)
    with pytest.raises(err, match=match) as e:
        TabularStore.open(bad)
    assert "tabular.json" in str(e.value) and isinstance(e.value, MemmapError)
    with pytest.raises(err):
        tabular_to_memmap(pd.DataFrame({c: [] for c in CATS + CONTS}), tmp_path / "t", state=bad, progress=False)


def test_null_statistics_refused_at_predict(data, table, store, tmp_path):
    "A processor carrying NaN stds (built by hand, or unpickled from an export) refuses to predict NaN."
    import dataclasses
    from fastai_memmap.tabular.item_list import MemmapTabularProcessor
    st = data.train_ds.x.state
    bad = dataclasses.replace(st, stds={**st.stds, "d": float("nan")})
    with pytest.raises(ColumnValueError, match=r"predict: fitted state: expected a finite std .*\['d'\]"):
        MemmapTabularProcessor(state=bad).process_one(table.iloc[0].to_dict())
    blob = pickle.dumps(MemmapTabularProcessor(state=bad))
    with pytest.raises(ColumnValueError, match="exported processor"):
        pickle.loads(blob)
    with pytest.raises(ColumnValueError, match=r"state=: expected a finite std"):
        tabular_to_memmap(table.iloc[:5], tmp_path / "t", state=bad, progress=False)


def test_csv_extra_fields_are_an_error_or_explicit(tmp_path):
    "pandas' usecols hid a line with more fields than the header: now an error naming the file, or explicit usecols."
    csv = tmp_path / "extra.csv"
    csv.write_text("a,c,y,unused\nx,1.0,p,0\nz,2.0,q,0,LOST\ny,3.0,p,0\n")
    out = tmp_path / "s"
    with pytest.raises(FormatError, match=r"extra\.csv: .*Expected 4 fields in line 3, saw 5"):
        tabular_to_memmap(csv, out, ["a"], ["c"], "y", procs=[Categorify], progress=False)
    _leaves_nothing(tmp_path, out)
    first = tmp_path / "first.csv"            # extra field on the first data line: pandas shifts every column
    first.write_text("a,c,y\nx,1.0,p,LOST\nz,2.0,q\n")
    with pytest.raises(FormatError, match=r"first\.csv: line 2: expected as many fields as the header's 3"):
        tabular_to_memmap(first, out, ["a"], ["c"], "y", procs=[Categorify], progress=False)
    _leaves_nothing(tmp_path, out)
    tabular_to_memmap(csv, out, ["a"], ["c"], "y", procs=[Categorify], progress=False,
                      read_kwargs={"usecols": ["a", "c", "y"]})        # the explicit opt-in keeps pandas' reading
    assert len(TabularStore.open(out)) == 3


def test_csv_unused_columns_do_not_change_the_store(table, store, tmp_path):
    "Reading every CSV column (to see extra fields) gives the same store as before, whatever the chunking."
    csv = tmp_path / "t.csv"
    table.assign(zz="unused text").to_csv(csv, index=False)
    tabular_to_memmap(csv, tmp_path / "s", CATS, CONTS, "y", chunksize=300, valid_idx=VALID, progress=False,
                      read_kwargs={"float_precision": "round_trip"})
    assert_same_store(store, tmp_path / "s")


@pytest.mark.parametrize("content, match", [
    (b"", r"empty\.csv: expected a CSV file with a header line, found an empty file"),
    (b"a,c,y\nx,1.0,p\n\xff\xfe,2.0,q\n", r"empty\.csv: expected text in utf-8, found an undecodable byte b'\\xff'"),
])
def test_empty_or_undecodable_csv_is_typed(tmp_path, content, match):
    csv = tmp_path / "empty.csv"
    csv.write_bytes(content)
    with pytest.raises(FormatError, match=match):
        tabular_to_memmap(csv, tmp_path / "s", ["a"], ["c"], "y", progress=False)
    _leaves_nothing(tmp_path, tmp_path / "s")
    with pytest.raises(FormatError, match=match):
        list(iter_frames(csv))


def test_undecodable_jsonl_is_typed(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": "x"}\n{"a": "\xff"}\n')
    with pytest.raises(FormatError, match=r"x\.jsonl: expected UTF-8 JSON lines"):
        list(iter_frames(p))


@pytest.mark.parametrize("kind", ["category", "float"])
def test_missing_labels_are_an_error_or_explicit(tmp_path, kind):
    "An empty label cell was silently no class (or a NaN regression target): refused unless missing_y='keep'."
    csv = tmp_path / "l.csv"
    csv.write_text("a,c,y\nx,1.0,1\nz,2.0,\ny,3.0,1\nw,4.0,2\n")
    out = tmp_path / "s"
    with pytest.raises(ColumnValueError, match=r"l\.csv: target column 'y', row 1: expected a label, found a missing"):
        tabular_to_memmap(csv, out, ["a"], ["c"], "y", y_kind=kind, chunksize=2, progress=False)
    _leaves_nothing(tmp_path, out)
    tabular_to_memmap(csv, out, ["a"], ["c"], "y", y_kind=kind, progress=False, missing_y="keep")
    y = TabularStore.open(out).y[:]
    if kind == "category":
        np.testing.assert_array_equal(y, [0, -1, 0, 1])
    else:
        np.testing.assert_array_equal(y, [1, np.nan, 1, 2])
    with pytest.raises(TabularError, match="missing_y: expected 'error' or 'keep', found 'drop'"):
        tabular_to_memmap(csv, tmp_path / "t", ["a"], ["c"], "y", progress=False, missing_y="drop")


def test_missing_labels_in_a_test_set(table, store, tmp_path):
    df = table.iloc[:50].copy()
    df.loc[7, "y"] = None
    with pytest.raises(ColumnValueError, match="target column 'y', row 7"):
        tabular_to_memmap(df, tmp_path / "t", y_names="y", state=store, progress=False)
    tabular_to_memmap(df, tmp_path / "t", y_names="y", state=store, progress=False, missing_y="keep")
    assert TabularStore.open(tmp_path / "t").y[7] == -1


# ------------------------------------------------------------------------------------------ peak memory
_RSS_CHILD = """
import json, sys, threading, time, warnings
warnings.filterwarnings("ignore")
import psutil, pandas as pd
from fastai_memmap.tabular.item_list import tabular_to_memmap
proc, peak, done = psutil.Process(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
before = proc.memory_info().rss
t = threading.Thread(target=sample); t.start()
if sys.argv[1] == "stream":
    tabular_to_memmap(sys.argv[2], sys.argv[3], ["k1", "k2"], ["v1", "v2", "v3"], "y", chunksize=10000, progress=False)
else:
    df = pd.read_csv(sys.argv[2])
done[0] = True; t.join()
print(json.dumps(max(peak[0], proc.memory_info().rss) - before))
"""


@pytest.mark.slow
def test_peak_rss_bounded_by_chunk_not_table(tmp_path):
    "200k-row CSV, chunks of 10k: the streamed conversion grows RSS far less than reading the CSV whole."
    import subprocess
    import sys
    rng = np.random.default_rng(0)
    n = 200_000
    df = pd.DataFrame({"k1": rng.choice(["red", "green", "blue", None], n), "k2": rng.integers(0, 1000, n),
                       "v1": rng.normal(size=n), "v2": rng.normal(size=n), "v3": rng.random(n),
                       "y": rng.choice(["a", "b"], n)})
    df.loc[::9, "v2"] = np.nan
    csv = tmp_path / "big.csv"
    df.to_csv(csv, index=False)
    del df
    grow = {}
    for mode in ("stream", "whole"):
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, mode, str(csv), str(tmp_path / "s")],
                             capture_output=True, text=True, check=True)
        grow[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert grow["stream"] < 0.5 * grow["whole"], grow
    assert len(TabularStore.open(tmp_path / "s")) == n


# ------------------------------------------------------------------------------------------ x / y / state as a group
def test_outputs_commit_as_a_group(table, store, tmp_path, monkeypatch):
    """cats, conts, y, valid and tabular.json are built in one hidden directory renamed once: when the y store
    fails (here its class list is over the manifest's meta limit, which the reader would refuse), no output
    appears, and a store being replaced (overwrite=True) stays as it was, byte for byte."""
    import fastai_memmap.store.format as fmt
    out = tmp_path / "s"
    tabular_to_memmap(table.iloc[:300], out, CATS, CONTS, "y", progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    many = table.assign(y=[f"label-{i:05d}-" + "x" * 40 for i in range(len(table))])
    monkeypatch.setattr(fmt, "MAX_META_BYTES", 50_000)     # 2000 classes of ~50 bytes: over it
    with pytest.raises(FormatError, match=r"y: expected meta of at most 50,000 bytes"):
        tabular_to_memmap(many, out, CATS, CONTS, "y", valid_idx=VALID, overwrite=True, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if ".fmtmp-" in p.name] == []
    with pytest.raises(FormatError):
        tabular_to_memmap(many, tmp_path / "new", CATS, CONTS, "y", valid_idx=VALID, progress=False)
    _leaves_nothing(tmp_path, tmp_path / "new")
    monkeypatch.undo()
    tabular_to_memmap(many, tmp_path / "new", CATS, CONTS, "y", valid_idx=VALID, progress=False)   # under the limit: opens
    assert len(TabularStore.open(tmp_path / "new").state.y_classes) == len(table) - len(VALID)


def test_failure_after_x_is_written_leaves_nothing(table, tmp_path, monkeypatch):
    "A failure while the y rows are appended (x already complete in the build directory) commits nothing."
    from fastai_memmap.store import writer as wr
    real = wr.MemmapWriter.append

    def append(self, batch):
        if self.path.name == "y":
            raise OSError(28, "No space left on device (injected)")
        return real(self, batch)
    monkeypatch.setattr(wr.MemmapWriter, "append", append)
    out = tmp_path / "s"
    with pytest.raises(OSError):
        tabular_to_memmap(table, out, CATS, CONTS, "y", valid_idx=VALID, chunksize=500, progress=False)
    _leaves_nothing(tmp_path, out)
