"""Shared test data: the dtypes and item shapes the store round-trips are checked over."""
import numpy as np
from hypothesis import strategies as st

DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", ">f4"]
item_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


def make_data(dtype, shape, seed):
    "Random bytes of `dtype` (NaNs and all; booleans 0/1), shape `shape`."
    rng, dt = np.random.default_rng(seed), np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def assert_store_refused(tmp_path, mutate, error, builtin, named, pattern):
    """Write a valid 2-shard store, apply `mutate`, and check that opening raises `error`, which is
    also a `builtin` and a MemmapError, names the file `named` and (if `pattern`) says expected/found."""
    import pytest
    from fastai_memmap import MemmapArray, save_memmap
    from fastai_memmap.errors import MemmapError
    store = save_memmap(tmp_path / "store", np.arange(30, dtype="<f4").reshape(10, 3), shard_rows=5)
    MemmapArray.open(store)                      # valid before the mutation
    mutate(store)
    with pytest.raises(error) as ei:
        MemmapArray.open(store)
    e = ei.value
    assert isinstance(e, builtin) and isinstance(e, MemmapError)
    msg = str(e)
    assert str(store / named) in msg, msg        # names the file
    if pattern:
        assert "expected" in msg and "found" in msg, msg


def write_png_folder(root, n_per_class, classes, sizes, modes=("RGB", "L", "RGBA", "P"), seed=0):
    """PNG files ``root/<class>/<i>.png``: random RGB pixels of the given (h, w) sizes, saved in the
    given file modes, cycling through both; returns `root`."""
    import PIL.Image
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = sizes[i % len(sizes)]
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            PIL.Image.fromarray(a).convert(modes[i % len(modes)]).save(root / c / f"{i:03d}.png")
    return root
