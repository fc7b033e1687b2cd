"""`fastai_memmap.Checkpoint`: SIGKILL a run at a batch, resume it in another process, get the same weights bit
for bit (random and block order, num_workers 0 / 2 / 'auto', per-item and per-batch augmentation, dropout);
distributed resume with another number of ranks trains every item of the epoch exactly once; writes are atomic
under SIGKILL; a checkpoint of another run is refused with the field that differs.

The killed run is a subprocess (tests/checkpoint_run.py, the run script); the uninterrupted reference and the
resumed run execute the same script's ``main`` in this process (another process than the killed one).
"""
import os
import signal
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import fastai_memmap  # noqa: F401
from fastai.basic_train import Learner
from fastai_memmap import Checkpoint, MemmapItemList, save_memmap
from fastai_memmap.data.checkpoint import load_checkpoint, write_atomic
from fastai_memmap.errors import (ArgumentError, ArgumentTypeError, CheckpointFormatError, CheckpointMismatchError,
                                  MemmapError)
from fastai_memmap.data.random_order import InOrderSampler, RandomOrderSampler
from fastai_memmap.data.sampling import BlockShuffleSampler

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checkpoint_run  # noqa: E402


def run_child(*args, timeout=300):
    "Run the run script in a new process; returns (returncode, output tail)."
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    p = subprocess.run([sys.executable, str(HERE / "checkpoint_run.py"), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr)[-3000:]


def run_here(*args):
    "Run the run script's main in this process (its own deterministic settings, undone after)."
    det = torch.are_deterministic_algorithms_enabled()
    try:
        checkpoint_run.main([str(a) for a in args])
    finally:
        torch.use_deterministic_algorithms(det)


def assert_same_run(a_path, b_path):
    a, b = (torch.load(p, weights_only=False) for p in (a_path, b_path))
    for k in a["model"]:
        assert a["model"][k].numpy().tobytes() == b["model"][k].numpy().tobytes(), k     # bitwise
    for k in ("losses", "lrs", "val_losses", "nb_batches", "metrics"):
        assert a[k] == b[k], k                                                          # the recorder's history


def killed_and_resumed(tmp_path, kill_at, *opts):
    "Reference run, run SIGKILLed in iteration `kill_at`, resumed run: the resumed one equals the reference."
    store = tmp_path / "store"
    run_here(store, tmp_path / "ref.ckpt", tmp_path / "ref.pt", *opts)
    rc, out = run_child(store, tmp_path / "run.ckpt", tmp_path / "killed.pt", "--kill-at", kill_at, *opts)
    assert rc == -signal.SIGKILL, out
    assert not (tmp_path / "killed.pt").exists()
    pos = load_checkpoint(tmp_path / "run.ckpt")["position"]
    assert pos["iteration"] == kill_at // 3 * 3 and not pos["finished"]     # every=3: the last write before the kill
    run_here(store, tmp_path / "run.ckpt", tmp_path / "resumed.pt", *opts)
    assert_same_run(tmp_path / "ref.pt", tmp_path / "resumed.pt")


# 2 epochs x 12 batches; kill points drawn once at random (seeded: the same in every run of the suite)
CELLS = [("random", "0", "image"), ("block", "2", "image"), ("block", "auto", "dense"), ("random", "auto", "image")]
KILLS = np.random.default_rng(17).integers(1, 24, len(CELLS)).tolist()


@pytest.mark.parametrize("cell,kill_at", list(zip(CELLS, KILLS)), ids=["-".join(c) for c in CELLS])
def test_sigkill_and_resume_gives_the_same_weights_bitwise(tmp_path, cell, kill_at):
    shuffle, workers, kind = cell
    killed_and_resumed(tmp_path, kill_at, "--shuffle", shuffle, "--workers", workers, "--kind", kind)


FULL = [(s, w, k) for s in ("random", "block") for w in ("0", "2", "auto") for k in ("image", "dense")]


@pytest.mark.slow
@pytest.mark.parametrize("cell", FULL, ids=["-".join(c) for c in FULL])
def test_sigkill_and_resume_full_matrix_every_batch(tmp_path, cell):
    shuffle, workers, kind = cell
    for kill_at in range(0, 24, 5):
        d = tmp_path / str(kill_at)
        d.mkdir()
        killed_and_resumed(d, kill_at, "--shuffle", shuffle, "--workers", workers, "--kind", kind)


def test_resume_is_needed_for_equality(tmp_path):
    "The check above can fail: a run restarted from scratch after its kill point ends elsewhere."
    store = tmp_path / "store"
    run_here(store, tmp_path / "ref.ckpt", tmp_path / "ref.pt", "--kind", "dense")
    run_here(store, tmp_path / "other.ckpt", tmp_path / "other.pt", "--kind", "dense", "--seed", "8")
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "ref.pt", tmp_path / "other.pt")


