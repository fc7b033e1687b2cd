"""Batch augmentation: fastai v1's ``get_transforms()`` applied to whole batches on the device.

fastai applies ``tfms`` item by item in DataLoader workers (``Image.apply_tfms``): for each image it
draws the parameters of every `RandTransform`, composes the affine transforms into one 3×3 matrix,
builds one sampling grid, calls ``grid_sample`` once, and runs lighting in logit space. `BatchTfms`
does the same for a whole ``(B, C, H, W)`` batch: each item draws its own parameters with fastai's
distributions and probabilities (`BatchTfms.draw`), the matrices of a batch are one ``(B, 3, 3)``
stack, the grid one ``(B, H', W', 2)`` tensor and ``grid_sample`` runs once per batch (twice when
fastai's area pre-shrink applies to some items only), on whatever device the batch is on.

For the same drawn parameters each image equals fastai's per-item output (``Image.apply_tfms``
with ``do_resolve=False``) up to float32 rounding (max abs difference <= 1e-4, bit for bit for
flips, dihedral and crops): the same grid math (``_affine_grid``, ``_affine_mult`` with its h/w
correction, the homographies of ``_find_coeffs``/``_apply_perspective``), the same
lazy order (coordinate transforms, then affine, one sampling, lighting in logit space, pixel
transforms, then ``crop_pad``), the same ``size``/``resize_method``/``padding_mode`` handling and
the same bilinear down-sampling hack of ``_grid_sample``. Masks (``mask=True``) get the geometric
transforms only, sampled ``nearest``, as fastai's ``ImageSegment`` does with ``tfm_y=True``.

Supported transforms (fastai's own functions, any arguments and ``p``): ``flip_lr``, ``dihedral``
(square images), ``flip_affine``, ``dihedral_affine``, ``rotate``, ``zoom`` (``rand_zoom``),
``squish``, ``symmetric_warp``, ``perspective_warp``, ``skew``, ``tilt``, ``brightness``,
``contrast``, ``crop_pad`` (``rand_crop``). Anything else is refused with
`UnsupportedTransformError` when the `BatchTfms` is built (never silently dropped).

Opt-in on the data block API (`install`, applied on import of fastai_memmap)::

    data = lls.databunch(bs=128, batch_tfms=get_transforms(), size=64)

keeps items on the batch fast path (uint8 where the list supports it) and runs the train
transforms on the training loaders, the validation transforms on the validation, test and single
item loaders, after the batch reached ``data.device`` and before ``normalize`` (see `attach`).
"""
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fastai.core import is_listy, listify
from fastai.torch_core import log_uniform, rand_bool, uniform, uniform_int
from fastai.vision import transform as T
from fastai.vision.image import (RandTransform, ResizeMethod, TfmAffine, TfmCoord, TfmCrop, TfmLighting, TfmPixel,
                                 _get_crop_target)

from ..errors import ArgumentError, ArgumentTypeError, UnsupportedTransformError

__all__ = ["BatchTfms", "Draws", "BatchAugment", "attach", "install", "SUPPORTED", "check_batch_tfms"]

PAD_MODES = {"reflection": "reflect", "zeros": "constant", "border": "replicate"}   # fastai's _pad_mode_convert
LOGIT_EPS = 1e-7   # fastai's logit_ clamps pixels to [1e-7, 1 - 1e-7]
_DISTS = {uniform: "uniform", log_uniform: "log_uniform", uniform_int: "uniform_int", rand_bool: "rand_bool"}


# ------------------------------------------------------------------------------------------- drawing
def _draw(fn: Any, args: Sequence[Any], n: int, rng: np.random.Generator, who: str) -> Tuple[np.ndarray, bool]:
    """`n` draws of fastai's random function `fn` (``uniform``, ``log_uniform``, ``uniform_int``,
    ``rand_bool`` or a ``functools.partial`` of one) called with `args`; ``(values, sized)``:
    values ``(n,)`` or ``(n, *size)``; `sized` when fastai returns a float tensor (``size=``)."""
    kw: Dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        args, kw, fn = tuple(fn.args) + tuple(args), dict(fn.keywords), fn.func
    kind = _DISTS.get(fn)
    if kind is None:
        raise UnsupportedTransformError(f"{who}: expected a parameter drawn with fastai's uniform, log_uniform, "
                                        f"uniform_int or rand_bool, found {fn!r:.80}; use per-item .transform()")
    try:
        b = inspect.signature(fn).bind(*args, **kw).arguments
    except TypeError as e:
        raise ArgumentError(f"{who}: fastai's {kind} cannot take arguments {tuple(args)!r:.80}: {e}") from None
    size = b.get("size")
    shape = (n,) + tuple(int(s) for s in listify(size)) if size is not None else (n,)
    if kind == "uniform":
        low = b["low"]
        high = low if b.get("high") is None else b["high"]
        out = rng.uniform(low, high, shape) if high != low else np.full(shape, float(low))
    elif kind == "log_uniform":
        out = np.exp(rng.uniform(math.log(b["low"]), math.log(b["high"]), shape))
    elif kind == "uniform_int":
        out = rng.integers(int(b["low"]), int(b["high"]) + 1, shape)
    else:
        out = rng.uniform(0, 1, shape) < b["p"]
    if size is not None and kind in ("uniform", "log_uniform"):
        out = out.astype(np.float32)   # fastai: a FloatTensor
    return out, size is not None


