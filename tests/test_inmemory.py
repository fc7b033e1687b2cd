"""ImageListInMemory, PixelBuffer and SharedBuffer: RAM = disk = cache, byte for byte, through fastai's chains."""
import os
import pickle
import random
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import psutil
import pytest
from store_data import write_png_folder
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_train import load_learner
from fastai.vision import (ImageList, cnn_learner, crop_pad, get_transforms, models,
                           open_image, open_mask, unet_learner)

from fastai_memmap.vision import convert as convert_images
from fastai_memmap.vision import inmemory
from fastai_memmap.store import shm
from fastai_memmap.vision.convert import DecodeSpec, ImageReadError
from fastai_memmap.errors import FormatError, MemoryBudgetError
from fastai_memmap.vision.images import MemmapImageList
from fastai_memmap.vision.inmemory import (ImageDataBunchInMemory, ImageListInMemory, LabelListsInMemory, PixelBuffer,
                                           SegmentationItemListInMemory, SegmentationLabelListInMemory, preload, unload)
from fastai_memmap.store.shm import SharedBuffer

MODES = ["RGB", "L", "RGBA", "P"]
CLASSES = ["cat", "dog", "eel"]


def _write_folder(root: Path, n_per_class: int, seed: int = 0, sizes=((12, 20), (16, 16), (9, 31), (24, 14))):
    "PNG files root/<class>/<i>.png of several sizes and file modes (RGB, L, RGBA, P)."
    return write_png_folder(root, n_per_class, CLASSES, sizes, MODES, seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("imgs") / "data", 14)     # 42 images, ragged sizes


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("sq") / "data", 16, seed=1, sizes=((32, 32),))   # 48 images 32x32


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def _flip_rows(im):   # a deterministic after_open: a module-level function (picklable for spawn)
    return im.transpose(PIL.Image.FLIP_TOP_BOTTOM).crop((0, 0, 7, 5))


# ------------------------------------------------------------------------------------------- exact pixels
@pytest.mark.parametrize("kwargs", [{}, {"convert_mode": "L"}, {"convert_mode": "RGBA"}, {"after_open": _flip_rows}])
def test_items_equal_open_image_from_ram_and_after_purge(folder, kwargs):
    il = ImageListInMemory.from_folder(folder, **kwargs)
    assert not il.loaded and il.nbytes == 0
    il.load_data(progress=False)
    c = DecodeSpec(kwargs.get("convert_mode", "RGB")).channels
    expect = sum(open_image(p, **kwargs).data.numel() for p in il.items)
    assert il.loaded and il.nbytes == expect and il.pixels.spec.channels == c      # uint8: one byte per value
    disk = [open_image(p, **kwargs).data for p in il.items]
    assert all(_same(il[i].data, disk[i]) for i in range(len(il)))
    il.purge()
    assert not il.loaded and il.nbytes == 0
    assert all(_same(il[i].data, disk[i]) for i in range(len(il)))


def test_size_resizes_at_load_time(folder):
    il = ImageListInMemory.from_folder(folder).load_data(size=(10, 12), progress=False)
    assert il.nbytes == len(il) * 10 * 12 * 3
    p = il.items[5]
    expect = np.asarray(PIL.Image.open(p).convert("RGB").resize((12, 10), PIL.Image.BILINEAR))
    got = il[5].data
    assert got.shape == (3, 10, 12) and np.array_equal((got * 255).round().byte().permute(1, 2, 0).numpy(), expect)


def test_mode_or_after_open_changed_after_load_reads_disk_with_warning(folder):
    il = ImageListInMemory.from_folder(folder).load_data(progress=False)
    il.convert_mode = "L"
    with pytest.warns(UserWarning, match="changed since load_data"):
        x = il[0]
    assert _same(x.data, open_image(il.items[0], convert_mode="L").data) and not il.loaded


