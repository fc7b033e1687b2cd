"""Tests of the writer (fastai_memmap.store.writer): round-trips through MemmapWriter and save_memmap, shard
layout, atomic commit and overwrite, locking, stale temporaries, crashes (SIGKILL) and a full disk."""
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastai_memmap import MemmapArray, MemmapWriter, save_memmap
from fastai_memmap.errors import (WriterStateError, ItemShapeError, MemmapError, StoreExistsError, StoreWriteError,
                                  UnsupportedDtypeError, WriterConflictError)
from fastai_memmap.store.format import ARRAY_ALIGN, DATA_ALIGN, MANIFEST_NAME
from fastai_memmap.store import writer as writer_module
from fastai_memmap.store.writer import OLD_MARK, TMP_MARK

from store_data import DTYPES, item_shapes, make_data


def leftovers(parent):
    "Temporary or replaced stores left next to the targets in `parent`."
    return sorted(p.name for p in Path(parent).iterdir() if TMP_MARK in p.name or OLD_MARK in p.name)


def snapshot(path):
    "Every file under `path` with its bytes (or the bytes of `path` itself)."
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def check_store(path, x, shard_rows=None):
    "The store at `path` holds exactly `x`, and every shard is a plain, aligned .npy file."
    a = MemmapArray.open(path)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a[:].tobytes() == x.tobytes()
    a.verify()
    parts = [np.load(f, mmap_mode="r") for f in a.shard_files]
    assert all(p.dtype == x.dtype and p.shape[1:] == x.shape[1:] for p in parts)
    assert b"".join(p.tobytes() for p in parts) == x.tobytes()
    for f, p in zip(a.shard_files, parts):
        head = f.read_bytes()[:10]
        # data start on a page; a shard without data bytes keeps numpy's 64 (numpy cannot map a file that ends
        # where its data start: format.npy_header_bytes)
        align = DATA_ALIGN if p.nbytes else ARRAY_ALIGN
        assert head[:8] == b"\x93NUMPY\x01\x00" and (10 + int.from_bytes(head[8:10], "little")) % align == 0
    if shard_rows is not None:
        rows = [len(p) for p in parts]
        assert len(rows) == max(1, -(-len(x) // shard_rows))
        assert all(r == shard_rows for r in rows[:-1]) and 0 <= rows[-1] <= shard_rows
    assert leftovers(Path(path).parent) == []
    return a


# ---------------------------------------------------------------- round-trips
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), item_shape=item_shapes, rows=st.sampled_from([0, 1, 2, 9, 40]),
       shard_rows=st.integers(1, 41), data=st.data())
def test_round_trip(dtype, item_shape, rows, shard_rows, data):
    x = make_data(dtype, (rows,) + item_shape, data.draw(st.integers(0, 2 ** 32 - 1), "seed"))
    cuts = sorted(data.draw(st.lists(st.integers(0, rows), max_size=6), "cuts"))
    batch_rows = data.draw(st.integers(1, rows + 1), "batch_rows")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        with MemmapWriter(d / "w", dtype, item_shape, shard_rows=shard_rows) as w:
            for b in np.split(x, cuts):              # random batch sizes, empty batches included
                w.append(b)
            assert w.rows == rows
        check_store(d / "w", x, shard_rows)
        assert save_memmap(d / "a", x, shard_rows=shard_rows, batch_rows=batch_rows) == d / "a"
        check_store(d / "a", x, shard_rows)
        np.save(d / "x.npy", x)                      # a memmap source is copied batch by batch
        save_memmap(d / "m", np.load(d / "x.npy", mmap_mode="r"), batch_rows=batch_rows, shard_rows=shard_rows)
        check_store(d / "m", x, shard_rows)
        save_memmap(d / "g", (b for b in np.split(x, cuts)), dtype=dtype, item_shape=item_shape,
                    shard_rows=shard_rows)
        check_store(d / "g", x, shard_rows)


def test_generator_infers_dtype_and_shape_from_first_batch(tmp_path):
    x = np.arange(60, dtype=np.int16).reshape(10, 2, 3)
    save_memmap(tmp_path / "g", (x[i:i + 3] for i in range(0, 10, 3)))
    check_store(tmp_path / "g", x)
    save_memmap(tmp_path / "l", [[1.5, 2.5], [3.5]])  # an iterable of batches, lists allowed
    check_store(tmp_path / "l", np.array([1.5, 2.5, 3.5]))


