"""MemmapImageList and segmentation masks from stores: fastai Images, transforms, cnn/unet learners."""
import numpy as np
import pytest
import torch

import fastai_memmap  # noqa: F401
from fastai.basic_train import load_learner
from fastai.vision import (Image, ImageSegment, cnn_learner, get_transforms, imagenet_stats, models,
                           open_image, unet_learner)
from fastai.vision.data import ImageDataBunch

from fastai_memmap import save_memmap
from fastai_memmap.errors import ItemShapeError
from fastai_memmap.vision.images import MemmapImageList, MemmapSegmentationLabelList, image_layout, row_to_chw


@pytest.fixture
def image_store(tmp_path, rng):
    "60 RGB 16×16 uint8 images (HWC) whose mean colour encodes the class."
    codes = np.arange(60) % 3
    imgs = rng.integers(0, 60, size=(60, 16, 16, 3)).astype(np.uint8)
    imgs[np.arange(60), :, :, codes] += 180
    save_memmap(tmp_path / "x", imgs, meta={"layout": "HWC"})
    save_memmap(tmp_path / "y", codes.astype(np.int64), meta={"classes": ["r", "g", "b"]})
    return tmp_path, imgs, codes


def test_get_returns_image_equal_to_pil_decoding(image_store, tmp_path):
    path, imgs, _ = image_store
    il = MemmapImageList.from_memmap(path / "x")
    img = il[7]
    assert isinstance(img, Image) and img.shape == (3, 16, 16)
    import PIL.Image
    PIL.Image.fromarray(imgs[7]).save(tmp_path / "seven.png")
    assert torch.equal(img.data, open_image(tmp_path / "seven.png").data)   # same bytes as fastai from a PNG


@pytest.mark.parametrize("layout,shape", [("HWC", (5, 6, 3)), ("CHW", (3, 5, 6)), ("HW", (5, 6))])
def test_layouts_give_chw_float(layout, shape, rng):
    row = rng.integers(0, 256, size=shape).astype(np.uint8)
    t = row_to_chw(row, image_layout(shape, {"layout": layout}))
    assert t.shape == (3, 5, 6) and t.dtype == torch.float32
    hwc = row[..., None].repeat(3, -1) if layout == "HW" else (row if layout == "HWC" else row.transpose(1, 2, 0))
    assert torch.equal(t, torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32) / 255))


def test_float_rows_and_convert_mode_L(tmp_path, rng):
    x = rng.random((4, 3, 8, 8)).astype(np.float32)
    save_memmap(tmp_path / "f", x, meta={"layout": "CHW"})
    il = MemmapImageList.from_memmap(tmp_path / "f")
    assert torch.equal(il[2].data, torch.from_numpy(x[2]))
    gray = MemmapImageList.from_memmap(tmp_path / "f", convert_mode="L")[2]
    assert gray.shape == (1, 8, 8)


def test_bad_layout_is_refused(tmp_path):
    save_memmap(tmp_path / "bad", np.zeros((2, 4, 4, 4, 4), np.uint8))
    with pytest.raises(ItemShapeError, match="expected image rows of layout HWC, CHW or HW"):
        MemmapImageList.from_memmap(tmp_path / "bad")[0]


def test_transforms_normalize_cnn_learner_export_predict(image_store):
    path, imgs, codes = image_store
    data = (MemmapImageList.from_memmap(path / "x").split_by_rand_pct(0.25, seed=0)
            .label_from_memmap(path / "y").transform(get_transforms(), size=24)
            .databunch(bs=8, num_workers=0).normalize(imagenet_stats))
    assert isinstance(data, ImageDataBunch) and data.c == 3
    xb, yb = data.one_batch()
    assert xb.shape == (8, 3, 24, 24)
    data.show_batch(rows=2)
    learn = cnn_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    before = learn.predict(Image(row_to_chw(imgs[5], "HWC")))
    learn.export()
    inf = load_learner(path)
    after = inf.predict(imgs[5])          # a raw HWC uint8 row is accepted too
    assert str(after[0]) == str(before[0]) and str(after[0]) in ("r", "g", "b")
    with pytest.raises(ItemShapeError, match=r"expected an image of shape \(16, 16, 3\)"):
        inf.predict(np.zeros((8, 8, 3), np.uint8))


def test_unet_learner_from_mask_store(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(24, 32, 32)).astype(np.uint8)
    masks = (imgs > 128).astype(np.uint8)
    save_memmap(tmp_path / "x", imgs, meta={"layout": "HW"})
    save_memmap(tmp_path / "m", masks, meta={"classes": ["bg", "fg"]})
    data = (MemmapImageList.from_memmap(tmp_path / "x").split_by_idx([0, 1, 2, 3])
            .label_from_memmap(tmp_path / "m").transform(get_transforms(), size=32, tfm_y=True)
            .databunch(bs=4, num_workers=0))
    assert isinstance(data.train_ds.y, MemmapSegmentationLabelList) and data.c == 2
    seg = data.valid_ds.y[1]
    assert isinstance(seg, ImageSegment) and torch.equal(seg.data[0], torch.from_numpy(masks[1].astype(np.int64)))
    learn = unet_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.validate()[0])
