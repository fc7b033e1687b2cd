"""Tests of the on-disk format (fastai_memmap.store.format): npy headers, manifests, and the table of
malformed stores that `MemmapArray.open` must refuse with a typed error naming the file."""
import hashlib
import io
import json
import os
import struct

import numpy as np
import pytest
from store_data import assert_store_refused
from hypothesis import given, settings, strategies as st

from fastai_memmap import MemmapArray, save_memmap
from fastai_memmap.errors import (FormatError, ShardMismatchError, StoreNotFoundError,
                                  TruncatedStoreError, UnsafePathError, UnsupportedDtypeError)
from fastai_memmap.store.format import (ARRAY_ALIGN, DATA_ALIGN, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo,
                                        check_dtype, confined_path, describe, npy_header_bytes, read_npy_header,
                                        shard_name)

DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", ">f4", ">i2"]
item_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


# ---------------------------------------------------------------- npy headers
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), item_shape=item_shapes, rows=st.integers(0, 10 ** 18))
def test_npy_header_is_numpy_readable_aligned_and_reservable(dtype, item_shape, rows):
    dt, shape = np.dtype(dtype), (rows,) + item_shape
    hdr = npy_header_bytes(dt, shape)
    empty = int(np.prod(shape)) * dt.itemsize == 0     # no data to page-align: numpy's 64 (it cannot map it else)
    assert hdr[:8] == b"\x93NUMPY\x01\x00" and len(hdr) % (ARRAY_ALIGN if empty else DATA_ALIGN) == 0
    assert hdr.endswith(b"\n")
    assert struct.unpack("<H", hdr[8:10])[0] == len(hdr) - 10
    reserved = npy_header_bytes(dt, (0,) + item_shape, reserve=True)
    exact = npy_header_bytes(dt, shape, length=len(reserved))    # any row count fits the reservation
    assert len(exact) == len(reserved)
    f = io.BytesIO(exact)
    assert np.lib.format.read_magic(f) == (1, 0)
    d = np.lib.format.read_array_header_1_0(f)
    assert d == (shape, False, dt)


def test_npy_header_too_small_length_refused():
    assert len(npy_header_bytes(np.dtype("f4"), (10, 3))) == 4096 == DATA_ALIGN   # data on a page
    with pytest.raises(FormatError, match="reserved"):
        npy_header_bytes(np.dtype("f4"), (10, 3), length=64)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("dtype", ["f4", ">i8", "?", "c16"])
def test_read_npy_header_of_np_save(tmp_path, version, dtype):
    x = np.zeros((7, 2, 3), dtype)
    fp = tmp_path / "x.npy"
    with open(fp, "wb") as f:
        np.lib.format.write_array(f, x, version=version)
    dt, shape, offset = read_npy_header(fp)
    assert (dt, shape) == (x.dtype, x.shape)
    assert offset == fp.stat().st_size - x.nbytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_check_dtype_accepts_numeric(dtype):
    assert check_dtype(dtype) == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["O", "V8", [("a", "<f4")], "U3", "S4", "M8[s]", "m8[s]", "(2,)f4", "nope"])
def test_check_dtype_refuses_non_numeric(dtype):
    with pytest.raises(UnsupportedDtypeError) as ei:
        check_dtype(dtype, what="somewhere")
    assert isinstance(ei.value, TypeError) and "somewhere" in str(ei.value) and "expected" in str(ei.value)


def test_shard_name_and_describe():
    assert shard_name(0) == "shard-000000.npy" and shard_name(123456) == "shard-123456.npy"
    assert describe(np.dtype("f4"), (1024,), 1000) == "1000 rows of (1024,) float32"


# ---------------------------------------------------------------- manifests
shard_lists = st.lists(st.tuples(st.integers(0, 10 ** 12), st.none() | st.binary(min_size=1, max_size=8)),
                       max_size=5)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 53, 2 ** 53) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), item_shape=item_shapes, shards=shard_lists,
       meta=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
def test_manifest_json_round_trip(dtype, item_shape, shards, meta):
    infos = tuple(ShardInfo(shard_name(i), r, None if b is None else "sha256:" + hashlib.sha256(b).hexdigest())
                  for i, (r, b) in enumerate(shards))
    m = Manifest(dtype=np.dtype(dtype), item_shape=item_shape, shards=infos, meta=meta)
    d = json.loads(m.to_json())
    assert d["format"] == FORMAT_NAME and d["version"] == FORMAT_VERSION and d["kind"] == "dense"
    assert d["dtype"] == np.dtype(dtype).str and d["rows"] == sum(r for r, _ in shards)
    assert Manifest.from_dict(d) == m