@dataclass
class Drawn:
    "Parameters of one `RandTransform` for the `n` items of a batch: `values` ``(n, ...)``, `fixed` as given."
    rt: RandTransform
    values: Dict[str, np.ndarray] = field(default_factory=dict)
    fixed: Dict[str, Any] = field(default_factory=dict)
    sized: frozenset = frozenset()
    run: np.ndarray = None

    def get(self, k: str, n: int) -> np.ndarray:
        "Parameter `k` for every item: ``(n, ...)`` (a fixed value broadcast)."
        if k in self.values:
            return self.values[k]
        v = self.fixed[k]
        return np.broadcast_to(np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v), (n,) + np.shape(v))

    def item(self, i: int) -> Tuple[Dict[str, Any], bool]:
        "``(resolved, do_run)`` of item `i`, as fastai's ``RandTransform.resolve`` would have set them."
        res = dict(self.fixed)
        for k, v in self.values.items():
            res[k] = torch.tensor(v[i]) if k in self.sized else v[i].item()
        return res, bool(self.run[i])


def _resolve(rt: RandTransform, n: int, rng: np.random.Generator) -> Drawn:
    "Vectorized ``RandTransform.resolve`` for `n` items (same rules: kwargs, defaults, then the rest)."
    tfm, who = rt.tfm, _name(rt)
    if not rt.is_random:
        return Drawn(rt, fixed={**tfm.def_args, **rt.kwargs}, run=np.full(n, bool(rt.do_run)))
    d = Drawn(rt)
    sized = set()

    def draw(k, f, args):
        d.values[k], s = _draw(f, args, n, rng, f"{who}({k}=...)")
        if s:
            sized.add(k)
    for k, v in rt.kwargs.items():
        if k in tfm.params:
            draw(k, tfm.params[k], listify(v))
        else:
            d.fixed[k] = v
    for k, v in tfm.def_args.items():
        if k not in d.values and k not in d.fixed:
            d.fixed[k] = v
    for k, f in tfm.params.items():
        if k != "return" and k not in d.values and k not in d.fixed:
            draw(k, f, ())
    d.sized, d.run = frozenset(sized), rng.uniform(0, 1, n) < rt.p
    return d


@dataclass
class Draws:
    "Drawn parameters of a batch: one `Drawn` per transform of `BatchTfms.plan` (sorted as fastai sorts)."
    n: int
    drawn: List[Drawn]

    def item(self, i: int) -> List[Tuple[Dict[str, Any], bool]]:
        "For item `i`, ``(resolved, do_run)`` of each planned transform (to set on fastai's `RandTransform`s)."
        return [d.item(i) for d in self.drawn]


# ------------------------------------------------------------------------------------------- matrices
def _stack(rows: List[List[Any]], n: int) -> np.ndarray:
    "A ``(n, 3, 3)`` float64 stack from a 3×3 nested list of scalars or ``(n,)`` arrays."
    return np.stack([np.stack([np.broadcast_to(np.asarray(v, np.float64), (n,)) for v in r], -1) for r in rows], -2)


def _rotate(d: Drawn, n: int) -> np.ndarray:
    a = d.get("degrees", n).astype(np.float64) * math.pi / 180
    return _stack([[np.cos(a), -np.sin(a), 0.], [np.sin(a), np.cos(a), 0.], [0., 0., 1.]], n)


def _zoom(d: Drawn, n: int) -> np.ndarray:
    scale = d.get("scale", n).astype(np.float64)
    s = 1 - 1 / scale
    col_c, row_c = s * (2 * d.get("col_pct", n) - 1), s * (2 * d.get("row_pct", n) - 1)
    return _stack([[1 / scale, 0., col_c], [0., 1 / scale, row_c], [0., 0., 1.]], n)


def _squish(d: Drawn, n: int) -> np.ndarray:
    scale = d.get("scale", n).astype(np.float64)
    small = scale <= 1
    col_c = np.where(small, (1 - scale) * (2 * d.get("col_pct", n) - 1), 0.)
    row_c = np.where(small, 0., (1 - 1 / scale) * (2 * d.get("row_pct", n) - 1))
    return _stack([[np.where(small, scale, 1.), 0., col_c], [0., np.where(small, 1., 1 / scale), row_c],
                   [0., 0., 1.]], n)


def _flip_affine(d: Drawn, n: int) -> np.ndarray:
    return _stack([[-1., 0., 0.], [0., 1., 0.], [0., 0., 1.]], n)


def _dihedral_affine(d: Drawn, n: int) -> np.ndarray:
    k = d.get("k", n).astype(np.int64)
    x, y, t = np.where(k & 1, -1., 1.), np.where(k & 2, -1., 1.), (k & 4) > 0
    z = np.zeros(n)
    return _stack([[np.where(t, 0., x), np.where(t, x, 0.), 0.], [np.where(t, y, 0.), np.where(t, 0., y), 0.],
                   [z, z, 1.]], n)


_ORIG = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]], np.float64)


def _symmetric_warp(d: Drawn, n: int) -> np.ndarray:
    m = d.get("magnitude", n).astype(np.float64)
    m = np.broadcast_to(m.reshape(n, -1), (n, 4)) if m.size in (n, 4 * n) else m
    return np.stack([np.stack([-1 - m[:, 3], -1 - m[:, 1]], -1), np.stack([-1 - m[:, 2], 1 + m[:, 1]], -1),
                     np.stack([1 + m[:, 3], -1 - m[:, 0]], -1), np.stack([1 + m[:, 2], 1 + m[:, 0]], -1)], 1)


def _perspective_warp(d: Drawn, n: int) -> np.ndarray:
    m = d.get("magnitude", n).astype(np.float64)
    return _ORIG[None] + np.broadcast_to(m.reshape(n, -1), (n, 8)).reshape(n, 4, 2)


