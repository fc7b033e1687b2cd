"""Tests of fastai_memmap.data.compat: each breakage is reproduced in a fresh interpreter that imports fastai
alone (no fastai_memmap), then shown fixed in this process after `compat.apply()`."""
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastai_memmap.data import compat

# Data builders, run both in the unpatched subprocess and here, so both sides see the same objects.
BUILDERS = '''
import numpy as np, pandas as pd, torch
from fastai.data_block import ItemList
from fastai.tabular import TabularList, tabular_learner, Categorify, FillMissing, Normalize
from fastai.vision import Image, get_transforms

def tabular_df(n=48):
    rng = np.random.RandomState(0)
    return pd.DataFrame({"cat": rng.choice(["a", "b", "c"], n), "num": rng.rand(n).astype("float32"),
                         "y": rng.randint(0, 2, n)})

def fit_tabular(path):
    "A one-epoch tabular learner on `tabular_df()` (Categorify exercises pandas' .cat accessor)."
    df = tabular_df()
    data = (TabularList.from_df(df, path=path, cat_names=["cat"], cont_names=["num"],
                                procs=[FillMissing, Categorify, Normalize])
            .split_by_idx(list(range(40, 48))).label_from_df("y").databunch(bs=8, num_workers=0))
    learn = tabular_learner(data, layers=[8])
    learn.fit(1)
    return df, data, learn

def multilabel_lists():
    "Multi-label targets with 1 to 3 labels per row."
    df = pd.DataFrame({"x": np.arange(8, dtype=np.float32),
                       "y": ["a b", "a", "b c a", "c", "a c", "b", "c", "a b"]})
    return ItemList.from_df(df, cols="x").split_by_idx([6, 7]).label_from_df("y", label_delim=" ")

def warped_images(n):
    "`n` random images through `get_transforms()` with the perspective warp always on."
    tfms = get_transforms(max_warp=0.4, p_affine=1.0)[0]
    return [Image(torch.rand(3, 32, 32)).apply_tfms(tfms, size=32) for _ in range(n)]
'''

UNPATCHED = '''
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastai.basic_train
out = {"pkg_resources": [str(w.message) for w in caught if "pkg_resources" in str(w.message)]}
warnings.simplefilter("ignore")
exec(BUILDERS)
from pathlib import Path
from fastai.basic_data import load_data
from fastai.basic_train import load_learner
from fastai.data_block import LabelLists
from fastai.vision import ImageBBox
from torch.utils.data import DataLoader

def attempt(key, fn):
    try:
        fn()
        out[key] = None
    except Exception as e:
        out[key] = [type(e).__name__, str(e)[:300]]

path = Path(sys.argv[1])
df, data, learn = fit_tabular(path)
learn.export()
learn.save("model", with_opt=True)
data.save("data.pkl")
data.export("data_export.pkl")
attempt("load_learner", lambda: load_learner(path))
attempt("learner_load", lambda: learn.load("model", with_opt=True))
attempt("load_data", lambda: load_data(path, "data.pkl"))
attempt("load_empty", lambda: LabelLists.load_empty(path, "data_export.pkl"))
attempt("warp", lambda: warped_images(1))
for kw, value in [("multiprocessing_context", "spawn"), ("persistent_workers", True), ("prefetch_factor", 2),
                  ("generator", torch.Generator()), ("pin_memory_device", "")]:
    attempt("dl_" + kw, lambda: DataLoader(range(8), batch_size=2, num_workers=1, **{kw: value}))
attempt("ragged", multilabel_lists)
attempt("bbox", lambda: ImageBBox.create(32, 32, np.array([[1, 2, 10, 12]])))
out["fastai_memmap_imported"] = any(name.startswith("fastai_memmap") for name in sys.modules)
(path / "result.json").write_text(json.dumps(out))
'''


def start_python(code: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    "Wait for `proc` and return its stdout; fail the test with its stderr if it failed."
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{stderr[-3000:]}")
    return stdout


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory):
    "Start both fresh-interpreter runs at once (each spends ~8 s importing fastai)."
    unpatched_dir, isolated_dir = tmp_path_factory.mktemp("unpatched"), tmp_path_factory.mktemp("isolated")
    procs = {"unpatched": (start_python(f"BUILDERS = {BUILDERS!r}\n{UNPATCHED}", str(unpatched_dir),
                                        cwd=unpatched_dir), unpatched_dir),
             "isolated": (start_python(ISOLATED_APPLY, str(Path(compat.__file__).parent.parent), cwd=isolated_dir), None)}
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def unpatched(fresh_interpreters):
    "What fastai 1.0.61 alone does on this stack: {check: None or [error type, message]}."
    proc, path = fresh_interpreters["unpatched"]
    finish(proc)
    result = json.loads((path / "result.json").read_text())
    assert not result["fastai_memmap_imported"]
    return result