def test_empty_stores(tmp_path):
    a = check_store(save_memmap(tmp_path / "e", iter([]), dtype="u1", item_shape=(2,)), np.zeros((0, 2), "u1"))
    assert len(a.shard_files) == 1
    with MemmapWriter(tmp_path / "w", np.float32, ()) as w:
        pass
    check_store(tmp_path / "w", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="empty iterable"):
        save_memmap(tmp_path / "x", iter([]))
    assert not (tmp_path / "x").exists()


def test_shard_bytes_and_casting(tmp_path):
    x = np.arange(70, dtype=np.float64).reshape(10, 7)
    save_memmap(tmp_path / "s", x, dtype=np.float32, shard_bytes=3 * 7 * 4)   # float64 -> float32 is same kind
    check_store(tmp_path / "s", x.astype(np.float32), shard_rows=3)
    with MemmapWriter(tmp_path / "i", np.int64, (2,)) as w:
        w.append([[1, 2], [3, 4]])                                         # lists, bool and int8 cast up
        w.append(np.array([[True, False]]))
        w.append(np.array([[-5, 6]], np.int8))
    check_store(tmp_path / "i", np.array([[1, 2], [3, 4], [1, 0], [-5, 6]], np.int64))


def test_meta_round_trips(tmp_path):
    meta = {"layout": "HWC", "classes": ["cat", "dög", "🐟"], "n": 3, "mean": [0.5, 0.25], "none": None,
            "nested": {"flag": True, "list": [[], {}]}}
    save_memmap(tmp_path / "s", np.zeros((2, 3)), meta=meta)
    assert MemmapArray.open(tmp_path / "s").meta == meta
    assert json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())["meta"] == meta


@pytest.mark.parametrize("meta", [{"x": object()}, {"x": np.int64(3)}, {"x": {1, 2}}, {"x": b"bytes"}],
                         ids=["object", "np.int64", "set", "bytes"])
