"""Batch augmentation (fastai_memmap.vision.batch_tfms): each image of a batch equals fastai's per-item output for the
same drawn parameters, draws follow fastai's distributions, and databunch(batch_tfms=...) works end to end."""
import dataclasses
import random

import numpy as np
import pytest
import scipy.stats
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes and installs batch_tfms=)
from fastai.basic_data import DatasetType
from fastai.basic_train import load_learner
from fastai.vision import (ImageList, brightness, cnn_learner, contrast, crop, crop_pad, cutout, dihedral,
                           dihedral_affine, flip_affine, flip_lr, get_transforms, imagenet_stats, jitter, models, pad,
                           perspective_warp, rand_crop, rand_zoom, rotate, skew, squish, symmetric_warp, tilt,
                           unet_learner, zoom)
from fastai.vision.image import Image, ImageSegment, ResizeMethod
from fastai.vision.transform import rgb_randomize, zoom_squish

from fastai_memmap import save_memmap
from fastai_memmap.vision.batch_tfms import BatchAugment, BatchTfms, UnsupportedTransformError
from fastai_memmap.data.batching import takes_fast_path
from fastai_memmap.data.device import to_float_tfm
from fastai_memmap.errors import ArgumentError, ArgumentTypeError, MemmapError
from fastai_memmap.vision.images import MemmapImageList, MemmapSegmentationLabelList
from fastai_memmap.vision.inmemory import ImageListInMemory
from store_data import write_png_folder

TOL = 1e-4   # max abs difference on float32 pixels in [0, 1]


def fastai_item(x, eng, draws, i, mask=False):
    "fastai's own per-item output for item `i` of `draws` (its RandTransforms set to the drawn values)."
    tfms = [dataclasses.replace(rt, resolved=res, do_run=run) for rt, (res, run) in zip(eng.plan, draws.item(i))]
    if mask:
        tfms = [t for t in tfms if t.use_on_y]
    cls = ImageSegment if mask else Image
    return cls(x.clone()).apply_tfms(tfms, do_resolve=False, **eng.tfmargs()).data


def images(n, h, w, seed=0):
    "Smooth gradients plus noise, values in [0, 1] with exact 0s and 1s: float32 (n, 3, h, w)."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[None]
    x = (base + 0.3 * torch.rand(n, 3, h, w, generator=g) - 0.15).clamp(0, 1)
    return x


def check_equal(tfms, kw, hw=(24, 32), n=6, exact=False, seed=3):
    eng = BatchTfms(tfms, seed=seed, **kw)
    x = images(n, *hw, seed=seed)
    keep = x.clone()
    d = eng.draw(n)
    out = eng.apply(x, d)
    assert torch.equal(x, keep), "the input batch was changed"
    ref = torch.stack([fastai_item(x[i], eng, d, i) for i in range(n)])
    assert out.shape == ref.shape and out.dtype == torch.float32
    diff = (out - ref).abs().max().item()
    assert (diff == 0) if exact else (diff <= TOL), (eng, diff)
    m = (x[:, :1] * 4).round()          # codes 0..4
    mo = eng.apply(m.long(), d, mask=True)
    mref = torch.stack([fastai_item(m[i], eng, d, i, mask=True) for i in range(n)])
    assert mo.dtype == torch.int64 and mo.shape == mref.shape
    assert (mo != mref).float().mean().item() <= 1e-3, eng
    return eng, d, out


