"""Block shuffling (fastai_memmap.data.sampling) and the reader's access hints: every row once per epoch,
locality, reproducibility, rank splits, readahead, and the sampler inside fastai's data bunches."""
import pickle
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastai_memmap  # noqa: F401  (applies the fastai compat fixes)
from fastai.basic_train import Learner

from fastai_memmap import MemmapArray, save_memmap
from fastai_memmap.errors import ArgumentError, ArgumentTypeError, MemmapError
from fastai_memmap.data.items import MemmapItemList
from fastai_memmap.data.sampling import (BlockShuffle, BlockShuffleSampler, block_shuffle_order, shuffle_option,
                                         READAHEAD_WINDOWS)

N, D = 600, 4


@pytest.fixture
def stores(tmp_path):
    "x: N rows whose first value is the row number, 3 shards; y: class codes."
    x = np.zeros((N, D), np.float32)
    x[:, 0] = np.arange(N)
    save_memmap(tmp_path / "x", x, shard_rows=250)
    save_memmap(tmp_path / "y", (np.arange(N) % 3).astype(np.int64), meta={"classes": ["a", "b", "c"]})
    return tmp_path


def _lls(path, pct=0.0):
    il = MemmapItemList.from_memmap(path / "x")
    il = il.split_by_rand_pct(pct, seed=0) if pct else il.split_none()
    return il.label_from_memmap(path / "y")


# ------------------------------------------------------------------------------------------ the order
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), block_rows=st.integers(1, 80), window_blocks=st.integers(1, 6),
       seed=st.integers(0, 2 ** 40), epoch=st.integers(0, 5), replicas=st.integers(1, 5))
def test_union_over_ranks_is_every_position_once(n, block_rows, window_blocks, seed, epoch, replicas):
    parts = [block_shuffle_order(n, block_rows, window_blocks, seed, epoch, replicas, r) for r in range(replicas)]
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    samplers = [BlockShuffleSampler(n, block_rows, window_blocks, seed, replicas, r, epoch=epoch) for r in range(replicas)]
    assert [len(s) for s in samplers] == sizes
    assert [list(s) for s in samplers] == [p.tolist() for p in parts]


def test_order_is_a_function_of_seed_and_epoch():
    a = block_shuffle_order(5000, 64, 4, seed=7, epoch=3)
    assert np.array_equal(a, block_shuffle_order(5000, 64, 4, seed=7, epoch=3))
    assert not np.array_equal(a, block_shuffle_order(5000, 64, 4, seed=7, epoch=4))
    assert not np.array_equal(a, block_shuffle_order(5000, 64, 4, seed=8, epoch=3))
    assert not np.array_equal(a, np.arange(5000))


@pytest.mark.parametrize("block_rows,window_blocks", [(64, 4), (100, 1), (7, 16)])
def test_each_window_reads_at_most_window_blocks_blocks(block_rows, window_blocks):
    n = 5000
    order = block_shuffle_order(n, block_rows, window_blocks, seed=1)
    window_rows = block_rows * window_blocks
    blocks = order // block_rows
    # windows are whole groups of shuffled blocks; a window of rows may straddle two groups (short last block)
    for a in range(0, n, window_rows):
        assert len(np.unique(blocks[a:a + window_rows])) <= 2 * window_blocks
    # consecutive batches stay inside few blocks: locality on disk
    assert all(len(np.unique(blocks[a:a + 32])) <= 2 * window_blocks for a in range(0, n, 32))
    # and the blocks themselves come in shuffled order
    firsts = blocks[::window_rows]
    assert not np.array_equal(firsts, np.sort(firsts))


def test_keys_make_blocks_contiguous_on_disk():
    rng = np.random.default_rng(0)
    keys = rng.permutation(10_000)[:3000]          # positions scattered over the store, e.g. a random split
    order = block_shuffle_order(3000, 100, 2, seed=3, keys=keys)
    assert np.array_equal(np.sort(order), np.arange(3000))
    rank_of_key = np.argsort(np.argsort(keys))       # where each position sits in disk order
    blocks = rank_of_key[order] // 100
    for a in range(0, 3000, 200):
        assert len(np.unique(blocks[a:a + 200])) <= 2


def test_single_window_is_a_full_shuffle_of_a_small_dataset():
    order = block_shuffle_order(300, 1024, 16, seed=0)
    assert np.array_equal(np.sort(order), np.arange(300)) and not np.array_equal(order, np.arange(300))


