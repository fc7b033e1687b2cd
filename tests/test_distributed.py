"""Two CPU ranks (gloo) train on one store: disjoint parts, union = every item once, DDP in sync."""
import sys
import subprocess
import textwrap

import numpy as np

from fastai_memmap import save_memmap

RANK_SCRIPT = textwrap.dedent('''
    import sys, numpy as np, torch, torch.distributed as dist
    import fastai_memmap
    from fastai.basic_train import Learner, LearnerCallback
    from fastai_memmap import MemmapItemList
    from fastai_memmap.data.distributed import to_memmap_distributed

    class Record(LearnerCallback):
        def on_epoch_begin(self, **kw): self.ids = []
        def on_batch_begin(self, last_input, train, **kw):
            if train: self.ids.append(last_input[:, 0].long().numpy())
        def on_epoch_end(self, epoch, **kw):
            np.save(f"{out}/rank{rank}_epoch{epoch}.npy", np.concatenate(self.ids))

    out, rank = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(rank)            # different init on purpose: DDP broadcasts rank 0's weights
    data = (MemmapItemList.from_memmap(f"{out}/x").split_by_idx(list(range(0, 1000, 10)))
            .label_from_memmap(f"{out}/y").databunch(bs=32, num_workers=0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    learn = Learner(data, model)
    learn.callbacks.append(Record(learn))
    to_memmap_distributed(learn, seed=7, drop_last=False, block_bytes=16 * 16, window_blocks=1)
    learn.fit(2, 1e-2)
    np.save(f"{out}/rank{rank}_weights.npy", torch.cat([p.detach().flatten() for p in learn.model.parameters()]).numpy())
    dist.destroy_process_group()
''')


def test_two_ranks_split_every_epoch_exactly(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    x[:, 0] = np.arange(1000)
    save_memmap(tmp_path / "x", x)
    save_memmap(tmp_path / "y", (np.arange(1000) % 2).astype(np.int64), meta={"classes": ["a", "b"]})
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(tmp_path), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    train_rows = sorted(set(range(1000)) - set(range(0, 1000, 10)))
    orders = []
    for epoch in (0, 1):
        r0, r1 = (np.load(tmp_path / f"rank{r}_epoch{epoch}.npy") for r in (0, 1))
        assert not set(r0.tolist()) & set(r1.tolist())                        # disjoint parts
        assert sorted(r0.tolist() + r1.tolist()) == train_rows                # union = every item once
        assert abs(len(r0) - len(r1)) <= 1
        same_block = np.mean(np.diff(r0 // 16) == 0)    # blocks of 16 rows (16 bytes each) stay together
        assert same_block > 0.5, same_block             # a uniform shuffle over ~57 blocks gives ~0.02
        orders.append(r0)
    assert not np.array_equal(orders[0], orders[1])                           # a new permutation per epoch
    w0, w1 = (np.load(tmp_path / f"rank{r}_weights.npy") for r in (0, 1))
    np.testing.assert_allclose(w0, w1, rtol=1e-6, atol=1e-7)                  # DDP kept the ranks in sync


# ---------------------------------------------------------------- refused upfront (issue 12)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fastai_memmap.errors import ArgumentError, ArgumentTypeError  # noqa: E402


@pytest.fixture
def one_rank(tmp_path):
    "A one-process gloo group in this process, destroyed afterwards."
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield tmp_path
    finally:
        dist.destroy_process_group()


def test_no_process_group_refused():
    from fastai_memmap.data.distributed import to_memmap_distributed
    assert not dist.is_initialized()
    with pytest.raises(ArgumentError, match="expected an initialised torch.distributed process group"):
        to_memmap_distributed(object())


def test_language_model_bunch_refused_before_fit(one_rank):
    "An LM bunch used to die inside `fit` (the block sampler mixed the rows of different batches)."
    from fastai.basic_train import Learner
    from fastai_memmap.data.distributed import MemmapDistributedTrainer, to_memmap_distributed
    from fastai_memmap.text.lm import MemmapLMDataBunch
    docs = [np.arange(2, 2 + n % 30).astype(np.int32) for n in range(20, 60)]
    data = MemmapLMDataBunch.from_memmap(save_memmap(one_rank / "c", docs, kind="ragged"), vocab=40, bs=2, bptt=4,
                                         valid_pct=0.2, seed=0)
    learn = Learner(data, torch.nn.Linear(1, 1))
    with pytest.raises(ArgumentError, match="found a language-model bunch"):
        to_memmap_distributed(learn)
    assert not any(isinstance(cb, MemmapDistributedTrainer) for cb in learn.callbacks)   # learn left unchanged


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(seed=None, block_size=4), ArgumentError, "expected options among"),
    (dict(seed=-1), ArgumentError, "seed: expected an int in [0, 2**63)"),
    (dict(seed="7"), ArgumentTypeError, "seed"),
    (dict(window_blocks=0), ArgumentError, "window_blocks"),
])
def test_bad_options_refused_before_any_change(one_rank, kwargs, error, words):
    from fastai_memmap.data.distributed import to_memmap_distributed

    class FakeLearner:
        callbacks = []
        data = None
    with pytest.raises(error) as ei:
        to_memmap_distributed(FakeLearner(), **kwargs)
    assert words in str(ei.value) and FakeLearner.callbacks == []


@pytest.mark.parametrize("args,error", [((10, 0, 0), ArgumentError), ((10, 2, 2), ArgumentError),
                                        ((-1, 1, 0), ArgumentError), ((10, 2, 1.0), ArgumentTypeError)])
def test_rank_slice_sampler_refuses_bad_ranks(args, error):
    "num_replicas=0 used to raise ZeroDivisionError."
    from fastai_memmap.data.distributed import RankSliceSampler
    with pytest.raises(error, match="expected"):
        RankSliceSampler(*args)
    parts = [list(RankSliceSampler(10, 3, r)) for r in range(3)]
    assert sum(parts, []) == list(range(10))
