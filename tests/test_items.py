"""MemmapItemList and the label lists through fastai's data block API, on real stores."""
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_train import Learner, load_learner
from fastai.data_block import FloatList

from fastai_memmap import save_memmap, MemmapArray
from fastai_memmap.errors import ItemShapeError, LabelError, MemmapError, ShardMismatchError
from fastai_memmap.data.items import MemmapItem, MemmapItemList, RowIndex
from fastai_memmap.data.labels import MemmapCategoryList, MemmapFloatList

N, D = 300, 8


@pytest.fixture
def stores(tmp_path, rng):
    "x: N rows of (D,) float32 whose first value is the row number; y: int64 codes with class names."
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, 0] = np.arange(N)
    codes = (np.arange(N) % 3).astype(np.int64)
    save_memmap(tmp_path / "x", x, shard_rows=70)
    save_memmap(tmp_path / "y", codes, meta={"classes": ["a", "b", "c"]})
    return tmp_path, x, codes


def _model(c):
    return torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, c))


def test_items_are_row_indices_and_get_reads_the_row(stores):
    path, x, _ = stores
    il = MemmapItemList.from_memmap(path / "x")
    assert isinstance(il.items, RowIndex) and il.items.dtype == np.int64 and len(il) == N
    item = il[123]
    assert isinstance(item, MemmapItem) and item.data.dtype == torch.float32
    assert np.array_equal(item.data.numpy(), x[123])
    sub = il[np.array([5, 1, 5])]
    assert isinstance(sub, MemmapItemList) and sub.store is il.store
    assert [int(sub[i].data[0]) for i in range(3)] == [5, 1, 5]
    assert il.path == path


def test_classification_chain_delivers_rows_and_codes(stores):
    path, x, codes = stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=3)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    assert isinstance(data.train_ds.y, MemmapCategoryList)
    assert data.c == 3 and data.train_ds.y.classes == ["a", "b", "c"]
    assert len(data.train_ds) + len(data.valid_ds) == N
    xb, yb = next(iter(data.fix_dl))
    rows = xb[:, 0].long().cpu().numpy()
    assert np.array_equal(xb.cpu().numpy(), x[rows])
    assert np.array_equal(yb.cpu().numpy(), codes[rows])
    assert str(data.train_ds.y[0]) in ("a", "b", "c")


def test_regression_with_multidimensional_targets(tmp_path, rng):
    x = rng.normal(size=(128, D)).astype(np.float32)
    y = np.stack([x[:, :3] * 2, x[:, 3:6] - 1], 1).astype(np.float32)    # (128, 2, 3)
    save_memmap(tmp_path / "x", x)
    save_memmap(tmp_path / "y", y)
    data = (MemmapItemList.from_memmap(tmp_path / "x").split_by_idx(list(range(100, 128)))
            .label_from_memmap(tmp_path / "y").databunch(bs=16, num_workers=0))
    assert isinstance(data.train_ds.y, MemmapFloatList) and data.c == 6
    assert isinstance(data.train_ds.y.loss_func.func, torch.nn.MSELoss)
    xb, yb = next(iter(data.fix_dl))
    assert yb.shape == (16, 2, 3)
    assert np.array_equal(yb.cpu().numpy(), y[:16])
    learn = Learner(data, _model(data.c))
    learn.fit(1, 1e-2)
    assert np.isfinite(learn.validate()[0])


def test_split_from_df_label_from_df_and_func(stores):
    path, x, codes = stores
    df = pd.DataFrame({"is_valid": np.arange(N) % 5 == 0, "label": np.where(np.arange(N) % 2, "odd", "even")})
    ll = (MemmapItemList.from_memmap(path / "x", inner_df=df).split_from_df("is_valid")
          .label_from_df("label"))
    assert len(ll.valid) == N // 5
    row = int(ll.valid.x.items[3])
    assert str(ll.valid.y[3]) == ("odd" if row % 2 else "even")
    lf = MemmapItemList.from_memmap(path / "x").split_by_idx([0, 1, 2]).label_from_func(lambda r: float(r), label_cls=FloatList)
    assert float(lf.valid.y[2].data) == 2.0


def test_filter_by_func_receives_row_numbers(stores):
    path, _, _ = stores
    il = MemmapItemList.from_memmap(path / "x").filter_by_func(lambda r: r % 10 == 0)
    assert il.items.dtype == np.int64 and list(il.items) == list(range(0, N, 10))
    assert il.items.store is il.store


def test_add_test_reads_its_own_store(stores, rng):
    path, x, _ = stores
    xt = rng.normal(size=(20, D)).astype(np.float32)
    save_memmap(path / "xt", xt)
    ll = MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y")
    ll.add_test(MemmapItemList.from_memmap(path / "xt"))
    assert len(ll.test) == 20
    assert np.array_equal(ll.test.x[7].data.numpy(), xt[7])
    data = ll.databunch(bs=8, num_workers=0)
    assert np.array_equal(next(iter(data.test_dl))[0].cpu().numpy(), xt[:8])


def test_add_test_with_other_item_shape_is_refused(stores, rng):
    path, _, _ = stores
    save_memmap(path / "bad", rng.normal(size=(5, D + 1)).astype(np.float32))
    ll = MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y")
    with pytest.raises(ShardMismatchError, match=r"expected rows of \(8,\) float32.*found \(9,\) float32"):
        ll.add_test(MemmapItemList.from_memmap(path / "bad"))


