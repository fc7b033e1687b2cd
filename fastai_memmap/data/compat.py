"""Targeted fixes that make fastai 1.0.61 run on today's torch (>= 2.6) and numpy (>= 1.24).

``import fastai_memmap`` calls :func:`apply`. Each fix patches a name inside fastai's own modules
(a module global, a class attribute) rather than torch or numpy, except where fastai itself patched
torch globally (the DataLoader constructor). :func:`apply` is idempotent: it detects what is already
patched, and a second call changes nothing. :data:`PATCHES` records what was patched, where and why.

======================  ============================================  ===========================================  ===============================================
patch                   what breaks                                   where in fastai 1.0.61                       fix
======================  ============================================  ===========================================  ===============================================
``torch_load``          ``torch.load`` defaults to                    ``basic_train.py``: ``load_learner``,        The global ``torch`` of these three modules
                        ``weights_only=True`` since torch 2.6:        ``Learner.load``, ``Learner.purge``;         becomes a proxy: every attribute is real
                        ``UnpicklingError`` in ``load_learner``,      ``basic_data.py``: ``load_data``;            torch except ``load``, which defaults
                        ``Learner.load`` (with optimizer state),      ``data_block.py``:                           ``weights_only=False`` when the caller passes
                        ``load_data``, ``LabelLists.load_empty``      ``LabelLists.load_empty``                    none. Plain ``torch.load`` is untouched. See
                                                                                                                   :data:`LOAD_LEARNER_SECURITY_NOTE`.
``solve``               ``torch.solve`` now raises ``RuntimeError``:  ``vision/transform.py``:                     ``_solve_func`` becomes :func:`solve_legacy`:
                        every perspective warp fails                  ``_solve_func = getattr(torch,               the old ``solve(B, A) -> (solution, LU)``
                        (``symmetric_warp`` in ``get_transforms()``,  'solve', None)``                             contract on ``torch.linalg.lu_factor`` and
                        ``perspective_warp``, ``skew``, ``tilt``)                                                  ``lu_solve``.
``dataloader_kwargs``   fastai replaces ``DataLoader.__init__``       ``basic_data.py``: ``intercept_args``;       A replacement accepts every argument of
                        globally with a fixed signature:              ``DataBunch.add_test`` builds the test       torch's ``DataLoader``, keeps fastai's defaults
                        ``multiprocessing_context``, ``generator``,   loader from batch size and workers only      (``pin_memory=True``, ``default_collate``) and
                        ``prefetch_factor``, ``persistent_workers``,                                               records every argument in ``init_kwargs``, so
                        ``pin_memory_device``, ``in_order`` raise                                                  ``DeviceDataLoader.new`` and the ``batch_size``
                        ``TypeError``, even for plain torch loaders                                                setter keep them; ``add_test`` reuses the
                                                                                                                   validation loader's ``init_kwargs``. fastai's
                                                                                                                   ``pin_memory=True`` only where CUDA is available
                                                                                                                   (else torch warns and pins for nothing).
``default_workers``     (not a break) fastai's ``LabelLists.         ``data_block.py``:                           The default becomes `FastaiDefaultWorkers`, the
                        databunch`` passes ``num_workers=defaults.    ``LabelLists.databunch(num_workers=          same int marked as fastai's: the package's
                        cpus`` explicitly: a bunch cannot tell it     defaults.cpus)``                             bunches then take ``'auto'`` silently; fastai's
                        from the user's value                                                                      own bunches see the int.
``ragged_array``        numpy 1.24 refuses ragged input:              ``core.py``: ``array()``, star-imported      A wrapper falls back to an object array when
                        ``ValueError`` for multi-label targets of     into ~40 fastai modules (``data_block``:     ``dtype`` is ``None`` and numpy refuses the
                        varying length (``label_from_df(...,          ``MultiCategoryList``,                       input; it replaces the same function object
                        label_delim=' ')``)                           ``CategoryProcessor.process``)               in every loaded ``fastai.*`` module.
``numpy_aliases``       ``np.object``, ``np.float``, ``np.int``,      ``vision/image.py`` (``ImageBBox.create``),  The global ``np`` of those modules becomes a
                        ``np.bool`` removed in numpy 1.24:            ``vision/interpret.py``,                     proxy of numpy that adds back the missing
                        ``AttributeError``                            ``data_block.py``, ``text/data.py``,         aliases as the builtins they always were. The
                                                                      ``callbacks/mlflow.py``                      numpy module itself is untouched.
``pkg_resources_warn``  ``import fastai`` emits setuptools'           ``imports/core.py``:                         :func:`apply` imports fastai with just that
                        "pkg_resources is deprecated" warning         ``import pkg_resources``                     ``UserWarning`` ignored (if fastai was not
                                                                                                                   imported before).
``spacy3_tokenizer``    spaCy 3 removed ``disable=`` from             ``text/transform.py``:                       ``SpacyTokenizer.__init__`` calls
                        ``spacy.blank``: ``TypeError`` in every       ``SpacyTokenizer.__init__``:                 ``spacy.blank(lang)`` (a blank pipeline has no
                        tokenisation (``Tokenizer``,                  ``spacy.blank(lang, disable=[...])``         parser, tagger or ner to disable). Only with
                        ``TextList.from_*``, ``TextLMDataBunch``,                                                  spaCy >= 3; applied when ``fastai.text`` loads.
                        ``learn.predict(text)``)
``qrnn_inplace``        ``z_gate.tanh_()`` / ``f_gate.sigmoid_()``    ``text/models/qrnn.py``:                     ``QRNNLayer.forward`` is the same computation
                        on the views ``chunk`` returns: autograd      ``QRNNLayer.forward``                        with out-of-place ``tanh`` / ``sigmoid``;
                        raises "Output 0 of SplitBackward0 is a                                                    applied when ``fastai.text.models.qrnn`` loads.
                        view and is being modified inplace" on
                        every forward with gradients
``ipython_display``     IPython >= 9 removed                          ``gen_doc/nbdoc.py``, ``gen_notebooks.py``,  :func:`apply` imports ``fastai.gen_doc`` with a
                        ``IPython.core.display.display``:             ``nbtest.py``: ``from IPython.core.display   proxy of ``IPython.core.display`` (adding
                        ``fastai.basics`` swallows the                import display``; ``basics.py``: ``try:      ``display`` from ``IPython.display``) in
                        ``ImportError``, ``doc()`` disappears         from .gen_doc.nbdoc import doc``             ``sys.modules`` for that import only; IPython
                                                                                                                   itself is untouched. Needs nbconvert (fastai's
                                                                                                                   own requirement for ``doc``).
``text_import_hook``    without spaCy, ``import fastai.text`` fails   ``text/transform.py``: ``import spacy``      A ``sys.meta_path`` finder: loading
                        with ``No module named 'spacy'``; after                                                    ``fastai.text.transform`` without spaCy raises
                        :func:`apply`, a ``fastai.text`` imported                                                  :class:`FastaiCompatError` naming the ``text``
                        later would stay unpatched                                                                 extra; the text modules are patched as they load.
(not patched)           pandas >= 2: ``Categorify`` fails ("Can       ``tabular/transform.py``                     ``pandas<2`` is pinned; pandas 1.5 works.
                        only use .cat accessor")
(not patched)           setuptools >= 81 has no ``pkg_resources``:    ``imports/core.py``                          ``setuptools<81`` is pinned; :func:`apply`
                        ``import fastai`` fails                                                                    raises :class:`FastaiCompatError` naming it.
======================  ============================================  ===========================================  ===============================================

Limits
------
- ``fastai.text`` modules are patched when they load (the import hook) or by :func:`apply` if loaded
  before it. ``fastai.callbacks.mlflow`` is patched only if imported before :func:`apply` (it needs
  mlflow); call :func:`apply` again after importing it.
- ``doc`` reaches ``fastai.basics`` (and its ``__all__``) whenever nbconvert is installed; a
  ``fastai.vision`` or ``fastai.text`` star-imported *before* :func:`apply` keeps the ``basics``
  namespace it had, without ``doc``.
- ``text/models/qrnn.py`` compiles its CUDA kernels with ``torch.utils.cpp_extension.load`` at import
  when CUDA is available (it needs nvcc and a compiler there); that is left as is.
  ``fastai.text.learner`` calls ``torch.load`` on plain state dicts, which ``weights_only=True`` loads:
  it is left alone.
- A DataLoader worker started with ``'spawn'`` or ``'forkserver'`` is a fresh interpreter: fastai code
  running there is unpatched unless something it unpickles imports ``fastai_memmap`` (the package's
  own item lists do). Fork workers inherit the patches.
- Code that did ``from fastai... import *`` before :func:`apply` keeps the unpatched ``array``.
"""
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import threading
import types
import warnings
from collections import namedtuple
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.utils.data

