"""Nothing the user has is lost or silently changed (issue 12): overwrite, lossless casts, commits the
reader accepts, group commits, converter inputs, strict JSON, OS errors at the file boundary."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from fastai_memmap import MemmapArray, MemmapWriter, save_memmap
from fastai_memmap.store.casting import cast_rows
from fastai_memmap.vision.convert import images_to_memmap
from fastai_memmap.errors import (FormatError, ItemShapeError, LossyCastError, MemmapError, NotAStoreError,
                                  OverlapError, StoreExistsError, StoreIOError, WriterStateError)
from fastai_memmap.store.format import MANIFEST_NAME, MAX_META_BYTES, Manifest
from fastai_memmap.store import writer as writer_module
from fastai_memmap.store.writer import WriterGroup


def snapshot(root: Path) -> dict:
    "Every file under `root` with its bytes: what the user had (writers' hidden `.NAME.lock` files aside)."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))}


def no_temporaries(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".fmtmp-" in p.name or ".fmold-" in p.name]


# ----------------------------------------------------------------------------------- overwrite=True
def _regular_file(p: Path) -> None:
    p.write_text("a,b\n1,2\n")


def _plain_dir(p: Path) -> None:
    p.mkdir()
    (p / "notes.txt").write_text("my notes")
    (p / "sub").mkdir()
    (p / "sub" / "img.png").write_bytes(b"\x89PNG...")


def _dir_bad_manifest(p: Path) -> None:
    p.mkdir()
    (p / MANIFEST_NAME).write_text('{"format": "something else"}')
    (p / "data.bin").write_bytes(b"12345")


def _store_with_user_file(p: Path) -> None:
    save_memmap(p, np.arange(6, dtype=np.int32).reshape(3, 2))
    (p / "README.txt").write_text("the user's own file inside the store")


def _symlink_to_dir(p: Path) -> None:
    (p.parent / "real").mkdir()
    (p.parent / "real" / "keep.txt").write_text("keep")
    p.symlink_to(p.parent / "real")


def _empty_dir(p: Path) -> None:
    p.mkdir()


def _npy_file(p: Path) -> None:
    np.save(p, np.arange(4))
    os.rename(str(p) + ".npy", p)


@pytest.mark.parametrize("make", [_regular_file, _plain_dir, _dir_bad_manifest, _store_with_user_file,
                                  _symlink_to_dir, _empty_dir, _npy_file],
                         ids=["csv file", "plain dir", "dir with foreign manifest", "store + user file",
                              "symlink to dir", "empty dir", "bare npy file"])
@pytest.mark.parametrize("how", ["writer", "save_memmap", "ragged", "dask"])
def test_overwrite_never_replaces_a_non_store(tmp_path, make, how):
    target = tmp_path / "target"
    make(target)
    before = snapshot(tmp_path)
    with pytest.raises(NotAStoreError) as ei:
        if how == "writer":
            with MemmapWriter(target, np.float32, (2,), overwrite=True) as w:
                w.append(np.ones((2, 2)))
        elif how == "save_memmap":
            save_memmap(target, np.ones((2, 2), np.float32), overwrite=True)
        elif how == "ragged":
            save_memmap(target, [np.ones(3), np.ones(1)], kind="ragged", overwrite=True)
        else:
            da = pytest.importorskip("dask.array")
            save_memmap(target, da.ones((4, 2), chunks=2), overwrite=True)
    assert isinstance(ei.value, FileExistsError) and isinstance(ei.value, MemmapError)
    assert str(target) in str(ei.value) and "not replaced" in str(ei.value)
    assert snapshot(tmp_path) == before          # nothing the user had is changed
    assert no_temporaries(tmp_path)


def test_overwrite_replaces_a_store_of_any_kind(tmp_path):
    target = tmp_path / "s"
    save_memmap(target, [np.ones(3), np.ones(1)], kind="ragged")
    save_memmap(target, np.arange(4, dtype=np.int16), overwrite=True)
    np.testing.assert_array_equal(MemmapArray.open(target)[:], np.arange(4, dtype=np.int16))
    assert sorted(os.listdir(target)) == [MANIFEST_NAME, "shard-000000.npy"]


def test_non_store_appearing_during_write_is_not_replaced(tmp_path):
    "The check runs again at commit: a file put at the target while writing survives."
    target = tmp_path / "s"
    save_memmap(target, np.zeros(3))
    with pytest.raises(NotAStoreError):
        with MemmapWriter(target, np.float64, (), overwrite=True) as w:
            w.append(np.ones(3))
            (target / "late.txt").write_text("added while writing")
    assert (target / "late.txt").read_text() == "added while writing"
    np.testing.assert_array_equal(MemmapArray.open(target)[:], np.zeros(3))


# ----------------------------------------------------------------------------------- lossless casts
LOSSY = [
    (np.array([1, 300, 2], np.int64), np.int8, 1, "300"),
    (np.array([0, -1], np.int32), np.uint16, 1, "-1"),
    (np.array([2 ** 63], np.uint64), np.int64, 0, str(2 ** 63)),
    (np.array([1.0, 2.5], np.float64), np.int32, 1, "2.5"),
    (np.array([1.0, np.nan], np.float32), np.int64, 1, "nan"),
    (np.array([np.inf], np.float64), np.int64, 0, "inf"),
    (np.array([2.0 ** 63], np.float64), np.int64, 0, "9.22"),
    (np.array([128.0], np.float32), np.int8, 0, "128"),
    (np.array([1 + 0j, 1 + 2j], np.complex128), np.float64, 1, "2j"),
    (np.array([1e300], np.float64), np.float32, 0, "1e+300"),
    (np.array([70000], np.int64), np.float16, 0, "70000"),
    (np.array([0, 2], np.int64), np.bool_, 1, "2"),
    (np.array([1e300 + 1e300j], np.complex128), np.complex64, 0, "1e+300"),
]


@pytest.mark.parametrize("values, dtype, row, shown", LOSSY, ids=[f"{v.dtype}->{np.dtype(d)}" for v, d, _, _ in LOSSY])
def test_value_changing_cast_refused(tmp_path, values, dtype, row, shown):
    before = snapshot(tmp_path)
    with pytest.raises(LossyCastError) as ei:
        with MemmapWriter(tmp_path / "s", dtype, ()) as w:
            w.append(np.zeros(2, dtype))
            w.append(values)
    msg = str(ei.value)
    assert f"row {2 + row}" in msg and shown in msg and isinstance(ei.value, ItemShapeError)
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists() and no_temporaries(tmp_path)


@pytest.mark.parametrize("values, dtype", [
    (np.array([0.1, 1 / 3], np.float64), np.float32),        # rounding into a narrower float: expected
    (np.array([2 ** 60 + 1], np.int64), np.float64),         # integers rounded into float
    (np.array([3.0, -2.0], np.float64), np.int8),            # integral floats in range
    (np.array([1 + 0j], np.complex64), np.float32),          # zero imaginary part
    (np.array([np.nan, np.inf], np.float64), np.float32),    # NaN and inf stay what they are
    (np.array([True, False]), np.uint8),
    (np.array([127, -128], np.int64), np.int8),
])
def test_value_preserving_cast_allowed(tmp_path, values, dtype):
    save_memmap(tmp_path / "s", values, dtype=dtype)
    got = MemmapArray.open(tmp_path / "s")[:]
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got, values.astype(dtype))


def test_casting_opt_in_keeps_numpy_semantics(tmp_path):
    save_memmap(tmp_path / "s", np.array([300], np.int64), dtype=np.int8, casting="unsafe")
    assert MemmapArray.open(tmp_path / "s")[0] == 44          # numpy's wrap-around, asked for explicitly
    with pytest.raises(LossyCastError):
        save_memmap(tmp_path / "t", np.array([1.5]), dtype=np.int8, casting="same_kind")


INTS = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
FLOATS = [np.float16, np.float32, np.float64]


@settings(max_examples=150, deadline=None)
@given(src=st.sampled_from(INTS + FLOATS), dst=st.sampled_from(INTS + [np.bool_]), data=st.data())
def test_lossless_is_exact_for_integers(src, dst, data):
    "Property: into an integer store, a batch is accepted iff every value reads back equal."
    if np.dtype(src).kind == "f":
        values = data.draw(st.lists(st.floats(width=np.dtype(src).itemsize * 8, allow_nan=True), min_size=1, max_size=6))
    else:
        info = np.iinfo(src)
        values = data.draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=1, max_size=6))
    a = np.array(values, dtype=src)
    exact = all(_fits(v, np.dtype(dst)) for v in a.tolist())
    try:
        out = cast_rows(a, np.dtype(dst), (), "lossless", "test")
    except LossyCastError:
        assert not exact
    else:
        assert exact and out.dtype == dst and [_num(v) for v in out.tolist()] == [_num(v) for v in a.tolist()]


def _num(v):
    return int(v) if not isinstance(v, float) else v


def _fits(v, dt: np.dtype) -> bool:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf")) or v != int(v)):
        return False
    if dt.kind == "b":
        return v in (0, 1)
    info = np.iinfo(dt)
    return info.min <= int(v) <= info.max


def test_ragged_nested_lists_and_strings_refused(tmp_path):
    with pytest.raises(ItemShapeError, match="cannot make one array"):
        with MemmapWriter(tmp_path / "s", np.float32, (2,)) as w:
            w.append([[1, 2], [3]])
    with pytest.raises(ItemShapeError, match="numeric"):
        with MemmapWriter(tmp_path / "s", np.float32, ()) as w:
            w.append(np.array(["1.0"]))
    assert not (tmp_path / "s").exists() and no_temporaries(tmp_path)


# ----------------------------------------------------------------------------------- what is committed opens
def test_meta_over_the_reader_limit_refused_before_writing(tmp_path):
    with pytest.raises(FormatError, match="meta"):
        MemmapWriter(tmp_path / "s", np.uint8, (), meta={"big": "x" * (MAX_META_BYTES + 10)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("meta", [{"v": float("nan")}, {"v": [float("inf")]}, {"v": {"w": -float("inf")}}])
def test_non_strict_json_meta_refused(tmp_path, meta):
    with pytest.raises(FormatError, match="strict JSON"):
        save_memmap(tmp_path / "s", np.zeros(2), meta=meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_reader_refuses_non_strict_json_manifest(tmp_path, token):
    save_memmap(tmp_path / "s", np.zeros(2), meta={"v": 1})
    mf = tmp_path / "s" / MANIFEST_NAME
    mf.write_text(mf.read_text().replace('"v": 1', f'"v": {token}'))
    with pytest.raises(FormatError, match="strict"):
        MemmapArray.open(tmp_path / "s")


def test_manifest_written_is_strict_json(tmp_path):
    save_memmap(tmp_path / "s", np.zeros((2, 2)), meta={"f": 0.5, "s": "é"})
    json.loads((tmp_path / "s" / MANIFEST_NAME).read_text(), parse_constant=lambda c: pytest.fail(c))


def test_dask_blocks_of_the_wrong_shape_never_committed(tmp_path):
    da = pytest.importorskip("dask.array")
    import dask
    arr = da.from_delayed(dask.delayed(np.ones)((3, 2)), shape=(4, 2), dtype=np.float64)   # declares 4 rows, has 3
    with pytest.raises(ItemShapeError, match="expected 4 rows"):
        save_memmap(tmp_path / "s", arr)
    bad_shape = da.from_delayed(dask.delayed(np.ones)((4, 3)), shape=(4, 2), dtype=np.float64)
    with pytest.raises(ItemShapeError):
        save_memmap(tmp_path / "s", bad_shape)
    assert not (tmp_path / "s").exists() and no_temporaries(tmp_path)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(INTS + FLOATS + [np.complex64, np.bool_]),
       shape=st.lists(st.integers(0, 3), max_size=2), rows=st.integers(0, 9), shard_rows=st.integers(1, 4),
       kind=st.sampled_from(["dense", "dask"]))
def test_every_committed_store_opens_reads_back_and_verifies(tmp_path_factory, dtype, shape, rows, shard_rows, kind):
    "Property: whatever a writer commits, the reader opens, reads back byte-equal, and verifies."
    rng = np.random.default_rng(rows)
    a = (rng.integers(0, 2, (rows, *shape)) if dtype == np.bool_ else rng.integers(-5, 5, (rows, *shape))).astype(dtype)
    p = tmp_path_factory.mktemp("s") / "s"
    if kind == "dask":
        da = pytest.importorskip("dask.array")
        save_memmap(p, da.from_array(a, chunks=(shard_rows,) + a.shape[1:]) if rows else a)
    else:
        save_memmap(p, a, shard_rows=shard_rows)
    m = MemmapArray.open(p)
    assert m[:].tobytes() == a.tobytes() and m.dtype == a.dtype and m.shape == a.shape
    m.verify()


# ----------------------------------------------------------------------------------- group commit
def _write_images(folder: Path, n: int = 4) -> None:
    for c in ("ant", "bee"):
        (folder / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6, 3), i * 20, np.uint8)).save(folder / c / f"{i}.png")


def test_images_x_and_y_appear_together_or_not_at_all(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write_images(src)
    out = tmp_path / "out"
    images_to_memmap(src, out, progress=False, workers=1)
    before = snapshot(out)
    real_swap = writer_module._swap_in
    calls = []

    def failing_swap(tmp, target, overwrite, is_store):
        calls.append(target.name)
        if target.name == "y":
            raise OSError(errno.EIO, "simulated I/O error on the second store")
        return real_swap(tmp, target, overwrite, is_store)
    monkeypatch.setattr(writer_module, "_swap_in", failing_swap)
    (src / "ant" / "0.png").unlink()                 # the new run would write other data
    with pytest.raises(MemmapError):
        images_to_memmap(src, out, progress=False, workers=1, overwrite=True)
    assert calls == ["x", "y"]                        # x was swapped in, then put back
    assert snapshot(out) == before and no_temporaries(out)


def test_group_commit_new_targets_rolled_back(tmp_path, monkeypatch):
    real_swap = writer_module._swap_in

    def failing_swap(tmp, target, overwrite, is_store):
        if target.name == "b":
            raise OSError(errno.ENOSPC, "simulated")
        return real_swap(tmp, target, overwrite, is_store)
    monkeypatch.setattr(writer_module, "_swap_in", failing_swap)
    with pytest.raises(MemmapError):
        with WriterGroup() as g:
            g.add(MemmapWriter(tmp_path / "a", np.int8, ())).append([1])
            g.add(MemmapWriter(tmp_path / "b", np.int8, ())).append([2])
            g.commit()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and no_temporaries(tmp_path)


def test_group_left_without_commit_writes_nothing(tmp_path):
    with WriterGroup() as g:
        w = g.add(MemmapWriter(tmp_path / "a", np.int8, ()))
        w.append([1])
    assert not (tmp_path / "a").exists() and no_temporaries(tmp_path)
    with pytest.raises(WriterStateError):
        w.append([2])


# ----------------------------------------------------------------------------------- converters and inputs
@pytest.mark.parametrize("layout", ["out is source", "source class folder is out/x", "out inside source",
                                    "source inside out/x"])
def test_converter_never_writes_over_its_inputs(tmp_path, layout):
    if layout == "out is source":
        src, out = tmp_path / "data", tmp_path / "data"
        _write_images(src)
    elif layout == "source class folder is out/x":
        src, out = tmp_path / "data", tmp_path / "data"
        for c in ("x", "y"):
            (src / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / c / "0.png")
    elif layout == "out inside source":
        src, out = tmp_path / "data", tmp_path / "data" / "stores"
        _write_images(src)
    else:
        src, out = tmp_path / "o" / "x" / "imgs", tmp_path / "o"
        _write_images(src)
    before = snapshot(tmp_path)
    with pytest.raises(OverlapError) as ei:
        images_to_memmap(src, out, progress=False, workers=1, overwrite=True)
    assert isinstance(ei.value, ValueError) and "source data" in str(ei.value)
    assert snapshot(tmp_path) == before


def test_converter_overlap_through_a_symlink(tmp_path):
    src = tmp_path / "data"
    _write_images(src)
    (tmp_path / "alias").symlink_to(src)
    with pytest.raises(OverlapError):
        images_to_memmap(tmp_path / "alias", tmp_path / "data", progress=False, workers=1, overwrite=True)


def test_converter_refuses_non_store_output_before_decoding(tmp_path):
    src = tmp_path / "src"
    _write_images(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("my file")
    with pytest.raises(NotAStoreError):
        images_to_memmap(src, tmp_path / "out", progress=False, workers=1, overwrite=True)
    assert (tmp_path / "out" / "x").read_text() == "my file"


# ----------------------------------------------------------------------------------- OS errors, names
def test_long_valid_name_writes(tmp_path):
    name = "s" * 240                                   # valid; the temporaries' names must fit as well
    save_memmap(tmp_path / name, np.arange(3))
    save_memmap(tmp_path / name, np.arange(4), overwrite=True)
    np.testing.assert_array_equal(MemmapArray.open(tmp_path / name)[:], np.arange(4))
    assert no_temporaries(tmp_path) and all(len(p.name) <= 255 for p in tmp_path.iterdir())


def test_too_long_name_typed(tmp_path):
    with pytest.raises(StoreIOError) as ei:
        save_memmap(tmp_path / ("s" * 256), np.arange(3))
    assert ei.value.errno == errno.ENAMETOOLONG and isinstance(ei.value, OSError)


def test_symlink_loop_target_typed(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(MemmapError) as ei:
        save_memmap(tmp_path / "a" / "s", np.arange(3))
    assert isinstance(ei.value, OSError) and "tmp" in str(ei.value)


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_os_errors_when_staging_are_wrapped(tmp_path, monkeypatch, err):
    def refuse(self, *a, **k):
        raise OSError(err, os.strerror(err), str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StoreIOError) as ei:
        save_memmap(tmp_path / "s", np.arange(3))
    assert ei.value.errno == err and str(tmp_path / "s") in str(ei.value)
    assert ("read-only" if err == errno.EROFS else "permission") in str(ei.value)


# ----------------------------------------------------------------------------------- reader arguments
def test_reader_bad_arguments_typed(tmp_path):
    save_memmap(tmp_path / "s", np.arange(10))
    a = MemmapArray.open(tmp_path / "s")
    from fastai_memmap.errors import RowIndexError, RowIndexTypeError
    with pytest.raises(RowIndexError, match="step"):
        a[::0]
    with pytest.raises(RowIndexTypeError, match="list"):
        a.read([1, 2], out=[0, 0])
    np.testing.assert_array_equal(a[np.array([3, 1], dtype=object)], [3, 1])   # valid rows, object dtype
    got = list(map(lambda i: a[np.array([i], dtype=object)][0], range(10)))    # no StopIteration ends map()
    assert got == list(range(10))
    with pytest.raises(RowIndexError):
        a[np.array([2 ** 70], dtype=object)]


def test_reader_symlink_loop_typed(tmp_path):
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    with pytest.raises(MemmapError, match="symlink loop"):
        MemmapArray.open(tmp_path / "l1")


def test_big_endian_shard_message_shows_byte_order(tmp_path):
    save_memmap(tmp_path / "s", np.arange(4, dtype="<f4"))
    shard = tmp_path / "s" / "shard-000000.npy"
    raw = shard.read_bytes()
    shard.write_bytes(raw.replace(b"'<f4'", b"'>f4'", 1))
    with pytest.raises(MemmapError) as ei:
        MemmapArray.open(tmp_path / "s")
    assert "<f4" in str(ei.value) and ">f4" in str(ei.value)


def test_complex_store_refused_as_item_list(tmp_path):
    from fastai_memmap import MemmapItemList
    from fastai_memmap.errors import UnsupportedDtypeError
    save_memmap(tmp_path / "z", np.array([[1 + 2j, 3j]], np.complex64))
    with pytest.raises(UnsupportedDtypeError, match="imaginary"):
        MemmapItemList.from_memmap(tmp_path / "z")