def test_bad_labels_are_refused(stores):
    path, _, _ = stores
    save_memmap(path / "y_bad", np.array([0, 1, 7] * (N // 3), np.int64), meta={"classes": ["a", "b", "c"]})
    save_memmap(path / "y_short", np.zeros(N - 1, np.int64))
    il = MemmapItemList.from_memmap(path / "x")
    with pytest.raises(LabelError, match=r"expected class codes in \[0, 3\).*found codes from 0 to 7"):
        il.split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y_bad")
    with pytest.raises(ItemShapeError, match=f"expected {N} label rows.*found {N - 1}; label row i"):
        il.split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y_short")
    save_memmap(path / "y_long", np.arange(N + 5, dtype=np.int64) % 3, meta={"classes": ["a", "b", "c"]})
    with pytest.raises(ItemShapeError, match=f"expected {N} label rows.*found {N + 5}.*allow_longer=True"):
        il.split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y_long")
    lls = il.split_by_rand_pct(0.2, seed=0).label_from_memmap(path / "y_long", allow_longer=True)
    rows = np.asarray(lls.train.x.items)
    assert [int(lls.train.y[i].data) for i in range(5)] == [int(r) % 3 for r in rows[:5]]   # row i labels row i
    with pytest.raises(ValueError, match="isn't split"):
        il.label_from_memmap(path / "y")


def test_integer_labels_without_classes_become_range(tmp_path, rng):
    save_memmap(tmp_path / "x", rng.normal(size=(40, D)).astype(np.float32))
    save_memmap(tmp_path / "y", (np.arange(40) % 4).astype(np.int32))
    ll = MemmapItemList.from_memmap(tmp_path / "x").split_by_idx([0, 1]).label_from_memmap(tmp_path / "y")
    assert ll.train.y.classes == [0, 1, 2, 3]


def test_pickled_label_list_is_small_for_a_100mb_store(tmp_path, rng):
    rows, width = 6400, 4096          # 6400 rows of 16 KiB = 100 MiB
    with fastai_memmap.MemmapWriter(tmp_path / "big", np.float32, (width,)) as w:
        for a in range(0, rows, 800):
            w.append(np.full((800, width), a, np.float32))
    save_memmap(tmp_path / "y", np.arange(rows, dtype=np.float32))
    ll = MemmapItemList.from_memmap(tmp_path / "big").split_by_rand_pct(0.2, seed=0).label_from_memmap(tmp_path / "y")
    assert MemmapArray.open(tmp_path / "big").nbytes == 100 * 2 ** 20
    for ds in (ll.train, ll.valid):
        blob = pickle.dumps(ds)
        assert len(blob) < 100_000, len(blob)
        back = pickle.loads(blob)
        assert np.array_equal(np.asarray(back.x.items), np.asarray(ds.x.items))
        assert np.array_equal(back.x[3].data.numpy(), ds.x[3].data.numpy())


def _deliver_epoch(path, context):
    ll = MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.25, seed=1).label_from_memmap(path / "y")
    kwargs = {} if context is None else {"multiprocessing_context": context}
    data = ll.databunch(bs=16, num_workers=2, **kwargs)
    dl = data.train_dl.new(shuffle=True, drop_last=False)
    seen = [xb.cpu().numpy() for xb, _ in dl]
    return np.concatenate(seen), np.asarray(data.train_ds.x.items)


@pytest.mark.parametrize("context", [None, "fork", "spawn"])
def test_workers_deliver_every_item_once_byte_equal(stores, context):
    path, x, _ = stores
    got, rows = _deliver_epoch(path, context)
    ids = got[:, 0].astype(np.int64)
    assert sorted(ids.tolist()) == sorted(rows.tolist())        # every train row exactly once
    assert got.tobytes() == x[ids].tobytes()                    # byte for byte


def test_export_load_learner_predict(stores):
    path, x, codes = stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=3)
            .label_from_memmap(path / "y").databunch(bs=32, num_workers=0))
    learn = Learner(data, _model(data.c))
    learn.fit(1, 1e-2)
    before = learn.predict(x[10])
    learn.export()
    blob = (path / "export.pkl").read_bytes()
    assert x[:, 1:].tobytes()[:64] not in blob          # no data rows in export.pkl
    inf = load_learner(path)
    after = inf.predict(x[10])
    assert str(after[0]) == str(before[0]) and str(after[0]) in ("a", "b", "c")
    assert torch.allclose(after[2], before[2])
    with pytest.raises(ItemShapeError, match=r"expected a row of shape \(8,\), found \(9,\)"):
        inf.predict(np.zeros(D + 1, np.float32))
    with pytest.raises(MemmapError, match="has no store"):
        inf.data.single_ds.x.get(0)


def test_show_batch_and_show_results_draw(stores):
    import matplotlib.pyplot as plt
    path, _, _ = stores
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=3)
            .label_from_memmap(path / "y").databunch(bs=16, num_workers=0))
    data.show_batch(rows=4)
    assert len(plt.gcf().axes) >= 4 and plt.gcf().axes[0].lines      # 1-d rows drawn as lines
    learn = Learner(data, _model(data.c))
    learn.show_results(rows=4)
    plt.close("all")