def test_memory_budget_refused_with_sizes_unless_forced(folder, monkeypatch):
    VM = namedtuple("VM", "available total")
    monkeypatch.setattr(inmemory.psutil, "virtual_memory", lambda: VM(1000, 2000))
    il = ImageListInMemory.from_folder(folder)
    need = sum(open_image(p).data.numel() for p in il.items)
    with pytest.raises(MemoryBudgetError, match=rf"need .*\({need:,} bytes\).*only .*\(1,000 bytes\).*size=.*force=True"):
        il.load_data(progress=False)
    assert il.pixels is None
    with pytest.raises(MemoryError):                              # a builtin MemoryError too
        il.load_data(size=8, progress=False)
    assert il.load_data(force=True, progress=False).loaded


def test_corrupt_image_named_in_load_data_error(tmp_path):
    root = _write_folder(tmp_path / "d", 2)
    (root / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    il = ImageListInMemory.from_folder(root)
    before = set(Path(shm.SHM_DIR).glob(f"{shm.FILE_PREFIX}{os.getpid()}-*"))
    with pytest.raises(ImageReadError, match=r"bad\.png: cannot read image"):
        il.load_data(progress=False)
    assert not il.loaded
    assert set(Path(shm.SHM_DIR).glob(f"{shm.FILE_PREFIX}{os.getpid()}-*")) <= before     # the buffer was freed


# ------------------------------------------------------------------------------------------- fastai chains
def test_chains_split_label_add_test_databunch_normalize_show(folder, tmp_path):
    import matplotlib.pyplot as plt
    df = pd.DataFrame({"name": [f"{c}/{i:03d}.png" for c in CLASSES for i in range(14)],
                       "label": [c for c in CLASSES for _ in range(14)]})
    df.to_csv(tmp_path / "labels.csv", index=False)
    for src in (ImageListInMemory.from_df(df, folder), ImageListInMemory.from_csv(folder, tmp_path / "labels.csv")):
        ll = src.split_by_rand_pct(0.25, seed=2).label_from_df()
        assert isinstance(ll, LabelListsInMemory) and ll.train.y.classes == CLASSES
    ll = (ImageListInMemory.from_folder(folder).split_by_rand_pct(0.25, seed=2).label_from_folder()
          .transform(([crop_pad()], [crop_pad()]), size=16))
    ll.add_test(ImageList.from_folder(folder / "dog").items)
    assert isinstance(ll, LabelListsInMemory) and ll.train.y.classes == CLASSES
    ll.load_data(progress=False)
    assert ll.train.x.loaded and ll.valid.x.loaded and ll.test.x.loaded
    assert ll.train.x.pixels is ll.valid.x.pixels is ll.test.x.pixels
    data = ll.databunch(bs=8, num_workers=0).normalize()
    assert isinstance(data, ImageDataBunchInMemory) and data.c == 3
    xb, yb = data.one_batch()
    assert xb.shape == (8, 3, 16, 16) and abs(float(xb.mean())) < 1
    data.show_batch(rows=2)
    plt.close("all")
    data.purge()
    assert not data.train_ds.x.loaded and data.train_ds.x.pixels is None
    data.load_data(progress=False)
    assert data.train_ds.x.loaded and data.test_ds.x.loaded


def test_preload_and_unload_walk_label_lists_and_refuse_other_objects(folder):
    ll = ImageListInMemory.from_folder(folder).split_by_rand_pct(0.25, seed=2).label_from_folder()
    assert preload(ll.valid, progress=False) is ll.valid
    assert ll.valid.x.loaded and not ll.train.x.loaded                  # only that dataset
    assert all(_same(ll.train.x[i].data, open_image(p).data) for i, p in enumerate(ll.train.x.items[:5]))
    x = ll.valid.x
    kept = [p for p in x.items if p.parent.name != "dog"]
    x.filter_by_func(lambda p: p.parent.name != "dog")                  # new items: slots looked up again
    assert list(x.items) == kept and x.loaded
    assert all(_same(x[i].data, open_image(p).data) and _same(x.open(p).data, x[i].data) for i, p in enumerate(kept))
    unload(ll)
    assert ll.valid.x.pixels is None
    with pytest.raises(TypeError, match="expected an ImageListInMemory.*found ImageList"):
        preload(ImageList.from_folder(folder))


def test_add_test_after_loading_reads_disk_then_loads_without_decoding_again(folder, monkeypatch):
    data = (ImageListInMemory.from_folder(folder / "cat").split_by_rand_pct(0.25, seed=0).label_from_folder()
            .databunch(bs=4, num_workers=0)).load_data(progress=False)
    test_items = ImageList.from_folder(folder / "eel").items
    data.add_test(test_items)
    assert not data.test_ds.x.loaded
    assert _same(data.test_ds.x[0].data, open_image(test_items[0]).data)          # from disk
    decoded = []
    real = convert_images.read_image
    monkeypatch.setattr(convert_images, "read_image", lambda p, spec: decoded.append(p) or real(p, spec))
    old = data.train_ds.x.pixels
    data.load_data(progress=False, workers=0)
    assert sorted(decoded) == sorted(map(str, test_items))                        # only the new ones decoded
    assert data.test_ds.x.loaded and data.train_ds.x.pixels is data.test_ds.x.pixels and old.closed is False
    assert all(_same(data.test_ds.x[i].data, open_image(p).data) for i, p in enumerate(test_items))


def test_get_transforms_same_seed_same_bytes_disk_ram_cache(square, tmp_path, monkeypatch):
    tfms = get_transforms()
    def ds(lst):
        return lst.split_by_rand_pct(0.25, seed=5).label_from_folder().transform(tfms, size=20).train
    disk = ds(ImageList.from_folder(square))
    ram = ds(ImageListInMemory.from_folder(square)).load_data(cache=tmp_path / "cache", progress=False)
    assert fastai_memmap.MemmapArray.open(tmp_path / "cache").shape == (len(disk), 32, 32, 3)
    monkeypatch.setattr(convert_images, "read_image", None)        # a new session: from the cache, no decoding
    cached = ds(ImageListInMemory.from_folder(square))
    cached.load_data(cache=tmp_path / "cache", progress=False, workers=0)
    monkeypatch.undo()
    assert ram.x.loaded and cached.x.loaded and cached.x.pixels is not ram.x.pixels
    for i in range(0, len(disk), 3):
        out = []
        for d in (disk, ram, cached):
            random.seed(i); np.random.seed(i); torch.manual_seed(i)
            out.append(d[i][0].data)
        assert _same(out[0], out[1]) and _same(out[0], out[2]), i


def test_cache_store_reused_rebuilt_and_read_by_memmap_image_list(folder, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    il = ImageListInMemory.from_folder(folder).load_data(size=16, cache=cache, progress=False)
    assert MemmapImageList.from_memmap(cache).layout == "HWC"
    mil = MemmapImageList.from_memmap(cache)
    assert len(mil) == len(il)
    keys = [os.fsencode(p) for p in il.items]
    order = np.argsort(np.array(keys, dtype=bytes))          # cache rows are in buffer (sorted path) order
    assert all(_same(mil[k].data, il[int(i)].data) for k, i in enumerate(order))
    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache holds every image")
    monkeypatch.setattr(convert_images, "read_image", no_decode)
    again = ImageListInMemory.from_folder(folder).load_data(size=16, cache=cache, progress=False, workers=0)
    assert again.loaded and all(_same(again[i].data, il[i].data) for i in range(len(il)))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="decoded differently: size"):
        ImageListInMemory.from_folder(folder).load_data(size=8, cache=cache, progress=False)
    assert MemmapImageList.from_memmap(cache).image_hw == (8, 8)                   # rebuilt
    (tmp_path / "junk").mkdir()
    with pytest.raises(FormatError, match="expected an image store"):
        ImageListInMemory.from_folder(folder).load_data(cache=tmp_path / "junk", progress=False)


def test_ragged_cache_is_padded_with_shapes(folder, tmp_path, monkeypatch):
    near = _write_folder(tmp_path / "near", 3, sizes=((20, 20), (18, 20), (20, 17)))
    il = ImageListInMemory.from_folder(near, convert_mode="L").load_data(cache=tmp_path / "r", progress=False)
    store = fastai_memmap.MemmapArray.open(tmp_path / "r")
    assert store.item_shape == (20, 20, 1) and len(store.meta["shapes"]) == len(il) == 9
    monkeypatch.setattr(convert_images, "read_image", None)
    again = ImageListInMemory.from_folder(near, convert_mode="L").load_data(cache=tmp_path / "r", progress=False)
    monkeypatch.undo()
    assert all(_same(again[i].data, open_image(p, convert_mode="L").data) for i, p in enumerate(il.items))
    with pytest.warns(UserWarning, match=r"cache not written: images of different sizes padded to \(24, 31\) would "
                                         r"take 2.7x"):
        ImageListInMemory.from_folder(folder).load_data(cache=tmp_path / "far", progress=False)
    assert not (tmp_path / "far").exists()


def test_export_load_learner_predict(square):
    data = (ImageListInMemory.from_folder(square).split_by_rand_pct(0.25, seed=1).label_from_folder()
            .databunch(bs=8, num_workers=0)).load_data(progress=False).normalize()
    learn = cnn_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    img = open_image(data.valid_ds.x.items[0])
    before = learn.predict(img)
    learn.export()
    assert os.path.getsize(square / "export.pkl") < 200_000 + sum(p.numel() * 4 for p in learn.model.parameters())
    inf = load_learner(square)
    after = inf.predict(img)
    assert str(after[0]) == str(before[0]) and torch.allclose(after[2], before[2], atol=1e-5)


# ------------------------------------------------------------------------------------------- segmentation
def test_segmentation_masks_in_ram_and_unet_trains(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    for i in range(16):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        PIL.Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(tmp_path / "lbl" / f"{i}.png")
    get_y = lambda p: tmp_path / "lbl" / p.name
    ll = (SegmentationItemListInMemory.from_folder(tmp_path / "img").split_by_rand_pct(0.25, seed=0)
          .label_from_func(get_y, classes=["a", "b", "c"]))
    assert isinstance(ll.train.y, SegmentationLabelListInMemory)
    ll.load_data(progress=False, size=16)
    assert ll.train.y.loaded and ll.train.x.loaded and ll.train.x.pixels is not ll.train.y.pixels
    assert ll.train.y.pixels.spec.kind == "mask" and ll.train.y.pixels.spec.resample == PIL.Image.NEAREST
    m = ll.train.y[0]
    assert m.data.shape == (1, 16, 16) and set(m.data.unique().tolist()) <= {0, 1, 2}
    ll.purge()
    ll.load_data(progress=False)
    assert all(_same(ll.valid.y[i].data.float(), open_mask(get_y(p)).data.float()) and
               _same(ll.valid.y[i].px, open_mask(get_y(p)).px) for i, p in enumerate(ll.valid.x.items))
    data = ll.transform(([], []), tfm_y=True).databunch(bs=4, num_workers=0)
    learn = unet_learner(data, models.resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.losses[-1].item())


# ------------------------------------------------------------------------------------------- workers
def _epoch(data) -> np.ndarray:
    return np.concatenate([xb.cpu().numpy() for xb, _ in data.valid_dl])


def test_pickle_is_a_handle_not_pixels(folder):
    ll = ImageListInMemory.from_folder(folder).split_by_rand_pct(0.25, seed=1).label_from_folder()
    ll.load_data(size=(200, 200), progress=False)
    assert ll.train.x.nbytes == 42 * 200 * 200 * 3
    blob = pickle.dumps(ll.train)
    assert len(blob) < 40_000, len(blob)
    back = pickle.loads(blob)
    assert back.x.loaded and back.x.pixels.shared.owner is None and not back.x.pixels.pixels.flags.writeable
    assert _same(back.x[3].data, ll.train.x[3].data)
    back.x.pixels.close()                                  # an attacher never unlinks the owner's file
    assert ll.train.x.pixels.shared.path.exists() and ll.train.x.loaded


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_deliver_ram_items_byte_equal(square, context):
    ll = (ImageListInMemory.from_folder(square).split_by_rand_pct(0.5, seed=4).label_from_folder()
          .transform(([], [crop_pad()]), size=24)).load_data(progress=False)
    expect = _epoch(ll.databunch(bs=6, num_workers=0))
    data = ll.databunch(bs=6, num_workers=2, multiprocessing_context=context)
    assert _epoch(data).tobytes() == expect.tobytes()
    disk = (ImageList.from_folder(square).split_by_rand_pct(0.5, seed=4).label_from_folder()
            .transform(([], [crop_pad()]), size=24)).databunch(bs=6, num_workers=0)
    assert _epoch(disk).tobytes() == expect.tobytes()


# ------------------------------------------------------------------------------------------- shared memory
def test_shared_buffer_unlinked_by_owner_only(tmp_path):
    b = SharedBuffer.create(1000)
    assert b.in_ram and b.path.exists() and b.view(np.uint8, 0, (1000,)).flags.writeable
    a = pickle.loads(pickle.dumps(b))
    assert a.owner is None and not a.view(np.uint8, 0, (10,)).flags.writeable
    a.close()
    assert b.path.exists()
    path = b.path
    del b, a
    import gc
    gc.collect()
    assert not path.exists()                                      # the owner's finalizer unlinked it
    c = SharedBuffer.create(10)
    blob = pickle.dumps(c)
    c.close()
    with pytest.warns(UserWarning, match="no longer exists"):
        gone = pickle.loads(blob)
    assert gone.closed and not c.path.exists()


def test_small_dev_shm_falls_back_to_file_with_warning(folder, monkeypatch):
    real = shm.free_bytes
    monkeypatch.setattr(shm, "free_bytes", lambda d: 64 << 20 if str(d) == shm.SHM_DIR else real(d))
    il = ImageListInMemory.from_folder(folder)
    with pytest.warns(UserWarning, match=r"/dev/shm has 64.0 MiB free.*--shm-size"):
        il.load_data(progress=False)
    path = il.pixels.shared.path
    assert not il.pixels.shared.in_ram and il.loaded
    assert all(_same(il[i].data, open_image(p).data) for i, p in enumerate(il.items))
    il.purge()
    assert not path.exists()


def test_no_room_anywhere_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(shm, "free_bytes", lambda d: 1000)
    with pytest.raises(shm.SharedMemoryError, match=r"enlarge /dev/shm \(docker run --shm-size"):
        SharedBuffer.create(10 << 20)


def test_stale_buffer_of_dead_process_removed(tmp_path):
    dead = shm.FILE_PREFIX + "999999999-abc"
    (tmp_path / dead).write_bytes(b"x")
    (tmp_path / (shm.FILE_PREFIX + f"{os.getpid()}-live")).write_bytes(b"x")
    b = SharedBuffer.create(10, tmp_path)
    assert not (tmp_path / dead).exists() and (tmp_path / (shm.FILE_PREFIX + f"{os.getpid()}-live")).exists()
    b.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.text(st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)),
                                  min_size=1, max_size=12),
                          st.integers(0, 5), st.integers(0, 5), st.integers(1, 4)),
                min_size=0, max_size=20, unique_by=lambda t: t[0]))
