"""ImageListInMemory on the batch fast path: one gather out of the pixel buffer, equal to the per-item batch."""
import warnings

import numpy as np
import PIL.Image
import pytest
from store_data import write_png_folder
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.vision import cnn_learner, crop_pad, imagenet_stats, models

from fastai_memmap.data.batching import Collated, WorkersSlowerWarning, takes_fast_path
from fastai_memmap.data.device import to_float, to_float_tfm
from fastai_memmap.vision.inmemory import ImageDataBunchInMemory, ImageListInMemory, SegmentationItemListInMemory

CLASSES = ["cat", "dog"]


def _write(root, n, sizes, modes=("RGB", "L", "RGBA", "P"), seed=0):
    return write_png_folder(root, n, CLASSES, sizes, modes, seed)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sq") / "data", 12, ((20, 24),))         # 24 images 20x24


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("rg") / "data", 8, ((12, 20), (16, 16)))


def _lls(root, **kwargs):
    return ImageListInMemory.from_folder(root, **kwargs).split_by_rand_pct(0.25, seed=3).label_from_folder()


def _per_item(ds, idxs):
    xs, ys = zip(*(ds[int(i)] for i in idxs))
    return torch.stack([x.data for x in xs]), torch.tensor([y.data for y in ys])


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_fast_batch_equals_per_item_float_and_uint8(square, mode):
    ll = _lls(square, convert_mode=mode).load_data(progress=False)
    ll8 = _lls(square, convert_mode=mode, uint8=True).load_data(progress=False)
    ds, ds8 = ll.train, ll8.train
    assert ds8.x.uint8 and not ds.x.uint8
    assert takes_fast_path(ds) and takes_fast_path(ds8)
    idxs = [5, 0, 7, 7, 3, 11]
    bx, by = _per_item(ds, idxs)
    got = ds.__getitems__(idxs)
    assert isinstance(got, Collated)
    assert _same(got[0], bx) and got[0].is_contiguous() and _same(got[1], by)
    got8 = ds8.__getitems__(idxs)
    assert isinstance(got8, Collated) and got8[0].dtype == torch.uint8
    assert _same(to_float(got8[0]), bx) and _same(got8[1], by)
    assert ll.valid.x.get_batch(np.arange(len(ll.valid))) is not None   # split lists share the buffer


def test_fallback_when_tfms_not_loaded_or_mixed_sizes(square, ragged):
    plain = _lls(square)                                           # never loaded: from disk, item by item
    assert plain.train.x.get_batch(np.arange(4)) is None
    assert isinstance(plain.train.__getitems__([0, 1]), list)
    idxs = [0, 1, 2, 3]
    ll = _lls(square).load_data(progress=False)
    expect = _per_item(ll.train, idxs)
    ll.train.x.pixels.close()                                      # freed: disk again, same values
    got = ll.train.__getitems__(idxs)
    assert isinstance(got, list) and _same(torch.stack([x.data for x, _ in got]), expect[0])
    rg = _lls(ragged, uint8=True).load_data(progress=False)
    x = rg.train.x
    shapes = [tuple(x[i].data.shape) for i in range(len(x))]
    same = [i for i in range(len(x)) if shapes[i] == shapes[0]][:3]
    mixed = same[:1] + [next(i for i in range(len(x)) if shapes[i] != shapes[0])]
    assert x.get_batch(np.array(mixed)) is None and isinstance(rg.train.__getitems__(mixed), list)
    assert _same(to_float(x.get_batch(np.array(same))), _per_item(rg.train, same)[0])
    tf = _lls(square).transform(([crop_pad()], [crop_pad()]), size=16).load_data(progress=False)
    assert not takes_fast_path(tf.train) and isinstance(tf.train.__getitems__([0, 1]), list)


def test_segmentation_masks_batch_as_int64(tmp_path):
    root = tmp_path / "seg"
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        PIL.Image.fromarray(rng.integers(0, 3, (8, 10), dtype=np.uint8)).save(root / "lbl" / f"{i}.png")
    ll = (SegmentationItemListInMemory.from_folder(root / "img").split_none()
          .label_from_func(lambda p: root / "lbl" / p.name, classes=["a", "b", "c"])).load_data(progress=False)
    idxs = [4, 1, 2]
    got = ll.train.__getitems__(idxs)
    xs, ys = zip(*(ll.train[i] for i in idxs))
    assert isinstance(got, Collated)
    assert _same(got[0], torch.stack([x.data for x in xs])) and _same(got[1], torch.stack([y.data for y in ys]))


def _batches(data):
    return [[t.clone() for t in b] for b in data.fix_dl] + [[t.clone() for t in b] for b in data.valid_dl]


def test_databunch_normalized_batches_equal_uint8_or_float(square):
    out = {}
    for u8 in (False, True):
        data = _lls(square, uint8=u8).load_data(progress=False).databunch(bs=5, num_workers=0)
        data.normalize(imagenet_stats)
        assert isinstance(data, ImageDataBunchInMemory)
        assert (data.train_dl.tfms[0] is to_float_tfm) == u8 and len(data.train_dl.tfms) == 1 + u8
        out[u8] = _batches(data)
    assert len(out[True]) == len(out[False]) == 6            # 4 train (fix_dl) + 2 valid
    for (x8, y8), (x, y) in zip(out[True], out[False]):
        assert x8.dtype == torch.float32 and torch.equal(x8, x) and torch.equal(y8, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkersSlowerWarning)
        auto = _lls(square, uint8=True).load_data(progress=False).databunch(bs=5, num_workers="auto")
    assert auto.train_dl.num_workers == 0
    auto.normalize(imagenet_stats)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_batches(auto), out[False]))


def test_cnn_learner_fits_one_epoch_uint8(square):
    data = _lls(square, uint8=True).load_data(progress=False).databunch(bs=6, num_workers=0).normalize(imagenet_stats)
    learn = cnn_learner(data, models.resnet18, pretrained=False)
    learn.fit(1)
    assert len(learn.recorder.losses) == len(data.train_dl) and np.isfinite(learn.recorder.losses[-1])