@pytest.fixture(scope="module")
def isolated_apply(fresh_interpreters):
    "compat.apply() in a fresh interpreter, compat loaded without the package __init__."
    return json.loads(finish(fresh_interpreters["isolated"][0]).strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def applied():
    compat.apply()
    return compat


@pytest.fixture(scope="module")
def builders(applied):
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(BUILDERS, namespace)
    return namespace


@pytest.fixture(scope="module")
def fitted(builders, tmp_path_factory):
    path = tmp_path_factory.mktemp("fitted")
    df, data, learn = builders["fit_tabular"](path)
    return path, df, data, learn


def assert_failed(unpatched, key, error, fragment):
    found = unpatched[key]
    assert found is not None, f"{key}: expected {error} without the fix, it worked (fix obsolete?)"
    assert found[0] == error and fragment in found[1], found


# --------------------------------------------------------------------------------------------- apply()
def test_apply_twice_changes_nothing():
    import fastai.basic_data, fastai.basic_train, fastai.core, fastai.data_block
    import fastai.vision.image, fastai.vision.transform

    def snapshot():
        return [fastai.basic_train.torch, fastai.basic_data.torch, fastai.data_block.torch,
                fastai.vision.transform._solve_func, torch.utils.data.DataLoader.__init__,
                fastai.basic_data.DataBunch.add_test, fastai.core.array, fastai.data_block.array,
                fastai.vision.image.np, fastai.data_block.np, *compat.PATCHES.values()]

    before, patches = snapshot(), dict(compat.PATCHES)
    compat.apply()
    assert all(a is b for a, b in zip(before, snapshot())) and len(before) == len(snapshot())
    assert compat.PATCHES == patches and compat.applied()


def test_patches_are_recorded_and_documented():
    expected = {"torch_load", "solve", "dataloader_kwargs", "default_workers", "ragged_array", "numpy_aliases",
                "pkg_resources_warn", "ipython_display", "text_import_hook"}
    on_text_import = {"spacy3_tokenizer", "qrnn_inplace"}   # recorded once fastai.text is imported (issue 18)
    assert expected <= set(compat.PATCHES) <= expected | on_text_import
    for name, patch in compat.PATCHES.items():
        assert patch.name == name and patch.targets and patch.reason and patch.location
        assert f"``{name}``" in compat.__doc__


# --------------------------------------------------------------------------------------------- torch.load
def test_unpatched_fastai_loads_fail_with_weights_only(unpatched):
    for key in ("load_learner", "learner_load", "load_data", "load_empty"):
        assert_failed(unpatched, key, "UnpicklingError", "weights_only")


def test_export_load_learner_predict(fitted):
    from fastai.basic_train import load_learner
    path, df, data, learn = fitted
    learn.export()
    loaded = load_learner(path)
    for i in range(5):
        row = df.iloc[i]
        assert torch.allclose(loaded.predict(row)[2], learn.predict(row)[2], atol=1e-6)
    assert "trust" in compat.LOAD_LEARNER_SECURITY_NOTE and "load_learner" in compat.LOAD_LEARNER_SECURITY_NOTE


def test_learner_load_restores_optimizer_state(fitted):
    from fastai.tabular import tabular_learner
    path, df, data, learn = fitted
    learn.save("model", with_opt=True)
    fresh = tabular_learner(data, layers=[8]).load("model", with_opt=True)
    saved, restored = learn.opt.state_dict()["state"], fresh.opt.state_dict()["state"]
    assert saved and saved.keys() == restored.keys()  # fastai swallows a failed optimizer load: compare
    for key in saved:
        for name, value in saved[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored[key][name]))


def test_load_data_and_load_empty(fitted):
    from fastai.basic_data import load_data
    from fastai.data_block import LabelLists
    path, df, data, learn = fitted
    data.save("data.pkl")
    data.export("data_export.pkl")
    assert len(load_data(path, "data.pkl", bs=8, num_workers=0).train_ds) == len(data.train_ds)
    assert LabelLists.load_empty(path, "data_export.pkl").train.y.classes == data.train_ds.y.classes


