"""`fastai-memmap bench` (fastai_memmap.cli.bench): a tiny run delivers every row it asks for and writes
the JSON it documents; page-cache helpers evict and measure residency. No timing assertions."""
import json
import os

from pathlib import Path

import numpy as np
import pytest

from fastai_memmap.cli.bench import TARGETS, bench_main, evict, read_bytes, resident_fraction

TINY = ["--quick", "--rows", "768", "--dim", "32", "--images", "96", "--side", "8", "--bs", "32",
        "--repeats", "1", "--item-cap", "96", "--image-cap", "64", "--tfm-cap", "64"]


def test_tiny_bench_delivers_every_row_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(TINY + ["--json", str(out), "--dir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "targets (ratios from this run)" in printed and "ours batched" in printed
    res = json.loads(out.read_text())
    assert set(res) == {"config", "env", "results", "ratios"}
    assert res["config"]["rows"] == 768 and res["config"]["workers"] == [0, 2]
    rows = res["results"]
    for r in rows:
        assert r["rows"] == r["expected"] > 0, r
        assert r["rate"] > 0 and r["seconds"] > 0 and r["gbps"] > 0
    loaders = {(r["workload"], r["state"], r["loader"], r["workers"]) for r in rows}
    for wl, st, name, wk in [("W1", "warm", "in-RAM tensor gather (no loader)", "-"),
                             ("W1", "warm", "h5py per item", "2"), ("W1", "warm", "fastai per item, in-RAM rows", "0"),
                             ("W1", "warm", "ours batched", "2"), ("W1", "warm", "ours batched, shuffle='block'", "0"),
                             ("W1", "cold", "sequential read (os.read, 8 MiB)", "0"),
                             ("W2", "warm", "fastai ImageList.from_folder (PNG)", "0"),
                             ("W2", "warm", "ours batched uint8 (+to_float_tfm)", "2"),
                             ("W2", "warm", "ours + get_transforms() (per item)", "0")]:
        assert (wl, st, name, wk) in loaders
    cold = [r for r in rows if r["state"] == "cold"]
    assert len(cold) == 3 and all(r["file_bytes"] >= 768 * 32 * 4 and r["bytes_read"] >= 0 for r in cold)
    assert [t["key"] for t in res["ratios"]] == [t[0] for t in TARGETS]
    assert all(t["value"] is not None and isinstance(t["met"], bool) for t in res["ratios"])


@pytest.mark.parametrize("args", [["--workers", "x"], ["--rows", "0"], ["--side", "30"], ["--rows", "10"]])
def test_bad_arguments_exit_2(args, capsys):
    assert bench_main(["--quick", "--no-w2"] + args) == 2
    assert "fastai-memmap bench" in capsys.readouterr().err


def _fs_type(path: Path) -> str:
    "Filesystem type of the mount holding `path`, from /proc/mounts ('' where unknown)."
    best, kind = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, fs = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fs
    except OSError:
        pass
    return kind


def test_evict_and_resident_fraction():
    "On a disk-backed filesystem a file just read is resident, and evict() drops it from the page cache."
    import tempfile
    where = Path(__file__).parent                  # the checkout: on disk, unlike a tmpfs TMPDIR
    if _fs_type(where) in ("tmpfs", "ramfs", ""):
        pytest.skip(f"{where} is on {_fs_type(where) or 'an unknown filesystem'}: no page cache to evict")
    with tempfile.TemporaryDirectory(dir=where) as d:
        p = Path(d) / "f.bin"
        p.write_bytes(np.random.default_rng(0).bytes(4 << 20))
        with open(p, "rb") as f:
            f.read()
        before = resident_fraction([p])
        evict([p])
        after = resident_fraction([p])
    assert before > 0.9, f"a file just written and read should be cached, found {before:.2f} resident"
    assert after < 0.1, f"evict() should drop the file from the page cache, found {after:.2f} resident"
    assert read_bytes() >= 0
