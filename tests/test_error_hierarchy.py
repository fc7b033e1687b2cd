"""Every error the package raises is typed: a subclass of `MemmapError` and of a builtin (issue 12, item 8).

Walks every ``raise`` in the package source (AST) and fails on a plain builtin exception or the bare
base class. Re-raises (``raise``, ``raise e``) and raises of our own classes pass.
"""
import ast
import builtins
import inspect
from pathlib import Path

import pytest

import fastai_memmap
from fastai_memmap import errors

PACKAGE = Path(fastai_memmap.__file__).parent
BUILTIN_ERRORS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}


PROTOCOL = {"__getattr__": "AttributeError", "missing": "AttributeError", "__next__": "StopIteration"}


def raised_names(tree: ast.AST):
    """(line, name) of each ``raise Name(...)`` / ``raise Name``, where Name is a class, not a caught variable.
    Python's own protocols are exempt: ``AttributeError`` for a dunder name in a module ``__getattr__``
    (or its helper ``missing``), ``StopIteration`` in ``__next__``."""
    exempt = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in PROTOCOL:
            exempt |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
                       and getattr(n.exc.func, "id", None) == PROTOCOL[fn.name]}
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and (exc.id[:1].isupper() or exc.id in BUILTIN_ERRORS):
                yield node.lineno, exc.id
            elif isinstance(exc, ast.Attribute):
                yield node.lineno, exc.attr


def test_no_plain_builtin_or_bare_base_class_raised():
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for line, name in raised_names(ast.parse(f.read_text(), str(f))):
            if name in BUILTIN_ERRORS or name == "MemmapError":
                bad.append(f"{f.relative_to(PACKAGE)}:{line}: raise {name}")
    assert not bad, "untyped raise sites:\n" + "\n".join(bad)


def test_walker_sees_untyped_raises():
    "The walker itself finds what it must refuse (else the test above could not fail)."
    src = "def f(e):\n    raise ValueError('x')\n\ndef g():\n    raise MemmapError('y')\n\ndef h(e):\n    raise e\n"
    assert [n for _, n in raised_names(ast.parse(src))] == ["ValueError", "MemmapError"]


@pytest.mark.parametrize("cls", [c for _, c in inspect.getmembers(errors, inspect.isclass)
                                 if issubclass(c, errors.MemmapError) and c is not errors.MemmapError])
def test_every_error_class_is_also_a_builtin(cls):
    assert any(issubclass(cls, getattr(builtins, b)) for b in BUILTIN_ERRORS if b not in ("Exception", "BaseException"))