# every transform the issue lists, with random arguments wide enough that most items run and some not
EACH = {
    "flip_lr": [flip_lr(p=0.5)],
    "dihedral": [dihedral()],
    "dihedral_affine": [dihedral_affine()],
    "flip_affine": [flip_affine(p=0.5)],
    "rotate": [rotate(degrees=(-40, 40), p=0.75)],
    "zoom": [zoom(scale=(0.7, 1.6), row_pct=(0, 1), col_pct=(0, 1), p=0.75)],
    "rand_zoom": [rand_zoom(scale=(1., 1.5), p=0.75)],
    "squish": [squish(scale=(0.6, 1.5), row_pct=(0, 1), col_pct=(0, 1))],
    "symmetric_warp": [symmetric_warp(magnitude=(-0.3, 0.3), p=0.75)],
    "perspective_warp": [perspective_warp(magnitude=(-0.3, 0.3), p=0.75)],
    "skew": [skew(direction=(0, 7), magnitude=(-0.4, 0.4))],
    "tilt": [tilt(direction=(0, 3), magnitude=(-0.4, 0.4))],
    "brightness": [brightness(change=(0.2, 0.8), p=0.75)],
    "contrast": [contrast(scale=(0.5, 2.), p=0.75)],
    "crop_pad": [crop_pad(row_pct=(0, 1), col_pct=(0, 1))],
    "rand_crop": [rand_crop()],
}
EXACT = {"flip_lr", "dihedral", "crop_pad", "rand_crop"}


@pytest.mark.parametrize("name", sorted(EACH))
def test_each_transform_equals_fastai_per_item(name):
    hw = (24, 24) if name == "dihedral" else (24, 32)
    check_equal(EACH[name], {}, hw=hw, exact=name in EXACT)
    if name not in EXACT:   # and through a resize, with the other padding modes
        check_equal(EACH[name], dict(size=20, padding_mode="zeros"), hw=hw)


SIZES = [
    dict(size=16), dict(size=40), dict(size=(20, 28)), dict(size=(20, 28), resize_method=ResizeMethod.CROP),
    dict(size=(20, 28), resize_method=ResizeMethod.PAD, padding_mode="zeros"),
    dict(size=30, resize_method=ResizeMethod.PAD, padding_mode="border"),
    dict(size=(18, 18), resize_method=ResizeMethod.SQUISH), dict(size=16, resize_method=ResizeMethod.NO),
    dict(size=8),      # down more than 2x: fastai's area pre-shrink in _grid_sample
    dict(size=18, mult=8), dict(size=20, mode="nearest"),
]


