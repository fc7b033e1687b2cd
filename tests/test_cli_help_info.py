"""Issue 16: `info`/`verify` on every store kind and on groups of stores, store names, plain-text --help."""
import argparse
import json
import re

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import scipy.sparse

from fastai_memmap import save_memmap
from fastai_memmap.cli import bench
from fastai_memmap.cli.main import build_parser, main, summarise
from fastai_memmap.store.reader import MemmapArray
from fastai_memmap.errors import RowIndexError

REST = re.compile(r"``[^`]+``|`[^`\s][^`]*`")


def test_bare_npy_is_named_by_its_file(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1000, 2), np.float32))
    a = MemmapArray.open(tmp_path / "x.npy")
    assert a.path == tmp_path and a.where == tmp_path / "x.npy"
    with pytest.raises(RowIndexError, match=r"x\.npy: row 5000 out of range"):
        a[5000]
    assert main(["info", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'x.npy'}: 1000 rows of (2,) float32")
    assert main(["info", "--json", str(tmp_path / "x.npy")]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "x.npy")
    assert main(["verify", "--quiet", str(tmp_path / "x.npy")]) == 1   # a bare .npy has no checksum
    err = capsys.readouterr().err
    assert f"UnverifiedStoreError: {tmp_path / 'x.npy'}" in err and "--allow-unchecked" in err
    assert main(["verify", "--quiet", "--allow-unchecked", str(tmp_path / "x.npy")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.npy'}: OK, 1 shard(s), 8,000 bytes checked, 1 without")


def test_info_ragged_and_sparse(tmp_path, capsys):
    rag = np.empty(3, dtype=object)
    rag[:] = [np.arange(n, dtype=np.int64) for n in (1, 4, 2)]
    save_memmap(tmp_path / "r", rag)
    save_memmap(tmp_path / "s", scipy.sparse.random(5, 40, density=0.1, format="csr", dtype=np.float32, random_state=0))
    assert main(["info", str(tmp_path / "r")]) == 0
    assert "3 items of (var, ) int64, 7 elements in all" in capsys.readouterr().out.replace("(var, )", "(var, )")
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "5 sparse rows of 40 float32 features, 20 stored entries" in capsys.readouterr().out


def test_info_and_verify_list_the_stores_of_an_image_folder_store(tmp_path, capsys):
    from fastai_memmap.vision.convert import images_to_memmap
    for c in ("ant", "bee"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            PIL.Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    images_to_memmap(tmp_path / "imgs", tmp_path / "out", workers=0, progress=False)
    assert main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{tmp_path / 'out'}: a group of 2 stores"
    assert "  x/: 6 rows of (8, 8, 3) uint8" in out and "  y/: 6 rows of () int64" in out
    assert "classes: ['ant', 'bee']" in out
    assert main(["verify", "--quiet", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(tmp_path / "out" / "x"), str(tmp_path / "out" / "y")]


def test_info_on_a_tabular_store_lists_sub_stores_and_state(tmp_path, capsys):
    from fastai_memmap.tabular.convert import tabular_to_memmap
    df = pd.DataFrame({"k": list("abcab") * 4, "v": np.arange(20.0), "y": [0, 1] * 10})
    tabular_to_memmap(df, tmp_path / "t", ["k"], ["v"], "y", valid_idx=[0, 1], progress=False)
    assert main(["info", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "manifest not found" not in out
    assert out.splitlines()[0].startswith(f"{tmp_path / 't'}: a group of 4 stores, with tabular.json")
    for name in ("cats/", "conts/", "valid/", "y/"):
        assert f"  {name}: " in out
    assert main(["info", "--json", str(tmp_path / "t")]) == 0
    j = json.loads(capsys.readouterr().out)
    assert sorted(j["stores"]) == ["cats", "conts", "valid", "y"] and j["other_files"] == ["tabular.json"]
    assert j["stores"]["valid"]["rows"] == 2


def test_info_on_a_folder_without_stores_says_what_it_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "StoreNotFoundError" in err and "folder of stores" in err


def test_long_meta_is_summarised_not_cut(tmp_path, capsys):
    names = [f"c{i}" for i in range(10_000)]
    assert summarise(names) == "['c0', 'c1', ... 9,998 more]"
    assert summarise({"a": 1}) == "{'a': 1}" and summarise([1, 2, 3]) == "[1, 2, 3]"
    assert summarise("z" * 100).endswith("... (100 chars)")
    save_memmap(tmp_path / "s", np.zeros((4, 2), np.float32), meta={"classes": names, "layout": "NC"})
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "    classes: ['c0', 'c1', ... 9,998 more]" in out and "    layout: 'NC'" in out
    assert "c9999" not in out


def _parsers():
    p = build_parser()
    yield "fastai-memmap", p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()
    yield "bench (own parser)", bench.build_parser()


@pytest.mark.parametrize("name,parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_help_is_plain_text_and_documents_every_argument(name, parser):
    text = parser.format_help()
    assert not REST.findall(text), f"{name}: reST markup in --help: {REST.findall(text)}"
    undocumented = [a.dest for a in parser._actions
                    if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not undocumented, f"{name}: arguments without help: {undocumented}"


def test_the_walk_covers_every_subcommand():
    names = [n for n, _ in _parsers()]
    assert {"demo", "info", "verify", "convert-images", "bench"} <= set(names)