BAD_ARGS = [  # (kwargs, error, words the message must hold)
    (dict(block_rows=0), ArgumentError, ["block_rows", ">= 1", "found 0"]),
    (dict(window_blocks=0), ArgumentError, ["window_blocks", "found 0"]),
    (dict(block_rows=2.5), ArgumentTypeError, ["block_rows", "2.5"]),
    (dict(block_rows=True), ArgumentTypeError, ["block_rows", "True"]),
    (dict(num_replicas=0), ArgumentError, ["num_replicas", "found 0"]),
    (dict(rank=2, num_replicas=2), ArgumentError, ["rank", "[0, 2)", "found 2"]),
    (dict(rank=-1), ArgumentError, ["rank", "found -1"]),
    (dict(rank="0"), ArgumentTypeError, ["rank", "'0'"]),
    (dict(keys=np.arange(3)), ArgumentError, ["keys", "(10,)", "(3,)"]),
    (dict(n=-1), ArgumentError, ["n >= 0", "found -1"]),
    (dict(epoch=-1), ArgumentError, ["epoch >= 0", "found -1"]),
    (dict(epoch=1.0), ArgumentTypeError, ["epoch", "1.0"]),
    (dict(seed=-1), ArgumentError, ["seed", "[0, 2**63)", "found -1"]),
    (dict(seed=2 ** 64), ArgumentError, ["seed", "[0, 2**63)", f"found {2 ** 64}"]),
    (dict(seed=2 ** 63), ArgumentError, ["seed", f"found {2 ** 63}"]),
    (dict(seed=1.5), ArgumentTypeError, ["seed", "1.5"]),
]


@pytest.mark.parametrize("kwargs,error,words", BAD_ARGS, ids=[str(c[0])[:30] for c in BAD_ARGS])
def test_bad_arguments_are_refused_with_typed_errors(kwargs, error, words):
    args = dict(n=10, block_rows=4, window_blocks=2, seed=0, epoch=0, num_replicas=1, rank=0)
    with pytest.raises(error) as ei:
        block_shuffle_order(**{**args, **kwargs})
    assert isinstance(ei.value, MemmapError) and "expected" in str(ei.value)
    assert all(w in str(ei.value) for w in words), str(ei.value)
    sampler_args = {k: v for k, v in {**args, **kwargs}.items() if k != "seed" or v is not None}
    with pytest.raises(error):   # the sampler checks the same arguments at construction
        BlockShuffleSampler(**sampler_args)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-2 ** 70, 2 ** 70))
def test_a_seed_gives_its_own_order_or_is_refused(seed):
    "Seeds never wrap onto another seed's order (2**64 used to give seed 0's order, -1 that of 2**64 - 1)."
    if 0 <= seed < 2 ** 63:
        order = block_shuffle_order(50, 4, 2, seed=seed)
        assert np.array_equal(np.sort(order), np.arange(50))
        assert np.array_equal(order, block_shuffle_order(50, 4, 2, seed=seed))
    else:
        with pytest.raises(ArgumentError, match=r"seed: expected an int in \[0, 2\*\*63\)"):
            block_shuffle_order(50, 4, 2, seed=seed)
        with pytest.raises(ArgumentError):
            BlockShuffle(seed=seed)


def test_bad_epochs_refused_by_set_epoch_and_order():
    s = BlockShuffleSampler(10, 2, seed=0)
    with pytest.raises(ArgumentError, match="epoch >= 0, found -1"):
        s.set_epoch(-1)
    with pytest.raises(ArgumentTypeError):
        s.order(epoch="1")


@pytest.mark.parametrize("make", [lambda: BlockShuffle(num_replicas=2, rank=1),
                                  lambda: BlockShuffleSampler(50, 4, num_replicas=2, rank=0)])
def test_distributed_sampling_refuses_a_seed_ranks_could_disagree_on(make):
    "seed=None with 2 ranks: each drew its own order, so the ranks trained 37 of 50 rows (parts overlapped)."
    with pytest.raises(ArgumentError, match="seed: expected an int shared by every rank with num_replicas=2, "
                                            "found None"):
        make()


