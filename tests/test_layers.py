"""The package layout: one direction of dependency between layers, no import cycles (imports inside
functions included), a numpy-only store layer, registries instead of base classes importing their
subclasses, the fastai fixes applied in either import order, and the 0.1 module paths still working."""
import ast
import json
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastai_memmap
from fastai_memmap import moved
from fastai_memmap.errors import ArgumentError

PKG = Path(fastai_memmap.__file__).parent
# rank of each layer: a module may import modules of its own layer folder or of a lower rank only
RANKS = {"base": 0, "store": 1, "data": 2, "vision": 3, "tabular": 3, "text": 3, "cli": 4, "top": 5}
BASE = {"errors", "arguments", "version"}            # fastai_memmap/*.py used by every layer
TOP = {"__init__", "__main__", "patching", "moved"}  # fastai_memmap/*.py that only the user imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def imports_of(path: Path):
    "Every module of the package that `path` imports, at module level or inside functions."
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastai_memmap")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "fastai_memmap":
                target = node.module
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}"))
    return {m for m in found if m != me}


@pytest.fixture(scope="module")
def graph():
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "top"
    return "base" if parts[1] in BASE else "top" if parts[1] in TOP else parts[1]


def test_every_module_is_in_a_layer(graph):
    assert {layer(m) for m in graph} <= set(RANKS), sorted({layer(m) for m in graph} - set(RANKS))
    assert {"fastai_memmap.store.reader", "fastai_memmap.data.items", "fastai_memmap.vision.images",
            "fastai_memmap.tabular.item_list", "fastai_memmap.text.lm", "fastai_memmap.cli.main"} <= set(graph)
    flat = [p.name for p in PKG.glob("*.py")]
    assert sorted(flat) == ["__init__.py", "__main__.py", "arguments.py", "errors.py", "moved.py", "patching.py",
                            "version.py"]


def test_no_import_cycles(graph):
    "Tarjan's strongly connected components of the import graph: each is a single module."
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_graph_sees_imports_inside_functions():
    "The graph builder is not blind to function-level imports (else the cycle test could not fail)."
    found = imports_of(PKG / "patching.py")
    assert "fastai_memmap.data.compat" in found   # imported inside _apply()


def test_imports_point_down(graph):
    wrong = []
    for m, targets in graph.items():
        for t in targets:
            if t not in graph:
                continue
            a, b = layer(m), layer(t)
            if a != b and not RANKS[b] < RANKS[a]:
                wrong.append(f"{m} -> {t}")
    assert wrong == []


