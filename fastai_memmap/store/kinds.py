"""The registry of store kinds: which reader opens, and which writer writes, a manifest's ``kind``.

The dense kind lives in `fastai_memmap.store.reader` / `fastai_memmap.store.writer`; other kinds
(``"ragged"``, ``"sparse"``) register themselves when their module is imported, which
`fastai_memmap.store` does on import. So `MemmapArray.open` and ``MemmapWriter(kind=...)`` choose a
class without importing their own subclasses.

To add a kind: write its reader (a `MemmapArray` subclass with an ``_open(path, manifest, max_open,
validate)`` classmethod) and its writer (a `MemmapWriter` subclass), describe its manifest fields in
`fastai_memmap.store.format`, call `register_kind` at the end of its module, and import that module
in ``fastai_memmap/store/__init__.py``.
"""
from typing import Any, Callable, Dict, Tuple

from ..errors import ArgumentError

__all__ = ["register_kind", "reader_for", "writer_for", "registered_kinds"]

_READERS: Dict[str, Callable[..., Any]] = {}
_WRITERS: Dict[str, type] = {}


def register_kind(kind: str, opener: Callable[..., Any], writer: type) -> None:
    """Register store `kind` (a manifest ``kind`` string).

    `opener(path, manifest, max_open=..., validate=...)` returns the opened array; `writer` is the
    `MemmapWriter` subclass that writes the kind. Registering a kind again replaces it (a module
    reloaded). Raises ``ArgumentError`` for an empty or non-string `kind`.
    """
    if not isinstance(kind, str) or not kind:
        raise ArgumentError(f"kind: expected a non-empty string, found {kind!r}")
    _READERS[kind] = opener
    _WRITERS[kind] = writer


def registered_kinds() -> Tuple[str, ...]:
    "The registered kinds other than ``'dense'``, sorted (a tuple of str)."
    return tuple(sorted(_READERS))


def _unknown(kind: str) -> ArgumentError:
    known = ", ".join(repr(k) for k in ("dense", *registered_kinds()))
    return ArgumentError(f"kind: expected one of {known}, found {kind!r}")


def reader_for(kind: str) -> Callable[..., Any]:
    "The opener registered for `kind` (not ``'dense'``). Raises ``ArgumentError`` for an unregistered kind."
    try:
        return _READERS[kind]
    except (KeyError, TypeError):
        raise _unknown(kind) from None


def writer_for(kind: str) -> type:
    "The writer class registered for `kind` (not ``'dense'``). Raises ``ArgumentError`` for an unregistered kind."
    try:
        return _WRITERS[kind]
    except (KeyError, TypeError):
        raise _unknown(kind) from None
