"""What a new user meets first: writers create missing parent directories, keyword-only LM arguments,
label stores of another length refused with both lengths."""
import numpy as np
import pytest

from fastai_memmap import MemmapArray, MemmapWriter, save_memmap
from fastai_memmap.errors import ItemShapeError, StoreIOError


def test_writers_create_missing_parents(tmp_path):
    target = tmp_path / "data" / "deep" / "x"
    save_memmap(target, np.arange(6, dtype=np.int32).reshape(3, 2))
    assert MemmapArray.open(target)[2].tolist() == [4, 5]
    with MemmapWriter(tmp_path / "other" / "y", np.float32, (2,)) as w:
        w.append(np.ones((2, 2), np.float32))
    assert len(MemmapArray.open(tmp_path / "other" / "y")) == 2


def test_a_file_in_the_parent_path_is_refused_and_kept(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(StoreIOError, match="expected a directory.*found a file"):
        save_memmap(f / "x", np.zeros((2, 2)))
    assert f.read_text() == "a,b\n1,2\n"


def test_lm_bunch_arguments_are_keywords(tmp_path):
    from fastai_memmap import MemmapLMDataBunch
    save_memmap(tmp_path / "t", [np.arange(n, dtype=np.int32) % 20 for n in range(5, 45)], kind="ragged")
    with pytest.raises(TypeError, match="positional"):
        MemmapLMDataBunch.from_memmap(tmp_path / "t", 4, 8)       # bs, bptt passed where vocab would be
    with pytest.raises(ValueError, match="valid_pct"):
        MemmapLMDataBunch.from_memmap(tmp_path / "t", vocab=20, valid_pct=10, bs=2, bptt=4)
    data = MemmapLMDataBunch.from_memmap(tmp_path / "t", vocab=20, bs=2, bptt=4, seed=0)
    x, y = next(iter(data.train_dl))
    assert x.shape == (2, 4) and (x[:, 1:] == y[:, :-1]).all()
