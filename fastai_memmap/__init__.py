"""fastai_memmap: memory-mapped (larger than RAM) and in-RAM datasets for fastai v1's data block API.

Importing this package applies targeted fixes that make fastai 1.0.61 work on today's torch/numpy
(see `fastai_memmap.compat`).
"""
from .version import __version__
from . import compat

compat.apply()

from .errors import *  # noqa: F401,F403  (the error hierarchy is part of the public API)
from .format import Manifest, FORMAT_VERSION
from .reader import MemmapArray, open_memmap
from .writer import MemmapWriter, save_memmap
from .items import MemmapItemList, MemmapItem, RowIndex
from .labels import MemmapCategoryList, MemmapFloatList, MemmapLabelList
from .images import MemmapImageList, MemmapSegmentationLabelList
from .records import tabular_to_memmap
from .tabular import MemmapTabularList
from .inmemory import ImageListInMemory, SegmentationItemListInMemory, preload, unload
from .convert_images import images_to_memmap
from .parallel import save_dask
from .ragged import RaggedArray, RaggedWriter, save_ragged
from .sparse import SparseArray, SparseWriter, save_sparse, csr_to_dense
from .padding import pad_ragged, RaggedCollate, BucketSampler, RaggedDataBunch
from .ragged_items import RaggedItemList, RaggedItem
from .sparse_items import SparseItemList, SparseItem, SparseLinear, sparse_batch
from .text import MemmapLMDataBunch, LMStream, import_fastai_text
from .distributed import to_memmap_distributed, MemmapDistributedTrainer
from .sampling import BlockShuffle, BlockShuffleSampler
from .device import to_float, to_float_tfm, with_to_float, insert_to_float, PrefetchDataLoader
from .batching import WorkersSlowerWarning
from .batch_tfms import BatchTfms, BatchAugment, install as _install_batch_tfms

_install_batch_tfms()   # databunch(batch_tfms=...): see fastai_memmap.batch_tfms
