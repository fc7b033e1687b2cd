"""Issue 16: progress bars count images and end their line; ImageListInMemory says once that it reads from disk."""
import warnings

import numpy as np
import PIL.Image
import pytest

from fastai_memmap.store.progress import Progress
from fastai_memmap.vision.convert import images_to_memmap
from fastai_memmap.vision.inmemory import ImageListInMemory, NotLoadedWarning


@pytest.fixture
def folder(tmp_path):
    for c in ("ant", "bee"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            PIL.Image.fromarray(np.full((6, 6, 3), i * 40, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_finished_bar_ends_its_line(capsys):
    b = Progress(4, True, "things")
    for i in range(1, 5):
        b.update(i)
    b.close()
    print("NEXT")
    out = capsys.readouterr().out
    assert "[4/4" in out and out.endswith("\nNEXT\n") and "|NEXT" not in out and "things" in out
    b = Progress(4, True, "things")
    b.update(1)
    b.close()
    b.close()
    print("AFTER")
    assert capsys.readouterr().out.endswith("\nAFTER\n")


def test_disabled_bar_prints_nothing(capsys):
    b = Progress(4, False)
    b.update(4)
    b.close()
    assert capsys.readouterr().out == ""


def test_images_to_memmap_counts_images(folder, tmp_path, capsys):
    images_to_memmap(folder, tmp_path / "out", size=6, workers=0, progress=True)
    out = capsys.readouterr().out
    assert "[10/10" in out and "images decoded" in out


def test_load_data_counts_images(folder, capsys):
    ImageListInMemory.from_folder(folder).load_data(workers=0, progress=True)
    out = capsys.readouterr().out
    assert "[10/10" in out and "images decoded" in out and out.endswith("\n")


def test_not_loaded_list_warns_once_per_list(folder):
    il = ImageListInMemory.from_folder(folder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        il.get(0), il.get(1), il[2]
        other = ImageListInMemory.from_folder(folder)
        other.get(0), other.get(1)
    msgs = [x for x in w if issubclass(x.category, NotLoadedWarning)]
    assert len(msgs) == 2
    assert "10 items" in str(msgs[0].message) and "load_data()" in str(msgs[0].message)


def test_loaded_list_does_not_warn(folder):
    il = ImageListInMemory.from_folder(folder).load_data(progress=False, workers=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        il.get(0)
    assert not [x for x in w if issubclass(x.category, NotLoadedWarning)]
