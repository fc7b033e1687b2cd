"""images_to_memmap and `fastai-memmap convert-images`: folders and DataFrames to image + label stores."""
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.vision import open_image

from fastai_memmap import MemmapArray
from fastai_memmap.vision import convert as convert_images
from fastai_memmap.vision.convert import (DecodeSpec, ImageReadError, cli_convert_images, images_to_memmap,
                                          read_image, n_workers, chunk_bounds)
from fastai_memmap.errors import ItemShapeError, StoreExistsError, UnsupportedDtypeError
from fastai_memmap.vision.images import MemmapImageList
from fastai_memmap.vision.inmemory import ImageListInMemory
from fastai_memmap.data.labels import MemmapCategoryList

CLASSES = ["ant", "bee"]


def _folder(root: Path, n_per_class: int, sizes=((16, 16),), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = sizes[i % len(sizes)]
            mode = ("RGB", "L", "RGBA")[i % 3]
            PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(root / c / f"{i:03d}.png")
    return root


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return path


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("c") / "imgs", 36)     # 72 images: enough for 2 decoding processes


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_to_stores_reads_back_through_memmap_image_list(imgs, tmp_path, workers):
    res = images_to_memmap(imgs, tmp_path / "out", workers=workers, progress=False)
    assert res.rows == 72 and res.classes == CLASSES and not res.skipped and res.y == tmp_path / "out" / "y"
    x, y = MemmapArray.open(res.x), MemmapArray.open(res.y)
    assert x.shape == (72, 16, 16, 3) and x.dtype == np.uint8 and x.meta["layout"] == "HWC"
    assert y.dtype == np.int64 and y.meta["classes"] == CLASSES
    files = sorted(imgs.rglob("*.png"))
    assert x.meta["paths"] == [p.relative_to(imgs).as_posix() for p in files]
    for k in (0, 5, 40, 71):
        assert np.array_equal(x[k], read_image(files[k])) and CLASSES[y[k]] == files[k].parent.name
        fastai = open_image(files[k]).data
        assert MemmapImageList.from_memmap(res.x)[k].data.numpy().tobytes() == fastai.numpy().tobytes()
    data = (MemmapImageList.from_memmap(res.x).split_by_rand_pct(0.25, seed=0).label_from_memmap(res.y)
            .databunch(bs=8, num_workers=0))
    assert isinstance(data.train_ds.y, MemmapCategoryList) and data.c == 2
    xb, yb = data.one_batch()
    assert xb.shape == (8, 3, 16, 16)


def test_parallel_equals_serial(imgs, tmp_path):
    assert n_workers(2, 72) == 2 and n_workers(8, 40) == 1 and len(chunk_bounds(72, 2)) >= 2
    a = images_to_memmap(imgs, tmp_path / "a", size=(8, 12), workers=0, progress=False)
    b = images_to_memmap(imgs, tmp_path / "b", size=(8, 12), workers=2, progress=False)
    assert MemmapArray.open(a.x)[:].tobytes() == MemmapArray.open(b.x)[:].tobytes()
    assert MemmapArray.open(a.x).item_shape == (8, 12, 3) and MemmapArray.open(b.x).meta["size"] == [8, 12]


def test_ragged_without_size_refused_before_decoding(tmp_path):
    root = _folder(tmp_path / "r", 3, sizes=((16, 16), (10, 16)))
    with pytest.raises(ItemShapeError, match=r"001\.png: expected every image of size \(16, 16\).*found \(10, 16\).*size="):
        images_to_memmap(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "x").exists()
    res = images_to_memmap(root, tmp_path / "out", size=12, progress=False, convert_mode="L")
    assert MemmapArray.open(res.x).item_shape == (12, 12, 1)


