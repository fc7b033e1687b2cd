"""`verify()` proves or fails, for every kind: a report of the bytes hashed per file, and no silent pass for
files without a recorded checksum (issue 12, item 4)."""
import hashlib
import json

import numpy as np
import pytest
import scipy.sparse

from fastai_memmap import save_memmap
from fastai_memmap.errors import (ChecksumError, MemmapError, OffsetsError, TruncatedStoreError,
                                  UnverifiedStoreError)
from fastai_memmap.store.format import MANIFEST_NAME
from fastai_memmap.store.reader import MemmapArray

CHECKSUM_KEYS = ("checksum", "offsets_checksum", "values_checksum")


def _edit(store, fn):
    d = json.loads((store / MANIFEST_NAME).read_text())
    fn(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


def _strip(store, shard=None, keys=CHECKSUM_KEYS):
    "Remove the checksums `keys` of shard `shard` (all shards if None) from the manifest."
    def fn(d):
        for k, s in enumerate(d["shards"]):
            if shard is None or k == shard:
                for key in keys:
                    s.pop(key, None)
    _edit(store, fn)


def _data(fp):
    "The data bytes of the .npy file `fp` (header excluded), read independently of the package."
    return np.load(fp, mmap_mode="r", allow_pickle=False).tobytes()


def _files(store):
    "Every (file, checksum) the manifest records, in the order `verify` reports them (each part in row order)."
    shards = json.loads((store / MANIFEST_NAME).read_text())["shards"]
    out = []
    for name, key in (("file", "checksum"), ("offsets", "offsets_checksum"), ("values", "values_checksum")):
        out += [(s[name], s.get(key)) for s in shards if name in s]
    return out


def _assert_proven(store, report):
    "Every recorded file is in `report`, hashed in full: its real data byte count, status ok, its checksum."
    files = _files(store)
    assert [r["file"] for r in report] == [f for f, _ in files]
    for r, (f, checksum) in zip(report, files):
        data = _data(store / f)
        assert r == {"file": f, "bytes_hashed": len(data), "checksum": checksum, "status": "ok"}
        assert checksum == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sum(r["bytes_hashed"] for r in report) == sum(len(_data(store / f)) for f, _ in files) > 0


def _stores(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    items = [np.arange(n, dtype=np.int32) for n in (3, 0, 5, 1, 7)]
    m = scipy.sparse.random(9, 12, density=0.3, format="csr", random_state=0)
    return {"dense": save_memmap(tmp_path / "dense", x, shard_rows=8),
            "ragged": save_memmap(tmp_path / "ragged", items, kind="ragged", shard_rows=2),
            "sparse": save_memmap(tmp_path / "sparse", m, shard_rows=4)}


@pytest.mark.parametrize("kind", ["dense", "ragged", "sparse"])
def test_verify_reports_bytes_hashed_per_file(tmp_path, kind):
    store = _stores(tmp_path)[kind]
    a = MemmapArray.open(store)
    _assert_proven(store, a.verify())
    _assert_proven(store, a.verify(allow_unchecked=True))       # nothing unchecked: the same report


@pytest.mark.parametrize("kind", ["dense", "ragged", "sparse"])
def test_verify_without_checksums_fails(tmp_path, kind):
    store = _stores(tmp_path)[kind]
    _strip(store)
    n = len(_files(store))
    with pytest.raises(UnverifiedStoreError) as ei:
        MemmapArray.open(store).verify()
    e = ei.value
    assert isinstance(e, ChecksumError) and isinstance(e, ValueError) and isinstance(e, MemmapError)
    assert str(store) in str(e) and f"found none for {n} of {n}" in str(e) and "allow_unchecked" in str(e)
    assert _files(store)[0][0] in str(e)
    report = MemmapArray.open(store).verify(allow_unchecked=True)
    assert [r["file"] for r in report] == [f for f, _ in _files(store)]
    assert all(r["status"] == "unchecked" and r["bytes_hashed"] == 0 and r["checksum"] is None for r in report)


@pytest.mark.parametrize("kind, key", [("dense", "checksum"), ("ragged", "offsets_checksum"),
                                       ("sparse", "values_checksum"), ("sparse", "checksum")])
def test_one_missing_checksum_is_named(tmp_path, kind, key):
    "One file of one shard without its checksum: only that one is named; the others are still hashed."
    store = _stores(tmp_path)[kind]
    before = dict(_files(store))
    _strip(store, shard=1, keys=(key,))
    missing = [f for f, c in _files(store) if c is None]
    assert len(missing) == 1
    with pytest.raises(UnverifiedStoreError, match=r"found none for 1 of") as ei:
        MemmapArray.open(store).verify()
    assert missing[0] in str(ei.value)
    others = [f for f in before if f != missing[0]]
    assert not any(f in str(ei.value) for f in others)
    report = {r["file"]: r for r in MemmapArray.open(store).verify(allow_unchecked=True)}
    assert report[missing[0]] == {"file": missing[0], "bytes_hashed": 0, "checksum": None, "status": "unchecked"}
    for f in others:
        assert report[f]["status"] == "ok" and report[f]["bytes_hashed"] == len(_data(store / f))
        assert report[f]["checksum"] == before[f]


def test_bare_npy_is_unverified(tmp_path):
    x = np.arange(24, dtype=np.int16).reshape(6, 4)
    fp = tmp_path / "plain.npy"
    np.save(fp, x)
    a = MemmapArray.open(fp)
    with pytest.raises(UnverifiedStoreError) as ei:
        a.verify()
    assert str(fp) in str(ei.value) and "found none for 1 of 1" in str(ei.value)
    assert a.verify(allow_unchecked=True) == [
        {"file": "plain.npy", "bytes_hashed": 0, "checksum": None, "status": "unchecked"}]


def test_corrupt_byte_is_a_checksum_error_not_unverified(tmp_path):
    "A mismatch in a checked shard wins over a missing checksum in another, with or without allow_unchecked."
    store = _stores(tmp_path)["dense"]
    _strip(store, shard=0)
    shard = store / "shard-000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    for allow in (False, True):
        with pytest.raises(ChecksumError) as ei:
            MemmapArray.open(store).verify(allow_unchecked=allow)
        assert type(ei.value) is ChecksumError and str(shard) in str(ei.value)


def test_unchecked_shards_are_still_size_checked(tmp_path):
    store = _stores(tmp_path)["dense"]
    _strip(store)
    a = MemmapArray.open(store)
    shard = store / "shard-000002.npy"
    with open(shard, "ab") as f:
        f.write(b"\0" * 12)                       # one extra row of (3,) float32 after open
    with pytest.raises(TruncatedStoreError) as ei:
        a.verify(allow_unchecked=True)
    assert str(shard) in str(ei.value)


def test_ragged_offsets_checked_before_unverified(tmp_path):
    "Structural errors keep their own type: bad offsets without checksums are an OffsetsError."
    store = _stores(tmp_path)["ragged"]
    _strip(store)
    fp = store / "shard-000001.offsets.npy"
    o = np.load(fp)
    o[1] = o[2] + 1                                # decreasing
    np.save(fp, o)
    a = MemmapArray.open(store, validate="lazy")
    for allow in (False, True):
        with pytest.raises(OffsetsError):
            a.verify(allow_unchecked=allow)


def test_verify_progress_gives_the_same_report(tmp_path):
    store = _stores(tmp_path)["sparse"]
    a = MemmapArray.open(store)
    assert a.verify(progress=True) == a.verify()
