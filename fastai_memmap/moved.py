"""The module paths of fastai_memmap 0.1 (a flat package), kept working for one release.

0.2 moved every module into a layer subpackage (`fastai_memmap.store`, ``.data``, ``.vision``,
``.tabular``, ``.text``, ``.cli``). ``import fastai_memmap.reader`` (or ``from fastai_memmap.items import
MemmapItemList``) still works: a finder on ``sys.meta_path`` returns the module at its new path (the
same module object, so classes and functions are identical) and emits a ``DeprecationWarning`` naming
the new path. This also loads learners exported (pickled) with 0.1, whose classes name the old
modules. `OLD_PATHS` maps each old module name to its new dotted path under ``fastai_memmap``. To be
removed in 0.3.

Two old names are now packages: ``fastai_memmap.tabular`` (was the tabular item list; the package
exports the same classes) and ``fastai_memmap.text`` (was the LM module; likewise). They import
without a warning. ``fastai_memmap.cli`` likewise (it exports ``main``).
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from typing import Any, Optional

__all__ = ["OLD_PATHS", "install", "new_path"]

OLD_PATHS = {
    "format": "store.format",
    "casting": "store.casting",
    "reader": "store.reader",
    "writer": "store.writer",
    "ragged": "store.ragged",
    "sparse": "store.sparse",
    "parallel": "store.parallel",
    "memory": "store.memory",
    "readahead": "store.readahead",
    "shm": "store.shm",
    "sources": "store.sources",
    "compat": "data.compat",
    "items": "data.items",
    "labels": "data.labels",
    "batching": "data.batching",
    "sampling": "data.sampling",
    "random_order": "data.random_order",
    "device": "data.device",
    "distributed": "data.distributed",
    "padding": "data.padding",
    "ragged_items": "data.ragged_items",
    "sparse_items": "data.sparse_items",
    "images": "vision.images",
    "inmemory": "vision.inmemory",
    "convert_images": "vision.convert",
    "tabular": "tabular.item_list",
    "records": "tabular.convert",
    "tabular_encoding": "tabular.encoding",
    "tabular_split": "tabular.split",
    "tabular_state": "tabular.state",
    "tabular_writer": "tabular.writer",
    "streaming_stats": "tabular.streaming_stats",
    "text": "text.lm",
    "text_tokenize": "text.tokenize",
    "cli": "cli.main",
    "demo": "cli.demo",
    "bench": "cli.bench",
}
_SAME_NAME = {"tabular", "text", "cli"}   # old module names that are now packages exporting their names
_LOCK = threading.Lock()


def new_path(old: str) -> Optional[str]:
    "The new full module name of the 0.1 module ``fastai_memmap.<old>``, or None if `old` did not move."
    if old in _SAME_NAME:
        return None
    target = OLD_PATHS.get(old)
    return None if target is None else "fastai_memmap." + target


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"fastai_memmap.{old} moved to {new} in fastai_memmap 0.2; the old path stops working in 0.3",
                  DeprecationWarning, stacklevel=stacklevel)


class _MovedLoader(importlib.abc.Loader):
    "Loads an old path as the module at its new path (the same object)."

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec: Any) -> Any:
        _warn(self.old, self.new, stacklevel=8)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.spec   # the import system has just set the old path's spec on it


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Any] = None, target: Any = None) -> Any:
        pkg, _, old = fullname.rpartition(".")
        if pkg != "fastai_memmap":
            return None
        new = new_path(old)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(old, new))


def install() -> None:
    "Put the finder first on ``sys.meta_path`` (idempotent); ``import fastai_memmap`` calls this."
    with _LOCK:
        if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _MovedFinder())