def test_corrupt_image_skipped_with_count_or_raises_with_name(imgs, tmp_path):
    root = _folder(tmp_path / "d", 4)
    bad = _corrupt(root / "bee" / "002.png")
    trunc = root / "ant" / "001.png"
    trunc.write_bytes(trunc.read_bytes()[:60])                     # header fine, data truncated
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 8: .*001\.png.*002\.png"):
        res = images_to_memmap(root, tmp_path / "out", progress=False)
    assert res.rows == 6 and sorted(p for p, _ in res.skipped) == sorted([str(trunc), str(bad)])
    x = MemmapArray.open(res.x)
    assert len(x) == 6 and str(bad.relative_to(root)) not in x.meta["paths"] and len(MemmapArray.open(res.y)) == 6
    with pytest.raises(ImageReadError, match=r"bee/002\.png: cannot read image .*on_error='skip'"):
        images_to_memmap(root, tmp_path / "out2", on_error="raise", progress=False)      # found by the header pass
    assert not (tmp_path / "out2" / "x").exists()
    with pytest.raises(ImageReadError, match=r"ant/001\.png: cannot read image \(OSError: image file is truncated"):
        images_to_memmap(root, tmp_path / "out3", size=8, on_error="raise", progress=False)   # decoding
    assert not (tmp_path / "out3" / "x").exists()


def test_dataframe_source_with_label_column_and_existing_store(imgs, tmp_path):
    files = sorted(imgs.rglob("*.png"))[::7]
    df = pd.DataFrame({"file": [p.relative_to(imgs).as_posix() for p in files], "kind": [i % 3 for i in range(len(files))]})
    res = images_to_memmap(df, tmp_path / "o", label_from="kind", path_col="file", folder=imgs, progress=False)
    assert res.rows == len(files) and res.classes == [0, 1, 2]
    assert MemmapArray.open(res.y)[:].tolist() == [i % 3 for i in range(len(files))]
    assert np.array_equal(MemmapArray.open(res.x)[1], read_image(files[1]))
    with pytest.raises(StoreExistsError):
        images_to_memmap(df, tmp_path / "o", label_from="kind", path_col="file", folder=imgs, progress=False)
    res = images_to_memmap(df, tmp_path / "o", label_from=None, path_col=0, folder=imgs, progress=False, overwrite=True)
    assert res.y is None and res.classes is None


def test_converted_store_serves_as_load_data_cache(imgs, tmp_path, monkeypatch):
    res = images_to_memmap(imgs, tmp_path / "o", size=10, progress=False)
    monkeypatch.setattr(convert_images, "read_image", None)                  # must not decode
    il = ImageListInMemory.from_folder(imgs).load_data(size=10, cache=res.x, progress=False, workers=0)
    monkeypatch.undo()
    assert il.loaded and il.nbytes == 72 * 10 * 10 * 3
    spec = DecodeSpec(size=10)
    assert np.array_equal((il[3].data * 255).round().byte().permute(1, 2, 0).numpy(), read_image(il.items[3], spec))


def test_decode_spec_refuses_non_uint8_modes():
    with pytest.raises(UnsupportedDtypeError, match="'I'.*int32"):
        DecodeSpec("I")
    with pytest.raises(ValueError, match="PIL mode"):
        DecodeSpec("NOPE")
    assert DecodeSpec("RGBA").channels == 4 and DecodeSpec("1").channels == 1


def test_cli_convert_images(imgs, tmp_path, capsys):
    assert cli_convert_images([str(imgs), str(tmp_path / "o"), "--size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "72 images, 2 classes" in out and "skipped 0" in out
    assert MemmapArray.open(tmp_path / "o" / "x").item_shape == (8, 8, 3)
    root = _folder(tmp_path / "d", 2)
    _corrupt(root / "ant" / "000.png")
    assert cli_convert_images([str(root), str(tmp_path / "p"), "--quiet", "--on-error", "raise"]) == 1
    assert "ImageReadError" in capsys.readouterr().err
    assert cli_convert_images([str(root), str(tmp_path / "p"), "--quiet", "--size", "6", "4"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    assert MemmapArray.open(tmp_path / "p" / "x").item_shape == (6, 4, 3)
    csv = tmp_path / "list.csv"
    pd.DataFrame({"p": ["bee/000.png", "bee/001.png"], "l": ["x", "y"]}).to_csv(csv, index=False)
    assert cli_convert_images([str(csv), str(tmp_path / "q"), "--quiet", "--folder", str(root)]) == 0
    assert MemmapArray.open(tmp_path / "q" / "y").meta["classes"] == ["x", "y"]