def test_manifest_of_written_store_follows_spec(tmp_path):
    x = np.arange(30, dtype="<u2").reshape(10, 3)
    save_memmap(tmp_path / "s", x, shard_rows=4, meta={"layout": "HWC"})
    d = json.loads((tmp_path / "s" / MANIFEST_NAME).read_bytes().decode("utf8"))
    assert set(d) == {"format", "version", "kind", "dtype", "item_shape", "rows", "shards", "meta"}
    assert (d["dtype"], d["item_shape"], d["rows"], d["meta"]) == ("<u2", [3], 10, {"layout": "HWC"})
    assert [s["file"] for s in d["shards"]] == [shard_name(i) for i in range(3)]
    assert [s["rows"] for s in d["shards"]] == [4, 4, 2]
    for s, part in zip(d["shards"], np.split(x, [4, 8])):
        raw = (tmp_path / "s" / s["file"]).read_bytes()
        assert raw[:8] == b"\x93NUMPY\x01\x00"            # version 1.0
        offset = 10 + struct.unpack("<H", raw[8:10])[0]
        assert offset % DATA_ALIGN == 0 and raw[offset:] == part.tobytes()
        assert s["checksum"] == "sha256:" + hashlib.sha256(part.tobytes()).hexdigest()


def test_store_built_with_plain_numpy_opens(tmp_path):
    "A store made of np.save shards and a hand-written manifest (empty shard in the middle) reads right."
    parts = [np.arange(6, dtype="f8").reshape(3, 2), np.zeros((0, 2)), np.arange(6, 14, dtype="f8").reshape(4, 2)]
    store = tmp_path / "hand"
    store.mkdir()
    shards = []
    for i, p in enumerate(parts):
        np.save(store / f"part{i}.npy", p)
        shards.append({"file": f"part{i}.npy", "rows": len(p),
                       "checksum": "sha256:" + hashlib.sha256(p.tobytes()).hexdigest()})
    (store / MANIFEST_NAME).write_text(json.dumps(
        {"format": FORMAT_NAME, "version": 1, "kind": "dense", "dtype": "<f8", "item_shape": [2], "rows": 7,
         "shards": shards, "meta": {}}))
    a = MemmapArray.open(store)
    x = np.concatenate(parts)
    assert a.shape == (7, 2) and a[:].tobytes() == x.tobytes()
    assert [a[i].tolist() for i in range(-7, 7)] == [x[i].tolist() for i in range(-7, 7)]
    a.verify()


def test_confined_path(tmp_path):
    store, outside = tmp_path / "s", tmp_path / "outside.npy"
    store.mkdir()
    outside.write_bytes(b"")
    (store / "inside.npy").write_bytes(b"")
    os.symlink(store / "inside.npy", store / "ok.npy")
    os.symlink(outside, store / "bad.npy")
    assert confined_path(store, "ok.npy") == store / "ok.npy"
    with pytest.raises(UnsafePathError, match="symlink"):
        confined_path(store, "bad.npy")


# ---------------------------------------------------------------- malformed stores
def _manifest(store):
    return json.loads((store / MANIFEST_NAME).read_text())


