"""Apply the fastai fixes (`fastai_memmap.data.compat`) whenever fastai is used with this package,
without importing fastai (or torch) for users of the numpy-only store layer.

`install()` (run by ``import fastai_memmap``): if fastai is already imported, the fixes are applied at
once; otherwise a finder on ``sys.meta_path`` waits for the first ``import fastai`` (anywhere: a user's
``from fastai.vision import *``, or one of this package's fastai layers) and applies them right after
fastai's own ``__init__`` has run, before that import statement returns. So ``import fastai_memmap``
followed by fastai code, in either order, always runs patched fastai; ``import fastai_memmap.store``
alone never imports fastai.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from typing import Any, Optional

__all__ = ["install", "installed"]

_LOCK = threading.Lock()


class _ApplyAfterFastai(importlib.abc.Loader):
    "Runs fastai's own loader, then `fastai_memmap.data.compat.apply()`."

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with warnings.catch_warnings():   # fastai/imports/core.py: setuptools >= 80 deprecates pkg_resources
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            self.loader.exec_module(module)
        _apply()


class _FastaiFinder(importlib.abc.MetaPathFinder):
    "Finds the ``fastai`` package with the other finders and wraps its loader (once)."

    def find_spec(self, fullname: str, path: Optional[Any] = None, target: Any = None) -> Any:
        if fullname != "fastai":
            return None
        _remove_finder()
        spec = importlib.util.find_spec("fastai")
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ApplyAfterFastai(spec.loader)
        return spec


def _remove_finder() -> None:
    with _LOCK:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _FastaiFinder)]


def _apply() -> None:
    from .data import compat   # the fastai layer; importing it applies the fixes
    compat.apply()
    from .vision import batch_tfms   # databunch(batch_tfms=...) on every LabelLists, fastai's own included
    batch_tfms.install()


def installed() -> bool:
    "Whether the finder is waiting for ``import fastai`` (False once fastai was imported and patched)."
    return any(isinstance(f, _FastaiFinder) for f in sys.meta_path)


def install() -> None:
    """Apply the fixes now if fastai is imported, else when it is (idempotent).

    Raises what `fastai_memmap.data.compat.apply` raises (``FastaiCompatError`` for a fastai other than
    1.0.61), at once or from the first ``import fastai``.
    """
    if "fastai" in sys.modules:
        _apply()
        return
    with _LOCK:
        if not any(isinstance(f, _FastaiFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _FastaiFinder())