def test_no_private_names_imported_across_modules(graph):
    wrong = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                wrong += [f"{module_name(p)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert wrong == []


def run_child(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_store_layer_imports_neither_torch_nor_fastai(tmp_path):
    out = run_child(f"""
        import json, sys
        import numpy as np
        import fastai_memmap.store as store
        from fastai_memmap import MemmapArray, save_memmap, RaggedArray
        save_memmap({str(tmp_path / 'd')!r}, np.arange(12, dtype=np.int16).reshape(4, 3))
        save_memmap({str(tmp_path / 'r')!r}, [np.arange(2), np.arange(3)], kind="ragged")
        a, r = MemmapArray.open({str(tmp_path / 'd')!r}), MemmapArray.open({str(tmp_path / 'r')!r})
        print(json.dumps({{"rows": a[1].tolist(), "ragged": type(r).__name__, "torch": "torch" in sys.modules,
                          "fastai": "fastai" in sys.modules, "data": "fastai_memmap.data" in sys.modules}}))
    """)
    assert out == {"rows": [3, 4, 5], "ragged": "RaggedArray", "torch": False, "fastai": False, "data": False}


CHECK_PATCHED = """
    import json, sys
    import torch.utils.data
    import fastai.vision.transform as t
    print(json.dumps({"solve": t._solve_func.__name__,
                      "dataloader": hasattr(torch.utils.data.DataLoader.__init__, "_fastai_memmap_patch"),
                      "compat": "fastai_memmap.data.compat" in sys.modules}))
"""


@pytest.mark.parametrize("first", ["fastai_memmap", "fastai"])
def test_fastai_fixes_applied_in_either_import_order(first):
    "The user's own fastai import is patched, whether fastai_memmap was imported before it or after."
    imports = "import fastai_memmap\nimport fastai.vision" if first == "fastai_memmap" else \
        "import fastai.vision\nimport fastai_memmap"
    out = run_child(imports + "\n" + textwrap.dedent(CHECK_PATCHED))
    assert out == {"solve": "solve_legacy", "dataloader": True, "compat": True}


def test_without_fastai_memmap_fastai_is_unpatched():
    "The check above can fail: plain fastai has its own solve and DataLoader."
    out = run_child("import fastai.vision\n" + textwrap.dedent(CHECK_PATCHED))
    assert out["solve"] != "solve_legacy" and out["dataloader"] is False and out["compat"] is False


def test_public_names_resolve():
    assert len(fastai_memmap.__all__) == len(set(fastai_memmap.__all__))
    for name in fastai_memmap.__all__:
        assert getattr(fastai_memmap, name) is not None, name
    assert set(fastai_memmap.__all__) <= set(dir(fastai_memmap))
    assert fastai_memmap.MemmapItemList.__module__ == "fastai_memmap.data.items"
    assert fastai_memmap.MemmapArray.__module__ == "fastai_memmap.store.reader"
    with pytest.raises(AttributeError):
        fastai_memmap.no_such_name


def test_old_module_paths_warn_and_return_the_new_module():
    out = run_child("""
        import importlib, json, warnings
        import fastai_memmap
        from fastai_memmap.moved import OLD_PATHS, new_path
        res = {}
        for old in OLD_PATHS:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                m = importlib.import_module("fastai_memmap." + old)
            new = new_path(old)
            res[old] = {"same": new is None or m is importlib.import_module(new),
                        "name": m.__name__, "spec": m.__spec__.name,
                        "warned": [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]}
        print(json.dumps(res))
    """)
    assert set(out) == set(moved.OLD_PATHS)
    for old, r in out.items():
        new = moved.new_path(old)
        assert r["same"], old
        if new is None:   # tabular, text, cli: now packages of the same name, exporting the same names
            assert r["name"] == f"fastai_memmap.{old}" and r["warned"] == []
        else:
            assert r["name"] == r["spec"] == new, old
            assert len(r["warned"]) == 1 and new in r["warned"][0], (old, r["warned"])


@pytest.mark.parametrize("module, name, new", [
    ("fastai_memmap.items", "MemmapItemList", "fastai_memmap.data.items"),
    ("fastai_memmap.images", "MemmapImageList", "fastai_memmap.vision.images"),
    ("fastai_memmap.reader", "MemmapArray", "fastai_memmap.store.reader"),
    ("fastai_memmap.tabular", "MemmapTabularProcessor", "fastai_memmap.tabular.item_list"),
    ("fastai_memmap.text", "TextIdProcessor", "fastai_memmap.text.lm"),
    ("fastai_memmap.inmemory", "ImageListInMemory", "fastai_memmap.vision.inmemory"),
])
def test_pickles_naming_old_modules_load(module, name, new):
    "A learner exported with 0.1 names its classes by the old module paths (protocol 0: a GLOBAL opcode)."
    blob = f"c{module}\n{name}\n.".encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = pickle.loads(blob)
    assert cls.__module__ == new and cls.__name__ == name


def test_store_kind_registry(tmp_path):
    from fastai_memmap.store import MemmapArray, MemmapWriter, RaggedArray, RaggedWriter, SparseArray, SparseWriter
    from fastai_memmap.store.kinds import reader_for, registered_kinds, writer_for
    assert registered_kinds() == ("ragged", "sparse")
    assert writer_for("ragged") is RaggedWriter and writer_for("sparse") is SparseWriter
    with pytest.raises(ArgumentError, match="'dense', 'ragged', 'sparse'.*'bogus'"):
        reader_for("bogus")
    with pytest.raises(ArgumentError, match="bogus"):
        MemmapWriter(tmp_path / "x", np.float32, (), kind="bogus")
    with MemmapWriter(tmp_path / "r", np.int32, (), kind="ragged") as w:
        assert type(w) is RaggedWriter
        w.append([np.arange(3, dtype=np.int32)])
    assert type(MemmapArray.open(tmp_path / "r")) is RaggedArray
    import scipy.sparse
    fastai_memmap.save_memmap(tmp_path / "s", scipy.sparse.random(5, 7, density=0.3, format="csr", random_state=0))
    assert type(MemmapArray.open(tmp_path / "s")) is SparseArray


def test_item_list_and_label_registries(tmp_path):
    import scipy.sparse
    from fastai_memmap import (MemmapCategoryList, MemmapFloatList, MemmapImageList, MemmapItemList,
                               MemmapSegmentationLabelList, RaggedItemList, SparseItemList, save_memmap)
    save_memmap(tmp_path / "r", [np.arange(n, dtype=np.float32) for n in (1, 2, 3)], kind="ragged")
    save_memmap(tmp_path / "s", scipy.sparse.random(3, 4, density=0.5, format="csr", random_state=0))
    save_memmap(tmp_path / "d", np.zeros((3, 8, 8, 3), np.uint8))
    save_memmap(tmp_path / "m", np.zeros((3, 8, 8), np.uint8))
    save_memmap(tmp_path / "f", np.zeros((3, 2), np.float32))
    save_memmap(tmp_path / "c", np.zeros(3, np.int64))
    assert type(MemmapItemList.from_memmap(tmp_path / "r")) is RaggedItemList
    assert type(MemmapItemList.from_memmap(tmp_path / "s")) is SparseItemList
    images = MemmapImageList.from_memmap(tmp_path / "d")
    store = fastai_memmap.MemmapArray.open
    assert images.get_label_cls(store(tmp_path / "m")) is MemmapSegmentationLabelList
    assert images.get_label_cls(store(tmp_path / "c")) is MemmapCategoryList
    assert images.get_label_cls(store(tmp_path / "f")) is MemmapFloatList
    plain = MemmapItemList.from_memmap(tmp_path / "f")
    assert plain.get_label_cls(store(tmp_path / "m")) is MemmapCategoryList   # masks only for image lists
    assert plain.get_label_cls([1.0, 2.0]).__name__ == "FloatList"   # not a store: fastai's own choice
    lls = images.split_none().label_from_memmap(tmp_path / "m")
    assert type(lls.train.y) is MemmapSegmentationLabelList