# (point, coordinate, sign) moved by `magnitude` for each direction, from fastai's _skew and _tilt tables
_SKEW = [[(0, 0, -1)], [(0, 1, -1)], [(1, 0, -1)], [(1, 1, 1)], [(2, 0, 1)], [(2, 1, -1)], [(3, 0, 1)], [(3, 1, 1)]]
_TILT = [[(2, 1, -1), (3, 1, 1)], [(0, 1, -1), (1, 1, 1)], [(1, 0, -1), (3, 0, 1)], [(0, 0, -1), (2, 0, 1)]]


def _moved(table: List[List[Tuple[int, int, int]]], who: str) -> Callable[[Drawn, int], np.ndarray]:
    def targ(d: Drawn, n: int) -> np.ndarray:
        direction = d.get("direction", n).astype(np.int64)
        mag = d.get("magnitude", n).astype(np.float64)
        if ((direction < 0) | (direction >= len(table))).any():
            raise ArgumentError(f"{who}: expected direction in 0..{len(table) - 1}, found {sorted(set(direction))}")
        pts = np.repeat(_ORIG[None], n, 0)
        for dirn, moves in enumerate(table):
            sel = direction == dirn
            for p, c, s in moves:
                pts[sel, p, c] += s * mag[sel]
        return pts
    return targ


def _coeffs(orig: np.ndarray, targ: np.ndarray) -> torch.Tensor:
    "fastai's ``_find_coeffs(orig, targ)`` for a batch: ``(n, 3, 3)`` float32 homographies (float32 LU solve)."
    n = len(orig)
    A = np.zeros((n, 8, 8), np.float64)
    p1, p2 = targ, orig
    A[:, 0::2, 0], A[:, 0::2, 1], A[:, 0::2, 2] = p1[..., 0], p1[..., 1], 1
    A[:, 1::2, 3], A[:, 1::2, 4], A[:, 1::2, 5] = p1[..., 0], p1[..., 1], 1
    A[:, 0::2, 6], A[:, 0::2, 7] = -p2[..., 0] * p1[..., 0], -p2[..., 0] * p1[..., 1]
    A[:, 1::2, 6], A[:, 1::2, 7] = -p2[..., 1] * p1[..., 0], -p2[..., 1] * p1[..., 1]
    A_t = torch.from_numpy(A.astype(np.float32))
    B_t = torch.from_numpy(orig.reshape(n, 8, 1).astype(np.float32))
    LU, piv = torch.linalg.lu_factor(A_t)
    sol = torch.linalg.lu_solve(LU, piv, B_t)[..., 0]
    return torch.cat([sol, torch.ones(n, 1)], 1).view(n, 3, 3)


# ------------------------------------------------------------------------------------------- pixel ops
def _brightness(d: Drawn, n: int) -> Tuple[np.ndarray, np.ndarray]:
    "``(add, mul)`` per item in logit space: fastai's ``x.add_(logit(change))``."
    change = np.asarray(d.get("change", n), dtype=np.float64)
    return np.log(change) - np.log1p(-change), np.ones(n)


def _contrast(d: Drawn, n: int) -> Tuple[np.ndarray, np.ndarray]:
    "``(add, mul)`` per item in logit space: fastai's ``x.mul_(scale)``."
    return np.zeros(n), np.asarray(d.get("scale", n), np.float64)


def _flip_lr(x: torch.Tensor, d: Drawn, n: int, R: np.ndarray) -> torch.Tensor:
    return x.flip(-1)


def _dihedral(x: torch.Tensor, d: Drawn, n: int, R: np.ndarray) -> torch.Tensor:
    k = d.get("k", n).astype(np.int64)[R]
    if (k & 4).any() and x.shape[-1] != x.shape[-2]:
        raise UnsupportedTransformError(f"dihedral: expected square images on the batch path (a transpose "
                                        f"changes their shape), found {tuple(x.shape[-2:])}; use dihedral_affine")
    out = x.clone()
    for kk in np.unique(k):
        sel = torch.from_numpy(np.flatnonzero(k == kk)).to(x.device)
        y = x[sel]
        flips = [dim for bit, dim in ((1, 2), (2, 3)) if kk & bit]
        if flips:
            y = torch.flip(y, flips)
        if kk & 4:
            y = y.transpose(2, 3)
        out[sel] = y
    return out


AFFINE = {T.rotate: _rotate, T.zoom: _zoom, T.squish: _squish, T.flip_affine: _flip_affine,
          T.dihedral_affine: _dihedral_affine}
COORD = {T.symmetric_warp: _symmetric_warp, T.perspective_warp: _perspective_warp,
         T.skew: _moved(_SKEW, "skew"), T.tilt: _moved(_TILT, "tilt")}
LIGHTING = {T.brightness: _brightness, T.contrast: _contrast}
PIXEL = {T.flip_lr: _flip_lr, T.dihedral: _dihedral}
CROP = {T.crop_pad}
SUPPORTED = tuple(t.__name__ for t in (*AFFINE, *COORD, *LIGHTING, *PIXEL, *CROP))


def _name(rt: Any) -> str:
    tfm = getattr(rt, "tfm", rt)
    return getattr(getattr(tfm, "func", None), "__name__", None) or type(rt).__name__