from ..errors import FastaiCompatError

__all__ = ["FastaiDefaultWorkers", "apply", "applied", "PATCHES", "Patch", "LOAD_LEARNER_SECURITY_NOTE", "FastaiCompatError",
           "solve_legacy"]

FASTAI_VERSION = "1.0.61"  # the only fastai these fixes were written against (the last v1 release)

LOAD_LEARNER_SECURITY_NOTE = (
    "`load_learner`, `Learner.load`, `load_data` and `LabelLists.load_empty` unpickle their file: "
    "fastai_memmap restores `torch.load`'s pre-2.6 default `weights_only=False` inside fastai, because "
    "an exported learner or a saved optimizer holds arbitrary Python objects (classes, processors, "
    "callbacks). Unpickling can run arbitrary code: load only files you created yourself or trust as much "
    "as code. Plain `torch.load` keeps its safe default, and an explicit `weights_only=True` is honoured."
)

_PATCH_MARK = "_fastai_memmap_patch"  # attribute set on every function this module installs
_LOCK = threading.RLock()


@dataclass(frozen=True)
class Patch:
    """One fix applied to fastai.

    Parameters
    ----------
    name : str
        Key in :data:`PATCHES` (first column of the table in the module docstring).
    location : str
        Where in fastai 1.0.61 the broken code lives.
    reason : str
        What breaks without the fix.
    targets : tuple of str
        What was actually patched (``module.attribute`` names).
    """
    name: str
    location: str
    reason: str
    targets: Tuple[str, ...]


