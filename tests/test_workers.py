"""DataLoader workers deliver every item exactly once per epoch, byte for byte, whatever the start method.

The matrix: fork, spawn, forkserver × num_workers 0, 2, 4 × dense (`MemmapItemList`), image
(`MemmapImageList`, uint8 HWC) and ragged (`RaggedItemList`, int32 tokens, padded batches) stores, through
fastai's ``databunch(num_workers=..., multiprocessing_context=...)`` and ``train_dl.new(shuffle=True,
drop_last=False)``. Every row carries its own row number (dense: the first value; image: the three
channels of pixel (0, 0); ragged: the first token), so the test knows which row each delivered item is
and compares it with the stored bytes. The default suite runs a few cells that test_items.py does not
(fork/spawn × 2 dense are there); the slow suite runs the whole matrix over more than 1M delivered items.
"""
import multiprocessing as mp

import numpy as np
import pytest
import torch

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai_memmap import MemmapImageList, MemmapItemList, save_memmap

D, H, W = 8, 6, 5
CONTEXTS = [c for c in ("fork", "spawn", "forkserver") if c in mp.get_all_start_methods()]


def make_stores(path, n, seed=0):
    "Dense rows (n, D) float32 and images (n, H, W, 3) uint8 that encode their row number; int64 labels."
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    x[:, 0] = np.arange(n)                        # exact in float32 below 2**24
    imgs = rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)
    rows = np.arange(n)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1], imgs[:, 0, 0, 2] = rows & 255, (rows >> 8) & 255, (rows >> 16) & 255
    codes = (rows % 3).astype(np.int64)
    tokens = [np.concatenate([[i], rng.integers(1, 2 ** 31 - 1, i % 13)]).astype(np.int32) for i in range(n)]
    save_memmap(path / "x", x, shard_rows=max(1, n // 3 + 1))          # several shards
    save_memmap(path / "img", imgs, shard_rows=max(1, n // 2 + 1), meta={"layout": "HWC"})
    save_memmap(path / "tok", tokens, kind="ragged", shard_rows=max(1, n // 3 + 1))
    save_memmap(path / "y", codes, meta={"classes": ["a", "b", "c"]})
    return {"x": x, "img": imgs, "tok": tokens, "y": codes}


def rows_of(kind, xb, stores):
    "Row numbers of the delivered batch `xb`, after checking every byte against the stored rows."
    if kind == "ragged":                          # [x, lengths], padded with 0 after each item
        x, lengths = xb[0].cpu().numpy(), xb[1].cpu().numpy()
        ids = x[:, 0]
        for row, n, i in zip(x, lengths, ids):
            assert n == len(stores["tok"][i]) and np.array_equal(row[:n], stores["tok"][i]) and not row[n:].any()
        return ids
    xb = xb.cpu()
    if kind == "dense":
        ids = xb[:, 0].numpy().astype(np.int64)
        assert xb.numpy().tobytes() == stores["x"][ids].tobytes()
        return ids
    pixels = (xb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()   # back to HWC bytes
    ids = pixels[:, 0, 0, 0].astype(np.int64) | pixels[:, 0, 0, 1].astype(np.int64) << 8 \
        | pixels[:, 0, 0, 2].astype(np.int64) << 16
    assert pixels.tobytes() == stores["img"][ids].tobytes()
    return ids


def deliver(path, stores, kind, workers, context, epochs=1, bs=64):
    "Iterate `epochs` shuffled epochs of the training set; check exact delivery; return the items delivered."
    cls, store = {"dense": (MemmapItemList, "x"), "image": (MemmapImageList, "img"), "ragged": (MemmapItemList, "tok")}[kind]
    ll = cls.from_memmap(path / store).split_by_rand_pct(0.2, seed=1).label_from_memmap(path / "y")
    kwargs = {"multiprocessing_context": context} if workers else {}
    if kind == "ragged":
        kwargs["bucket"] = False                  # shuffled by train_dl.new below, not by a BucketSampler
    data = ll.databunch(bs=bs, num_workers=workers, **kwargs)
    dl = data.train_dl.new(shuffle=True, drop_last=False)
    expect = np.sort(np.asarray(data.train_ds.x.items))
    orders = []
    for _ in range(epochs):
        got = []
        for xb, yb in dl:
            ids = rows_of(kind, xb, stores)
            assert np.array_equal(yb.cpu().numpy(), stores["y"][ids])     # labels travel with their rows
            got.append(ids)
        got = np.concatenate(got)
        assert np.array_equal(np.sort(got), expect)                         # every item exactly once
        orders.append(got)
    if epochs > 1 and len(expect) > 10:
        assert not all(np.array_equal(orders[0], o) for o in orders[1:])    # shuffled anew each epoch
    return len(expect) * epochs


@pytest.fixture(scope="module", autouse=True)
def forkserver_preload():
    "The fork server imports the package once; its workers then start in milliseconds instead of seconds each."
    if "forkserver" in CONTEXTS:
        mp.set_forkserver_preload(["fastai_memmap"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers")
    return path, make_stores(path, 600)


# spawn (a fresh interpreter importing torch and fastai per worker, per epoch) is in test_items.py and the slow matrix
DEFAULT_CELLS = [("dense", 2, "forkserver"), ("image", 4, "fork"), ("ragged", 2, "fork"), ("image", 0, None),
                 ("dense", 0, None), ("ragged", 0, None)]


@pytest.mark.parametrize("kind,workers,context", DEFAULT_CELLS, ids=[f"{k}-{w}-{c}" for k, w, c in DEFAULT_CELLS])
def test_exact_delivery(small, kind, workers, context):
    if context is not None and context not in CONTEXTS:
        pytest.skip(f"no {context} start method here")
    path, stores = small
    assert deliver(path, stores, kind, workers, context, epochs=2) == 2 * 480


KINDS = ("dense", "image", "ragged")
FULL = [(k, w, c) for k in KINDS for w in (2, 4) for c in CONTEXTS] + [(k, 0, None) for k in KINDS]


@pytest.mark.slow
def test_exact_delivery_full_matrix_over_a_million_items(tmp_path):
    stores = make_stores(tmp_path, 45000)         # 36000 training rows per epoch, 21 cells, 2 epochs: 1.5M items
    total = 0
    for kind, workers, context in FULL:
        total += deliver(tmp_path, stores, kind, workers, context, epochs=2, bs=256)
    assert total >= 1_000_000, total
