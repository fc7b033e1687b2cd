"""fastai_memmap: memory-mapped (larger than RAM) and in-RAM datasets for fastai v1's data block API.

Layers (each a subpackage; imports point down only, a test checks the graph)::

    cli        command line, demo, bench harness
    vision  tabular  text     image / table / text lists and converters
    data       fastai core: item and label lists, batching, sampling, devices, distributed, fastai fixes
    store      numpy only: the on-disk format, readers and writers of every store kind
    errors, arguments          the error hierarchy and argument checks every layer uses

``import fastai_memmap`` is light: the names below load on first use (PEP 562), so
``import fastai_memmap.store`` and ``from fastai_memmap import MemmapArray`` import neither torch nor
fastai. The fixes that make fastai 1.0.61 work on today's torch and numpy
(`fastai_memmap.data.compat`) are applied as soon as fastai is imported, by you or by this package
(`fastai_memmap.patching`). The 0.1 module paths (``fastai_memmap.reader`` ...) still import, with a
``DeprecationWarning`` (`fastai_memmap.moved`).
"""
import importlib
from typing import Any, List

from .version import __version__
from .errors import *  # noqa: F401,F403  (the error hierarchy is part of the public API)
from .errors import __all__ as _ERROR_NAMES
from . import moved as _moved
from . import patching as _patching

_moved.install()
_patching.install()

_NAMES = {
    "store": ["FORMAT_VERSION", "Manifest", "MemmapArray", "MemmapWriter", "RaggedArray", "RaggedWriter", "SparseArray",
              "SparseWriter", "csr_to_dense", "open_memmap", "save_dask", "save_memmap", "save_ragged", "save_sparse"],
    "data": ["BlockShuffle", "BlockShuffleSampler", "BucketSampler", "Checkpoint", "MemmapCategoryList", "MemmapDistributedTrainer",
             "MemmapFloatList", "MemmapItem", "MemmapItemList", "MemmapLabelList", "PrefetchDataLoader",
             "RaggedCollate", "RaggedDataBunch", "RaggedItem", "RaggedItemList", "RowIndex", "SparseItem",
             "SparseItemList", "SparseLinear", "WorkersSlowerWarning", "insert_to_float", "pad_ragged", "sparse_batch",
             "to_float", "to_float_tfm", "to_memmap_distributed", "with_to_float"],
    "vision": ["BatchAugment", "BatchTfms", "ImageListInMemory", "MemmapImageList", "MemmapSegmentationLabelList", "SegmentationItemListInMemory",
               "images_to_memmap", "preload", "unload"],
    "tabular": ["MemmapTabularList", "tabular_to_memmap"],
    "text": ["LMStream", "MemmapLMDataBunch", "MemmapTextList", "import_fastai_text", "texts_to_memmap"],
}
_WHERE = {name: layer for layer, names in _NAMES.items() for name in names}

__all__ = ["__version__", *_ERROR_NAMES, *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    "Load a public name from its layer on first use; an 0.1 module name (``reader``...) with a warning."
    layer = _WHERE.get(name)
    if layer is not None:
        value = getattr(importlib.import_module(f"{__name__}.{layer}"), name)
        globals()[name] = value
        return value
    if _moved.new_path(name) is not None:
        return importlib.import_module(f"{__name__}.{name}")   # through the finder: warns, returns the new module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_WHERE))
