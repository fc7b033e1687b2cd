"""Reliability (issue 6): a store opens and reads exactly what was written, or fails at once with a typed
error that names the file, what was expected and what was found.

Sections: hostile stores and arguments (extending the table of test_format.py), fuzzed parsers, files
that change under an open reader (shrink: no SIGBUS; replace: no mix of old and new), crashes and
races of writers, and no pickle anywhere in the data path. RELIABILITY.md maps each guarantee to
the tests here.
"""
import errno
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from store_data import assert_store_refused
from hypothesis import HealthCheck, given, settings, strategies as st

from fastai_memmap import MemmapArray, MemmapWriter, save_memmap
from fastai_memmap.store import reader as reader_module
from fastai_memmap.store import writer as writer_module
from fastai_memmap.errors import (NotAStoreError, ChecksumError, FormatError, MemmapError, RowIndexError, RowIndexTypeError,
                                  ShardMismatchError, StoreChangedError, StoreExistsError, StoreNotFoundError,
                                  StoreWriteError, TruncatedStoreError, UnsafePathError, UnsupportedDtypeError,
                                  WriterConflictError)
from fastai_memmap.store.format import MANIFEST_NAME, Manifest, npy_header_bytes, read_npy_header
from fastai_memmap.store.writer import OLD_MARK, TMP_MARK

PKG_DIR = Path(reader_module.__file__).parent
S0, S1 = "shard-000000.npy", "shard-000001.npy"
SIGBUS = 7


def leftovers(parent):
    "Temporary or replaced stores left next to the targets in `parent`."
    return sorted(p.name for p in Path(parent).iterdir() if TMP_MARK in p.name or OLD_MARK in p.name)


def generation(g, rows=10, width=3):
    "Rows of generation `g`: every value of row i is ``g * 1000 + i`` (int32), so a mix shows."
    return (g * 1000 + np.arange(rows, dtype=np.int32))[:, None].repeat(width, 1)


def check_generation(a, allowed):
    "`a` holds one complete generation, the one its manifest names, and it is in `allowed`; return it."
    x = a[:]
    g = int(x[0, 0]) // 1000
    assert a.meta["gen"] == g and g in allowed, (a.meta, g, allowed)
    assert x.tobytes() == generation(g, len(x), x.shape[1]).tobytes()
    a.verify()
    return g


# ---------------------------------------------------------------- child processes
# Children import only the store layer (numpy only: no fastai or torch, which take seconds per process).
PRELUDE = textwrap.dedent("""
    import json, os, signal, sys, time
    import fastai_memmap.store
    import numpy as np
""")