def test_torch_load_fix_stays_inside_fastai(fitted):
    import fastai.basic_train
    path, df, data, learn = fitted
    learn.export("export_check.pkl")
    proxy = fastai.basic_train.torch
    assert proxy.nn is torch.nn and proxy.Tensor is torch.Tensor and proxy.load is not torch.load
    with pytest.raises(Exception, match="weights_only") as plain:  # torch's own default is untouched
        torch.load(path / "export_check.pkl")
    assert type(plain.value).__name__ == "UnpicklingError"
    with pytest.raises(type(plain.value)):  # an explicit weights_only=True is honoured inside fastai
        proxy.load(path / "export_check.pkl", weights_only=True)


# --------------------------------------------------------------------------------------------- torch.solve
def test_unpatched_perspective_warp_fails(unpatched):
    assert_failed(unpatched, "warp", "RuntimeError", "torch.solve")


def test_perspective_warps_work(builders):
    images = builders["warped_images"](30)
    assert all(im.data.shape == (3, 32, 32) and torch.isfinite(im.data).all() for im in images)


def test_solve_legacy_matches_linalg():
    gen = torch.Generator().manual_seed(0)
    A = torch.rand(8, 8, generator=gen) + 8 * torch.eye(8)
    B = torch.rand(8, 1, generator=gen)
    solution, LU = compat.solve_legacy(B, A)
    assert torch.allclose(solution, torch.linalg.solve(A, B), atol=1e-5) and LU.shape == (8, 8)
    with pytest.raises(RuntimeError):
        compat.solve_legacy(B, torch.zeros(8, 8))


# --------------------------------------------------------------------------------------------- DataLoader
DL_KWARGS = ["multiprocessing_context", "persistent_workers", "prefetch_factor", "generator", "pin_memory_device"]


def test_unpatched_dataloader_rejects_modern_kwargs(unpatched):
    for kw in DL_KWARGS:
        assert_failed(unpatched, "dl_" + kw, "TypeError", f"unexpected keyword argument '{kw}'")


def test_plain_dataloader_accepts_and_records_modern_kwargs():
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import default_collate
    gen = torch.Generator().manual_seed(0)
    dl = DataLoader(range(8), 2, num_workers=1, persistent_workers=True, prefetch_factor=3, generator=gen,
                    pin_memory=False)
    assert sorted(torch.cat(list(dl)).tolist()) == list(range(8))
    assert dl.init_kwargs["batch_size"] == 2 and dl.init_kwargs["generator"] is gen
    assert dl.init_kwargs["persistent_workers"] and dl.init_kwargs["prefetch_factor"] == 3
    plain = DataLoader(range(4)).init_kwargs  # fastai's defaults are kept; pinned only for a CUDA device
    assert plain["pin_memory"] is torch.cuda.is_available()
    assert plain["collate_fn"] is default_collate and plain["shuffle"] is False
    assert DataLoader(range(4), pin_memory=True).init_kwargs["pin_memory"] is True   # the user's value is kept
    with pytest.raises(TypeError, match="bogus"):
        DataLoader(range(4), bogus=1)


def _labelled_floats():
    from fastai.data_block import ItemList
    x = np.arange(48, dtype=np.float32).reshape(12, 4)
    return ItemList(x).split_by_idx([10, 11]).label_from_lists(["a", "b"] * 5, ["a", "b"]), x


def test_databunch_spawn_context_reaches_every_loader():
    from fastai.data_block import ItemList
    lists, x = _labelled_floats()
    lists.add_test(ItemList(x[:3]))
    data = lists.databunch(bs=4, num_workers=2, multiprocessing_context="spawn")

    def start_method(ddl):
        return ddl.dl.multiprocessing_context.get_start_method()

    assert [start_method(d) for d in (data.train_dl, data.valid_dl, data.fix_dl, data.test_dl)] == ["spawn"] * 4
    rebuilt = data.train_dl.new(shuffle=False)
    assert start_method(rebuilt) == "spawn" and rebuilt.dl.init_kwargs["shuffle"] is False
    data.batch_size = 2
    assert start_method(data.train_dl) == "spawn" and data.train_dl.batch_size == 2
    data.add_test(ItemList(x[:5]))
    assert start_method(data.test_dl) == "spawn" and len(data.test_dl.dataset) == 5
    xb, yb = next(iter(data.train_dl))  # two spawned workers unpickle the LabelList
    assert xb.shape == (2, 4) and yb.shape == (2,)


