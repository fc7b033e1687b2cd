"""Multi-process training on one store with ``torch.distributed`` (CPU with gloo, or GPUs with nccl).

fastai 1.0.61's ``learn.to_distributed(cuda_id)`` wraps the model for one GPU per process and splits
the data with a padded random sampler. `to_memmap_distributed` does the same job for store-backed
data bunches, on CPU too: the model is wrapped in ``DistributedDataParallel`` (gradients averaged
across ranks), and each rank trains on its own part of a block-shuffled epoch
(`fastai_memmap.data.sampling.BlockShuffleSampler` with ``num_replicas``/``rank``): the parts are
disjoint, their union is every training item exactly once, and each rank reads long runs of
contiguous rows (locality-aware shuffling per rank). Validation items are split into contiguous
parts, one per rank, in order. Every rank must use the same `seed`.

Launch one process per rank (``python -m torch.distributed.run --nproc_per_node=2 train.py`` or
``torch.multiprocessing.spawn``), call ``torch.distributed.init_process_group`` in each, build the
data bunch from the store on the shared filesystem, then ``to_memmap_distributed(learn)``.
"""
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from fastai.basic_train import Learner, LearnerCallback
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from ..errors import ArgumentError
from ..arguments import check_int, check_rank
from .sampling import BlockShuffle, rank_slice, use_sampler

__all__ = ["RankSliceSampler", "MemmapDistributedTrainer", "to_memmap_distributed", "BLOCK_OPTIONS"]

BLOCK_OPTIONS = ("block_bytes", "window_blocks", "readahead")   # the `BlockShuffle` fields a caller may set


class RankSliceSampler(Sampler):
    "Positions ``0 .. n-1`` in order, cut into `num_replicas` contiguous parts: this rank's part."

    def __init__(self, n: int, num_replicas: int, rank: int):
        check_rank(num_replicas, rank)
        self.part = rank_slice(check_int("n", n, 0), int(num_replicas), int(rank))

    def __len__(self) -> int:
        return self.part.stop - self.part.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.part.start, self.part.stop))


class MemmapDistributedTrainer(LearnerCallback):
    """Wrap the model in DDP and give each rank its block-shuffled part of the training data.

    Parameters
    ----------
    learn : Learner
    shuffle : BlockShuffle
        With ``num_replicas`` = world size, ``rank`` = this rank and a `seed` shared by every rank.
    cuda_id : int, optional
        GPU of this process (None: CPU, e.g. the gloo backend).
    drop_last : bool
        Drop the last incomplete training batch of each rank (fastai's default is True; False
        delivers every item of the epoch).
    """
    _order = -20   # before the Recorder, like fastai's DistributedTrainer

    def __init__(self, learn: Learner, shuffle: BlockShuffle, cuda_id: Optional[int] = None, drop_last: bool = True):
        super().__init__(learn)
        self.shuffle, self.cuda_id, self.drop_last = shuffle, cuda_id, drop_last
        self.sampler = None

    def on_train_begin(self, **kwargs: Any) -> None:
        "Wrap the model, swap in this rank's training and validation loaders."
        ids = None if self.cuda_id is None else [self.cuda_id]
        self.learn.model = DistributedDataParallel(self.learn.model, device_ids=ids, output_device=self.cuda_id)
        data = self.learn.data
        self.old_train_dl, self.old_valid_dl = data.train_dl, data.valid_dl
        self.sampler = self.shuffle.sampler(data.train_ds)
        data.train_dl = use_sampler(data.train_dl.new(drop_last=self.drop_last), self.sampler)
        if data.valid_dl is not None:
            part = RankSliceSampler(len(data.valid_ds), self.shuffle.num_replicas, self.shuffle.rank)
            data.valid_dl = use_sampler(data.valid_dl.new(), part)
        self.learn.recorder.silent = self.shuffle.rank != 0

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        "Every rank draws the permutation of this epoch."
        self.sampler.set_epoch(epoch)

    def on_train_end(self, **kwargs: Any) -> None:
        "Unwrap the model and restore the original loaders."
        self.learn.model = self.learn.model.module
        self.learn.data.train_dl, self.learn.data.valid_dl = self.old_train_dl, self.old_valid_dl


def to_memmap_distributed(learn: Learner, seed: int = 0, cuda_id: Optional[int] = None, drop_last: bool = True,
                          **block: Any) -> Learner:
    """Make `learn` train as one rank of the initialised default process group; returns `learn`.

    `seed` must be equal on every rank (it fixes each epoch's permutation). `block` goes to
    `BlockShuffle` (``block_bytes``, ``window_blocks``, ``readahead``). Raises ``ArgumentError`` (a
    ``ValueError``) if ``torch.distributed`` is not initialised, for a language-model bunch
    (`MemmapLMDataBunch`: its batches are contiguous token streams, not items a sampler can split),
    and for bad `block` options or `seed` (checked before any change to `learn`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError("to_memmap_distributed: expected an initialised torch.distributed process group "
                            "(call torch.distributed.init_process_group first), found none")
    if getattr(getattr(learn.data, "train_ds", None), "token_stream", False):   # a text.lm.LMStream
        raise ArgumentError("to_memmap_distributed: expected a data bunch of items (MemmapItemList, ragged, "
                            "sparse, tabular), found a language-model bunch (MemmapLMDataBunch), whose batches "
                            "are token streams that cannot be split by item; train it in one process")
    unknown = sorted(set(block) - set(BLOCK_OPTIONS))
    if unknown:
        raise ArgumentError(f"to_memmap_distributed: expected options among {BLOCK_OPTIONS}, found {unknown}")
    shuffle = BlockShuffle(seed=seed, num_replicas=dist.get_world_size(), rank=dist.get_rank(), **block)
    if cuda_id is not None:
        torch.cuda.set_device(cuda_id)
    learn.callbacks.append(MemmapDistributedTrainer(learn, shuffle, cuda_id=cuda_id, drop_last=drop_last))
    return learn