@pytest.mark.parametrize("kw", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("which", ["train", "valid", "flip_vert"])
def test_get_transforms_with_size_resize_method_padding_mode(kw, which):
    tfms = get_transforms(flip_vert=True, max_warp=0.3, max_rotate=30) if which == "flip_vert" else get_transforms()
    check_equal(tfms[1] if which == "valid" else tfms[0], kw, n=8)


def test_xtra_tfms_and_all_transforms_at_once():
    xtra = [skew(direction=(0, 7), magnitude=(-0.3, 0.3), p=0.5), tilt(direction=(0, 3), magnitude=(-.3, .3), p=.5),
            perspective_warp(magnitude=(-0.2, 0.2), p=0.5), squish(scale=(0.8, 1.2), p=0.5)]
    check_equal(get_transforms(xtra_tfms=xtra)[0], dict(size=28), n=8)
    check_equal(get_transforms(xtra_tfms=[dihedral(), rand_zoom(scale=(1., 1.3))])[0], dict(size=24), hw=(24, 24))


def test_flips_and_crops_only_are_exact_and_untouched_items_keep_their_bytes():
    eng, d, out = check_equal([flip_lr(p=0.5), rand_crop()], dict(size=(24, 28), resize_method=ResizeMethod.CROP),
                              n=16, exact=True)   # crop without resize
    check_equal([flip_lr(p=0.5), rand_crop()], dict(size=(28, 32), resize_method=ResizeMethod.PAD), exact=True)
    run = d.drawn[[t.__name__ for t in eng.plan].index("flip_lr")].run
    assert 0 < run.sum() < 16   # both flipped and unflipped items in the batch
    # an affine transform that runs on some items only: the others keep their pixels bit for bit
    eng = BatchTfms([rotate(degrees=(-20, 20), p=0.5)], seed=0)
    x = images(16, 24, 32)
    d = eng.draw(16)
    out, r = eng.apply(x, d), d.drawn[0].run
    assert 0 < r.sum() < 16 and torch.equal(out[~torch.from_numpy(r)], x[~torch.from_numpy(r)])


def test_uint8_batch_equals_float_batch_divided_by_255():
    eng = BatchTfms(get_transforms()[0], size=20, seed=5)
    u = (images(6, 24, 32) * 255).round().to(torch.uint8)
    d = eng.draw(6)
    assert torch.equal(eng.apply(u, d), eng.apply(u.float() / 255, d))


def test_reproducible_from_seed_and_from_torch_seed():
    x = images(8, 24, 32)
    a, b, c = (BatchTfms(get_transforms()[0], seed=s) for s in (7, 7, 8))
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    torch.manual_seed(1)
    p = BatchTfms(get_transforms()[0])(x)
    torch.manual_seed(1)
    assert torch.equal(p, BatchTfms(get_transforms()[0])(x))


def _fastai_draws(rt, n):
    "n resolutions of fastai's own RandTransform `rt`: ({param: values}, do_run)."
    vals, runs = {}, []
    for _ in range(n):
        rt.resolve()
        runs.append(rt.do_run)
        for k, v in rt.resolved.items():
            if isinstance(v, torch.Tensor):
                v = v.numpy().copy()
            vals.setdefault(k, []).append(v)
    return {k: np.array(v) for k, v in vals.items()}, np.array(runs)


def test_drawn_parameters_follow_fastais_distributions():
    "Two-sample KS (continuous), chi-square (integers) and binomial (do_run) tests over 10,000 draws each."
    random.seed(0)
    torch.manual_seed(0)
    n = 10_000
    tfms = get_transforms(flip_vert=True, xtra_tfms=[skew(direction=(0, 7), magnitude=(-0.3, 0.3), p=0.3),
                                                     perspective_warp(magnitude=(-0.2, 0.2), p=0.6)])[0]
    eng = BatchTfms(tfms, seed=11)
    ours = eng.draw(n)
    checked = 0
    for rt, dr in zip(eng.plan, ours.drawn):
        theirs, runs = _fastai_draws(rt, n)
        assert scipy.stats.binomtest(int(dr.run.sum()), n, rt.p).pvalue > 1e-4 if rt.p < 1 else dr.run.all()
        assert abs(dr.run.mean() - runs.mean()) < 0.03, rt
        for k, v in dr.values.items():
            a, b = v.reshape(n, -1), theirs[k].reshape(n, -1).astype(np.float64)
            assert a.shape == b.shape, (rt, k)
            for j in range(a.shape[1]):
                if np.issubdtype(a.dtype, np.integer):
                    cats = np.union1d(a[:, j], b[:, j])
                    table = [[(a[:, j] == c).sum() for c in cats], [(b[:, j] == c).sum() for c in cats]]
                    assert scipy.stats.chi2_contingency(table)[1] > 1e-4, (rt, k)
                else:
                    assert scipy.stats.ks_2samp(a[:, j], b[:, j]).pvalue > 1e-4, (rt, k, j)
                    assert a[:, j].min() >= b[:, j].min() - 0.02 and a[:, j].max() <= b[:, j].max() + 0.02
                checked += 1
    assert checked >= 12   # every random parameter of get_transforms + xtra was compared


@pytest.mark.parametrize("bad", [jitter(magnitude=(-.1, .1)), cutout(), pad(padding=4), crop(size=8),
                                 rgb_randomize(channel=0), zoom_squish(scale=(1., 2., 8), squish=(.75, 1.33, 8),
                                                                       invert=(0.5, 8))])
def test_unsupported_transform_is_refused_by_name(bad):
    with pytest.raises(UnsupportedTransformError) as ei:
        BatchTfms(get_transforms()[0] + [bad])
    e = ei.value
    assert isinstance(e, ValueError) and isinstance(e, MemmapError)
    assert repr(bad.tfm.func.__name__) in str(e) and "expected one of" in str(e)


def test_bad_arguments_are_typed():
    for kw, err in [(dict(padding_mode="wrap"), ArgumentError), (dict(mode="bicubic"), ArgumentError),
                    (dict(size="64"), ArgumentTypeError), (dict(size=0), ArgumentError),
                    (dict(resize_method=9), ArgumentError)]:
        with pytest.raises(err, match="expected"):
            BatchTfms(get_transforms()[0], **kw)
    with pytest.raises(UnsupportedTransformError, match="found BatchTfms|found str"):
        BatchTfms(["rotate"])
    eng = BatchTfms([crop_pad(p=0.5)], size=16, seed=0)
    with pytest.raises(UnsupportedTransformError, match="p=0.5"):
        eng(images(16, 24, 32))
    with pytest.raises(ArgumentError, match=r"\(B, C, H, W\) batch of 4"):
        eng.apply(images(2, 24, 32), eng.draw(4))


# ------------------------------------------------------------------------------------------- data bunches
@pytest.fixture
def store(tmp_path, rng):
    "48 RGB 24×24 uint8 images (HWC) whose dominant colour is the class, plus a float32 copy."
    codes = np.arange(48) % 3
    imgs = rng.integers(0, 60, size=(48, 24, 24, 3)).astype(np.uint8)
    imgs[np.arange(48), :, :, codes] += 180
    save_memmap(tmp_path / "x", imgs, meta={"layout": "HWC"})
    save_memmap(tmp_path / "xf", imgs.astype(np.float32) / 255, meta={"layout": "HWC"})
    save_memmap(tmp_path / "y", codes.astype(np.int64), meta={"classes": ["r", "g", "b"]})
    return tmp_path, imgs


def _lists(path, x="x"):
    return MemmapImageList.from_memmap(path / x).split_by_idx(list(range(36, 48))).label_from_memmap(path / "y")


def _valid_per_item(lls_fn, size):
    "The validation batch of fastai's per-item path (.transform(get_transforms(), size=...))."
    data = lls_fn().transform(get_transforms(), size=size).databunch(bs=12, num_workers=0)
    return data.one_batch(DatasetType.Valid, denorm=False)[0]


@pytest.mark.parametrize("x", ["x", "xf"])
def test_memmap_image_list_batch_tfms_fast_path_and_valid_equals_per_item(store, x):
    path, imgs = store
    data = _lists(path, x).databunch(bs=12, num_workers=0, batch_tfms=get_transforms(), size=20, batch_seed=0)
    data.normalize(imagenet_stats)
    assert takes_fast_path(data.train_ds) and takes_fast_path(data.valid_ds)
    tf = data.train_dl.tfms
    hook = [t for t in tf if isinstance(t, BatchAugment)]
    assert len(hook) == 1 and tf[0] is to_float_tfm and tf[1] is hook[0] and tf[-1] is data.norm
    if x == "x":   # a uint8 store travels as uint8 up to the device
        raw = data.train_dl.dl.dataset.__getitems__(list(range(4)))
        assert raw[0].dtype == torch.uint8
    xb, yb = data.one_batch(DatasetType.Train, denorm=True)
    assert xb.shape == (12, 3, 20, 20) and xb.dtype == torch.float32 and yb.shape == (12,)
    v = data.one_batch(DatasetType.Valid, denorm=False)[0]
    ref = _valid_per_item(lambda: _lists(path, x), 20)
    ref = data.norm.func(ref) if False else (ref - torch.tensor(imagenet_stats[0]).view(1, 3, 1, 1)) / \
        torch.tensor(imagenet_stats[1]).view(1, 3, 1, 1)
    assert (v - ref).abs().max().item() <= TOL * 5   # /std of ~0.22


def test_train_batches_are_augmented_reproducible_and_show_batch(store):
    path, imgs = store
    tfms = ([flip_lr(p=1.)], [])
    data = _lists(path).databunch(bs=12, num_workers=0, batch_tfms=tfms, batch_seed=0)
    fix = data.one_batch(DatasetType.Fix, denorm=False)[0]      # fixed order, train transforms
    raw = torch.from_numpy(imgs[:12]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(fix, raw.flip(-1))
    data.show_batch(rows=2)
    a = _lists(path).databunch(bs=12, num_workers=0, batch_tfms=get_transforms(), batch_seed=4)
    b = _lists(path).databunch(bs=12, num_workers=0, batch_tfms=get_transforms(), batch_seed=4)
    torch.manual_seed(0)
    xa = a.one_batch(DatasetType.Fix)[0]
    xb = b.one_batch(DatasetType.Fix)[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, raw)


def test_refusals_at_databunch(store):
    path, _ = store
    with pytest.raises(UnsupportedTransformError, match="'jitter'"):
        _lists(path).databunch(bs=4, batch_tfms=(get_transforms()[0] + [jitter()], []), num_workers=0)
    with pytest.raises(ArgumentTypeError, match=r"\(train, valid\) pair"):
        _lists(path).databunch(bs=4, batch_tfms=get_transforms()[0], num_workers=0)
    with pytest.raises(ArgumentError, match="per-item transforms"):
        _lists(path).transform(get_transforms()).databunch(bs=4, batch_tfms=get_transforms(), num_workers=0)
    plain = _lists(path).databunch(bs=4, num_workers=0)   # without batch_tfms: unchanged
    assert not any(isinstance(t, BatchAugment) for t in plain.train_dl.tfms)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_png_folder(tmp_path_factory.mktemp("bt") / "data", 8, ["a", "b"], ((24, 24),), ("RGB",), seed=2)


@pytest.mark.parametrize("cls", [ImageList, ImageListInMemory])
def test_image_list_and_in_memory_valid_equal_per_item(folder, cls):
    def lls():
        il = cls.from_folder(folder)
        if cls is ImageListInMemory:
            il.load_data(progress=False)
        return il.split_by_idx([0, 1, 2, 3, 8, 9, 10, 11]).label_from_folder()
    data = lls().databunch(bs=8, num_workers=0, batch_tfms=get_transforms(), size=16)
    assert takes_fast_path(data.train_ds) == (cls is ImageListInMemory)
    xb, _ = data.one_batch()
    assert xb.shape == (8, 3, 16, 16)
    v = data.one_batch(DatasetType.Valid, denorm=False)[0]
    assert (v - _valid_per_item(lls, 16)).abs().max().item() <= TOL


def test_cnn_learner_export_load_learner_predict_valid_tfms_only(store):
    path, imgs = store
    data = _lists(path).databunch(bs=12, num_workers=0, batch_tfms=get_transforms(), size=16).normalize(imagenet_stats)
    learn = cnn_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    img = Image(torch.from_numpy(imgs[40]).permute(2, 0, 1).float() / 255)
    before = learn.predict(img)
    learn.export()
    inf = load_learner(path)
    assert [t.__name__ for t in inf.data.single_ds.tfms] == ["crop_pad"]
    assert inf.data.single_ds.tfmargs["size"] == 16
    after = inf.predict(img)
    assert str(after[0]) == str(before[0]) and torch.allclose(after[2], before[2], atol=1e-4)


def test_unet_learner_masks_get_the_same_geometry(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(16, 32, 32)).astype(np.uint8)
    masks = (imgs > 128).astype(np.uint8)
    save_memmap(tmp_path / "x", imgs, meta={"layout": "HW"})
    save_memmap(tmp_path / "m", masks, meta={"classes": ["bg", "fg"]})

    def lls():
        return (MemmapImageList.from_memmap(tmp_path / "x").split_by_idx([0, 1, 2, 3])
                .label_from_memmap(tmp_path / "m"))
    data = lls().databunch(bs=4, num_workers=0, batch_tfms=([dihedral_affine(p=1.)], []), batch_seed=1)
    assert isinstance(data.train_ds.y, MemmapSegmentationLabelList)
    xb, yb = data.one_batch(DatasetType.Fix, denorm=False)
    assert not torch.equal(yb, torch.from_numpy(masks[4:8, None].astype(np.int64)))   # transformed
    assert yb.dtype == torch.int64 and torch.equal((xb[:, 0:1] > 128.5 / 255).long(), yb)   # moved together
    data = lls().databunch(bs=4, num_workers=0, batch_tfms=get_transforms(), size=32)
    learn = unet_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.validate()[0])
