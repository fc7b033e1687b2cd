"""A small training run for tests/test_checkpoint.py, run in its own process (so it can be SIGKILLed).

``python tests/checkpoint_run.py STORE CKPT OUT --shuffle random|block --workers 0|2|auto --kind image|dense
[--kill-at N] [--every K] [--epochs E] [--seed S] [--lr LR] [--width W]``

Builds the stores in STORE once (images 8x8 uint8 with three classes, or dense float32 rows), trains a tiny
CNN/MLP with dropout, random per-item transforms (images: fastai's ``get_transforms``) and a random per-batch
transform (noise, in the main process) under `fastai_memmap.Checkpoint`, then writes the final weights and
the recorder's history to OUT. ``--kill-at N`` SIGKILLs the process in the middle of training iteration N
(after its backward pass, before the optimizer step).
"""
import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastai_memmap  # noqa: E402
from fastai.basic_train import Learner  # noqa: E402
from fastai.callback import Callback  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402
from fastai.train import fit_one_cycle  # noqa: E402,F401  (adds Learner.fit_one_cycle)
from fastai.vision import get_transforms  # noqa: E402
from fastai_memmap import BlockShuffle, Checkpoint, MemmapImageList, MemmapItemList, save_memmap  # noqa: E402
from fastai_memmap.data.random_order import RandomShuffle  # noqa: E402

N, D, S = 120, 6, 8


class KillAt(Callback):
    "SIGKILL this process after the backward pass of training iteration `at`."
    _order = 200

    def __init__(self, at):
        self.at = at

    def on_backward_end(self, iteration, **kwargs):
        if iteration == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def noise(b):
    "A random per-batch transform (dl_tfm): draws from the main process's torch generator."
    x, y = b
    return x + 0.01 * torch.randn_like(x), y


def make_stores(store):
    if (store / "y").exists():
        return
    store.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_memmap(store / "img", rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8), shard_rows=50,
                meta={"layout": "HWC"})
    save_memmap(store / "x", rng.normal(size=(N, D)).astype(np.float32), shard_rows=50)
    save_memmap(store / "y", (np.arange(N) % 3).astype(np.int64), meta={"classes": ["a", "b", "c"]})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shuffle", default="random")
    ap.add_argument("--workers", default="0")
    ap.add_argument("--kind", default="image")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--width", type=int, default=4)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)
    make_stores(a.store)
    workers = a.workers if a.workers == "auto" else int(a.workers)
    shuffle = BlockShuffle(seed=a.seed, block_bytes=1024, window_blocks=2) if a.shuffle == "block" else \
        RandomShuffle(seed=a.seed, readahead=True) if a.shuffle == "random-store" else True
    if a.kind == "image":
        ll = (MemmapImageList.from_memmap(a.store / "img").split_by_rand_pct(0.2, seed=1)
              .label_from_memmap(a.store / "y").transform(get_transforms(), size=S))
        model = torch.nn.Sequential(torch.nn.Conv2d(3, a.width, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(a.width, 3))
    else:
        ll = MemmapItemList.from_memmap(a.store / "x").split_by_rand_pct(0.2, seed=1).label_from_memmap(a.store / "y")
        model = torch.nn.Sequential(torch.nn.Linear(D, a.width), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(a.width, 3))
    data = ll.databunch(bs=8, num_workers=workers, shuffle=shuffle, dl_tfms=[noise])
    cbs = [KillAt(a.kill_at)] if a.kill_at is not None else []
    learn = Learner(data, model, metrics=accuracy,
                    callback_fns=[partial(Checkpoint, path=a.ckpt, every=a.every)])
    learn.fit_one_cycle(a.epochs, a.lr, callbacks=cbs)
    r = learn.recorder
    torch.save({"model": learn.model.state_dict(), "losses": [float(v) for v in r.losses], "lrs": list(r.lrs),
                "val_losses": [float(v) for v in r.val_losses], "nb_batches": list(r.nb_batches),
                "metrics": [[float(m) for m in ms] for ms in r.metrics]}, a.out)


if __name__ == "__main__":
    main()