def _kind(rt: Any) -> str:
    "``'coord'``, ``'affine'``, ``'lighting'``, ``'pixel'`` or ``'crop'``; `UnsupportedTransformError` otherwise."
    if not isinstance(rt, RandTransform):
        raise UnsupportedTransformError(f"batch_tfms: expected fastai RandTransforms (e.g. rotate(degrees=(-10, 10))), "
                                        f"found {type(rt).__name__} {rt!r:.60}")
    t = rt.tfm
    for kind, table in (("coord", COORD), ("affine", AFFINE), ("lighting", LIGHTING), ("pixel", PIXEL), ("crop", CROP)):
        if t in table:
            return kind
    raise UnsupportedTransformError(f"batch_tfms: the batch path cannot apply {_name(rt)!r} ({type(t).__name__}); "
                                    f"expected one of {', '.join(SUPPORTED)}; apply it per item with .transform()")


def check_batch_tfms(tfms: Any) -> List[RandTransform]:
    """`tfms` (None, one `RandTransform` or a list) as a list; refuse what the batch path cannot do.

    Raises
    ------
    UnsupportedTransformError
        A transform that is not one of `SUPPORTED` (named in the message), or not a `RandTransform`.
    """
    out = listify(tfms)
    for rt in out:
        _kind(rt)
    return out


def _affine_grid(h: int, w: int, device: Any) -> torch.Tensor:
    "fastai's ``_affine_grid((1, C, h, w)).flow``: ``(1, h, w, 2)`` float32, x then y in [-1, 1]."
    grid = torch.empty(1, h, w, 2)
    lin = torch.linspace(-1, 1, w) if w > 1 else torch.tensor([-1.])
    grid[..., 0] = torch.ger(torch.ones(h), lin).expand_as(grid[..., 0])
    lin = torch.linspace(-1, 1, h) if h > 1 else torch.tensor([-1.])
    grid[..., 1] = torch.ger(lin, torch.ones(w)).expand_as(grid[..., 1])
    return grid.to(device)


def _corrected(m: np.ndarray, h: int, w: int) -> np.ndarray:
    "Affine matrices `m` ``(k, 3, 3)`` with fastai's ``_affine_mult`` h/w correction for a ``(h, w)`` grid."
    m = m.copy()
    m[:, 0, 1] *= h / w
    m[:, 1, 0] *= w / h
    return m


def _grid(M: np.ndarray, h: int, w: int, device: Any, projective: bool) -> torch.Tensor:
    """The sampling grid ``(k, h, w, 2)`` float32 of the 3×3 maps `M` ``(k, 3, 3)`` applied to fastai's
    ``_affine_grid`` points (x along w, y along h, in [-1, 1]): ``(M[:2] @ (x, y, 1)) / (M[2] @ (x, y, 1))``.

    One matrix per item stands for fastai's chain of coordinate transforms (homographies, each
    normalized, i.e. a product of matrices) and ``_affine_mult``: evaluated from the separable
    base grid straight into the x and y planes of the result, it costs a few passes over the grid
    instead of a batched matmul per transform."""
    g = _affine_grid(h, w, device)[0]
    X, Y = g[0, :, 0].view(1, 1, w), g[:, 0, 1].view(1, h, 1)
    m = torch.from_numpy(M.astype(np.float32)).to(device).view(-1, 3, 3, 1, 1)
    out = torch.empty(len(M), h, w, 2, device=device)
    gx, gy = out[..., 0], out[..., 1]

    def row(r: int, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = m[:, r, 2] + m[:, r, 1] * Y
        return torch.addcmul(base, m[:, r, 0], X) if into is None else torch.addcmul(base, m[:, r, 0], X, out=into)
    row(0, gx)
    row(1, gy)
    if projective:
        inv = row(2).reciprocal_().unsqueeze(-1)
        out.mul_(inv)
    return out


def _reflect_(g: torch.Tensor) -> torch.Tensor:
    """Grid coordinates reflected into [-1, 1] in place, as ``grid_sample(padding_mode='reflection',
    align_corners=True)`` reflects them: sampling the result with ``'border'`` gives the same pixels (up to
    float32 rounding), 2-3x faster on CPU than the reflection kernel. A grid inside [-1, 1] is returned
    as it is; coordinates in [-3, 3] take the one-fold formula ``1 - |2 - |g + 1||``; others the
    general ``reflect_coordinates``."""
    top = float(g.abs().max())
    if top <= 1:
        return g
    if top <= 3:
        return g.add_(1).abs_().sub_(2).abs_().neg_().add_(1)
    t = (g + 1).abs_()
    odd = torch.fmod(torch.floor(t / 2), 2) == 1
    extra = torch.fmod(t, 2)
    return g.copy_(torch.where(odd, 2 - extra, extra).sub_(1))


def _idx(mask: np.ndarray, device: Any) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(mask)).to(device)


