"""Lossless casting of incoming rows to a store's dtype (numpy only).

A writer's default ``casting="lossless"`` lets a batch into a store of another dtype only if no
value changes, with two exceptions users expect: floats rounded into a narrower float (float64 →
float32: the nearest representable value) and integers rounded into a float. Refused, with the
first offending row named:

- integers outside the store dtype's range (int64 300 into int8 would store 44);
- floats with a fractional part, NaN or ±inf into an integer or bool store;
- complex values with a non-zero imaginary part into a real store;
- finite values that overflow to ±inf in a narrower float (1e300 into float32);
- anything but 0 and 1 into a bool store.

The other names of `CASTINGS` are numpy's own rules (``ndarray.astype(casting=...)``), for users who
want them.
"""
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ItemShapeError, LossyCastError

__all__ = ["CASTINGS", "cast_rows", "changed_values"]

CASTINGS = ("lossless", "no", "equiv", "safe", "same_kind", "unsafe")


def cast_rows(batch: Any, dtype: np.dtype, item_shape: Sequence[int], casting: str, where: str,
              first_row: int = 0) -> np.ndarray:
    """`batch` as a C-contiguous array of shape ``(n, *item_shape)`` and `dtype`.

    A view of `batch` when it already has that dtype and layout, else a copy. `first_row` is the
    store row of ``batch[0]`` (for messages). Raises ``ItemShapeError`` for another shape, ragged
    nested lists or non-numeric values; ``LossyCastError`` when the cast would change a value under
    ``casting="lossless"``, or numpy refuses it under another rule.
    """
    try:
        a = np.asarray(batch)
    except (ValueError, TypeError) as e:   # ragged nested lists: numpy refuses an inhomogeneous shape
        raise ItemShapeError(f"{where}: expected a batch of shape (n, *{tuple(item_shape)}), found something numpy "
                             f"cannot make one array of ({e})") from None
    if a.ndim != len(item_shape) + 1 or a.shape[1:] != tuple(item_shape):
        raise ItemShapeError(f"{where}: expected a batch of shape (n, {', '.join(map(str, item_shape))}) "
                             f"-- (n, *item_shape) -- found {a.shape}")
    if a.dtype.kind not in "biufc":
        raise ItemShapeError(f"{where}: expected numeric values castable to {dtype}, found dtype {a.dtype}")
    if casting != "lossless":
        try:
            return np.ascontiguousarray(a.astype(dtype, casting=casting, copy=False))
        except TypeError as e:
            raise LossyCastError(f"{where}: expected values castable to {dtype} under casting={casting!r}, "
                                 f"found {a.dtype} ({e})") from None
    bad = changed_values(a, dtype)
    if bad is not None and bad.any():
        row = int(np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))[0])
        value = a[row].flat[int(np.flatnonzero(bad[row].ravel())[0])] if a[row].ndim else a[row]
        raise LossyCastError(f"{where}: row {first_row + row}: expected values that {dtype} holds exactly, found "
                             f"{value!r} ({a.dtype}) which would be stored as another value; convert it yourself "
                             f"or pass casting='unsafe' to accept numpy's cast")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(a.astype(dtype, copy=False))


def changed_values(a: np.ndarray, dtype: np.dtype) -> Optional[np.ndarray]:
    """Boolean mask (shape of `a`) of the elements whose value a cast to `dtype` would change, or None
    where none can (numpy's ``can_cast(..., 'safe')``). Float rounding is not a change (see module)."""
    dtype, src = np.dtype(dtype), a.dtype
    if np.can_cast(src, dtype, "safe"):
        return None
    bad = np.zeros(a.shape, bool)
    real = a
    if src.kind == "c" and dtype.kind != "c":
        bad |= a.imag != 0
        real = a.real
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype.kind in "fc":
            parts = (real.real, real.imag) if real.dtype.kind == "c" else (real,)
            for part in parts:   # finite values must stay finite (a narrower float may overflow)
                bad |= np.isinf(part.astype(dtype.type(0).real.dtype)) & np.isfinite(part)
        elif dtype.kind == "b":
            bad |= (real != 0) & (real != 1)
        else:
            info = np.iinfo(dtype)
            if real.dtype.kind in "iu":
                bad |= real > info.max
                if real.dtype.kind == "i":
                    bad |= real < info.min
            elif real.dtype.kind == "f":   # bounds are exact powers of two as floats: compare without rounding
                bad |= ~np.isfinite(real) | (real != np.floor(real))
                bad |= (real < float(info.min)) | (real >= float(info.max + 1))
    return bad
