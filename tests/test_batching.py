"""The batch fast path (fastai_memmap.data.batching) and the device stage (fastai_memmap.data.device): whole
batches equal to fastai's per-item path for every label kind, fallback with tfms, uint8 images made
float on the device before normalize, worker defaults, the prefetch thread, export/load_learner."""
import random
import threading
import warnings

import numpy as np
import pytest
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_data import DatasetType
from fastai.basic_train import Learner, load_learner
from fastai.core import defaults
from fastai.data_block import CategoryList, FloatList
from fastai.torch_core import data_collate
from fastai.vision import get_transforms

from fastai_memmap import save_memmap
from fastai_memmap.errors import ArgumentError, ArgumentTypeError
from fastai_memmap.data.batching import Collated, FastLabelList, WorkersSlowerWarning, memmap_collate, takes_fast_path
from fastai_memmap.data.device import (PrefetchDataLoader, insert_to_float, to_float, to_float_tfm, use_prefetch_thread,
                                       with_to_float)
from fastai_memmap.vision.images import MemmapImageList, rows_to_nchw, rows_to_nchw_uint8
from fastai_memmap.data.items import MemmapItemList
from fastai_memmap.data.labels import MemmapCategoryList, MemmapFloatList

N, D = 120, 6
IDX = [5, 0, 77, 5, 99, 33, 2]      # unsorted, with a repeat


@pytest.fixture
def stores(tmp_path, rng):
    "x: N rows (first value = row number), 3 shards; y codes with classes; z float targets (N, 2, 2)."
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, 0] = np.arange(N)
    save_memmap(tmp_path / "x", x, shard_rows=50)
    save_memmap(tmp_path / "y", (np.arange(N) % 3).astype(np.int64), meta={"classes": ["a", "b", "c"]})
    save_memmap(tmp_path / "z", rng.normal(size=(N, 2, 2)).astype(np.float32))
    return tmp_path, x