# ------------------------------------------------------------------------------------------- the engine
class BatchTfms:
    """fastai transforms for whole batches: draw per-item parameters, apply them to ``(B, C, H, W)``.

    Parameters
    ----------
    tfms : list of fastai `RandTransform`
        E.g. ``get_transforms()[0]``; each of `SUPPORTED`, any arguments and ``p``.
    size : int or (int, int), optional
        Output size, as ``.transform(tfms, size=...)``; with `resize_method` CROP or PAD a
        ``crop_pad()`` is added when `tfms` has none, as fastai does.
    resize_method : fastai ``ResizeMethod``, optional
        Default as fastai: SQUISH for a tuple `size`, CROP otherwise.
    padding_mode : str
        ``'reflection'`` (default), ``'zeros'`` or ``'border'``: for ``grid_sample`` and ``crop_pad``.
    mode : str
        ``'bilinear'`` (default) or ``'nearest'`` sampling of images (masks: always nearest).
    mult : int, optional
        Round `size` to a multiple of `mult`, as fastai.
    seed : int, optional
        Seed of the parameter generator (numpy ``default_rng``); None: drawn from torch's generator on
        first use (so ``torch.manual_seed`` makes runs reproducible).

    Raises
    ------
    UnsupportedTransformError
        A transform the batch path cannot apply (named), or geometry ordered after a pixel transform.
    ArgumentError, ArgumentTypeError
        Bad `size`, `resize_method`, `padding_mode` or `mode`.
    """

    def __init__(self, tfms: Any, size: Any = None, resize_method: Any = None, padding_mode: str = "reflection",
                 mode: str = "bilinear", mult: Optional[int] = None, seed: Optional[int] = None):
        tfms = check_batch_tfms(tfms)
        _check_args(size, resize_method, padding_mode, mode)
        self.size, self.padding_mode, self.mode, self.mult = size, padding_mode, mode, mult
        default = ResizeMethod.SQUISH if (size is not None and is_listy(size)) else ResizeMethod.CROP
        self.resize_method = ResizeMethod(resize_method) if resize_method is not None else default
        if self.resize_method <= 2 and size is not None and "crop_pad" not in [_name(t) for t in tfms]:
            tfms = [T.crop_pad()] + tfms
        self.plan = sorted(tfms, key=lambda o: o.tfm.order)
        self.kinds = [_kind(t) for t in self.plan]
        geo = [k in ("coord", "affine") for k in self.kinds]
        if any(g and not a for a, g in zip(geo, geo[1:])):
            first = self.plan[geo.index(False)]
            raise UnsupportedTransformError(f"batch_tfms: expected every coord/affine transform before lighting, pixel "
                                            f"and crop transforms (fastai's default orders), found one after "
                                            f"{_name(first)!r} (custom order=); use per-item .transform()")
        self.seed = seed
        self.rng = None if seed is None else np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (f"BatchTfms([{', '.join(_name(t) for t in self.plan)}], size={self.size!r}, "
                f"resize_method={self.resize_method.name}, padding_mode={self.padding_mode!r})")

    def tfmargs(self) -> Dict[str, Any]:
        "The keywords of ``Image.apply_tfms`` equivalent to this engine's settings."
        return dict(size=self.size, resize_method=self.resize_method, padding_mode=self.padding_mode, mode=self.mode,
                    mult=self.mult)

    def draw(self, n: int) -> Draws:
        "Parameters of every planned transform for `n` items, with fastai's distributions and probabilities."
        if self.rng is None:
            self.rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,))))
        return Draws(n, [_resolve(rt, n, self.rng) for rt in self.plan])

    def __call__(self, x: torch.Tensor, mask: bool = False) -> torch.Tensor:
        "Draw parameters for the items of `x` and apply them (see `apply`)."
        return self.apply(x, self.draw(len(x)), mask)

    def apply(self, x: torch.Tensor, draws: Draws, mask: bool = False) -> torch.Tensor:
        """Apply `draws` to the batch `x`: float ``(B, C, H, W)`` in [0, 1] (uint8: divided by 255 first).

        Returns a new float32 tensor ``(B, C, H', W')`` on `x`'s device. With `mask`, `x` holds class
        codes (any dtype, e.g. int64 ``(B, 1, H, W)``): geometric transforms only (``use_on_y``), nearest
        sampling, returned as int64.

        Raises
        ------
        ItemShapeError-like `ArgumentError`
            `x` is not 4-d or `draws` is for another batch size.
        """
        if x.dim() != 4 or len(x) != draws.n:
            raise ArgumentError(f"batch_tfms: expected a (B, C, H, W) batch of {draws.n} items, found shape "
                                f"{tuple(x.shape)}")
        owned = x.dtype != torch.float32   # a converted copy may be changed in place; the caller's tensor never
        if x.dtype == torch.uint8 and not mask:
            x = x.to(torch.float32).div_(255.)
        else:
            x = x.to(torch.float32)
        out = _Run(self, x, draws, mask, owned).run()
        return out.long() if mask else out


