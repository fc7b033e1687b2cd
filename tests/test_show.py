"""Issue 16: show_batch pictures: (C, L) rows as C lines, exactly the items asked for; tabular tables as written."""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fastai_memmap import save_memmap  # noqa: E402
from fastai_memmap.data.items import MemmapItemList, is_signal  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")


@pytest.fixture(autouse=True)
def _close_figures():
    plt.close("all")
    yield
    plt.close("all")


def _data(tmp_path, x):
    save_memmap(tmp_path / "x", x)
    save_memmap(tmp_path / "y", np.arange(len(x), dtype=np.int64) % 2, meta={"classes": ["a", "b"]})
    return (MemmapItemList.from_memmap(tmp_path / "x").split_by_idx([0, 1])
            .label_from_memmap(tmp_path / "y").databunch(bs=8, num_workers=0))


def test_signal_rows_and_exact_axes(tmp_path):
    from fastai.basic_data import DatasetType
    x = np.stack([np.stack([np.full(64, 10.0 * i + c) for c in range(3)]) for i in range(12)]).astype(np.float32)
    data = _data(tmp_path, x)
    data.show_batch(rows=3, ds_type=DatasetType.Fix)
    fig = plt.gcf()
    assert len(fig.axes) == 3                      # rows=3: 3 items, no empty fourth axis
    shown = set()
    for ax in fig.axes:
        assert not ax.images and len(ax.lines) == 3   # a line per channel, not a 3x64 grey image
        ys = [tuple(np.unique(ln.get_ydata())) for ln in ax.lines]
        assert all(len(y) == 1 for y in ys)
        base = ys[0][0]
        assert [y[0] - base for y in ys] == [0.0, 1.0, 2.0]
        shown.add(base)
    assert len(shown) == 3 and shown <= {10.0 * i for i in range(12)}


def test_images_stay_images_and_grid_has_only_items(tmp_path):
    from fastai.basic_data import DatasetType
    x = np.random.default_rng(0).random((12, 8, 8)).astype(np.float32)
    _data(tmp_path, x).show_batch(rows=5, ds_type=DatasetType.Fix)
    fig = plt.gcf()
    assert len(fig.axes) == 5 and all(len(ax.images) == 1 and not ax.lines for ax in fig.axes)


def test_is_signal():
    assert is_signal((3, 64)) and is_signal((1, 10))
    assert not is_signal((28, 28)) and not is_signal((3, 8)) and not is_signal((64,)) and not is_signal((3, 8, 8))


def test_tabular_show_batch_prints_values_as_written_and_no_figure(tmp_path, capsys):
    from fastai_memmap.tabular.convert import tabular_to_memmap
    from fastai_memmap.tabular.item_list import MemmapTabularList
    df = pd.DataFrame({"k": [7, 8, 9, 7, 8] * 8, "v": [89.0, 1.5, 3.25, 1000.0, 0.1] * 8, "y": ["p", "n"] * 20})
    tabular_to_memmap(df, tmp_path / "t", ["k"], ["v"], "y", valid_idx=[0, 1, 2, 3, 4], progress=False)
    data = MemmapTabularList.from_memmap(tmp_path / "t").split_from_memmap().label_from_memmap().databunch(
        bs=40, num_workers=0)
    from fastai.basic_data import DatasetType
    capsys.readouterr()
    data.show_batch(rows=5, ds_type=DatasetType.Valid)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["k", "v", "target"]
    rows = [ln.split() for ln in out[1:]]
    assert rows == [["7", "89.0", "p"], ["8", "1.5", "n"], ["9", "3.25", "p"], ["7", "1000.0", "n"], ["8", "0.1", "p"]]
    assert plt.get_fignums() == []
    x = data.valid_ds.x
    assert x.display_decimals("v") == 3 and isinstance(x.decode([1], [0.0])["k"], (int, np.integer))