def exchange_supported(directory):
    "Whether the filesystem of `directory` swaps two paths atomically (else the writer falls back to two renames)."
    a, b = Path(directory) / ".xa", Path(directory) / ".xb"
    a.mkdir()
    b.mkdir()
    try:
        return writer_module._try_exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def run_child(code, *args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


# ================================================================ hostile stores
def _manifest(store):
    return json.loads((store / MANIFEST_NAME).read_text())


def _edit(store, fn):
    d = _manifest(store)
    fn(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


def _set(**kv):
    return lambda s: _edit(s, lambda d: d.update(kv))


def _header(fp, dtype, shape):
    "Rewrite the .npy header of `fp` for `dtype` and `shape`, keeping its length (the data offset)."
    raw = fp.read_bytes()
    hlen = 10 + struct.unpack("<H", raw[8:10])[0]
    fp.write_bytes(npy_header_bytes(np.dtype(dtype), shape, length=hlen) + raw[hlen:])


def _header_text(fp, text):
    raw = fp.read_bytes()
    hlen = struct.unpack("<H", raw[8:10])[0]
    body = text.encode("latin1")
    fp.write_bytes(raw[:10] + body + b" " * (hlen - len(body) - 1) + b"\n" + raw[10 + hlen:])


def _npy_v3_latin1(s):
    "A version 3.0 header (UTF-8 by the spec) holding a latin-1 byte."
    body = "{'descr': '<f4\xff', 'fortran_order': False, 'shape': (5, 3), }\n".encode("latin1")
    (s / S0).write_bytes(b"\x93NUMPY\x03\x00" + struct.pack("<I", len(body)) + body + bytes(60))


def _append(fp, data):
    with open(fp, "ab") as f:
        f.write(data)


def _huge_rows(rows):
    "Shard 0 claims `rows` rows, in its header and in the manifest."
    def mutate(s):
        _header(s / S0, "<f4", (rows, 3))
        _edit(s, lambda d: (d["shards"][0].update(rows=rows), d.update(rows=rows + 5)))
    return mutate


def _overflowing_item_shape(s):
    "(2**32, 2**32) float32 rows: 2**66 bytes per row, 0 when computed in int64."
    for fp in (s / S0, s / S1):
        fp.write_bytes(npy_header_bytes(np.dtype("<f4"), (5, 2 ** 32, 2 ** 32), length=128))
    _set(item_shape=[2 ** 32, 2 ** 32])(s)


def _rewrite_shard(name, array):
    def mutate(s):
        with open(s / name, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=True)
    return mutate


class _Trap:
    "Unpickling this creates the file `path`: proof that something unpickled store content."

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _pickled_shard(s):
    _rewrite_shard(S1, np.array([_Trap(s.parent / "PWNED")] * 5, dtype=object))(s)


def _fifo(name):
    def mutate(s):
        (s / name).unlink()
        os.mkfifo(s / name)
    return mutate


def _directory(name):
    def mutate(s):
        (s / name).unlink()
        (s / name).mkdir()
    return mutate


def _symlink_chain_out(s):
    "shard-1 -> inner link (inside the store) -> a file outside the store."
    outside = s.parent / "outside.npy"
    outside.write_bytes((s / S1).read_bytes())
    (s / S1).unlink()
    os.symlink(outside, s / "inner.npy")
    os.symlink(s / "inner.npy", s / S1)


def _symlink(name, target):
    def mutate(s):
        (s / name).unlink()
        os.symlink(target, s / name)
    return mutate


# Cases not in test_format.MALFORMED (51 cases there): (id, mutation of a valid store of 2 shards of
# 5 rows of (3,) float32, error, builtin it also is, file named in the message, says expected/found).
HOSTILE = [
    ("10**17 rows in header and manifest", _huge_rows(10 ** 17), TruncatedStoreError, ValueError, S0, True),
    ("10**18 rows: beyond 2**63 bytes", _huge_rows(10 ** 18), FormatError, ValueError, MANIFEST_NAME, True),
    ("10**18 rows in header only", lambda s: _header(s / S0, "<f4", (10 ** 18, 3)), FormatError,
     ValueError, S0, True),
    ("item_shape overflowing int64", _overflowing_item_shape, FormatError, ValueError, MANIFEST_NAME, True),
    ("item_shape dim of 2**64", _set(item_shape=[2 ** 64]), FormatError, ValueError, MANIFEST_NAME, True),
    ("item_shape of bools", _set(item_shape=[True]), FormatError, ValueError, MANIFEST_NAME, True),
    ("shard rows 10**30", lambda s: _edit(s, lambda d: (d["shards"][0].update(rows=10 ** 30),
                                                        d.update(rows=10 ** 30 + 5))),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("rows NaN", lambda s: (s / MANIFEST_NAME).write_text(
        (s / MANIFEST_NAME).read_text().replace('"rows": 10', '"rows": NaN')), FormatError, ValueError,
     MANIFEST_NAME, True),
    ("void dtype |V12 in manifest", _set(dtype="|V12"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("void dtype |V12 in npy", lambda s: _header(s / S1, "|V12", (5,)), UnsupportedDtypeError, TypeError,
     S1, True),
    ("datetime dtype in manifest", _set(dtype="<M8[s]"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("unicode dtype in manifest", _set(dtype="<U3"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("bytes dtype in manifest", _set(dtype="|S12"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("subarray dtype in manifest", _set(dtype="(3,)<f4"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("structured dtype as JSON list", _set(dtype=[["a", "<f4"]]), FormatError, ValueError, MANIFEST_NAME, True),
    ("pickled object shard (np.save)", _pickled_shard, UnsupportedDtypeError, TypeError, S1, True),
    ("shards of different dtypes", lambda s: _header(s / S1, "<i4", (5, 3)), ShardMismatchError, ValueError,
     S1, True),
    ("shards of different item shapes", lambda s: _header(s / S1, "<f4", (5, 1, 3)), ShardMismatchError,
     ValueError, S1, True),
    ("npy header with an extra key", lambda s: _header_text(
        s / S0, "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3), 'x': 1}"), FormatError, ValueError,
     S0, True),
    ("npy shape of bools", lambda s: _header_text(
        s / S0, "{'descr': '<f4', 'fortran_order': False, 'shape': (5, True)}"), FormatError, ValueError, S0, True),
    ("npy shape as a list", lambda s: _header_text(
        s / S0, "{'descr': '<f4', 'fortran_order': False, 'shape': [5, 3]}"), FormatError, ValueError, S0, True),
    ("npy v3 header not UTF-8", _npy_v3_latin1, FormatError, ValueError, S0, True),
    ("npy header Python expression", lambda s: _header_text(
        s / S0, "{'descr': '<f4', 'fortran_order': False, 'shape': (2 ** 99, 3)}"), FormatError, ValueError,
     S0, True),
    ("shard is a directory", _directory(S1), FormatError, ValueError, S1, True),
    ("shard is a FIFO (never opened)", _fifo(S1), FormatError, ValueError, S1, True),
    ("manifest is a directory", _directory(MANIFEST_NAME), FormatError, ValueError, MANIFEST_NAME, True),
    ("manifest is a FIFO (never opened)", _fifo(MANIFEST_NAME), FormatError, ValueError, MANIFEST_NAME, True),
    ("manifest of 65 MiB (sparse file)", lambda s: os.truncate(s / MANIFEST_NAME, 65 << 20), FormatError,
     ValueError, MANIFEST_NAME, True),
    ("manifest empty", lambda s: (s / MANIFEST_NAME).write_bytes(b""), FormatError, ValueError, MANIFEST_NAME,
     True),
    ("manifest JSON null", lambda s: (s / MANIFEST_NAME).write_text("null"), FormatError, ValueError,
     MANIFEST_NAME, True),
    ("manifest nested 100000 deep", lambda s: (s / MANIFEST_NAME).write_text("[" * 100000 + "]" * 100000),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("manifest with UTF-8 BOM", lambda s: (s / MANIFEST_NAME).write_bytes(
        b"\xef\xbb\xbf" + (s / MANIFEST_NAME).read_bytes()), FormatError, ValueError, MANIFEST_NAME, True),
    ("shard symlink chain leaving the store", _symlink_chain_out, UnsafePathError, ValueError, S1, True),
    ("shard symlink to /dev/zero", _symlink(S1, "/dev/zero"), UnsafePathError, ValueError, S1, True),
    ("dangling shard symlink", _symlink(S1, "nowhere.npy"), StoreNotFoundError, FileNotFoundError, S1, False),
    ("store without shards but rows", _set(shards=[]), ShardMismatchError, ValueError, MANIFEST_NAME, True),
]


@pytest.mark.parametrize("mutate,error,builtin,named,pattern", [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_store_refused(tmp_path, mutate, error, builtin, named, pattern):
    assert_store_refused(tmp_path, mutate, error, builtin, named, pattern)
    assert not (tmp_path / "PWNED").exists()     # nothing was unpickled


def test_symlinked_store_directory_and_inner_symlinks_open(tmp_path):
    "Symlinks are fine while they stay inside the store: a linked store directory, a shard linked to a sibling."
    x = np.arange(30, dtype="<f4").reshape(10, 3)
    store = save_memmap(tmp_path / "store", x, shard_rows=5)
    os.symlink(store, tmp_path / "link")
    assert MemmapArray.open(tmp_path / "link")[:].tobytes() == x.tobytes()
    os.rename(store / S1, store / "real1.npy")
    os.symlink("real1.npy", store / S1)
    MemmapArray.open(store).verify()


# ================================================================ hostile arguments
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    return MemmapArray.open(save_memmap(tmp_path_factory.mktemp("small") / "s", x, shard_rows=4)), x


# Row indices not in test_reader.BAD_INDEX.
BAD_ROWS = [
    ("ragged nested list", [[1], [1, 2]], RowIndexTypeError, TypeError),
    ("mixed int and str", [1, "a"], RowIndexTypeError, TypeError),
    ("set", {1, 2}, RowIndexTypeError, TypeError),
    ("dict", {"a": 1}, RowIndexTypeError, TypeError),
    ("object array with None", np.array([1, None], dtype=object), RowIndexTypeError, TypeError),
    ("list with None", [None], RowIndexTypeError, TypeError),
    ("complex", 1 + 2j, RowIndexTypeError, TypeError),
    ("bytes", b"1", RowIndexTypeError, TypeError),
    ("np.float16", np.float16(1), RowIndexTypeError, TypeError),
    ("datetime64 array", np.array(["2020-01-01"], dtype="M8[D]"), RowIndexTypeError, TypeError),
    ("int64 min", np.iinfo(np.int64).min, RowIndexError, IndexError),
    ("int64 max in array", np.array([np.iinfo(np.int64).max]), RowIndexError, IndexError),
    ("uint64 max in list", [2 ** 64 - 1], RowIndexError, IndexError),
    ("2**70 in list", [2 ** 70], RowIndexError, IndexError),
    ("-2**70 in list", [-2 ** 70], RowIndexError, IndexError),
]


@pytest.mark.parametrize("key,error,builtin", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_refused_by_getitem_and_read(small, key, error, builtin):
    a, _ = small
    for f in (a.__getitem__, a.read):
        if f == a.read and isinstance(key, (int, float, complex, bytes, np.floating)):
            continue                              # read() takes array-likes only
        with pytest.raises(error) as ei:
            f(key)
        assert isinstance(ei.value, builtin) and isinstance(ei.value, MemmapError)
        assert str(a.path) in str(ei.value)


@pytest.mark.parametrize("out,accepted", [(np.empty((2, 3), np.float32)[:, ::-1], True),
                                          (np.empty((2, 3), np.float64), False),
                                          (np.empty((2, 3), np.float32).T.copy().T, True),
                                          (np.empty((2, 3), np.float32), False)],
                         ids=["reversed view", "wrong dtype", "Fortran order", "read-only"])
def test_read_into_bad_out(small, out, accepted):
    "Contract: any writable array of the exact shape and dtype is filled (whatever its strides); others are refused."
    a, x = small
    if out.flags.c_contiguous and out.dtype == np.float32:
        out.flags.writeable = False
    if not accepted:
        with pytest.raises(RowIndexError, match="expected out"):
            a.read([1, 7], out=out)
        return
    r = a.read([1, 7], out=out)
    assert r is out and np.array_equal(out, x[[1, 7]])


def test_empty_stores_read_nothing(tmp_path):
    empty = MemmapArray.open(save_memmap(tmp_path / "e", np.zeros((0, 4), np.uint8), shard_rows=3))
    (tmp_path / "none").mkdir()                   # a hand-written store with no shard at all
    (tmp_path / "none" / MANIFEST_NAME).write_text(json.dumps(
        {"format": "fastai_memmap", "version": 1, "kind": "dense", "dtype": "<f4", "item_shape": [2], "rows": 0,
         "shards": [], "meta": {}}))
    for a in (empty, MemmapArray.open(tmp_path / "none")):
        assert len(a) == 0 and a[:].shape == (0,) + a.item_shape and a.read([]).shape == (0,) + a.item_shape
        assert a[np.zeros(0, bool)].shape == (0,) + a.item_shape and a[::-1].shape == (0,) + a.item_shape
        a.verify()
        for key in (0, -1, [0], np.array([0])):
            with pytest.raises(RowIndexError, match="out of range"):
                a[key]
        assert pickle.loads(pickle.dumps(a))[:].shape == (0,) + a.item_shape


# ================================================================ fuzzing
json_scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
                | st.text(max_size=8) | st.sampled_from(["<f4", "|u1", "|O", "|V8", "shard-000000.npy", "../x",
                                                         "fastai_memmap", "dense", "ragged", "sparse"]))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=10) | st.sampled_from(["format", "version", "kind", "dtype", "item_shape", "rows", "shards",
                                            "meta", "file", "checksum", "offsets", "length", "size"]),
    c, max_size=5), max_leaves=12)
VALID = {"format": "fastai_memmap", "version": 1, "kind": "dense", "dtype": "<f4", "item_shape": [3], "rows": 10,
         "shards": [{"file": S0, "rows": 5, "checksum": "sha256:" + "0" * 64}, {"file": S1, "rows": 5}],
         "meta": {"layout": "HWC"}}


def _paths(d, prefix=()):
    "Every (path of keys/indices) inside the JSON value `d`, containers included."
    yield prefix
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated_manifests(draw):
    d = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(d))
        path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        if not path:
            d = draw(json_values)
            continue
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
        elif action == "add":
            parent.append(draw(json_values))
        else:
            parent[path[-1]] = draw(json_values)
    return d


def _only_typed_errors(f, *args):
    "Call `f`; return its result or the MemmapError it raised. Any other exception fails the test."
    try:
        return f(*args)
    except MemmapError as e:
        return e


@settings(max_examples=300, deadline=None)
@given(d=json_values | mutated_manifests())
def test_fuzz_manifest_from_dict(d):
    m = _only_typed_errors(Manifest.from_dict, d)
    if isinstance(m, Manifest):                   # accepted: then it is consistent and round-trips
        assert m.rows == d["rows"] and m.dtype.kind in "biufc" and all(s >= 0 for s in m.item_shape)
        assert Manifest.from_dict(json.loads(m.to_json())) == m


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300) | mutated_manifests().map(lambda d: json.dumps(d).encode())
       | st.tuples(st.just(json.dumps(VALID).encode()), st.integers(0, 200), st.binary(min_size=1, max_size=3))
       .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]))
def test_fuzz_manifest_load(raw):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / MANIFEST_NAME).write_bytes(raw)
        m = _only_typed_errors(Manifest.load, Path(d))
        assert isinstance(m, (Manifest, MemmapError))
        if isinstance(m, MemmapError):
            assert str(Path(d) / MANIFEST_NAME) in str(m)


DESCRS = ["'<f4'", "'|u1'", "'>i8'", "'|O'", "'|V8'", "'<M8[s]'", "'<U3'", "\"[('a', '<f4')]\"", "[('a', '<f4')]",
          "'(2,)<f4'", "'float-ish'", "3", "None", "b'<f4'"]
SHAPES = ["(5, 3)", "()", "(0,)", "(10**18, 3)", "(1000000000000000000, 3)", "(-1, 3)", "(5, -3)", "(5, 3.0)",
          "(True,)", "[5, 3]", "5", "(2**64,)", "(18446744073709551616,)", "(5," * 50 + ")" * 50, "None"]


@st.composite
def npy_files(draw):
    "Bytes of a .npy file: valid magic and version, then a header built from hostile parts, or random."
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x00\x00", b"\x01\x09"]))
    if draw(st.booleans()):
        text = "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (
            draw(st.sampled_from(DESCRS)), draw(st.sampled_from(["False", "True", "0", "None"])),
            draw(st.sampled_from(SHAPES)))
        if draw(st.booleans()):                   # mutate a few characters
            chars = list(text)
            for _ in range(draw(st.integers(1, 3))):
                chars[draw(st.integers(0, len(chars) - 1))] = draw(st.characters(max_codepoint=255))
            text = "".join(chars)
        body = text.encode("latin1") + b"\n"
    else:
        body = draw(st.binary(max_size=200))
    size = draw(st.sampled_from([len(body), len(body) + 7, max(0, len(body) - 3), 0xFFFF, 2 ** 31]))
    fmt = "<H" if version[0] == 1 else "<I"
    head = b"\x93NUMPY" + version + struct.pack(fmt, min(size, 0xFFFF) if fmt == "<H" else size)
    return head + body + draw(st.binary(max_size=64))


@settings(max_examples=300, deadline=None)
@given(raw=npy_files() | st.binary(max_size=40).map(lambda b: b"\x93NUMPY\x01\x00" + b))
def test_fuzz_read_npy_header(raw):
    with tempfile.TemporaryDirectory() as d:
        fp = Path(d) / "x.npy"
        fp.write_bytes(raw)
        r = _only_typed_errors(read_npy_header, fp)
        if isinstance(r, MemmapError):
            assert str(fp) in str(r)
        else:
            dtype, shape, offset = r
            assert dtype.kind in "biufc" and all(type(s) is int and s >= 0 for s in shape) and offset <= len(raw)
        a = _only_typed_errors(MemmapArray.open, fp)   # huge shapes: refused by the size check, no allocation
        if isinstance(a, MemmapArray):
            assert 10 + a.nbytes <= len(raw) and len(a[:3]) == min(3, len(a))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    x = np.arange(60, dtype="<f4").reshape(20, 3)
    return save_memmap(tmp_path_factory.mktemp("pristine") / "s", x, shard_rows=8, meta={"k": [1, 2]}), x


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_store_bytes(pristine, data):
    "Random bytes of the manifest or of a shard header changed: a typed error, or the exact data (or ChecksumError)."
    store, x = pristine
    with tempfile.TemporaryDirectory() as d:
        s = Path(shutil.copytree(store, Path(d) / "s"))
        fp = s / data.draw(st.sampled_from([MANIFEST_NAME, S0, "shard-000002.npy"]), "file")
        raw = bytearray(fp.read_bytes())
        limit = len(raw) if fp.name == MANIFEST_NAME else 128
        for _ in range(data.draw(st.integers(1, 3), "n")):
            raw[data.draw(st.integers(0, limit - 1), "pos")] = data.draw(st.integers(0, 255), "byte")
        fp.write_bytes(bytes(raw))
        a = _only_typed_errors(MemmapArray.open, s)
        if isinstance(a, MemmapError):
            return
        assert a.dtype == x.dtype and a.shape == x.shape       # opened: then it reads what was written
        try:
            a.verify()
        except ChecksumError:                     # a recorded checksum was hit
            return
        assert a[:].tobytes() == x.tobytes()


# ================================================================ a file shrinks under an open reader
SHRINK_CHILD = """
    from fastai_memmap.store.reader import MemmapArray
    from fastai_memmap.errors import StoreChangedError
    a = MemmapArray.open(sys.argv[1])
    if sys.argv[2] == "unchecked":                # the control: what happens without the size check
        MemmapArray._check_mapped = lambda self, k, m: None
    n = len(a)
    a.read(np.arange(n))                          # every shard mapped
    print("mapped", flush=True)
    sys.stdin.readline()                          # the parent changes the file now
    out = []
    for what, f in (("int", lambda: a[n - 1]), ("gather", lambda: a.read(np.arange(n)[::-3])),
                    ("slice", lambda: a[-5:]), ("other shard", lambda: a[0])):
        try:
            f()
            out.append([what, "no error", ""])
        except StoreChangedError as e:
            out.append([what, "StoreChangedError", str(e)])
    print(json.dumps(out), flush=True)
"""


def _shrink_under_reader(tmp_path, mode, change):
    x = np.arange(128 * 1024, dtype=np.float32).reshape(128, 1024)     # 4 KiB rows, 2 shards of 256 KiB
    store = save_memmap(tmp_path / "s", x, shard_rows=64)
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(SHRINK_CHILD), str(store), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "mapped\n", p.stderr.read()
        change(store / S1)
        out, err = p.communicate("go\n", timeout=60)
    finally:
        p.kill()
        p.wait()
    return p.returncode, out, err, store / S1


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_shrunk_shard_raises_store_changed_not_sigbus(tmp_path, change):
    f = {"truncate": lambda fp: os.truncate(fp, 4096),
         "append": lambda fp: _append(fp, b"\0" * 10)}[change]
    rc, out, err, fp = _shrink_under_reader(tmp_path, "checked", f)
    assert rc == 0, (rc, err)                     # not -SIGBUS: the process lives
    results = json.loads(out.strip().splitlines()[-1])
    for what, outcome, msg in results[:3]:
        assert outcome == "StoreChangedError", (what, outcome)
        assert str(fp) in msg and "expected" in msg and "found" in msg
    assert results[3][1] == "no error"            # the untouched shard still reads


def test_without_the_size_check_a_shrunk_map_kills_with_sigbus(tmp_path):
    "The control that makes the test above meaningful: the failure it prevents is real."
    rc, _, _, _ = _shrink_under_reader(tmp_path, "unchecked", lambda fp: os.truncate(fp, 4096))
    assert rc == -SIGBUS


def test_size_check_cost_is_negligible(tmp_path, capsys):
    "Cost of the per-read size check (one fstat) against a 256 x 4 KiB gather; printed, loosely bounded."
    rows = 4096
    with MemmapWriter(tmp_path / "s", np.float32, (1024,)) as w:
        for i in range(0, rows, 512):
            w.append(np.full((512, 1024), i, np.float32))
    a = MemmapArray.open(tmp_path / "s")
    a[:]                                          # mapped and in the page cache
    idx = np.random.default_rng(0).integers(0, rows, 256)
    m = a._maps[0]

    def best(f, n):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - t) / n)
        return min(times) * 1e6

    check_us = best(lambda: a._check_mapped(0, m), 20000)
    read_us = best(lambda: a.read(idx), 200)
    with capsys.disabled():
        print(f"\nsize check: {check_us:.2f} µs per shard per read; read() of 256 x 4 KiB rows: {read_us:.1f} µs "
              f"({100 * check_us / read_us:.2f} %)")
    assert check_us < 0.05 * read_us


# ================================================================ a store replaced under a reader
def test_reader_of_replaced_store_reads_old_or_refuses(tmp_path):
    "Maps made before the replace keep the old bytes; files first mapped after it are refused, never mixed in."
    p = save_memmap(tmp_path / "s", generation(0), shard_rows=4, meta={"gen": 0})
    mapped, lazy, one = MemmapArray.open(p), MemmapArray.open(p), MemmapArray.open(p, max_open=1)
    mapped[:]
    one[0]                                        # shard 0 mapped, 1 and 2 not
    blob = pickle.dumps(MemmapArray.open(p))      # e.g. a spawned DataLoader worker's copy
    save_memmap(p, generation(1), shard_rows=4, meta={"gen": 1}, overwrite=True)   # same sizes
    assert mapped[:].tobytes() == generation(0).tobytes()
    assert one[:4].tobytes() == generation(0)[:4].tobytes()
    for a, key in ((lazy, 0), (lazy, slice(None)), (one, 5), (pickle.loads(blob), 9)):
        with pytest.raises(StoreChangedError) as ei:
            a[key]
        assert isinstance(ei.value, OSError) and "shard-00000" in str(ei.value)
        assert "expected the file validated when the store was opened" in str(ei.value)
    mapped.close()                                # maps dropped: remapping finds new files
    with pytest.raises(StoreChangedError):
        mapped[0]
    check_generation(MemmapArray.open(p), {1})    # opening again reads the new store


def test_store_replaced_while_opening_is_refused(tmp_path, monkeypatch):
    "The manifest read, then the whole store replaced before its shards are checked: old manifest, new files."
    p = save_memmap(tmp_path / "s", generation(0), shard_rows=4, meta={"gen": 0})
    real_load = Manifest.load.__func__

    def load_then_replace(cls, store_dir):
        m = real_load(cls, store_dir)
        monkeypatch.setattr(Manifest, "load", classmethod(real_load))
        save_memmap(p, generation(1), shard_rows=4, meta={"gen": 1}, overwrite=True)
        return m

    monkeypatch.setattr(Manifest, "load", classmethod(load_then_replace))
    with pytest.raises(StoreChangedError, match="replaced while opening") as ei:
        MemmapArray.open(p)
    assert str(p / MANIFEST_NAME) in str(ei.value)
    check_generation(MemmapArray.open(p), {1})


REPLACER = """
    from fastai_memmap.store.save import save_memmap
    store, n = sys.argv[1], int(sys.argv[2])
    for g in range(1, n + 1):
        x = (g * 1000 + np.arange(40, dtype=np.int32))[:, None].repeat(3, 1)
        save_memmap(store, x, shard_rows=7, meta={"gen": g}, overwrite=True)
    print("done", flush=True)
"""


def _race_readers_with_replacer(tmp_path, generations):
    p = save_memmap(tmp_path / "s", generation(0, 40), shard_rows=7, meta={"gen": 0})
    w = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(REPLACER), str(p), str(generations)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, errors = set(), {}
    try:
        while w.poll() is None:
            try:
                a = MemmapArray.open(p)
                seen.add(check_generation(a, set(range(generations + 1))))
            except (StoreChangedError, StoreNotFoundError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    finally:
        out, err = w.communicate(timeout=120)
    assert w.returncode == 0 and out == "done\n", err
    check_generation(MemmapArray.open(p), {generations})
    assert leftovers(tmp_path) == []
    return seen, errors


def test_readers_racing_a_replacing_writer_never_see_a_mix(tmp_path):
    seen, errors = _race_readers_with_replacer(tmp_path, 30)
    assert len(seen) >= 2, (seen, errors)         # the race happened: several generations were read whole
    if exchange_supported(tmp_path):
        assert "StoreNotFoundError" not in errors  # an atomic exchange: the target never disappears


@pytest.mark.slow
def test_readers_racing_a_replacing_writer_long(tmp_path):
    seen, errors = _race_readers_with_replacer(tmp_path, 400)
    assert len(seen) >= 20, (len(seen), errors)


# ================================================================ writers: crashes, races, full disk
KILLED_OVERWRITER = """
    from fastai_memmap.store import writer
    from fastai_memmap.store.writer import MemmapWriter
    target, g, die_at = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if die_at != "-":                             # die (SIGKILL) just before or after the n-th call of a step
        when, name, nth = die_at.split(":")
        owner = os if name in ("rename", "fsync") else writer
        real, calls = getattr(owner, name), [0]
        def step(*args, **kwargs):
            calls[0] += 1
            if when == "before" and calls[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            r = real(*args, **kwargs)
            if when == "after" and calls[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        setattr(owner, name, step)
    if os.environ.get("NO_EXCHANGE"):             # take the two-rename fallback commit
        writer._try_exchange = lambda a, b: False
    print("start", flush=True)
    with MemmapWriter(target, np.int32, (3,), shard_rows=7, overwrite=True, meta={"gen": g}) as w:
        for i in range(0, 40, 5):
            w.append((g * 1000 + np.arange(i, i + 5, dtype=np.int32))[:, None].repeat(3, 1))
            time.sleep(float(os.environ.get("WRITER_PAUSE", "0")))
    print("done", flush=True)
"""


def _kill_overwriter(tmp_path, die_at="-", delay=None, pause=0.0, no_exchange=False):
    "Overwrite generation 0 with 1 in a child killed at `die_at` (a step) or after `delay` s; check the outcome."
    target = tmp_path / "t"
    if not target.exists():
        save_memmap(target, generation(0, 40), shard_rows=7, meta={"gen": 0})
    env = dict(os.environ, WRITER_PAUSE=str(pause), **({"NO_EXCHANGE": "1"} if no_exchange else {}))
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(KILLED_OVERWRITER), str(target), "1",
                          die_at], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert p.stdout.readline() == b"start\n", p.stderr.read()
        if delay is not None:
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
    finally:
        p.wait(60)
        p.stdout.close()
        p.stderr.close()
    g = check_generation(MemmapArray.open(target), {0, 1})   # the previous store or the new one, complete
    stale = leftovers(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        save_memmap(target, generation(0, 40), shard_rows=7, meta={"gen": 0}, overwrite=True)
    assert sorted(str(r.message).split(":")[0] for r in rec) == sorted(str(tmp_path / s) for s in stale)
    assert leftovers(tmp_path) == [] and p.returncode in (-signal.SIGKILL, 0)
    return g, p.returncode


# (step, commit by exchange?, generation found after the kill): before the commit point the previous store,
# after it the new one. The fallback's crash between its two renames is covered by the next test.
COMMIT_STEPS = [("before:fsync:1", True, 0), ("after:fsync:2", True, 0), ("before:write_fsync:1", True, 0),
                ("after:write_fsync:1", True, 0), ("before:fsync_dir:1", True, 0), ("before:_exchange:1", True, 0),
                ("after:_exchange:1", True, 1), ("before:_remove:1", True, 1),
                ("before:rename:1", False, 0), ("after:rename:2", False, 1), ("before:_remove:1", False, 1)]


@pytest.mark.parametrize("die_at,exchange,gen", COMMIT_STEPS,
                         ids=[f"{d}-{'exchange' if e else 'renames'}" for d, e, _ in COMMIT_STEPS])
def test_writer_killed_at_each_commit_step(tmp_path, die_at, exchange, gen):
    if exchange and not exchange_supported(tmp_path):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    g, rc = _kill_overwriter(tmp_path, die_at, no_exchange=not exchange)
    assert rc == -signal.SIGKILL, f"the kill point {die_at} was never reached (exit code {rc})"
    assert g == gen


def test_writer_killed_between_the_renames_of_the_fallback_commit(tmp_path, monkeypatch):
    "Without RENAME_EXCHANGE the commit is two renames; a crash between them loses nothing: the next writer restores."
    target = save_memmap(tmp_path / "t", generation(0, 40), shard_rows=7, meta={"gen": 0})
    # what a writer killed after moving the old store aside (first rename) leaves behind:
    old = tmp_path / f".t{OLD_MARK}99999-deadbeef"
    os.rename(target, old)
    new = tmp_path / f".t{TMP_MARK}99999-deadbeef"
    shutil.copytree(old, new)
    with pytest.warns(UserWarning) as rec:
        with pytest.raises(StoreExistsError):     # the restored store is there: not overwritten silently
            with MemmapWriter(target, np.int32, (3,)):
                pass
    assert any("restored" in str(r.message) for r in rec)
    check_generation(MemmapArray.open(target), {0})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("seed", range(3))
def test_overwriter_killed_at_random_time(tmp_path, seed):
    _kill_overwriter(tmp_path, delay=np.random.default_rng(seed).uniform(0, 0.3), pause=0.01)


@pytest.mark.slow
def test_overwriter_killed_at_60_random_times(tmp_path):
    t = time.perf_counter()
    _, rc = _kill_overwriter(tmp_path, pause=0.005)           # calibration: a run to the end
    span = time.perf_counter() - t
    assert rc == 0
    rng = np.random.default_rng(6)
    outcomes = [_kill_overwriter(tmp_path, delay=rng.uniform(0, span), pause=0.005)[0] for _ in range(60)]
    assert 0 in outcomes and 1 in outcomes, outcomes          # killed before and after the commit


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, MemoryError, GeneratorExit])
def test_base_exceptions_inside_with_leave_the_previous_store(tmp_path, exc):
    target = save_memmap(tmp_path / "t", generation(0), meta={"gen": 0})
    with pytest.raises(exc):
        with MemmapWriter(target, np.int32, (3,), overwrite=True, meta={"gen": 1}) as w:
            w.append(generation(1)[:4])
            raise exc()
    check_generation(MemmapArray.open(target), {0})
    assert leftovers(tmp_path) == []
    with pytest.raises(exc):                      # an exception from the source of save_memmap
        save_memmap(target, (b if i < 2 else (_ for _ in ()).throw(exc()) for i, b in
                             enumerate(np.split(generation(1), 5))), overwrite=True, meta={"gen": 1})
    check_generation(MemmapArray.open(target), {0})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["_finish_shard fsync", "manifest write", "directory fsync", "commit"])
def test_disk_full_at_each_step_raises_and_keeps_previous_store(tmp_path, monkeypatch, where):
    target = save_memmap(tmp_path / "t", generation(0), meta={"gen": 0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    name = {"_finish_shard fsync": (os, "fsync"), "manifest write": (writer_module, "write_fsync"),
            "directory fsync": (writer_module, "fsync_dir"), "commit": (writer_module, "_exchange")}[where]
    monkeypatch.setattr(*name, full)
    if where == "commit":
        monkeypatch.setattr(os, "rename", full)   # the fallback commit fails the same way
    with pytest.raises(StoreWriteError) as ei:
        save_memmap(target, generation(1), shard_rows=3, meta={"gen": 1}, overwrite=True)
    monkeypatch.undo()
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and str(target) in str(e)
    assert "unchanged" in str(e) or "nothing was committed" in str(e)
    check_generation(MemmapArray.open(target), {0})
    assert leftovers(tmp_path) == []


RACING_WRITER = """
    from fastai_memmap.store.writer import MemmapWriter
    from fastai_memmap.errors import WriterConflictError
    target, g, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        with MemmapWriter(target, np.int32, (3,), shard_rows=7, overwrite=True, meta={"gen": g}) as w:
            for i in range(0, 40, 5):
                w.append((g * 1000 + np.arange(i, i + 5, dtype=np.int32))[:, None].repeat(3, 1))
                time.sleep(0.02)
        print("committed")
    except WriterConflictError as e:
        print("conflict", str(e) if target in str(e) and "another writer" in str(e) else "bad message")
"""


def test_concurrent_writers_one_wins_others_get_a_clear_error(tmp_path):
    target, go = tmp_path / "t", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(RACING_WRITER), str(target), str(g),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in range(1, 5)]
    time.sleep(1.0)                               # every child imported numpy and waits
    go.touch()
    results = {}
    for g, p in enumerate(procs, 1):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results[g] = out.split()[0]
        assert "bad message" not in out
    winners = [g for g, r in results.items() if r == "committed"]
    assert winners and "conflict" in results.values(), results
    check_generation(MemmapArray.open(target), set(winners))   # one writer's complete store, nothing mixed
    assert leftovers(tmp_path) == []


# ================================================================ security
NO_PICKLE_CHILD = """
    import pickle, mmap
    events = []
    def hook(event, args):
        if event == "pickle.find_class":
            raise RuntimeError(f"unpickling {args}")
        if event == "open" and isinstance(args[0], str) and args[0].startswith(sys.argv[1]):
            events.append(["open", args[0], args[1], args[2]])
        if event == "mmap.__new__":
            events.append(["mmap", args[2]])
    for name in ("loads", "load", "Unpickler"):
        setattr(pickle, name, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pickle used")))
    from fastai_memmap.store.reader import MemmapArray
    sys.addaudithook(hook)
    for store in sys.argv[2:]:
        a = MemmapArray.open(store)
        a[0], a[-1], a[:], a.read(np.arange(len(a))[::-1])
        a.verify(allow_unchecked=True)   # the bare .npy has no checksum
    print(json.dumps(events))
"""


def test_opening_and_reading_never_unpickles_and_opens_read_only(tmp_path):
    "An audit hook in a child: no pickle.find_class, every file opened for reading, every map read-only; every kind."
    import scipy.sparse
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    stores = [save_memmap(tmp_path / "dense", x, shard_rows=8),
              save_memmap(tmp_path / "img", np.zeros((4, 5, 6, 3), np.uint8), meta={"layout": "HWC"}),
              save_memmap(tmp_path / "ragged", [np.arange(n, dtype=np.int32) for n in (3, 0, 5, 1)], kind="ragged",
                          shard_rows=2),
              save_memmap(tmp_path / "sparse", scipy.sparse.random(9, 12, density=0.3, format="csr", random_state=0),
                          shard_rows=4)]
    np.save(tmp_path / "bare.npy", x)
    stores.append(tmp_path / "bare.npy")
    r = run_child(NO_PICKLE_CHILD, tmp_path, *stores)
    assert r.returncode == 0, r.stderr
    events = json.loads(r.stdout.strip().splitlines()[-1])
    opens = [e for e in events if e[0] == "open"]
    maps = [e for e in events if e[0] == "mmap"]
    assert opens and maps
    for _, path, mode, flags in opens:
        assert mode in ("r", "rb", None) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) == 0, \
            (path, mode, flags)
    import mmap
    assert all(access == mmap.ACCESS_READ for _, access in maps), maps


def test_item_lists_never_unpickle_store_content(tmp_path, monkeypatch):
    from fastai_memmap import MemmapImageList, MemmapItemList

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while opening or reading a store")

    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    save_memmap(tmp_path / "x", x)
    save_memmap(tmp_path / "img", np.zeros((20, 5, 6, 3), np.uint8), meta={"layout": "HWC"})
    save_memmap(tmp_path / "y", np.arange(20) % 2, meta={"classes": ["a", "b"]})
    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    for cls, store in ((MemmapItemList, "x"), (MemmapImageList, "img")):
        data = (cls.from_memmap(tmp_path / store).split_by_idx([0, 1]).label_from_memmap(tmp_path / "y")
                .databunch(bs=4, num_workers=0))
        assert sum(len(xb) for xb, _ in data.train_dl.new(shuffle=False, drop_last=False)) == 18


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_read_only_store_opens_reads_and_verifies(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    store = save_memmap(tmp_path / "s", x, shard_rows=8)
    for f in store.iterdir():
        f.chmod(0o444)
    store.chmod(0o555)
    try:
        a = MemmapArray.open(store)
        assert a[:].tobytes() == x.tobytes()
        a.verify()
    finally:
        store.chmod(0o755)


def test_writer_leaves_read_only_source_untouched(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "src.npy", x)
    src = tmp_path / "src.npy"
    src.chmod(0o444)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    save_memmap(tmp_path / "s", np.load(src, mmap_mode="r"), batch_rows=7)
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert MemmapArray.open(tmp_path / "s")[:].tobytes() == x.tobytes()


def test_writer_refuses_a_symlinked_lock_file(tmp_path):
    victim = tmp_path / "victim"
    os.symlink(victim, tmp_path / ".t.lock")
    with pytest.raises(UnsafePathError) as ei:
        save_memmap(tmp_path / "t", np.zeros((2, 2)))
    assert str(tmp_path / ".t.lock") in str(ei.value) and "symlink" in str(ei.value)
    assert not victim.exists() and not (tmp_path / "t").exists() and leftovers(tmp_path) == []


def test_writer_never_replaces_nor_writes_through_a_symlink_target(tmp_path):
    elsewhere = save_memmap(tmp_path / "elsewhere", generation(0), meta={"gen": 0})
    before = sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir())
    os.symlink(elsewhere, tmp_path / "link")
    with pytest.raises(StoreExistsError):
        save_memmap(tmp_path / "link", generation(1), meta={"gen": 1})
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(StoreExistsError) as ei:   # refused at once, not after writing everything
        MemmapWriter(tmp_path / "dangling", np.int32, (3,)).open()
    assert "symlink" in str(ei.value)
    with pytest.raises(NotAStoreError, match="symlink"):   # a link is the user's, not a store: kept as it is
        save_memmap(tmp_path / "link", generation(1), meta={"gen": 1}, overwrite=True)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(elsewhere)
    check_generation(MemmapArray.open(tmp_path / "link"), {0})
    assert sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir()) == before


def test_stale_cleanup_only_touches_its_own_target(tmp_path):
    "Glob characters in a store name do not make the cleanup of one target remove another target's files."
    other = tmp_path / f".data1{TMP_MARK}99999-deadbeef"
    other.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # nothing of ours to clean: no warning
        save_memmap(tmp_path / "data[1]", np.zeros((2, 2)))
    assert other.exists()


@pytest.mark.parametrize("dtype", ["0:", "01", "0:f4,", "(2,)f4,i8", "f4,f4", "S3", "U2", "M8[s]", "O", "V8"])
def test_unparsable_or_non_numeric_dtype_strings_refused(dtype):
    "Strings numpy parses as comma formats raised ValueError/SyntaxError before (found by fuzzing)."
    from fastai_memmap.errors import UnsupportedDtypeError
    from fastai_memmap.store.format import check_dtype
    with pytest.raises(UnsupportedDtypeError, match="expected a numeric"):
        check_dtype(dtype)
