"""The command line: info, verify (exit codes on damaged stores) and the demo as a smoke test."""
import subprocess
import sys

import numpy as np
import pytest

from fastai_memmap import save_memmap
from fastai_memmap.cli.main import main


def test_info_and_verify(tmp_path, capsys):
    save_memmap(tmp_path / "s", np.arange(60, dtype=np.float32).reshape(20, 3), shard_rows=8, meta={"k": 1})
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "20 rows of (3,) float32" in out and "shard-000002.npy: 4 rows" in out
    assert main(["verify", str(tmp_path / "s"), "--quiet"]) == 0
    shard = tmp_path / "s" / "shard-000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["verify", str(tmp_path / "s"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "ChecksumError" in err and "shard-000001.npy" in err


def test_info_on_missing_store_exits_1(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "StoreNotFoundError" in capsys.readouterr().err


def test_demo_trains_to_90_percent(tmp_path):
    "The main job, end to end, as a user runs it (console script entry point via -m)."
    r = subprocess.run([sys.executable, "-m", "fastai_memmap", "demo", "--dir", str(tmp_path),
                        "--min-accuracy", "0.9"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "validation accuracy:" in r.stdout and "held-out images predicted" in r.stdout
    assert (tmp_path / "export.pkl").exists() and (tmp_path / "x" / "manifest.json").exists()