PATCHES: Dict[str, Patch] = {}
"Patches applied so far, by name; filled by :func:`apply`."


class _ModuleProxy(types.ModuleType):
    """Stands in for a module in one fastai module's globals.

    Attributes given as ``overrides`` win; every other attribute is read from the real module
    (``__wrapped__``) at each access, so the proxy never goes stale.
    """

    def __init__(self, real: types.ModuleType, **overrides: Any):
        super().__init__(real.__name__, real.__doc__)
        for key in ("__package__", "__loader__", "__spec__"):  # forward these to the real module
            del self.__dict__[key]
        self.__dict__.update(overrides, __wrapped__=real)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["__wrapped__"], name)

    def __dir__(self):
        return sorted(set(dir(self.__wrapped__)) | set(self.__dict__))

    def __repr__(self) -> str:
        return f"<fastai_memmap.data.compat proxy of {self.__wrapped__!r}>"


def _mark(func: Callable) -> Callable:
    setattr(func, _PATCH_MARK, True)
    return func


def _is_ours(obj: Any) -> bool:
    return getattr(obj, _PATCH_MARK, False) is True


# ---------------------------------------------------------------------------------------- torch.load
@_mark
def _torch_load_trusted(f: Any, *args: Any, **kwargs: Any) -> Any:
    "`torch.load` with the pre-2.6 default `weights_only=False` (unpickles: trusted files only)."
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


_TORCH_LOAD_MODULES = ("fastai.basic_train", "fastai.basic_data", "fastai.data_block")


def _patch_torch_load() -> Patch:
    for name in _TORCH_LOAD_MODULES:
        module = sys.modules[name]
        if not isinstance(vars(module)["torch"], _ModuleProxy):
            module.torch = _ModuleProxy(vars(module)["torch"], load=_torch_load_trusted)
    return Patch("torch_load", "basic_train.py, basic_data.py, data_block.py: torch.load(...)",
                 "torch>=2.6 torch.load defaults to weights_only=True; fastai files hold pickled objects",
                 tuple(f"{name}.torch" for name in _TORCH_LOAD_MODULES))


# ---------------------------------------------------------------------------------------- torch.solve
_SolveResult = namedtuple("solve", ["solution", "LU"])