@pytest.fixture
def images(tmp_path, rng):
    "48 RGB 8×10 uint8 images (HWC), class codes, and 0/1/2 masks of the same size."
    imgs = rng.integers(0, 256, size=(48, 8, 10, 3)).astype(np.uint8)
    save_memmap(tmp_path / "im", imgs, meta={"layout": "HWC"})
    save_memmap(tmp_path / "iy", (np.arange(48) % 2).astype(np.int64), meta={"classes": ["p", "q"]})
    save_memmap(tmp_path / "mask", (imgs[..., 0] // 86).astype(np.uint8), meta={"classes": ["0", "1", "2"]})
    return tmp_path, imgs


def assert_same_batch(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape, (u.dtype, v.dtype, u.shape, v.shape)
        assert torch.equal(u, v)


def assert_fast_equals_per_item(ds, idx=IDX):
    fast = ds.__getitems__(idx)
    assert isinstance(fast, Collated) and takes_fast_path(ds)
    assert_same_batch(memmap_collate(fast), data_collate([ds[i] for i in idx]))


def _split(il):
    return il.split_by_idx(list(range(100, il.items.shape[0])))


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("labels", ["memmap_codes", "memmap_floats", "fastai_category", "fastai_float"])
def test_fast_path_equals_per_item_path_for_every_label_kind(stores, labels):
    path, _ = stores
    lls = _split(MemmapItemList.from_memmap(path / "x"))
    if labels == "memmap_codes":
        lls = lls.label_from_memmap(path / "y")
        kind = MemmapCategoryList
    elif labels == "memmap_floats":
        lls = lls.label_from_memmap(path / "z")
        kind = MemmapFloatList
    elif labels == "fastai_category":
        lls = lls.label_from_func(lambda r: "abc"[int(r) % 3])
        kind = CategoryList
    else:
        lls = lls.label_from_func(lambda r: float(r) / 7, label_cls=FloatList)
        kind = FloatList
    assert type(lls.train.y) is kind and isinstance(lls.train, FastLabelList)
    assert_fast_equals_per_item(lls.train)
    assert_fast_equals_per_item(lls.valid, [3, 0, 19])


def test_loader_batches_equal_a_per_item_loader(stores):
    path, x = stores
    data = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y").databunch(bs=16, num_workers=0)
    per_item = torch.utils.data.DataLoader([data.fix_ds[i] for i in range(len(data.fix_ds))], batch_size=16,
                                           collate_fn=data_collate)
    for fast, slow in zip(data.fix_dl, per_item):
        assert_same_batch(fast, slow)
    xb, _ = next(iter(data.train_dl))
    assert np.array_equal(xb.numpy(), x[xb[:, 0].long().numpy()])


@pytest.mark.parametrize("layout,convert_mode", [("HWC", "RGB"), ("HWC", "L"), ("CHW", "RGB"), ("HW", "RGB"),
                                                 ("HWC4", "RGB")])
def test_image_fast_path_equals_per_item_and_uint8_equals_float(tmp_path, rng, layout, convert_mode):
    imgs = rng.integers(0, 256, size=(30, 5, 7, 4 if layout == "HWC4" else 3)).astype(np.uint8)
    rows = {"HWC": imgs, "HWC4": imgs, "CHW": imgs.transpose(0, 3, 1, 2).copy(), "HW": imgs[..., 0].copy()}[layout]
    save_memmap(tmp_path / "im", rows, meta={"layout": layout[:3] if layout != "HW" else "HW"})
    save_memmap(tmp_path / "iy", (np.arange(30) % 2).astype(np.int64))
    for uint8 in (False, True):
        lls = (MemmapImageList.from_memmap(tmp_path / "im", convert_mode=convert_mode, uint8=uint8)
               .split_by_idx([1, 2]).label_from_memmap(tmp_path / "iy"))
        assert lls.train.x.uint8 is uint8 and lls.valid.x.uint8 is uint8        # kept by splits (copy_new)
        xb, yb = memmap_collate(lls.train.__getitems__([5, 0, 17, 5, 27]))
        slow = data_collate([lls.train[i] for i in [5, 0, 17, 5, 27]])
        assert_same_batch([to_float(xb), yb], slow)
        exact_uint8 = uint8 and not (convert_mode == "L")
        assert xb.dtype == (torch.uint8 if exact_uint8 else torch.float32)
        assert to_float(xb).is_contiguous()


def test_rows_to_nchw_uint8_matches_float_conversion(rng):
    rows = rng.integers(0, 256, size=(4, 3, 5, 3)).astype(np.uint8)
    t = rows_to_nchw_uint8(rows, "HWC")
    assert t.dtype == torch.uint8 and t.shape == (4, 3, 3, 5)
    assert np.shares_memory(t.numpy() if t.is_contiguous() else t.permute(0, 2, 3, 1).numpy(), rows)   # no copy
    f = to_float(t)
    assert torch.equal(f, rows_to_nchw(rows, "HWC")) and f.is_contiguous()
    assert rows_to_nchw_uint8(rows, "HWC", "L") is None


def test_segmentation_masks_fast_path_equals_per_item(images):
    path, _ = images
    lls = MemmapImageList.from_memmap(path / "im").split_by_idx([0, 1, 2]).label_from_memmap(path / "mask")
    xb, yb = memmap_collate(lls.train.__getitems__([4, 9, 4]))
    assert yb.dtype == torch.int64 and yb.shape == (3, 1, 8, 10)
    assert_fast_equals_per_item(lls.train, [4, 9, 4])


def test_fallback_with_tfms_is_the_per_item_path(images):
    path, _ = images
    lls = (MemmapImageList.from_memmap(path / "im", uint8=True).split_by_idx([0, 1, 2])
           .label_from_memmap(path / "iy").transform(get_transforms(), size=8))
    ds = lls.train
    assert not takes_fast_path(ds)

    def seeded(f):
        random.seed(3), np.random.seed(3), torch.manual_seed(3)
        return f()
    got = seeded(lambda: ds.__getitems__([3, 7, 11]))
    assert not isinstance(got, Collated)
    fast = memmap_collate(got)
    slow = seeded(lambda: data_collate([ds[i] for i in [3, 7, 11]]))
    assert fast[0].dtype == torch.float32
    assert_same_batch(fast, slow)


def test_non_batchable_labels_fall_back(stores):
    path, _ = stores
    lls = _split(MemmapItemList.from_memmap(path / "x")).label_from_func(lambda r: float(r) + 1, label_cls=FloatList,
                                                                         log=True)
    out = lls.train.__getitems__([1, 2])
    assert not isinstance(out, Collated) and not takes_fast_path(lls.train)
    assert_same_batch(memmap_collate(out), data_collate([lls.train[1], lls.train[2]]))


def test_fast_path_survives_export_and_load_learner(stores):
    path, x = stores
    data = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y").databunch(bs=16, num_workers=0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    learn = Learner(data, model)
    learn.fit(1, 1e-2)
    learn.export()
    test = MemmapItemList.from_memmap(path / "x", rows=np.arange(90, 110))
    inf = load_learner(path, test=test)
    preds = inf.get_preds(DatasetType.Test)[0]
    model.eval()
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(x[90:110])), 1)
    assert torch.allclose(preds, expect, atol=1e-6)
    assert str(inf.predict(x[3])[0]) in ("a", "b", "c")


# ------------------------------------------------------------------------------------------ uint8 on the device
def test_uint8_databunch_puts_to_float_before_normalize(images):
    path, imgs = images
    stats = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    got = {}
    for uint8 in (False, True):
        data = (MemmapImageList.from_memmap(path / "im", uint8=uint8).split_by_idx([0, 1, 2, 3])
                .label_from_memmap(path / "iy").databunch(bs=8, num_workers=0).normalize(stats))
        tfms = data.train_dl.tfms
        if uint8:
            assert tfms[0] is to_float_tfm and len(tfms) == 2 and data.valid_dl.tfms[0] is to_float_tfm
            raw, _ = next(iter(data.fix_dl.dl))
            assert raw.dtype == torch.uint8                     # what travels from the loader
        else:
            assert to_float_tfm not in tfms
        got[uint8] = [xb for xb, _ in data.fix_dl]
        x, _ = data.one_batch(denorm=True)
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1.0001
        data.show_batch(rows=2)
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b) and b.dtype == torch.float32