def test_finished_run_is_not_trained_again(tmp_path):
    store = tmp_path / "store"
    run_here(store, tmp_path / "c.ckpt", tmp_path / "a.pt", "--kind", "dense")
    before = (tmp_path / "c.ckpt").read_bytes()
    run_here(store, tmp_path / "c.ckpt", tmp_path / "b.pt", "--kind", "dense")
    assert_same_run(tmp_path / "a.pt", tmp_path / "b.pt")
    assert (tmp_path / "c.ckpt").read_bytes() == before                    # nothing written: nothing trained


# ------------------------------------------------------------------------------------------- samplers
def test_random_and_in_order_samplers_skip_consumed_positions():
    s = RandomOrderSampler(50, 8, seed=3, epoch=2)
    full = s.order()
    s.skip(16)
    assert len(s) == 34 and list(s) == full[16:].tolist()
    assert len(s) == 50 and s.epoch == 3                                      # one epoch only
    o = InOrderSampler(10, 4)
    o.skip(8)
    assert list(o) == [8, 9]
    with pytest.raises(ArgumentError):
        s.skip(-1)
    with pytest.raises(ArgumentTypeError):
        s.skip(1.5)


@given(n=st.integers(0, 300), old=st.integers(1, 4), new=st.integers(1, 4), frac=st.floats(0, 1),
       seed=st.integers(0, 2 ** 40))
def test_block_sampler_resumed_with_other_ranks_visits_the_rest_exactly_once(n, old, new, frac, seed):
    parts = [BlockShuffleSampler(n, 7, 2, seed=seed, num_replicas=old, rank=r).order(1) for r in range(old)]
    consumed = [int(len(p) * frac) for p in parts]
    done = np.concatenate([p[:c] for p, c in zip(parts, consumed)]).tolist()
    got, sizes = [], []
    for r in range(new):
        s = BlockShuffleSampler(n, 7, 2, seed=seed, num_replicas=new, rank=r, epoch=1)
        s.skip(consumed)
        sizes.append(len(s))
        mine = list(s)
        assert len(mine) == sizes[-1]
        got += mine
    assert sorted(got + done) == list(range(n))                               # every position exactly once
    assert max(sizes) - min(sizes) <= 1
    if old == new and len(set(consumed)) == 1:                                # same world: each rank its own rest
        s = BlockShuffleSampler(n, 7, 2, seed=seed, num_replicas=old, rank=0, epoch=1)
        s.skip(consumed[0])
        assert list(s) == parts[0][consumed[0]:].tolist()


