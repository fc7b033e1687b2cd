"""The fastai layer: item and label lists over stores, batching, sampling, devices, distributed
training, and the fixes that make fastai 1.0.61 run on today's stack. Importing it applies those
fixes (`compat.apply()`, idempotent) and registers the ragged and sparse item lists.

============  ===================================================================================
module        concept
============  ===================================================================================
compat        the targeted fixes to fastai 1.0.61 (torch 2, numpy 1.26, spaCy 3, IPython 9)
items         `MemmapItemList`: rows of a store as fastai items; the list-class and label-rule registries
labels        `MemmapCategoryList` / `MemmapFloatList`: labels from a label store
batching      the batch fast path (whole batches read at once) and the data bunches using it
sampling      `BlockShuffle`: block order for stores larger than RAM; the ``shuffle=`` option
random_order  random order read ahead (``pread``), for stores larger than the memory budget
device        uint8 → float on the device (`to_float_tfm`), `PrefetchDataLoader`
checkpoint    `Checkpoint`: atomic mid-epoch checkpoints, exact resume
distributed   `MemmapDistributedTrainer`, `to_memmap_distributed`: one rank per process
padding       ragged batches: `pad_ragged`, `RaggedCollate`, `BucketSampler`, `RaggedDataBunch`
ragged_items  `RaggedItemList`: variable-length items
sparse_items  `SparseItemList`, `SparseLinear`: CSR rows, expanded per batch or kept sparse
============  ===================================================================================
"""
from . import compat

compat.apply()

from .items import MemmapItem, MemmapItemList, RowIndex, register_label_rule, register_list_class  # noqa: E402
from .labels import MemmapCategoryList, MemmapFloatList, MemmapLabelList  # noqa: E402
from .batching import MemmapDataBunch, MemmapImageDataBunch, WorkersSlowerWarning  # noqa: E402
from .sampling import BlockShuffle, BlockShuffleSampler, RandomShuffle  # noqa: E402
from .device import PrefetchDataLoader, insert_to_float, to_float, to_float_tfm, with_to_float  # noqa: E402
from .checkpoint import Checkpoint  # noqa: E402
from .distributed import MemmapDistributedTrainer, to_memmap_distributed  # noqa: E402
from .padding import BucketSampler, RaggedCollate, RaggedDataBunch, pad_ragged  # noqa: E402
from .ragged_items import RaggedItem, RaggedItemList  # noqa: E402
from .sparse_items import SparseItem, SparseItemList, SparseLinear, sparse_batch  # noqa: E402

__all__ = ["BlockShuffle", "BlockShuffleSampler", "BucketSampler", "Checkpoint", "MemmapCategoryList", "MemmapDataBunch",
           "MemmapDistributedTrainer", "MemmapFloatList", "MemmapImageDataBunch", "MemmapItem", "MemmapItemList",
           "MemmapLabelList", "PrefetchDataLoader", "RaggedCollate", "RaggedDataBunch", "RaggedItem", "RaggedItemList",
           "RandomShuffle", "RowIndex", "SparseItem", "SparseItemList", "SparseLinear", "WorkersSlowerWarning", "compat",
           "insert_to_float", "pad_ragged", "register_label_rule", "register_list_class", "sparse_batch", "to_float",
           "to_float_tfm", "to_memmap_distributed", "with_to_float"]