def test_insert_to_float_goes_before_an_existing_normalize_once(images):
    path, _ = images
    data = (MemmapImageList.from_memmap(path / "im").split_by_idx([0, 1]).label_from_memmap(path / "iy")
            .databunch(bs=4, num_workers=0).normalize(([0.5] * 3, [0.2] * 3)))
    norm = data.norm
    insert_to_float(insert_to_float(data))
    for dl in data.dls:
        assert dl.tfms == [to_float_tfm, norm]
    assert with_to_float(None) == [to_float_tfm] and with_to_float(norm) == [to_float_tfm, norm]


def test_to_float_leaves_other_inputs_alone():
    f = torch.rand(2, 3)
    assert to_float(f) is f and to_float("x") == "x"
    u = torch.tensor([[0, 255], [51, 1]], dtype=torch.uint8)
    a, b = to_float([u, f])
    assert torch.equal(a, torch.tensor([[0., 1.], [0.2, 1 / 255]])) and b is f
    x, y = to_float_tfm((u, u))
    assert x.dtype == torch.float32 and y is u


def test_uint8_images_through_fork_workers_equal_in_process(images):
    path, _ = images
    lls = MemmapImageList.from_memmap(path / "im", uint8=True).split_by_idx([0, 1]).label_from_memmap(path / "iy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WorkersSlowerWarning)
        data = lls.databunch(bs=8, num_workers=2)
    alone = [b for b in data.fix_dl.new(num_workers=0)]
    for a, b in zip(data.fix_dl, alone):
        assert_same_batch(a, b)


# ------------------------------------------------------------------------------------------ workers and threads
def test_auto_workers_use_a_prefetch_thread_on_the_fast_path(stores):
    path, x = stores
    lls = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y")
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkersSlowerWarning)
        data = lls.databunch(bs=16, num_workers="auto")
    assert isinstance(data.train_dl.dl, PrefetchDataLoader) and data.train_dl.num_workers == 0
    rows = [int(r) for xb, _ in data.train_dl for r in xb[:, 0]]
    assert len(rows) == len(set(rows)) == 96
    assert data.train_dl.new(shuffle=False).dl.prefetch == data.train_dl.dl.prefetch
    data.train_dl.batch_size = 8
    assert isinstance(data.train_dl.dl, PrefetchDataLoader) and len(data.train_dl) == 12