# ------------------------------------------------------------------------------------------- writes
def test_write_killed_before_rename_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "c.ckpt"
    old = {"w": torch.arange(10.)}
    write_atomic(old, path)
    pid = os.fork()
    if pid == 0:                                   # child: SIGKILLed inside the write, after the data, before the rename
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        write_atomic({"w": torch.zeros(1 << 20)}, path)
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    stale = list(tmp_path.glob(".c.ckpt.tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 4 << 20             # the new data was written
    assert torch.equal(torch.load(path, weights_only=True)["w"], old["w"])   # the previous checkpoint is whole
    size = write_atomic({"w": torch.ones(3)}, path)
    assert size == path.stat().st_size and not list(tmp_path.glob(".c.ckpt.tmp-*"))   # stale file removed


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "t.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointFormatError, match="does not load"):
        load_checkpoint(tmp_path / "t.ckpt")
    torch.save({"format": "other"}, tmp_path / "o.ckpt")
    with pytest.raises(CheckpointFormatError, match="expected format 'fastai_memmap.checkpoint', found 'other'"):
        load_checkpoint(tmp_path / "o.ckpt")
    assert issubclass(CheckpointFormatError, ValueError) and issubclass(CheckpointFormatError, MemmapError)


# ------------------------------------------------------------------------------------------- refusal, cost
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    save_memmap(path / "x", x)
    save_memmap(path / "y", (np.arange(200) % 2).astype(np.int64), meta={"classes": ["a", "b"]})
    return path


def learner(path, ckpt, width=4, split_seed=1, **kw):
    data = (MemmapItemList.from_memmap(path / "x").split_by_rand_pct(0.2, seed=split_seed)
            .label_from_memmap(path / "y").databunch(bs=16, num_workers=0))
    model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    return Learner(data, model, callback_fns=[partial(Checkpoint, path=ckpt, **kw)])


@pytest.mark.parametrize("change,field,words", [
    (dict(width=6), "model", "0.weight of shape (6, 5)"),
    (dict(epochs=3), "n_epochs", "has 3"),
    (dict(lr=1e-3), "schedule", "OneCycleScheduler"),
    (dict(split_seed=2), "train_digest", ""),
])
def test_checkpoint_of_another_run_is_refused(dense, tmp_path, change, field, words):
    ckpt = tmp_path / "c.ckpt"
    learner(dense, ckpt, every=4).fit_one_cycle(2, 1e-2)
    w = dict(width=4, split_seed=1)
    w.update({k: v for k, v in change.items() if k in w})
    learn = learner(dense, ckpt, **w)
    with pytest.raises(CheckpointMismatchError) as ei:
        learn.fit_one_cycle(change.get("epochs", 2), change.get("lr", 1e-2))
    msg = str(ei.value)
    assert f"whose {field} differs" in msg and words in msg and str(ckpt) in msg, msg
    assert isinstance(ei.value, ValueError)


def test_bad_arguments_refused(dense, tmp_path):
    with pytest.raises(ArgumentError):
        learner(dense, tmp_path / "c", every=0).fit(1)
    with pytest.raises(ArgumentTypeError):
        learner(dense, tmp_path / "c", seconds="1").fit(1)


def test_cost_is_measured_and_the_file_holds_the_run(dense, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    learn = learner(dense, tmp_path / "unused.ckpt")
    learn.callback_fns = learn.callback_fns[:-1]
    cb = Checkpoint(learn, ckpt, every=5)
    learn.fit_one_cycle(1, 1e-2, callbacks=[cb])
    state = load_checkpoint(ckpt)
    assert state["position"] == {"epoch": 1, "batches": 0, "iteration": 10, "num_replicas": 1, "consumed": [0],
                                 "finished": True}
    for k, v in learn.model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    assert cb.last_write["bytes"] == ckpt.stat().st_size and 0 < cb.last_write["seconds"] < 10
    print(f"checkpoint cost: {cb.last_write['seconds'] * 1e3:.1f} ms, {cb.last_write['bytes']} bytes")


# ------------------------------------------------------------------------------------------- distributed
RANK_SCRIPT = textwrap.dedent('''
    import os, signal, sys, numpy as np, torch, torch.distributed as dist
    from functools import partial
    import fastai_memmap
    from fastai.basic_train import Learner, LearnerCallback
    from fastai_memmap import Checkpoint, MemmapItemList
    from fastai_memmap.distributed import to_memmap_distributed

    out, rank, world, stage, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

    class Record(LearnerCallback):
        def on_batch_begin(self, last_input, train, epoch, iteration, **kw):
            if train:
                with open(f"{out}/{stage}_rank{rank}.txt", "a") as f:
                    f.write(f"{epoch} {iteration} " + " ".join(map(str, last_input[:, 0].long().tolist())) + "\\n")
        def on_backward_end(self, iteration, **kw):
            if iteration == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{stage}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    data = (MemmapItemList.from_memmap(f"{out}/x").split_by_idx(list(range(0, 200, 10)))
            .label_from_memmap(f"{out}/y").databunch(bs=16, num_workers=0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    learn = Learner(data, model, callback_fns=[partial(Checkpoint, path=f"{out}/run.ckpt", every=2)])
    learn.callbacks.append(Record(learn))
    to_memmap_distributed(learn, seed=7, drop_last=False, block_bytes=16 * 8, window_blocks=1)
    learn.fit(2, 1e-2)
    dist.destroy_process_group()
''')


def run_ranks(path, world, stage, kill_at):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs = [subprocess.Popen([sys.executable, str(path / "rank.py"), str(path), str(r), str(world), stage,
                               str(kill_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], "\n".join(o[-2000:] for o in outs)


def trained(path, stage, world, before=None):
    "{epoch: row ids trained} over the ranks of `stage` (iterations < `before` only)."
    got = {}
    for r in range(world):
        for line in (path / f"{stage}_rank{r}.txt").read_text().splitlines():
            epoch, it, *ids = map(int, line.split())
            if before is None or it < before:
                got.setdefault(epoch, []).extend(ids)
    return got


def distributed_resume(tmp_path, new_world):
    x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    x[:, 0] = np.arange(200)
    save_memmap(tmp_path / "x", x)
    save_memmap(tmp_path / "y", (np.arange(200) % 2).astype(np.int64), meta={"classes": ["a", "b"]})
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    rcs, out = run_ranks(tmp_path, 2, "first", kill_at=3)             # killed in iteration 3, written after 2
    assert rcs == [-signal.SIGKILL] * 2, out
    pos = load_checkpoint(tmp_path / "run.ckpt")["position"]
    assert pos["iteration"] == 2 and pos["num_replicas"] == 2 and pos["consumed"] == [32, 32]
    rcs, out = run_ranks(tmp_path, new_world, "second", kill_at=-1)
    assert rcs == [0] * new_world, out
    first, second = trained(tmp_path, "first", 2, before=2), trained(tmp_path, "second", new_world)
    train_rows = sorted(set(range(200)) - set(range(0, 200, 10)))
    assert sorted(first[0] + second[0]) == train_rows                   # epoch 0: every item exactly once
    assert sorted(second[1]) == train_rows and 1 not in first          # epoch 1 entirely after the resume


def test_distributed_resume_with_three_ranks_instead_of_two(tmp_path):
    distributed_resume(tmp_path, 3)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_distributed_resume_with_one_or_two_ranks(tmp_path, world):
    distributed_resume(tmp_path, world)


def test_time_based_writes(dense, tmp_path):
    learn = learner(dense, tmp_path / "unused.ckpt")
    learn.callback_fns = learn.callback_fns[:-1]
    cb = Checkpoint(learn, tmp_path / "t.ckpt", seconds=1e-9, at_epoch_end=False)
    learn.fit(1, 1e-2, callbacks=[cb])
    assert cb.last_write["batches"] == 10 and load_checkpoint(tmp_path / "t.ckpt")["position"]["iteration"] == 10