def test_non_json_meta_refused(tmp_path, meta):
    with pytest.raises(TypeError, match="JSON"):
        MemmapWriter(tmp_path / "s", np.float32, (), meta=meta)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_without_notebook(tmp_path, capsys):
    x = np.arange(1000, dtype=np.float32).reshape(100, 10)
    save_memmap(tmp_path / "s", x, batch_rows=7, progress=True)
    with MemmapWriter(tmp_path / "w", np.float32, (10,), total=100, progress=True) as w:
        for i in range(0, 100, 9):
            w.append(x[i:i + 9])
    check_store(tmp_path / "s", x)
    check_store(tmp_path / "w", x)
    assert "100/100" in capsys.readouterr().out


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("existing", ["store", "file", "empty dir"])
def test_existing_target_refused_and_untouched(tmp_path, existing):
    target = tmp_path / "t"
    if existing == "store":
        save_memmap(target, np.arange(12.0).reshape(4, 3), shard_rows=3)
    elif existing == "file":
        target.write_bytes(b"precious")
    else:
        target.mkdir()
    before = snapshot(target)
    for attempt in (lambda: MemmapWriter(target, np.float32, (3,)).__enter__(),
                    lambda: save_memmap(target, np.zeros((5, 3)))):
        with pytest.raises(StoreExistsError) as ei:
            attempt()
        assert isinstance(ei.value, FileExistsError) and str(target) in str(ei.value)
        assert "overwrite=True" in str(ei.value)
    assert snapshot(target) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_and_open_reader_keeps_old_bytes(tmp_path):
    old, new = np.arange(30, dtype=np.int32).reshape(10, 3), -np.arange(30, dtype=np.int32).reshape(10, 3)
    target = save_memmap(tmp_path / "t", old, shard_rows=4)
    a = MemmapArray.open(target)
    assert a[:].tobytes() == old.tobytes()          # every shard mapped
    save_memmap(target, new, shard_rows=4, overwrite=True)
    assert a[:].tobytes() == old.tobytes() and a[7].tobytes() == old[7].tobytes()
    check_store(target, new, shard_rows=4)
    save_memmap(target, np.ones((3, 2, 2), np.uint8), overwrite=True)   # another dtype and shape
    check_store(target, np.ones((3, 2, 2), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.lock", "t"]


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with MemmapWriter(tmp_path / "t", np.float32, (3,), shard_rows=2) as w:
            w.append(np.zeros((5, 3)))
            raise KeyError("boom")
    assert not (tmp_path / "t").exists() and leftovers(tmp_path) == []
    old = np.arange(6.0).reshape(2, 3)
    save_memmap(tmp_path / "t", old)
    with pytest.raises(KeyError):
        with MemmapWriter(tmp_path / "t", np.float64, (3,), overwrite=True) as w:
            w.append(np.zeros((5, 3)))
            raise KeyError("boom")
    check_store(tmp_path / "t", old)


@pytest.mark.parametrize("batch", [np.zeros((2, 4)), np.zeros((2, 3, 1)), np.zeros(3), np.float32(1),
                                   np.full((2, 3), 0.5), np.full((2, 3), 1j, np.complex64)],
                         ids=["wrong item shape", "extra axis", "missing row axis", "0-d", "float to int",
                              "complex to int"])
def test_bad_batch_refused(tmp_path, batch):
    with pytest.raises(ItemShapeError) as ei:
        with MemmapWriter(tmp_path / "t", np.int32, (3,)) as w:
            w.append(np.zeros((1, 3), np.int32))
            w.append(batch)
    assert isinstance(ei.value, ValueError) and str(tmp_path / "t") in str(ei.value)
    assert "expected" in str(ei.value) and "found" in str(ei.value)
    assert not (tmp_path / "t").exists() and leftovers(tmp_path) == []


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(UnsupportedDtypeError):
        MemmapWriter(tmp_path / "t", object, ())
    with pytest.raises(ItemShapeError):
        MemmapWriter(tmp_path / "t", np.float32, (3, -1))
    with pytest.raises(ValueError, match="shard_rows"):
        MemmapWriter(tmp_path / "t", np.float32, (3,), shard_rows=0)
    with pytest.raises(ItemShapeError):
        save_memmap(tmp_path / "t", np.float32(1))
    assert list(tmp_path.iterdir()) == []


def test_append_after_close_refused(tmp_path):
    w = MemmapWriter(tmp_path / "t", np.uint8, ())
    with pytest.raises(WriterStateError, match="not open"):
        w.append([1])
    with w:
        w.append(np.array([1, 2], np.uint8))
    assert w.close() == tmp_path / "t"               # closing twice is harmless
    with pytest.raises(WriterStateError, match="closed") as ei:
        w.append(np.array([3], np.uint8))
    assert isinstance(ei.value, RuntimeError) and type(ei.value) is not MemmapError
    check_store(tmp_path / "t", np.array([1, 2], np.uint8))


def test_second_writer_conflicts(tmp_path):
    target = tmp_path / "t"
    with MemmapWriter(target, np.float32, (2,)) as w1:
        w1.append(np.ones((3, 2)))
        for overwrite in (False, True):
            with pytest.raises(WriterConflictError) as ei:
                with MemmapWriter(target, np.float32, (2,), overwrite=overwrite):
                    pass
            assert isinstance(ei.value, FileExistsError) and str(target) in str(ei.value)
        w1.append(np.ones((1, 2)))
    check_store(target, np.ones((4, 2), np.float32))
    save_memmap(target, np.zeros((1, 2), np.float32), overwrite=True)   # the lock is free again
    check_store(target, np.zeros((1, 2), np.float32))


def test_target_appearing_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "t"
    w = MemmapWriter(target, np.float32, (2,)).open()
    w.append(np.ones((3, 2)))
    target.mkdir()
    (target / "theirs").write_text("keep me")
    with pytest.raises(StoreExistsError, match="appeared while writing"):
        w.close()
    assert snapshot(target) == {"theirs": b"keep me"} and leftovers(tmp_path) == []


def test_failed_commit_rename_restores_old_store(tmp_path, monkeypatch):
    old = np.arange(8, dtype=np.int64).reshape(4, 2)
    target = save_memmap(tmp_path / "t", old)
    real_rename = os.rename
    monkeypatch.setattr(writer_module, "_try_exchange", lambda a, b: False)   # the two-rename fallback commit

    def rename(src, dst):
        if TMP_MARK in str(src):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StoreWriteError) as ei:
        save_memmap(target, np.zeros((5, 2), np.int64), overwrite=True)
    assert ei.value.errno == errno.EIO
    monkeypatch.undo()
    check_store(target, old)


def test_stale_temporaries_removed_with_warning(tmp_path):
    stale = tmp_path / f".t{TMP_MARK}99999-deadbeef"
    stale.mkdir()
    (stale / "shard-000000.npy").write_bytes(b"partial")
    old = tmp_path / f".t{OLD_MARK}99999-cafebabe"
    old.mkdir()
    other = tmp_path / f".u{TMP_MARK}99999-deadbeef"   # another target's temporary: not ours to remove
    other.mkdir()
    with pytest.warns(UserWarning, match="leftover temporary") as rec:
        save_memmap(tmp_path / "t", np.zeros((2, 2)))
    assert len(rec) == 2 and any(str(stale) in str(r.message) for r in rec)
    assert not stale.exists() and not old.exists() and other.exists()
    a = MemmapArray.open(tmp_path / "t")
    assert a[:].tobytes() == np.zeros((2, 2)).tobytes()


# ---------------------------------------------------------------- crashes
# Child processes import only the store layer (numpy only: no fastai or torch, seconds per process).
CHILD_PRELUDE = textwrap.dedent("""
    import sys
    import fastai_memmap.store
""")
KILLED_WRITER = CHILD_PRELUDE + textwrap.dedent("""
    import numpy as np
    from fastai_memmap.store.writer import MemmapWriter
    print("start", flush=True)
    with MemmapWriter(sys.argv[1], np.int64, (32,), shard_rows=500) as w:
        for i in range(int(sys.argv[2])):
            w.append(np.arange(i * 1600, (i + 1) * 1600, dtype=np.int64).reshape(50, 32))
""")


def _kill_writer_at_random(tmp_path, seed, batches=1000, max_delay=0.45):
    target = tmp_path / f"k{seed}"
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(batches)], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"start\n"
        time.sleep(np.random.default_rng(seed).uniform(0, max_delay))
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(30)
        p.stdout.close()
    if target.exists():                            # complete and valid, or nothing at all
        a = MemmapArray.open(target)
        a.verify()
        assert a[:].tobytes() == np.arange(batches * 1600, dtype=np.int64).tobytes()
        outcome = "complete"
    else:
        outcome = "absent"
    stale = leftovers(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        save_memmap(target, np.zeros((1, 2)), overwrite=True)   # the lock died with the writer
    assert len(rec) == len(stale) and leftovers(tmp_path) == []
    return outcome


@pytest.mark.parametrize("seed", range(5))
def test_sigkilled_writer_leaves_absent_or_complete_store(tmp_path, seed):
    _kill_writer_at_random(tmp_path, seed)


@pytest.mark.slow
def test_sigkilled_writer_many_times(tmp_path):
    outcomes = [_kill_writer_at_random(tmp_path, seed, max_delay=0.6) for seed in range(5, 45)]
    assert "absent" in outcomes


# ---------------------------------------------------------------- out of space
FULL_DISK = CHILD_PRELUDE + textwrap.dedent("""
    import json, resource, signal, numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    from fastai_memmap.store.save import save_memmap
    from fastai_memmap.errors import StoreWriteError
    x = np.arange(40000, dtype=np.float64).reshape(-1, 100)
    cases = {"one big batch": dict(batch_rows=400), "small buffered batches": dict(batch_rows=1),
             "last shard flushed at close": dict(batch_rows=3, data=x[:26])}
    out = {}
    for name, kw in cases.items():
        try:
            save_memmap(sys.argv[1] + "/" + name.replace(" ", "_"), kw.pop("data", x), **kw)
            out[name] = ["no error"]
        except StoreWriteError as e:
            out[name] = ["StoreWriteError", e.errno, isinstance(e, OSError), str(e)]
        except BaseException as e:
            out[name] = [type(e).__name__, str(e)]
    print(json.dumps(out))
""")


def test_file_size_limit_raises_store_write_error(tmp_path):
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name, res in out.items():
        assert res[:3] == ["StoreWriteError", errno.EFBIG, True], (name, res)
        assert "nothing was committed" in res[3] or "target is unchanged" in res[3]
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