def test_auto_workers_keep_processes_for_per_item_work(images):
    path, _ = images
    lls = (MemmapImageList.from_memmap(path / "im").split_by_idx([0, 1]).label_from_memmap(path / "iy")
           .transform(get_transforms(), size=8))
    data = lls.databunch(bs=8, num_workers="auto")
    assert data.train_dl.num_workers == defaults.cpus and not isinstance(data.train_dl.dl, PrefetchDataLoader)


def test_explicit_workers_on_the_fast_path_warn(stores):
    path, _ = stores
    lls = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y")
    with pytest.warns(WorkersSlowerWarning, match="num_workers='auto'"):
        data = lls.databunch(bs=16, num_workers=2)
    assert data.train_dl.num_workers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkersSlowerWarning)
        lls.databunch(bs=16, num_workers=0)


def test_default_workers_are_auto_and_silent(stores):
    "fastai's databunch passes num_workers=defaults.cpus when the user wrote none: that takes 'auto', silently."
    path, _ = stores
    lls = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no WorkersSlowerWarning, no pin_memory warning on a CPU machine
        data = lls.databunch(bs=16)
        next(iter(data.train_dl))
    assert data.train_dl.num_workers == 0 and isinstance(data.train_dl.dl, PrefetchDataLoader)
    assert data.train_dl.dl.init_kwargs["pin_memory"] is torch.cuda.is_available()


class _Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        if i == 25:
            raise KeyError("item 25 is broken")
        return torch.tensor([i])


def test_prefetch_thread_raises_reading_errors_in_the_consumer():
    dl = PrefetchDataLoader(_Failing(), batch_size=5, pin_memory=False)
    got = []
    with pytest.raises(KeyError, match="item 25 is broken"):
        for b in dl:
            got.append(b)
    assert len(got) == 5


def test_prefetch_thread_stops_when_the_loop_breaks():
    before = threading.active_count()
    dl = PrefetchDataLoader(list(range(1000)), batch_size=2, prefetch=3, pin_memory=False)
    for i, b in enumerate(dl):
        if i == 3:
            break
    del b
    assert threading.active_count() == before
    assert [int(b[0]) for b in PrefetchDataLoader(list(range(6)), batch_size=2, prefetch=0)] == [0, 2, 4]


@pytest.mark.parametrize("prefetch, error", [(-1, ArgumentError), (1.5, ArgumentTypeError), (True, ArgumentTypeError)])
def test_prefetch_must_be_a_count(prefetch, error):
    with pytest.raises(error, match="prefetch: expected an int >= 0"):
        PrefetchDataLoader(list(range(4)), prefetch=prefetch)


def test_use_prefetch_thread_keeps_the_loader_settings(stores):
    path, _ = stores
    data = _split(MemmapItemList.from_memmap(path / "x")).label_from_memmap(path / "y").databunch(bs=10, num_workers=0)
    use_prefetch_thread(data.valid_dl, prefetch=1)
    assert data.valid_dl.dl.prefetch == 1 and data.valid_dl.batch_size == 10
    assert [int(r) for xb, _ in data.valid_dl for r in xb[:, 0]] == list(range(100, N))