def test_one_process_still_draws_a_seed_and_ranks_with_one_seed_cover_every_row():
    assert BlockShuffle().seed is None and BlockShuffleSampler(10, 2).seed >= 0
    parts = [list(BlockShuffleSampler(50, 4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(50))


# ------------------------------------------------------------------------------------------ the sampler
def test_sampler_advances_its_epoch_and_set_epoch_repeats_one():
    s = BlockShuffleSampler(1000, 50, 2, seed=11)
    e0, e1 = list(s), list(s)
    assert s.epoch == 2 and e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(1000))
    s.set_epoch(1)
    assert list(s) == e1 and s.order(0).tolist() == e0


def test_default_seed_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = list(BlockShuffleSampler(500, 20, 2))
    torch.manual_seed(5)
    assert list(BlockShuffleSampler(500, 20, 2)) == a


class Recorder:
    "A prefetcher that records what it is asked, and from which thread."

    def __init__(self):
        self.asked, self.threads = [], set()

    def __call__(self, positions):
        self.threads.add(threading.get_ident())
        self.asked.append(np.sort(positions))


def test_readahead_reads_every_window_in_order_in_a_thread():
    rec = Recorder()
    s = BlockShuffleSampler(1000, 50, 2, seed=0, prefetch=rec)
    seen = []
    for p in s:                       # a slow consumer: the thread stays READAHEAD_WINDOWS windows ahead
        if len(seen) % 100 == 0:
            want, deadline = min(10, len(seen) // 100 + READAHEAD_WINDOWS), time.monotonic() + 10
            while len(rec.asked) < want and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(rec.asked) >= want
        seen.append(p)
    windows = [np.sort(p) for p in np.split(np.array(seen), range(100, 1000, 100))]
    assert len(rec.asked) == 10 and all(np.array_equal(a, b) for a, b in zip(rec.asked, windows))
    assert rec.threads and threading.get_ident() not in rec.threads
    assert _readahead_threads_end()                                 # stopped at the end of the epoch


def test_readahead_thread_stops_when_the_epoch_is_abandoned():
    s = BlockShuffleSampler(10_000, 50, 2, seed=0, prefetch=Recorder())
    it = iter(s)
    assert [next(it) for _ in range(10)]
    it.close()
    assert _readahead_threads_end()


def _readahead_threads_end(timeout=10.0):
    deadline = time.monotonic() + timeout
    while [t for t in threading.enumerate() if t.name == "fastai_memmap-readahead"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_reader_waits_for_each_window_to_be_read():
    "Positions of a window are yielded only after its readahead returned (no competing page faults)."
    done = []

    def slow(positions):
        time.sleep(0.02)
        done.append(set(positions.tolist()))
    s = BlockShuffleSampler(400, 20, 2, seed=0, prefetch=slow)
    for p in s:
        assert any(p in d for d in done)


def test_failing_prefetch_warns_and_the_epoch_goes_on():
    def prefetch(positions):
        raise OSError("madvise refused")
    s = BlockShuffleSampler(100, 10, 2, seed=0, prefetch=prefetch)
    with pytest.warns(UserWarning, match="madvise refused"):
        assert sorted(s) == list(range(100))   # the reader waits for the (failed) first window: warned by then


@pytest.mark.parametrize("value", ["blocks", False, 1, None])
def test_shuffle_option_refuses_unknown_values(value):
    with pytest.raises(ArgumentError, match="shuffle"):
        shuffle_option(value)


@pytest.mark.parametrize("kwargs,error", [(dict(block_bytes=0), ArgumentError), (dict(window_blocks=-1), ArgumentError),
                                          (dict(num_replicas=2, rank=2, seed=0), ArgumentError),
                                          (dict(readahead="yes"), ArgumentTypeError),
                                          (dict(block_bytes=1.5), ArgumentTypeError)])
def test_block_shuffle_option_validates(kwargs, error):
    with pytest.raises(error, match="expected"):
        BlockShuffle(**kwargs)


# ------------------------------------------------------------------------------------------ in a data bunch
def _epoch_rows(dl):
    return [int(r) for xb, _ in dl for r in xb[:, 0].tolist()]


def test_databunch_block_shuffle_delivers_distinct_rows_and_keeps_other_loaders(stores):
    data = _lls(stores, 0.2).databunch(bs=32, num_workers=0, shuffle=BlockShuffle(block_bytes=40 * 16, seed=1))
    s = data.train_dl.dl.sampler
    assert isinstance(s, BlockShuffleSampler) and s.block_rows == 40 and s.epoch == 0   # sanity check undone
    train_rows = set(np.asarray(data.train_ds.x.items).tolist())
    e0 = _epoch_rows(data.train_dl)
    assert len(e0) == len(set(e0)) == len(data.train_ds) // 32 * 32 and set(e0) <= train_rows
    e1 = _epoch_rows(data.train_dl)
    assert e1 != e0 and s.epoch == 2
    fix = _epoch_rows(data.fix_dl)                                    # fix_dl and valid_dl keep fastai's order
    assert fix == sorted(fix) and len(fix) == len(data.train_ds)
    assert _epoch_rows(data.valid_dl) == np.asarray(data.valid_ds.x.items).tolist()


def test_block_string_option_and_readahead_advises_the_stores(stores, monkeypatch):
    lls = _lls(stores)
    asked = []
    monkeypatch.setattr(MemmapArray, "advise", lambda self, hint, rows=None: asked.append((self.path.name, hint,
                                                                                           np.asarray(rows))))
    data = lls.databunch(bs=50, num_workers=0, shuffle="block", no_check=True)
    rows = []
    for i, (xb, _) in enumerate(data.train_dl):
        deadline = time.monotonic() + 10
        while i == 0 and len(asked) < 2 and time.monotonic() < deadline:    # the readahead thread runs first
            time.sleep(0.001)
        rows += [int(r) for r in xb[:, 0].tolist()]
    assert sorted(rows) == list(range(N))
    assert {(name, hint) for name, hint, _ in asked} == {("x", "populate"), ("y", "populate")}
    assert sorted(np.concatenate([r for name, _, r in asked if name == "x"]).tolist()) == list(range(N))


def test_sampler_survives_new_batch_size_and_fit(stores):
    data = _lls(stores).databunch(bs=32, num_workers=0, shuffle=BlockShuffle(seed=3))
    s = data.train_dl.dl.sampler
    new = data.train_dl.new(drop_last=False)
    assert new.dl.sampler is s
    data.train_dl.batch_size = 64
    assert data.train_dl.dl.sampler is s and data.train_dl.batch_size == 64
    learn = Learner(data, torch.nn.Sequential(torch.nn.Linear(D, 3)))
    learn.fit(2, 1e-3)
    assert data.train_dl.dl.sampler is s and s.epoch >= 2


def test_rank_splits_of_a_databunch_cover_the_training_set_once(stores):
    rows = []
    for rank in range(3):
        data = _lls(stores).databunch(bs=10, num_workers=0, no_check=True,
                                      shuffle=BlockShuffle(block_bytes=64, seed=9, num_replicas=3, rank=rank))
        rows.append([int(data.train_ds.x.items[i]) for i in data.train_dl.dl.sampler])
    assert sorted(sum(rows, [])) == list(range(N)) and [len(r) for r in rows] == [200, 200, 200]


def test_block_shuffle_with_workers_delivers_the_same_rows(stores):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _lls(stores).databunch(bs=50, num_workers=2, shuffle=BlockShuffle(seed=4), no_check=True)
    expect = [int(i) for i in BlockShuffleSampler(N, data.train_dl.dl.sampler.block_rows, 16, seed=4)]
    assert _epoch_rows(data.train_dl) == expect


# ------------------------------------------------------------------------------------------ access hints
def test_access_hint_applies_to_maps_opened_later_and_survives_pickling(tmp_path):
    save_memmap(tmp_path / "s", np.arange(40, dtype=np.float32).reshape(20, 2), shard_rows=8)
    a = MemmapArray.open(tmp_path / "s")
    assert a.access == "normal"
    a[0]
    a.advise("random")
    assert a.access == "random" and np.array_equal(a[[19, 3]], [[38, 39], [6, 7]])
    b = pickle.loads(pickle.dumps(a))
    assert b.access == "random" and np.array_equal(b[:], a[:])
    a.advise("willneed")
    a.advise("willneed", [3, 4, 5, 17])
    a.advise("dontneed", np.array([1, 2]))
    a.advise("populate", [0, 19])
    a.advise("sequential")
    assert np.array_equal(a[:], np.arange(40, dtype=np.float32).reshape(20, 2))


@pytest.mark.parametrize("hint,rows,error", [("fast", None, ValueError), ("random", [1], ValueError),
                                             ("willneed", [99], IndexError), ("willneed", [1.5], TypeError)])
def test_bad_hints_are_refused(tmp_path, hint, rows, error):
    save_memmap(tmp_path / "s", np.zeros((10, 3), np.float32))
    with pytest.raises(error):
        MemmapArray.open(tmp_path / "s").advise(hint, rows)


def test_reads_stay_right_while_readahead_maps_and_evicts_shards(tmp_path):
    "The readahead thread and the reading thread share a store whose maps are evicted (max_open=2)."
    x = np.arange(60 * 3, dtype=np.float32).reshape(60, 3)
    save_memmap(tmp_path / "s", x, shard_rows=5)                  # 12 shards
    a = MemmapArray.open(tmp_path / "s", max_open=2)
    done = threading.Event()

    def advise():
        rng = np.random.default_rng(1)
        while not done.is_set():
            a.advise(str(rng.choice(["willneed", "populate"])), rng.integers(0, 60, 7))
    t = threading.Thread(target=advise)
    t.start()
    try:
        rng = np.random.default_rng(0)
        for _ in range(3000):
            idx = rng.integers(0, 60, 9)
            assert np.array_equal(a.read(idx), x[idx])
            assert np.array_equal(a[int(idx[0])], x[idx[0]])
    finally:
        done.set()
        t.join()
    assert len(a._maps) <= 3