@_mark
def solve_legacy(B: torch.Tensor, A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A @ X = B`` with the contract of the removed ``torch.solve(B, A)``.

    Parameters
    ----------
    B : torch.Tensor
        Right-hand side, shape ``(*, n, k)``.
    A : torch.Tensor
        Square coefficient matrices, shape ``(*, n, n)``, same floating dtype as `B`.

    Returns
    -------
    (solution, LU) : namedtuple of torch.Tensor
        ``solution``, shape ``(*, n, k)``, and the packed LU factorization of `A`, shape ``(*, n, n)``,
        both new tensors.

    Raises
    ------
    RuntimeError
        If `A` is singular (as ``torch.solve`` did).
    """
    LU, pivots = torch.linalg.lu_factor(A)
    return _SolveResult(torch.linalg.lu_solve(LU, pivots, B), LU)


def _patch_solve() -> Patch:
    transform = sys.modules["fastai.vision.transform"]
    if transform._solve_func is not solve_legacy:
        transform._solve_func = solve_legacy
    return Patch("solve", "vision/transform.py: _solve_func = getattr(torch, 'solve', None)",
                 "torch.solve was removed (it now raises RuntimeError): every perspective warp fails",
                 ("fastai.vision.transform._solve_func",))


# ---------------------------------------------------------------------------------------- DataLoader
# fastai's `intercept_args` defaults, where they differ from torch's (equivalent otherwise).
_FASTAI_DL_DEFAULTS = {"batch_size": 1, "shuffle": False, "sampler": None, "batch_sampler": None,
                       "num_workers": 0, "pin_memory": True, "drop_last": False, "timeout": 0,
                       "worker_init_fn": None}


def _make_dataloader_init(torch_init: Callable) -> Callable:
    from torch.utils.data.dataloader import default_collate
    defaults = {**_FASTAI_DL_DEFAULTS, "collate_fn": default_collate}
    signature = inspect.signature(torch_init)

    @functools.wraps(torch_init)
    def __init__(self, dataset, *args, **kwargs):
        # binding first raises torch's own TypeError for an argument torch does not accept
        passed = signature.bind(self, dataset, *args, **kwargs).arguments
        passed = {key: value for key, value in passed.items() if key not in ("self", "dataset")}
        # fastai pins by default, for its CUDA device; without CUDA pinning does nothing but warn
        self.init_kwargs = {**defaults, "pin_memory": torch.cuda.is_available(), **passed}
        torch_init(self, dataset, **self.init_kwargs)

    # help() and inspect show torch's parameters with the defaults fastai actually applies
    __init__.__signature__ = signature.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in signature.parameters.values()])
    return _mark(__init__)


class FastaiDefaultWorkers(int):
    """fastai's default ``num_workers`` (``defaults.cpus``), marked so that a data bunch can tell it from
    a value the user passed: `fastai_memmap.data.batching` then picks the fast setting (``'auto'``)
    silently. Behaves as the int it is everywhere else (torch, fastai's own bunches)."""

    def __repr__(self) -> str:
        return f"{int(self)}"

    def __reduce__(self):
        return (int, (int(self),))


def _unwrapped(f: Callable) -> Callable:
    while hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f


def _patch_databunch_workers() -> Patch:
    data_block = sys.modules["fastai.data_block"]
    f = _unwrapped(data_block.LabelLists.databunch)   # fastai's own, under any wrapper (vision.batch_tfms)
    names = f.__code__.co_varnames[:f.__code__.co_argcount]
    k = names.index("num_workers") - (len(names) - len(f.__defaults__))
    if not isinstance(f.__defaults__[k], FastaiDefaultWorkers):
        d = list(f.__defaults__)
        d[k] = FastaiDefaultWorkers(d[k])
        f.__defaults__ = tuple(d)
    return Patch("default_workers", "data_block.py: LabelLists.databunch(num_workers=defaults.cpus)",
                 "not a break: the package's bunches choose num_workers='auto' when the user passed none, and "
                 "fastai passes its default explicitly", ("fastai.data_block.LabelLists.databunch.__defaults__",))


def _databunch_add_test(self, items, label=None, tfms=None, tfm_y=None) -> None:
    "Add the `items` as a test set. Pass along `label` otherwise label them with `EmptyLabel`."
    self.label_list.add_test(items, label=label, tfms=tfms, tfm_y=tfm_y)
    vdl = self.valid_dl
    kwargs = {**vdl.dl.init_kwargs, "batch_size": vdl.batch_size, "num_workers": vdl.num_workers,
              "shuffle": False, "drop_last": False, "sampler": None, "batch_sampler": None}
    dl = torch.utils.data.DataLoader(self.label_list.test, **kwargs)
    self.test_dl = type(vdl)(dl, vdl.device, vdl.tfms, vdl.collate_fn)


_mark(_databunch_add_test)


def _patch_dataloader() -> Patch:
    basic_data = sys.modules["fastai.basic_data"]
    loader = torch.utils.data.DataLoader
    if not _is_ours(loader.__init__):
        torch_init = basic_data.old_dl_init  # the constructor fastai saved before replacing it
        while _is_ours(torch_init):  # fastai.basic_data reloaded after a previous apply()
            torch_init = torch_init.__wrapped__
        loader.__init__ = _make_dataloader_init(torch_init)
    if basic_data.DataBunch.add_test is not _databunch_add_test:
        basic_data.DataBunch.add_test = _databunch_add_test
    return Patch("dataloader_kwargs", "basic_data.py: intercept_args (DataLoader.__init__), DataBunch.add_test",
                 "fastai's fixed DataLoader signature rejects multiprocessing_context, persistent_workers, "
                 "prefetch_factor, generator, pin_memory_device, in_order",
                 ("fastai.basic_data.DataBunch.add_test", "torch.utils.data.DataLoader.__init__"))


# ---------------------------------------------------------------------------------------- ragged array
def _object_array(items: Sized, **kwargs: Any) -> np.ndarray:
    "Object array of ragged `items` as numpy < 1.24 built it (1-d of the elements if nothing else fits)."
    try:
        return np.array(items, dtype=object, **kwargs)
    except ValueError:  # e.g. arrays whose leading dimensions agree but trailing ones do not
        result = np.empty(len(items), dtype=object)
        for i, item in enumerate(items):
            result[i] = item
        return result


def _make_ragged_tolerant(fastai_array: Callable) -> Callable:
    @functools.wraps(fastai_array)
    def array(a, dtype: type = None, **kwargs) -> np.ndarray:
        "Same as `np.array` but also handles generators and ragged input (object array, as numpy < 1.24)."
        if not isinstance(a, Sized) and not getattr(a, "__array_interface__", False):
            a = list(a)  # materialize once: a retry must see the same items
        try:
            return fastai_array(a, dtype=dtype, **kwargs)
        except ValueError:
            if dtype is not None:
                raise
        return _object_array(a, **kwargs)

    return _mark(array)


def _fastai_modules():
    return [(name, module) for name, module in list(sys.modules.items())
            if (name == "fastai" or name.startswith("fastai.")) and isinstance(module, types.ModuleType)]


def _patch_array() -> Patch:
    core = sys.modules["fastai.core"]
    tolerant = core.array if _is_ours(core.array) else _make_ragged_tolerant(core.array)
    original = tolerant.__wrapped__
    targets = []
    for name, module in _fastai_modules():
        namespace = vars(module)
        if namespace.get("array") is original:
            module.array = tolerant
        if namespace.get("array") is tolerant:
            targets.append(f"{name}.array")
    return Patch("ragged_array", "core.py: array(), star-imported into most fastai modules",
                 "numpy>=1.24 raises ValueError for ragged input (multi-label targets of varying length)",
                 tuple(sorted(targets)))


# ---------------------------------------------------------------------------------------- numpy aliases
# The aliases numpy 1.24 removed were these builtins exactly (numpy 1.20 deprecation notes).
_NUMPY_ALIASES = {"object": object, "float": float, "int": int, "bool": bool}
_NUMPY_ALIAS_MODULES = ("fastai.data_block", "fastai.vision.image", "fastai.vision.interpret")
_NUMPY_ALIAS_MODULES_IF_LOADED = ("fastai.text.data", "fastai.callbacks.mlflow")  # need spacy / mlflow


def _missing_numpy_aliases() -> Dict[str, type]:
    with warnings.catch_warnings():  # numpy 1.2x warns (FutureWarning) on access before raising
        warnings.simplefilter("ignore")
        return {name: alias for name, alias in _NUMPY_ALIASES.items() if not hasattr(np, name)}


def _patch_numpy_aliases() -> Patch:
    missing = _missing_numpy_aliases()
    names = _NUMPY_ALIAS_MODULES + tuple(n for n in _NUMPY_ALIAS_MODULES_IF_LOADED if n in sys.modules)
    for name in names if missing else ():
        module = sys.modules[name]
        if not isinstance(vars(module)["np"], _ModuleProxy):
            module.np = _ModuleProxy(vars(module)["np"], **missing)
    return Patch("numpy_aliases", "vision/image.py, vision/interpret.py, data_block.py, text/data.py, "
                 "callbacks/mlflow.py: np.object, np.float, np.int",
                 "numpy>=1.24 removed the np.object/np.float/np.int/np.bool aliases (AttributeError)",
                 tuple(f"{name}.np" for name in names) if missing else ())


# ---------------------------------------------------------------------------------------- fastai.text
TEXT_EXTRA_HINT = "pip install 'fastai_memmap[text]'"   # the extra that installs a spaCy fastai.text works with


def spacy_available() -> bool:
    "Whether ``import spacy`` can succeed (a module already in ``sys.modules`` counts, ``None`` there does not)."
    if "spacy" in sys.modules:
        return sys.modules["spacy"] is not None
    try:
        return importlib.util.find_spec("spacy") is not None
    except (ImportError, ValueError):
        return False


def _spacy_major() -> int:
    "Major version of the loaded spaCy; 0 for none or a placeholder (read from the module dict: no __getattr__)."
    spacy = sys.modules.get("spacy")
    version = vars(spacy).get("__version__", "0") if isinstance(spacy, types.ModuleType) else "0"
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _make_spacy_init(fastai_init: Callable) -> Callable:
    @functools.wraps(fastai_init)
    def __init__(self, lang: str):
        "Wrapper around a spacy tokenizer to make it a `BaseTokenizer` (spaCy 3: `spacy.blank(lang)`)."
        self.lang = lang
        self.tok = sys.modules["fastai.text.transform"].spacy.blank(lang)   # fastai's global: a placeholder raises

    return _mark(__init__)


def _patch_spacy_tokenizer() -> Optional[Patch]:
    transform = sys.modules.get("fastai.text.transform")
    if transform is None:
        return None
    cls = transform.SpacyTokenizer
    if not _is_ours(cls.__init__) and _spacy_major() >= 3:
        cls.__init__ = _make_spacy_init(cls.__init__)
    return Patch("spacy3_tokenizer", "text/transform.py: SpacyTokenizer.__init__: spacy.blank(lang, disable=[...])",
                 "spaCy 3 removed spacy.blank's disable= (TypeError in every tokenisation)",
                 ("fastai.text.transform.SpacyTokenizer.__init__",) if _is_ours(cls.__init__) else ())


def _make_qrnn_forward(fastai_forward: Callable) -> Callable:
    qrnn = sys.modules["fastai.text.models.qrnn"]

    @functools.wraps(fastai_forward)
    def forward(self, inp, hid=None):
        "fastai's `QRNNLayer.forward` with out-of-place activations on the gates (views of one `chunk`)."
        y = self.linear(self._get_source(inp))
        gates = y.chunk(3 if self.output_gate else 2, dim=2)
        z_gate, f_gate = torch.tanh(gates[0]), torch.sigmoid(gates[1])
        if self.zoneout and self.training:
            mask = qrnn.dropout_mask(f_gate, f_gate.size(), self.zoneout).requires_grad_(False)
            f_gate = f_gate * mask
        z_gate, f_gate = z_gate.contiguous(), f_gate.contiguous()
        if self.backward:
            forget_mult = qrnn.dispatch_cuda(qrnn.BwdForgetMultGPU, functools.partial(qrnn.forget_mult_CPU, backward=True), inp)
        else:
            forget_mult = qrnn.dispatch_cuda(qrnn.ForgetMultGPU, qrnn.forget_mult_CPU, inp)
        c_gate = forget_mult(z_gate, f_gate, hid, self.batch_first)
        output = torch.sigmoid(gates[2]) * c_gate if self.output_gate else c_gate
        if self.window > 1 and self.save_prev_x:
            if self.backward:
                self.prevX = (inp[:, :1] if self.batch_first else inp[:1]).detach()
            else:
                self.prevX = (inp[:, -1:] if self.batch_first else inp[-1:]).detach()
        idx = 0 if self.backward else -1
        return output, (c_gate[:, idx] if self.batch_first else c_gate[idx])

    return _mark(forward)


def _patch_qrnn() -> Optional[Patch]:
    qrnn = sys.modules.get("fastai.text.models.qrnn")
    if qrnn is None:
        return None
    if not _is_ours(qrnn.QRNNLayer.forward):
        qrnn.QRNNLayer.forward = _make_qrnn_forward(qrnn.QRNNLayer.forward)
    return Patch("qrnn_inplace", "text/models/qrnn.py: QRNNLayer.forward: z_gate.tanh_(), f_gate.sigmoid_()",
                 "in-place activations on the views of y.chunk(): autograd raises on every forward with gradients",
                 ("fastai.text.models.qrnn.QRNNLayer.forward",))


# what to patch as each fastai.text module finishes loading (the import hook) or in apply() if already loaded
_TEXT_PATCHERS = {"fastai.text.transform": _patch_spacy_tokenizer, "fastai.text.models.qrnn": _patch_qrnn}


class _PatchingLoader(importlib.abc.Loader):
    "Runs fastai's loader, then the patches of the module it loaded (every other attribute is the real loader's)."

    def __init__(self, loader: Any, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            if self._name == "fastai.text.data":
                _record(_patch_numpy_aliases())
            else:
                _record(_TEXT_PATCHERS[self._name]())

    def __getattr__(self, name: str) -> Any:   # get_source, get_code...: tracebacks and inspect keep working
        return getattr(self._loader, name)


class _TextImportHook(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` finder for fastai's text modules: refuses ``fastai.text.transform`` without spaCy
    (:class:`FastaiCompatError` naming the extra) and patches the modules of `_TEXT_PATCHERS` as they load."""
    names = frozenset(_TEXT_PATCHERS) | {"fastai.text.data"}

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name not in self.names:
            return None
        if name == "fastai.text.transform" and not spacy_available():
            raise FastaiCompatError(f"fastai.text: expected spaCy (fastai/text/transform.py imports it), found none "
                                    f"installed; install the text extra: {TEXT_EXTRA_HINT} (without spaCy, "
                                    "fastai_memmap.text.lm.import_fastai_text() imports fastai.text for pre-tokenised "
                                    "token ids)")
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, name)
        return spec


def _install_text_hook() -> Patch:
    if not any(isinstance(finder, _TextImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TextImportHook())
    return Patch("text_import_hook", "text/transform.py: import spacy; text/models/qrnn.py, text/data.py",
                 "without spaCy `import fastai.text` fails with a bare ModuleNotFoundError; text modules imported "
                 "after apply() would stay unpatched", ("sys.meta_path",))


# ---------------------------------------------------------------------------------------- IPython 9
class _IPythonDisplayProxy(_ModuleProxy):
    "``IPython.core.display`` as fastai's ``gen_doc`` expects it: ``display`` is ``IPython.display.display``."


def _import_gen_doc() -> Optional[Patch]:
    """Import ``fastai.gen_doc`` (hence ``doc``) with ``display`` back in ``IPython.core.display`` for that import.

    Returns None when IPython is not installed or still has ``display`` there; fastai's own ``ImportError``
    (nbconvert missing) is swallowed, as ``fastai.basics`` does."""
    try:
        core_display = importlib.import_module("IPython.core.display")
    except ImportError:
        return None
    if hasattr(core_display, "display"):
        return None
    loaded = "fastai.gen_doc.nbdoc" in sys.modules
    if not loaded:
        display = importlib.import_module("IPython.display").display
        sys.modules["IPython.core.display"] = _IPythonDisplayProxy(core_display, display=display)
        try:
            importlib.import_module("fastai.gen_doc.nbdoc")
            loaded = True
        except ImportError:   # nbconvert missing: no doc(), as in fastai
            pass
        finally:
            if isinstance(sys.modules.get("IPython.core.display"), _IPythonDisplayProxy):
                sys.modules["IPython.core.display"] = core_display
    basics = sys.modules.get("fastai.basics")
    if loaded and basics is not None and "doc" not in vars(basics):   # basics imported (and failed) before apply()
        basics.doc = sys.modules["fastai.gen_doc.nbdoc"].doc
        if "doc" not in basics.__all__:
            basics.__all__.append("doc")
    return Patch("ipython_display", "gen_doc/nbdoc.py, gen_notebooks.py, nbtest.py: from IPython.core.display "
                 "import display", "IPython>=9 removed IPython.core.display.display: fastai.basics silently drops doc()",
                 ("sys.modules['IPython.core.display'] during the import of fastai.gen_doc",) if loaded else ())


# ---------------------------------------------------------------------------------------- import fastai
_FASTAI_MODULES = ("fastai.basic_train", "fastai.basic_data", "fastai.data_block", "fastai.core",
                   "fastai.vision.transform", "fastai.vision.image", "fastai.vision.interpret")


def _import_fastai() -> Patch:
    "Import the fastai modules the patches need, without setuptools' pkg_resources deprecation warning."
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import fastai
            if fastai.__version__ != FASTAI_VERSION:
                raise FastaiCompatError(f"fastai_memmap.data.compat: expected fastai {FASTAI_VERSION}, found "
                                        f"{fastai.__version__}; install fastai=={FASTAI_VERSION}")
            gen_doc = _import_gen_doc()   # before fastai.basics, which imports it (and swallows its error)
            if gen_doc is not None:
                _record(gen_doc)
            for name in _FASTAI_MODULES:
                importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            raise
        raise FastaiCompatError("fastai 1.0.61 needs pkg_resources, removed in setuptools 81: found none; "
                                "install 'setuptools<81'") from e
    return Patch("pkg_resources_warn", "imports/core.py: import pkg_resources",
                 "setuptools>=80 warns that pkg_resources is deprecated on every `import fastai`",
                 ("warnings filter around `import fastai` in compat.apply()",))


# ---------------------------------------------------------------------------------------- public API
_PATCHERS = (_patch_torch_load, _patch_solve, _patch_dataloader, _patch_databunch_workers, _patch_array,
             _patch_numpy_aliases,
             _install_text_hook, *_TEXT_PATCHERS.values())


def _record(patch: Optional[Patch]) -> None:
    "Enter `patch` in `PATCHES` (replacing an entry only when it changed); None: nothing was loaded to patch."
    if patch is not None and PATCHES.get(patch.name) != patch:
        PATCHES[patch.name] = patch


def apply() -> None:
    """Apply every fix of the module docstring's table to fastai 1.0.61; idempotent and thread-safe.

    Imports fastai (``basic_train``, ``basic_data``, ``data_block``, ``vision``, and ``gen_doc`` when
    IPython >= 9 and nbconvert are installed) if needed, and installs the import hook that patches
    ``fastai.text`` as it loads (never importing it, nor spaCy, itself). A second call
    changes nothing, except that it also patches fastai modules imported since the first call.
    :data:`PATCHES` is filled with one :class:`Patch` per fix; an entry is replaced only when its
    targets changed.

    Raises
    ------
    FastaiCompatError
        If fastai is not version 1.0.61, or cannot be imported because ``pkg_resources`` is missing.
    """
    with _LOCK:
        for patch in (_import_fastai(), *(patcher() for patcher in _PATCHERS)):
            _record(patch)


def applied() -> bool:
    """Whether every fix is in place right now (checks the patched objects, not a flag).

    Returns
    -------
    bool
        ``False`` before :func:`apply`, or if fastai was reloaded since.
    """
    modules = sys.modules
    if not all(name in modules for name in _FASTAI_MODULES):
        return False
    checks = [isinstance(vars(modules[name])["torch"], _ModuleProxy) for name in _TORCH_LOAD_MODULES]
    workers = _unwrapped(modules["fastai.data_block"].LabelLists.databunch).__defaults__
    checks += [any(isinstance(v, FastaiDefaultWorkers) for v in workers),
               modules["fastai.vision.transform"]._solve_func is solve_legacy,
               _is_ours(torch.utils.data.DataLoader.__init__),
               modules["fastai.basic_data"].DataBunch.add_test is _databunch_add_test,
               _is_ours(modules["fastai.core"].array)]
    if _missing_numpy_aliases():
        checks += [isinstance(vars(modules[name])["np"], _ModuleProxy) for name in _NUMPY_ALIAS_MODULES]
    checks.append(any(isinstance(finder, _TextImportHook) for finder in sys.meta_path))
    if "fastai.text.transform" in modules and _spacy_major() >= 3:
        checks.append(_is_ours(modules["fastai.text.transform"].SpacyTokenizer.__init__))
    if "fastai.text.models.qrnn" in modules:
        checks.append(_is_ours(modules["fastai.text.models.qrnn"].QRNNLayer.forward))
    return all(checks)