class _Run:
    "One application of a `BatchTfms` to one batch: fastai's lazy per-item state, kept for all items at once."

    def __init__(self, eng: BatchTfms, x: torch.Tensor, draws: Draws, mask: bool, owned: bool):
        self.e, self.x, self.d, self.mask = eng, x, draws, mask
        self.n, c, h, w = x.shape
        self.dev = x.device
        size, rm = eng.size, eng.resize_method
        self.target, resized = (h, w), False
        self.crop_size = (h, w)
        if size is not None:
            ct = _get_crop_target(size, mult=eng.mult)
            self.crop_size = ct
            if rm in (ResizeMethod.CROP, ResizeMethod.PAD):
                ratio = (min if rm == ResizeMethod.CROP else max)(h / ct[0], w / ct[1])
                self.target = (int(round(h / ratio)), int(round(w / ratio)))
            elif rm == ResizeMethod.SQUISH:
                self.target = tuple(ct)
            resized = (c,) + tuple(self.target) != (c, h, w)
        eye = np.broadcast_to(np.eye(3), (self.n, 3, 3))
        self.M, self.P = eye.copy(), eye.copy()   # per item: the flow's map of the base grid; the pending affine
        self.flow_set = np.full(self.n, resized)
        self.aff_set = np.zeros(self.n, bool)
        self.projective = False
        self.light: Optional[Tuple[np.ndarray, np.ndarray]] = None   # pending lighting: (mul, add) per item
        self.sampled, self.owned = False, owned

    def take(self, t: torch.Tensor, sel: np.ndarray) -> torch.Tensor:
        "Items `sel` (bool ``(n,)``) of `t`: `t` itself when all are selected, else a gathered copy."
        return t if sel.all() else t[_idx(sel, self.dev)]

    def put(self, t: torch.Tensor, sel: np.ndarray, v: torch.Tensor) -> torch.Tensor:
        "`t` with items `sel` replaced by `v` (`v` itself when all are selected)."
        if sel.all():
            return v
        if t is self.x and not self.owned:
            t, self.owned = t.clone(), True
        t[_idx(sel, self.dev)] = v
        return t

    def run(self) -> torch.Tensor:
        for rt, kind, d in zip(self.e.plan, self.e.kinds, self.d.drawn):
            if self.mask and not rt.use_on_y:
                continue
            if kind in ("coord", "affine"):
                if d.run.any():
                    self._geometry(kind, rt, d)
                continue
            self._sample()
            if kind == "lighting":
                if not self.mask and d.run.any():
                    self._lighting(rt, d)
            elif kind == "pixel":
                if d.run.any():
                    self._sigmoid(d.run)
                    self.x = self.put(self.x, d.run, PIXEL[rt.tfm](self.take(self.x, d.run), d, self.n, d.run))
            elif self.e.resize_method in (ResizeMethod.CROP, ResizeMethod.PAD):
                self._crop(d)
        self._sample()
        self._sigmoid(np.ones(self.n, bool))
        return self.x

    def _geometry(self, kind: str, rt: RandTransform, d: Drawn) -> None:
        "Compose an affine matrix into the pending one, or a homography into the flow's map (fastai's lazy order)."
        run = d.run
        if kind == "affine":
            self.P[run] = self.P[run] @ AFFINE[rt.tfm](d, self.n)[run].astype(np.float32).astype(np.float64)
            self.aff_set |= run
            return
        self._flush_affine(run)   # fastai's flow getter applies a pending affine matrix first
        targ = COORD[rt.tfm](d, self.n)[run]
        inv = np.broadcast_to(np.asarray(d.get("invert", self.n), bool), (self.n,))[run]
        orig = np.repeat(_ORIG[None], len(targ), 0)
        o, t = np.where(inv[:, None, None], targ, orig), np.where(inv[:, None, None], orig, targ)
        self.M[run] = _coeffs(o, t).double().numpy() @ self.M[run]
        self.flow_set |= run
        self.projective = True

    def _flush_affine(self, sel: np.ndarray) -> None:
        pend = sel & self.aff_set
        if pend.any():
            self.M[pend] = _corrected(self.P[pend], *self.target) @ self.M[pend]
            self.P[pend] = np.eye(3)
            self.aff_set &= ~pend
            self.flow_set |= pend

    def _sample(self) -> None:
        "fastai's ``refresh`` for the items with pending geometry: one ``grid_sample`` (two with the area hack)."
        if self.sampled:
            return
        self.sampled = True
        G = self.flow_set | self.aff_set
        if not G.any():
            return
        self._flush_affine(G)
        ho, wo = self.target
        coords = _grid(self.M, ho, wo, self.dev, self.projective)   # identity rows for items without geometry
        x = self.x
        n, c, h, w = x.shape
        mode = "nearest" if self.mask else self.e.mode
        pad = self.e.padding_mode
        shrink = np.zeros(n, bool)
        d = min(h / ho, w / wo) / 2
        if mode == "bilinear" and d > 1:   # fastai's _grid_sample: area pre-shrink when resizing down > 2x
            corners = coords[:, [0, -1]][:, :, [0, -1]]   # a projective map of a rectangle has its extremes there
            span = (corners.amax(dim=(1, 2, 3)) - corners.amin(dim=(1, 2, 3))).tolist()
            shrink = np.array([d > 1 / s * 2 for s in span], bool) & G
        if pad == "reflection" and mode == "bilinear":
            coords, pad = _reflect_(coords), "border"
        kw = dict(mode=mode, padding_mode=pad, align_corners=True)
        if not shrink.any():
            out = F.grid_sample(x, coords, **kw)
        else:
            out = x.new_empty(n, c, ho, wo)
            for sel in (shrink, ~shrink):
                if sel.any():
                    sub = _Sub(sel, self.dev)
                    xs = sub.take(x)
                    if sel is shrink:
                        xs = F.interpolate(xs, scale_factor=1 / d, mode="area")
                    out = sub.put(out, F.grid_sample(xs, sub.take(coords), **kw))
        if not G.all():   # not resized (same shape): items without geometry keep their pixels, bit for bit
            keep = _idx(~G, self.dev)
            out[keep] = x[keep]
        self.x, self.owned = out, True

    def _lighting(self, rt: RandTransform, d: Drawn) -> None:
        """fastai's ``Image.lighting``: in logit space, ``add`` then ``mul`` per item.

        The transforms of a batch compose into one per-item map of the logits, ``x * mul + add``
        (float64 coefficients), applied when the batch leaves logit space (`_sigmoid`): one logit, two
        passes and one sigmoid whatever the number of lighting transforms. Items whose transform does not
        run get ``+ 0`` and ``* 1`` (exact). An item on which no lighting runs at all makes the
        logit/sigmoid round trip fastai skips: within 1e-6 of its pixels."""
        add, mul = LIGHTING[rt.tfm](d, self.n)
        add = np.where(d.run, np.asarray(add, np.float64), 0.)
        mul = np.where(d.run, np.asarray(mul, np.float64), 1.)
        m, b = self.light if self.light is not None else (np.ones(self.n), np.zeros(self.n))
        self.light = (m * mul, (b + add) * mul)

    def _sigmoid(self, sel: np.ndarray) -> None:
        "Leave logit space (fastai's ``refresh``): the whole batch, at the first pixel op or at the end."
        if self.light is None:
            return
        (m, b), self.light = self.light, None
        x = self.x.logit_(LOGIT_EPS) if self.owned else torch.logit(self.x, LOGIT_EPS)   # fastai's logit_ clamp
        if (m != 1).any():
            x.mul_(torch.from_numpy(m.astype(np.float32)).to(self.dev).view(-1, 1, 1, 1))
        if (b != 0).any():
            x.add_(torch.from_numpy(b.astype(np.float32)).to(self.dev).view(-1, 1, 1, 1))
        self.x, self.owned = x.sigmoid_(), True

    def _crop(self, d: Drawn) -> None:
        "fastai's ``crop_pad`` (size, padding_mode from the engine; row_pct/col_pct per item)."
        run = d.run
        self._sigmoid(run)
        rows, cols = self.crop_size
        n, c, h, w = self.x.shape
        if not run.any() or (h, w) == (rows, cols):
            return
        if not run.all():
            raise UnsupportedTransformError(f"crop_pad: expected it to run on every item of a batch (p=1.), found "
                                            f"p={d.rt.p}: items would leave it with different sizes")
        x = self.x
        if h < rows or w < cols:
            rp, cp = max((rows - h + 1) // 2, 0), max((cols - w + 1) // 2, 0)
            x = F.pad(x, (cp, cp, rp, rp), mode=PAD_MODES[self.e.padding_mode])
            h, w = x.shape[-2:]
        rpct = np.asarray(d.get("row_pct", n), np.float64).copy()
        cpct = np.asarray(d.get("col_pct", n), np.float64).copy()
        rpct[rpct == 1.] -= 1e-7   # fastai's _minus_epsilon
        cpct[cpct == 1.] -= 1e-7
        r0 = [int((h - rows + 1) * p) for p in rpct.tolist()]
        c0 = [int((w - cols + 1) * p) for p in cpct.tolist()]
        if len(set(r0)) == 1 and len(set(c0)) == 1:
            self.x = x[:, :, r0[0]:r0[0] + rows, c0[0]:c0[0] + cols].contiguous()
            return
        ri = (torch.tensor(r0, device=self.dev)[:, None] + torch.arange(rows, device=self.dev))[:, :, None]
        ci = (torch.tensor(c0, device=self.dev)[:, None] + torch.arange(cols, device=self.dev))[:, None, :]
        b = torch.arange(n, device=self.dev)[:, None, None]
        self.x = x.permute(0, 2, 3, 1)[b, ri, ci].permute(0, 3, 1, 2).contiguous()


class _Sub:
    "Take/put of a subset of the items of a gathered batch (same rules as `_Run.take`/`put`)."

    def __init__(self, sel: np.ndarray, dev: Any):
        self.sel, self.all = sel, bool(sel.all())
        self.i = None if self.all else _idx(sel, dev)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.all else t[self.i]

    def put(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.all:
            return v
        t[self.i] = v
        return t


def _check_args(size: Any, resize_method: Any, padding_mode: Any, mode: Any) -> None:
    "Refuse bad engine settings, typed, expected vs found."
    if size is not None:
        vals = list(size) if is_listy(size) else [size]
        if len(vals) not in (1, 2) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                for v in vals):
            raise ArgumentTypeError(f"size: expected None, an int or (int, int), found {size!r:.50}")
        if any(v < 1 for v in vals):
            raise ArgumentError(f"size: expected values >= 1, found {size!r:.50}")
    if resize_method is not None:
        try:
            ResizeMethod(resize_method)
        except (ValueError, TypeError):
            raise ArgumentError(f"resize_method: expected a fastai ResizeMethod (CROP, PAD, SQUISH, NO), found "
                                f"{resize_method!r:.50}") from None
    if padding_mode not in PAD_MODES:
        raise ArgumentError(f"padding_mode: expected one of {sorted(PAD_MODES)}, found {padding_mode!r:.50}")
    if mode not in ("bilinear", "nearest"):
        raise ArgumentError(f"mode: expected 'bilinear' or 'nearest', found {mode!r:.50}")


# ------------------------------------------------------------------------------------------- data bunch hook
class BatchAugment:
    """fastai *dl_tfm* running a `BatchTfms` on batches ``(x, y)`` already on the device.

    `x` (uint8 or float ``(B, C, H, W)``) becomes the transformed float32 batch; with `tfm_y`, a
    mask batch `y` (``(B, 1, H, W)`` codes of `x`'s height and width) gets the same geometric
    transforms (nearest) and stays int64; any other `y` passes unchanged.
    """

    def __init__(self, tfms: BatchTfms, tfm_y: bool = False):
        self.tfms, self.tfm_y = tfms, bool(tfm_y)

    def __repr__(self) -> str:
        return f"BatchAugment({self.tfms!r}, tfm_y={self.tfm_y})"

    def __call__(self, b: Sequence[Any]) -> Tuple[Any, Any]:
        x, y = b
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ArgumentError(f"batch_tfms: expected image batches (B, C, H, W), found "
                                f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}; images of one "
                                "batch must share one size (resize them when loading, e.g. load_data(size=))")
        d = self.tfms.draw(len(x))
        out = self.tfms.apply(x, d)
        if self.tfm_y and isinstance(y, torch.Tensor) and y.dim() == 4 and y.shape[-2:] == x.shape[-2:]:
            y = self.tfms.apply(y, d, mask=True)
        return out, y