def test_pixel_buffer_round_trip(entries):
    names = sorted(entries, key=lambda e: os.fsencode(e[0]))
    keys = np.array([os.fsencode(e[0]) for e in names], dtype=bytes) if names else np.zeros(0, "S1")
    shapes = np.array([e[1:] for e in names], np.int64).reshape(-1, 3)
    buf = PixelBuffer.allocate(keys, shapes, DecodeSpec())
    data = [np.full(tuple(s), k % 251, np.uint8) for k, s in enumerate(shapes)]
    dst = buf.writable_pixels()
    for k, d in enumerate(data):
        dst[buf.offsets[k]:buf.offsets[k + 1]] = d.reshape(-1)
    back = pickle.loads(pickle.dumps(buf))
    assert back.nbytes == sum(d.size for d in data)
    for k, (name, *_) in enumerate(names):
        assert back.slot(name) == k == buf.slot(Path(name)) and np.array_equal(back.image(k), data[k])
    assert back.slot("not-there") == -1 and back.slot(3) == -1
    assert list(back.slots([e[0] for e in names] + ["zz-missing"])) == list(range(len(names))) + [-1]
    buf.close()


# ------------------------------------------------------------------------------------------- memory (PSS)
def _pss_run(ll, context: str, epochs: int = 3) -> dict:
    "Iterate `epochs` over the train set with 2 persistent workers; max total PSS of main + workers."
    data = ll.databunch(bs=4, num_workers=2, multiprocessing_context=context, persistent_workers=True)
    dl = data.train_dl.dl
    best, first, t0 = 0, None, time.perf_counter()
    for _ in range(epochs):
        for k, _batch in enumerate(dl):
            if first is None:
                first = time.perf_counter() - t0
            if k % 8 == 7:
                procs = [psutil.Process()] + [psutil.Process(w.pid) for w in dl._iterator._workers]
                best = max(best, sum(p.memory_full_info().pss for p in procs))
    dl._iterator._shutdown_workers()
    return {"pss": best, "first_batch_s": first}