def _edit_manifest(store, fn):
    d = _manifest(store)
    fn(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


def _rewrite_header(fp, text, version=b"\x01\x00"):
    "Replace the header dict of `fp` by `text`, keeping the header length (so the data offset)."
    raw = fp.read_bytes()
    hlen = struct.unpack("<H", raw[8:10])[0]
    body = text.encode("latin1")
    assert len(body) < hlen
    fp.write_bytes(raw[:6] + version + raw[8:10] + body + b" " * (hlen - len(body) - 1) + b"\n" + raw[10 + hlen:])


def _patch(fp, pos, data):
    raw = bytearray(fp.read_bytes())
    raw[pos:pos + len(data)] = data
    fp.write_bytes(bytes(raw))


S0, S1 = "shard-000000.npy", "shard-000001.npy"
HDR = "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3), }"


def _symlink_out(store):
    outside = store.parent / "outside.npy"
    outside.write_bytes((store / S1).read_bytes())
    (store / S1).unlink()
    os.symlink(outside, store / S1)


def _set(key, value):
    return lambda s: _edit_manifest(s, lambda d: d.__setitem__(key, value))


def _set_shard(i, key, value):
    return lambda s: _edit_manifest(s, lambda d: d["shards"][i].__setitem__(key, value))


# (id, mutation of a valid store of 2 shards of 5 rows of (3,) float32, error, builtin, file named, has expected/found)
MALFORMED = [
    ("truncated shard", lambda s: os.truncate(s / S1, (s / S1).stat().st_size - 4),
     TruncatedStoreError, ValueError, S1, True),
    ("over-long shard", lambda s: open(s / S1, "ab").write(b"\0"), TruncatedStoreError, ValueError, S1, True),
    ("wrong npy magic", lambda s: _patch(s / S0, 0, b"\x93NUMPZ"), FormatError, ValueError, S0, True),
    ("bad npy version", lambda s: _patch(s / S0, 6, b"\x09\x00"), FormatError, ValueError, S0, True),
    ("npy header not a dict", lambda s: _rewrite_header(s / S0, "[1, 2, 3]"), FormatError, ValueError, S0, True),
    ("npy header unparsable", lambda s: _rewrite_header(s / S0, "{'descr': '<f4', "), FormatError, ValueError,
     S0, True),
    ("npy header missing key", lambda s: _rewrite_header(s / S0, "{'descr': '<f4', 'shape': (5, 3)}"),
     FormatError, ValueError, S0, True),
    ("npy shape negative", lambda s: _rewrite_header(s / S0, HDR.replace("(5, 3)", "(5, -3)")),
     FormatError, ValueError, S0, True),
    ("fortran order", lambda s: _rewrite_header(s / S0, HDR.replace("False", "True")), FormatError, ValueError,
     S0, True),
    ("object dtype in npy", lambda s: _rewrite_header(s / S0, HDR.replace("'<f4'", "'|O'")),
     UnsupportedDtypeError, TypeError, S0, True),
    ("structured dtype in npy", lambda s: _rewrite_header(s / S0, HDR.replace("'<f4'", "[('a', '<f4')]")),
     UnsupportedDtypeError, TypeError, S0, True),
    ("huge npy header length", lambda s: _patch(s / S0, 8, b"\xff\xff"), FormatError, ValueError, S0, True),
    ("huge npy v2 header length", lambda s: _patch(s / S0, 6, b"\x02\x00\xff\xff\xff\xff"), FormatError,
     ValueError, S0, True),
    ("npy header length truncated", lambda s: (s / S0).write_bytes((s / S0).read_bytes()[:9]),
     TruncatedStoreError, ValueError, S0, True),
    ("npy header truncated", lambda s: (s / S0).write_bytes((s / S0).read_bytes()[:40]),
     TruncatedStoreError, ValueError, S0, True),
    ("manifest not JSON", lambda s: (s / MANIFEST_NAME).write_text("{'format': 'fastai_memmap'"),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("manifest not UTF-8", lambda s: (s / MANIFEST_NAME).write_bytes(b'{"format": "\xff"}'),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("manifest a JSON list", lambda s: (s / MANIFEST_NAME).write_text("[1, 2]"), FormatError, ValueError,
     MANIFEST_NAME, True),
    ("manifest 5000-digit int", lambda s: (s / MANIFEST_NAME).write_text('{"rows": 1' + "0" * 5000 + "}"),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("wrong format name", _set("format", "zarr"), FormatError, ValueError, MANIFEST_NAME, True),
    ("wrong version", _set("version", 2), FormatError, ValueError, MANIFEST_NAME, True),
    ("version as bool", _set("version", True), FormatError, ValueError, MANIFEST_NAME, True),
    ("version as string", _set("version", "1"), FormatError, ValueError, MANIFEST_NAME, True),
    ("unknown kind", _set("kind", "ragged"), FormatError, ValueError, MANIFEST_NAME, True),
    ("missing key", lambda s: _edit_manifest(s, lambda d: d.pop("dtype")), FormatError, ValueError,
     MANIFEST_NAME, True),
    ("rows as string", _set("rows", "10"), FormatError, ValueError, MANIFEST_NAME, True),
    ("rows as bool", _set("rows", True), FormatError, ValueError, MANIFEST_NAME, True),
    ("item_shape negative", _set("item_shape", [-3]), FormatError, ValueError, MANIFEST_NAME, True),
    ("item_shape not a list", _set("item_shape", 3), FormatError, ValueError, MANIFEST_NAME, True),
    ("meta not an object", _set("meta", []), FormatError, ValueError, MANIFEST_NAME, True),
    ("object dtype in manifest", _set("dtype", "|O"), UnsupportedDtypeError, TypeError, MANIFEST_NAME, True),
    ("unknown dtype in manifest", _set("dtype", "float-ish"), UnsupportedDtypeError, TypeError, MANIFEST_NAME,
     True),
    ("rows != sum of shard rows", _set("rows", 11), ShardMismatchError, ValueError, MANIFEST_NAME, True),
    ("shard entry not an object", lambda s: _edit_manifest(s, lambda d: d["shards"].__setitem__(1, S1)),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("shard rows negative", lambda s: _edit_manifest(s, lambda d: (d["shards"][0].__setitem__("rows", -1),
                                                                    d.__setitem__("rows", 4))),
     FormatError, ValueError, MANIFEST_NAME, True),
    ("bad checksum string", _set_shard(0, "checksum", "md5:abc"), FormatError, ValueError, MANIFEST_NAME, True),
    ("checksum with newline", _set_shard(0, "checksum", "sha256:" + "0" * 64 + "\n"), FormatError, ValueError,
     MANIFEST_NAME, True),
    ("shard dtype != manifest dtype", _set("dtype", "<i4"), ShardMismatchError, ValueError, S0, True),
    ("shard byte order != manifest", _set("dtype", ">f4"), ShardMismatchError, ValueError, S0, True),
    ("shard item shape mismatch", _set("item_shape", [1, 3]), ShardMismatchError, ValueError, S0, True),
    ("shard rows != header rows", lambda s: _edit_manifest(s, lambda d: (d["shards"][0].__setitem__("rows", 4),
                                                                          d["shards"][1].__setitem__("rows", 6))),
     ShardMismatchError, ValueError, S0, True),
    ("shard name with ..", _set_shard(1, "file", "../" + S1), UnsafePathError, ValueError, MANIFEST_NAME, True),
    ("shard name is ..", _set_shard(1, "file", ".."), UnsafePathError, ValueError, MANIFEST_NAME, True),
    ("absolute shard name", _set_shard(1, "file", "/etc/passwd"), UnsafePathError, ValueError, MANIFEST_NAME, True),
    ("shard name with newline", _set_shard(1, "file", S1 + "\n"), UnsafePathError, ValueError, MANIFEST_NAME, True),
    ("shard named manifest.json", _set_shard(1, "file", MANIFEST_NAME), UnsafePathError, ValueError,
     MANIFEST_NAME, True),
    ("shard symlink outside store", _symlink_out, UnsafePathError, ValueError, S1, True),
    ("duplicate shard names", _set_shard(1, "file", S0), FormatError, ValueError, MANIFEST_NAME, True),
    ("missing shard", lambda s: (s / S1).unlink(), StoreNotFoundError, FileNotFoundError, S1, False),
    ("missing manifest", lambda s: (s / MANIFEST_NAME).unlink(), StoreNotFoundError, FileNotFoundError,
     MANIFEST_NAME, False),
]


@pytest.mark.parametrize("mutate,error,builtin,named,pattern", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_store_refused(tmp_path, mutate, error, builtin, named, pattern):
    assert_store_refused(tmp_path, mutate, error, builtin, named, pattern)


def test_missing_store_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store here") as ei:
        MemmapArray.open(tmp_path / "nothing")
    assert isinstance(ei.value, FileNotFoundError) and str(tmp_path / "nothing") in str(ei.value)


BAD_NPY = [
    ("fortran order", lambda fp: np.save(fp, np.asfortranarray(np.zeros((4, 3), "f4"))), FormatError, ValueError),
    ("0-d array", lambda fp: np.save(fp, np.float32(3)), ShardMismatchError, ValueError),
    ("object array", lambda fp: np.save(fp, np.array([None, 1], dtype=object)), UnsupportedDtypeError, TypeError),
    ("structured array", lambda fp: np.save(fp, np.zeros(4, [("a", "<f4")])), UnsupportedDtypeError, TypeError),
    ("string array", lambda fp: np.save(fp, np.array(["ab", "c"])), UnsupportedDtypeError, TypeError),
    ("truncated data", lambda fp: (np.save(fp, np.zeros((4, 3), "f4")), os.truncate(fp, fp.stat().st_size - 1)),
     TruncatedStoreError, ValueError),
    ("not npy", lambda fp: fp.write_bytes(b"PK\x03\x04 a zip file"), FormatError, ValueError),
    ("empty file", lambda fp: fp.write_bytes(b""), FormatError, ValueError),
]


@pytest.mark.parametrize("make,error,builtin", [c[1:] for c in BAD_NPY], ids=[c[0] for c in BAD_NPY])
def test_malformed_bare_npy_refused(tmp_path, make, error, builtin):
    fp = tmp_path / "x.npy"
    make(fp)
    with pytest.raises(error) as ei:
        MemmapArray.open(fp)
    assert isinstance(ei.value, builtin) and str(fp) in str(ei.value)