def test_databunch_persistent_workers():
    lists, x = _labelled_floats()
    data = lists.databunch(bs=4, num_workers=1, persistent_workers=True)
    assert all(d.dl.persistent_workers for d in (data.train_dl, data.valid_dl, data.fix_dl))
    for _ in range(2):
        assert sum(len(xb) for xb, yb in data.fix_dl) == 10
    assert data.fix_dl.new(shuffle=False).dl.persistent_workers


# --------------------------------------------------------------------------------------------- ragged
def test_unpatched_ragged_multilabel_fails(unpatched):
    assert_failed(unpatched, "ragged", "ValueError", "inhomogeneous")


def test_array_falls_back_to_object_for_ragged_input():
    import fastai.core, fastai.data_block
    from fastai.core import array
    ragged = array([[1, 2], [3]])
    assert ragged.dtype == object and ragged.shape == (2,) and ragged[0] == [1, 2]
    assert array(iter([[1, 2], [3]])).shape == (2,)
    assert array([[1, 2], [3, 4]]).dtype == np.int64 and array(x for x in [1.5, 2]).dtype == np.float64
    mixed = array([np.zeros((2, 3)), np.zeros((2, 4))])
    assert mixed.shape == (2,) and mixed[1].shape == (2, 4)
    with pytest.raises(ValueError):  # an explicit dtype still refuses ragged input
        array([[1, 2], [3]], dtype=np.int64)
    assert fastai.data_block.array is fastai.core.array
    assert "fastai.data_block.array" in compat.PATCHES["ragged_array"].targets


def test_multilabel_databunch(builders):
    lists = builders["multilabel_lists"]()
    assert lists.train.y.classes == ["a", "b", "c"]
    xb, yb = lists.databunch(bs=3, num_workers=0).one_batch()
    assert yb.shape == (3, 3) and set(yb.unique().tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------------- numpy aliases
def test_unpatched_numpy_alias_fails(unpatched):
    assert_failed(unpatched, "bbox", "AttributeError", "has no attribute 'object'")


def test_image_bbox_from_array():
    import fastai.vision.image
    from fastai.vision import ImageBBox
    bbox = ImageBBox.create(32, 32, np.array([[1, 2, 10, 12]]))
    assert bbox.data.shape == (1, 4)
    assert fastai.vision.image.np.float is float and fastai.vision.image.np.ndarray is np.ndarray
    assert "object" not in vars(np) and "float" not in vars(np)  # numpy itself is untouched


# --------------------------------------------------------------------------------------------- pkg_resources
ISOLATED_APPLY = '''
import json, sys, types, warnings
for name, where in (("fastai_memmap", sys.argv[1]), ("fastai_memmap.data", sys.argv[1] + "/data")):
    package = types.ModuleType(name)  # load compat without the __init__s (the data layer's applies the fixes)
    package.__path__ = [where]
    sys.modules[name] = package
from fastai_memmap.data import compat
before = compat.applied()
filters = list(warnings.filters)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    filters = list(warnings.filters)
    compat.apply()
    same_filters = list(warnings.filters) == filters
print(json.dumps({"before": before, "after": compat.applied(), "same_filters": same_filters,
                  "warnings": [str(w.message) for w in caught]}))
'''


def test_unpatched_import_warns_about_pkg_resources(unpatched):
    assert any("pkg_resources is deprecated" in message for message in unpatched["pkg_resources"])


def test_apply_imports_fastai_without_pkg_resources_warning(isolated_apply):
    result = isolated_apply
    assert result["before"] is False and result["after"] is True and result["same_filters"]
    assert not [message for message in result["warnings"] if "pkg_resources" in message], result["warnings"]

# --------------------------------------------------------------------------------------------- pandas
def test_tabular_categorify_fits_on_pinned_pandas(fitted):
    path, df, data, learn = fitted
    assert int(pd.__version__.split(".")[0]) < 2
    assert list(data.train_ds.x.classes["cat"]) == ["#na#", "a", "b", "c"]
    assert learn.recorder.losses and all(np.isfinite(float(loss)) for loss in learn.recorder.losses)