def _big_folder(root: Path, n: int, side: int) -> Path:
    "`n` hard links of one random side x side RGB PNG (stored uncompressed: fast to write and decode)."
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    src = root / "src.png"
    PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(src, compress_level=0)
    for i in range(n):
        os.link(src, root / "a" / f"{i:05d}.png")
    src.unlink()
    return root


def _pss_check(tmp_path, context, n, side):
    root = _big_folder(tmp_path / f"big{side}", n, side)
    ll = ImageListInMemory.from_folder(root).split_none().label_const(0)
    base = _pss_run(ll, context, epochs=1)                      # same pipeline, images read from disk
    ll.load_data(progress=False)
    decoded = ll.train.x.nbytes
    ram = _pss_run(ll, context)
    ll.purge()
    return base, ram, decoded


@pytest.mark.parametrize("context", ["fork"])
def test_pss_small_fork(tmp_path, context):
    base, ram, decoded = _pss_check(tmp_path, context, 64, 256)  # 12 MiB of pixels
    assert ram["pss"] - base["pss"] <= 1.15 * decoded + (300 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_pss_200mb_three_epochs_and_spawn_startup_flat(tmp_path, context):
    base, ram, decoded = _pss_check(tmp_path, context, 256, 512)   # 192 MiB of pixels
    over = ram["pss"] - base["pss"]
    print(f"\n{context}: decoded {decoded >> 20} MiB, PSS disk {base['pss'] >> 20} MiB, RAM {ram['pss'] >> 20} MiB, "
          f"over disk {over >> 20} MiB, first batch {ram['first_batch_s']:.1f}s")
    assert over <= 1.15 * decoded + (300 << 20)
    if context == "spawn":
        small = ImageListInMemory.from_folder(_big_folder(tmp_path / "small", 256, 32)).split_none().label_const(0)
        small.load_data(progress=False)
        t_small = _pss_run(small, context, epochs=1)["first_batch_s"]
        print(f"spawn first batch: {t_small:.1f}s with {small.train.x.nbytes >> 20} MiB decoded, "
              f"{ram['first_batch_s']:.1f}s with {decoded >> 20} MiB")
        assert ram["first_batch_s"] <= 1.5 * t_small + 2.0, (ram["first_batch_s"], t_small)
