"""Checks of the arguments users pass to samplers and loaders (numpy only): typed errors that say
what was expected and what was found, raised where the argument enters."""
from typing import Any, Optional

import numpy as np

from .errors import ArgumentError, ArgumentTypeError

__all__ = ["check_int", "check_positive", "check_rank", "check_seed", "SEED_LIMIT"]

SEED_LIMIT = 2 ** 63            # seeds in [0, SEED_LIMIT): each gives its own order (none wraps onto another)


def check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    "`value` as an int in ``[lo, hi)``: ``ArgumentTypeError`` for a non-int (bools too), ``ArgumentError`` out of range."
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"expected {name} to be an int, found {value!r:.100} ({type(value).__name__})")
    if value < lo or (hi is not None and value >= hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ArgumentError(f"expected {name} {bound}, found {value}")
    return int(value)


def check_positive(name: str, value: Any) -> int:
    "`value` as an int >= 1 (see `check_int`)."
    return check_int(name, value, 1)


def check_rank(num_replicas: Any, rank: Any) -> None:
    "Refuse `num_replicas` < 1 or `rank` outside ``[0, num_replicas)`` (typed, as `check_int`)."
    check_int("rank", rank, 0, check_positive("num_replicas", num_replicas))


def check_seed(seed: Any, num_replicas: int) -> Optional[int]:
    """`seed` as an int in ``[0, SEED_LIMIT)``, or None (one process only: each rank would draw its own
    seed, so their parts of the epoch would overlap and miss rows)."""
    if seed is None:
        if num_replicas > 1:
            raise ArgumentError(f"seed: expected an int shared by every rank with num_replicas={num_replicas}, found "
                                "None (each rank would draw its own order: parts overlap and rows are missed); "
                                "pass the same seed=... on every rank")
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)) and not 0 <= seed < SEED_LIMIT:
        raise ArgumentError(f"seed: expected an int in [0, 2**63), found {seed}; a seed outside would wrap onto "
                            "another seed's order")
    return check_int("seed", seed, 0, SEED_LIMIT)