def _insert(dl: Any, hook: BatchAugment) -> None:
    "Put `hook` in ``dl.tfms`` right after `to_float_tfm` (uint8 batches), else first: always before normalize."
    from ..data.device import to_float_tfm
    tfms = [t for t in listify(dl.tfms) if not isinstance(t, BatchAugment)]
    at = tfms.index(to_float_tfm) + 1 if to_float_tfm in tfms else 0
    dl.tfms = tfms[:at] + [hook] + tfms[at:]


def attach(data: Any, train: BatchTfms, valid: BatchTfms, tfm_y: bool = False) -> Any:
    """Run `train` on the training loaders (``train_dl``, ``fix_dl``) and `valid` on the others
    (``valid_dl``, ``single_dl`` for ``predict``, ``test_dl``) of the fastai `DataBunch` `data`.

    Each loader gets a `BatchAugment` after ``to_float_tfm`` and before ``normalize``; an earlier one
    is replaced. ``learn.export()`` then records `valid` as the validation set's per-item
    ``tfms``/``tfmargs``, so ``load_learner(...).predict`` applies the validation transforms as
    fastai does. Returns `data` (changed in place), with ``data.batch_tfms = (train, valid)``.
    """
    for dl, eng in ((data.train_dl, train), (data.fix_dl, train), (data.valid_dl, valid),
                    (getattr(data, "single_dl", None), valid), (data.test_dl, valid)):
        if dl is not None:
            _insert(dl, BatchAugment(eng, tfm_y))
    data.batch_tfms = (train, valid)
    data.valid_ds._batch_export = (list(valid.plan), {k: v for k, v in valid.tfmargs().items() if v is not None},
                                   bool(tfm_y))
    return data


