"""Label lists over a label store (fastai_memmap.data.labels): class codes outside the class list, ragged
label stores and uint64 codes beyond int64 are refused with ``LabelError`` when labelling, never
passed on to fail later inside the model (``CrossEntropy``/embedding) or to wrap."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai_memmap import MemmapArray, MemmapItemList, save_memmap
from fastai_memmap.errors import LabelError, MemmapError
from fastai_memmap.data.labels import MemmapCategoryList


@pytest.fixture(scope="module")
def xstore(tmp_path_factory):
    return save_memmap(tmp_path_factory.mktemp("x") / "x", np.zeros((20, 2), np.float32))


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(-3, 8), min_size=20, max_size=20), n_classes=st.integers(1, 6),
       given_classes=st.booleans(), dtype=st.sampled_from(["i1", "i8", "u2"]))
def test_codes_outside_the_class_list_refused_at_labelling(xstore, tmp_path_factory, codes, n_classes,
                                                           given_classes, dtype):
    "Codes beyond the class list used to pass until the loss (or an embedding) failed inside `fit`."
    codes = np.array(codes)
    if dtype[0] == "u":
        codes = np.abs(codes)
    ypath = save_memmap(tmp_path_factory.mktemp("y") / "y", codes.astype(dtype))
    classes = [f"c{i}" for i in range(n_classes)] if given_classes else None
    split = MemmapItemList.from_memmap(xstore).split_by_idx(list(range(15, 20)))
    n = n_classes if given_classes else int(codes[:15].max()) + 1
    bad = np.flatnonzero((codes < 0) | (codes >= n))
    if len(bad) or (not given_classes and codes[:15].min() < 0):
        with pytest.raises(LabelError) as ei:
            split.label_from_memmap(ypath, classes=classes)
        msg = str(ei.value)
        assert isinstance(ei.value, MemmapError) and isinstance(ei.value, ValueError)
        assert str(ypath) in msg and "expected class codes" in msg and "found" in msg
        if len(bad) and not (not given_classes and codes[:15].min() < 0):
            first = [b for b in bad if b < 15] or [b for b in bad if b >= 15]
            assert f"code {codes[first[0]]} in row {first[0]}" in msg, msg
    else:
        ll = split.label_from_memmap(ypath, classes=classes)
        assert isinstance(ll.train.y, MemmapCategoryList) and ll.train.y.c == n
        assert [int(ll.valid.y[i].data) for i in range(5)] == codes[15:].tolist()


def test_uint64_codes_beyond_int64_refused_not_wrapped(xstore, tmp_path):
    "A uint64 code of 2**63 became -2**63 through int64 (and a message about classes [] followed)."
    y = np.zeros(20, np.uint64)
    y[4] = 2 ** 63
    ypath = save_memmap(tmp_path / "y", y)
    with pytest.raises(LabelError, match=f"expected class codes below 2\\*\\*63, found {2 ** 63}"):
        MemmapItemList.from_memmap(xstore).split_none().label_from_memmap(ypath)


@pytest.mark.parametrize("classes", [None, ["a", "b"]])
def test_ragged_label_store_refused(xstore, tmp_path, classes):
    "A ragged label store used to fail with AttributeError ('RaggedArray' object has no attribute 'item_shape')."
    ypath = save_memmap(tmp_path / "y", [np.array([i % 2]) for i in range(20)], kind="ragged")
    with pytest.raises(LabelError, match="expected a label store of one row per item .*found a ragged store"):
        MemmapItemList.from_memmap(xstore).split_none().label_from_memmap(ypath, classes=classes)
    assert MemmapArray.open(ypath).kind == "ragged"
