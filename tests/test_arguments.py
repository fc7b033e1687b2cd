"""Loader, preload and cache arguments are checked where they enter: typed errors that say what was
expected and what was found (issue 12), and a damaged or busy cache never loses the decoded images."""
import json

import numpy as np
import pytest
from store_data import write_png_folder

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai_memmap import MemmapItemList, save_memmap
from fastai_memmap.vision import inmemory
from fastai_memmap.errors import ArgumentError, ArgumentTypeError, FormatError, WriterConflictError
from fastai_memmap.vision.inmemory import ImageListInMemory
from fastai_memmap.store.shm import SharedBuffer


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    x = save_memmap(root / "x", np.arange(40 * 3, dtype=np.float32).reshape(40, 3))
    y = save_memmap(root / "y", np.arange(40, dtype=np.int64) % 2)
    return MemmapItemList.from_memmap(x).split_by_idx(range(30, 40)).label_from_memmap(y)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_png_folder(tmp_path_factory.mktemp("imgs") / "data", 3, ["a", "b"], ((12, 10), (9, 14)))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bs=0), ArgumentError, "bs: expected an int >= 1, found 0"),
    (dict(bs=2.5), ArgumentTypeError, "bs: expected an int >= 1, found float 2.5"),
    (dict(bs="8"), ArgumentTypeError, "bs: expected an int >= 1, found str '8'"),
    (dict(val_bs=0), ArgumentError, "val_bs: expected an int >= 1 or None, found 0"),
    (dict(num_workers=-1), ArgumentError, "num_workers: expected an int >= 0 or 'auto' or None, found -1"),
    (dict(num_workers="bogus"), ArgumentTypeError, "num_workers: expected an int >= 0 or 'auto' or None, found str"),
    (dict(num_workers=True), ArgumentTypeError, "num_workers: .* found bool True"),
])
def test_databunch_arguments_are_refused_where_they_enter(lists, kwargs, error, message):
    with pytest.raises(error, match=message):
        lists.databunch(**{"bs": 4, "num_workers": 0, **kwargs})


def test_databunch_accepts_the_documented_values(lists):
    for kw in (dict(bs=4, num_workers=0), dict(bs=np.int64(4), val_bs=8, num_workers="auto"), dict(bs=4, num_workers=None)):
        data = lists.databunch(**kw)
        xb, yb = data.one_batch()
        assert xb.shape == (4, 3)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(workers=-1), ArgumentError, "workers: expected None or an int >= 0 .*found -1"),
    (dict(workers="2"), ArgumentTypeError, "workers: expected None or an int >= 0 .*found str '2'"),
    (dict(resample=99), ArgumentError, r"resample: expected None or a PIL filter .*found 99"),
    (dict(resample="bilinear"), ArgumentError, r"resample: expected None or a PIL filter .*found 'bilinear'"),
])
def test_load_data_arguments_are_refused_before_decoding(folder, kwargs, error, message):
    il = ImageListInMemory.from_folder(folder)
    with pytest.raises(error, match=message):
        il.load_data(progress=False, **kwargs)
    assert not il.loaded


@pytest.mark.parametrize("nbytes, error", [(-1, ArgumentError), (1.5, ArgumentTypeError), ("10", ArgumentTypeError)])
def test_shared_buffer_size_is_a_count(nbytes, error):
    with pytest.raises(error, match="SharedBuffer.create: expected nbytes"):
        SharedBuffer.create(nbytes)


@pytest.mark.parametrize("shapes", [
    "not a list", [[1, 1]], [[99, 99]] * 6, [[-1, 3]] * 6, [[1.5, 2]] * 6, [[1, 2, 3]] * 6, [[True, 2]] * 6,
])
def test_hostile_cache_shapes_are_a_format_error_never_a_read_outside_the_row(folder, tmp_path, shapes):
    "meta['shapes'] says how much of each padded row is the image: a larger one would read other rows' bytes."
    cache = tmp_path / "c"
    ImageListInMemory.from_folder(folder).load_data(cache=cache, progress=False, workers=0)
    m = json.loads((cache / "manifest.json").read_text())
    assert len(m["meta"]["shapes"]) == 6           # the folder has two sizes: the cache is padded
    m["meta"]["shapes"] = shapes
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"meta\['shapes'\].*the cache is damaged: delete it"):
        ImageListInMemory.from_folder(folder).load_data(cache=cache, progress=False, workers=0)


def test_hostile_cache_paths_are_a_format_error(folder, tmp_path):
    cache = tmp_path / "c"
    ImageListInMemory.from_folder(folder).load_data(cache=cache, progress=False, workers=0)
    m = json.loads((cache / "manifest.json").read_text())
    m["meta"]["paths"] = [1, 2, 3, 4, 5, 6]
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"meta\['paths'\] to be a list of str"):
        ImageListInMemory.from_folder(folder).load_data(cache=cache, progress=False, workers=0)


def test_a_busy_cache_keeps_the_decoded_images(folder, tmp_path, monkeypatch):
    "Another process writing the cache (WriterConflictError) costs the copy, not the decoded pixels."
    def busy(*a, **k):
        raise WriterConflictError("another writer holds the lock")
    monkeypatch.setattr(inmemory, "write_cache", busy)
    with pytest.warns(UserWarning, match="cache not written .*another writer holds the lock.*kept in RAM"):
        il = ImageListInMemory.from_folder(folder).load_data(cache=tmp_path / "c", progress=False, workers=0)
    assert il.loaded and il[0].data.shape[0] == 3


def test_any_other_cache_error_frees_the_new_buffer(folder, tmp_path, monkeypatch):
    made = []
    real = inmemory.PixelBuffer.allocate.__func__
    def allocate(cls, *a, **k):
        made.append(real(cls, *a, **k))
        return made[-1]
    monkeypatch.setattr(inmemory.PixelBuffer, "allocate", classmethod(allocate))
    def broken(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(inmemory, "write_cache", broken)
    il = ImageListInMemory.from_folder(folder)
    with pytest.raises(KeyboardInterrupt):
        il.load_data(cache=tmp_path / "c", progress=False, workers=0)
    assert made and all(b.closed for b in made) and not il.loaded