_OPTIONS = ("size", "resize_method", "padding_mode", "mode", "mult", "batch_tfm_y", "batch_seed")


def _engines(lls: Any, tfms: Any, opts: Dict[str, Any]) -> Tuple[BatchTfms, BatchTfms, bool]:
    "Validated `(train, valid, tfm_y)` for ``lls.databunch(batch_tfms=tfms, **opts)``."
    from fastai.vision.data import ImageList, SegmentationLabelList
    from .images import MemmapSegmentationLabelList
    if not (is_listy(tfms) and len(tfms) == 2):
        raise ArgumentTypeError(f"batch_tfms: expected a (train, valid) pair of transform lists, as .transform() "
                                f"takes (e.g. get_transforms()), found {type(tfms).__name__} {tfms!r:.60}")
    if not isinstance(lls.train.x, ImageList):
        raise ArgumentTypeError(f"batch_tfms: expected image lists (ImageList, MemmapImageList, ImageListInMemory), "
                                f"found {type(lls.train.x).__name__}")
    for ds in lls.lists:
        if ds.tfms or ds.tfmargs:
            raise ArgumentError("batch_tfms: expected no per-item transforms, found .transform() already applied; "
                                "use one of .transform(tfms, size=...) (per item) or databunch(batch_tfms=...)")
    tfm_y = opts.pop("batch_tfm_y", None)
    if tfm_y is None:
        tfm_y = isinstance(lls.train.y, (SegmentationLabelList, MemmapSegmentationLabelList))
    seed = opts.pop("batch_seed", None)
    train = BatchTfms(tfms[0], seed=seed, **opts)
    valid = BatchTfms(tfms[1], seed=None if seed is None else seed + 1, **opts)
    return train, valid, bool(tfm_y)


_PATCHED: Dict[str, Any] = {}


def _databunch(self: Any, *args: Any, **kwargs: Any) -> Any:
    "`LabelLists.databunch`, plus ``batch_tfms=(train, valid)`` with ``size``, ``resize_method``, ``padding_mode``."
    if kwargs.get("batch_tfms") is None:
        kwargs.pop("batch_tfms", None)
        return _PATCHED["databunch"](self, *args, **kwargs)
    tfms = kwargs.pop("batch_tfms")
    opts = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    train, valid, tfm_y = _engines(self, tfms, opts)
    for ds in self.lists:   # uint8 batches where the list can deliver them: 4x fewer bytes, equal values
        if hasattr(ds.x, "uint8"):
            ds.x.uint8 = True
    return attach(_PATCHED["databunch"](self, *args, **kwargs), train, valid, tfm_y)


def _get_state(self: Any, **kwargs: Any) -> Dict[str, Any]:
    "`LabelList.get_state`; a validation set of ``databunch(batch_tfms=...)`` exports its batch tfms as per-item tfms."
    state = _PATCHED["get_state"](self, **kwargs)
    ex = getattr(self, "_batch_export", None)
    if ex is not None:
        tfms, args, tfm_y = ex
        state.update(tfms=tfms, tfmargs=dict(args))
        if tfm_y:
            state.update(tfm_y=True, tfms_y=[t for t in tfms if getattr(t, "use_on_y", True)], tfmargs_y=dict(args))
    return state


def install() -> None:
    """Add ``batch_tfms=`` to fastai's ``LabelLists.databunch`` and its export to ``LabelList.get_state``.

    Idempotent; calls without ``batch_tfms`` behave exactly as before. fastai_memmap's ``__init__``
    calls it once.
    """
    from fastai.data_block import LabelList, LabelLists
    if "databunch" not in _PATCHED:
        _PATCHED["databunch"], _PATCHED["get_state"] = LabelLists.databunch, LabelList.get_state
        _databunch.__wrapped__, _get_state.__wrapped__ = _PATCHED["databunch"], _PATCHED["get_state"]
        LabelLists.databunch, LabelList.get_state = _databunch, _get_state
