"""Statistics of columns too big for RAM, computed from values staged on disk and re-read in blocks.

- `Scratch`: raw columns appended chunk by chunk to plain files, re-read in blocks of rows (no mmap,
  so RSS stays flat).
- `Moments`: count, mean and sum of squared deviations (ddof=1 std) merged block by block in float64
  (Chan, Golub, LeVeque); with fixed blocks the result does not depend on how the source was chunked
  and agrees with pandas to about 1e-15 relative.
- `medians`: the *exact* median (pandas' definition: mean of the two middle values for an even count).
  Floats map to order-preserving uint64 keys (`_float_keys`); `_RankSelector` finds a rank by radix
  selection, `RADIX_BITS` bits of the key a pass, until the keys sharing the fixed prefix fit the RAM
  budget; one last pass collects them and ``np.partition`` finishes. Typically 1 or 2 extra reads.
"""
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import FormatError

__all__: List[str] = []      # internal to the tabular converter

RADIX_BITS = 16              # bits of a float64 key resolved per selection pass: 65536 counters
_SIGN = np.uint64(1 << 63)


class Moments:
    "Count, mean and sum of squared deviations per column, merged chunk by chunk (Chan, Golub, LeVeque)."

    def __init__(self, k: int):
        self.n, self.mean, self.m2 = np.zeros(k), np.zeros(k), np.zeros(k)

    def add(self, j: int, x: np.ndarray) -> None:
        if len(x):
            mb = x.mean()
            self.merge(j, len(x), mb, float(((x - mb) ** 2).sum()))

    def merge(self, j: int, nb: float, mb: float, m2b: float) -> None:
        na = self.n[j]
        n = na + nb
        d = mb - self.mean[j]
        self.mean[j] += d * nb / n
        self.m2[j] += m2b + d * d * na * nb / n
        self.n[j] = n

    def std(self, j: int) -> float:
        return float(np.sqrt(self.m2[j] / (self.n[j] - 1))) if self.n[j] > 1 else float("nan")


def _float_keys(x: np.ndarray) -> np.ndarray:
    "Order-preserving map of non-NaN float64 to uint64: a < b  <=>  key(a) < key(b)."
    b = x.view(np.uint64)
    return np.where(b >> np.uint64(63) == 1, ~b, b | _SIGN)


def _key_float(k: np.uint64) -> float:
    b = np.uint64(k)
    b = b & ~_SIGN if b >> np.uint64(63) == 1 else ~b
    return float(np.array([b], np.uint64).view(np.float64)[0])


class _RankSelector:
    """Exact `k`-th smallest (0-based) of `n` uint64 keys streamed in passes, at most `budget` kept in RAM.

    Each histogram pass fixes the next `RADIX_BITS` bits of the answer; once the keys sharing the fixed
    prefix number at most `budget`, one last pass collects them and ``np.partition`` finishes.
    """

    def __init__(self, k: int, n: int, budget: int):
        self.k, self.n, self.budget = k, n, budget
        self.prefix, self.bits, self.result = np.uint64(0), 0, None
        self._start()

    def _start(self) -> None:
        self.collect = self.n <= self.budget
        self.parts: List[np.ndarray] = []
        self.hist = np.zeros(1 << RADIX_BITS, np.int64)

    def feed(self, keys: np.ndarray) -> None:
        if self.bits:
            keys = keys[keys >> np.uint64(64 - self.bits) == self.prefix]
        if self.collect:
            self.parts.append(keys)
        else:
            digit = (keys >> np.uint64(64 - self.bits - RADIX_BITS)) & np.uint64((1 << RADIX_BITS) - 1)
            self.hist += np.bincount(digit.astype(np.intp), minlength=1 << RADIX_BITS)

    def end_pass(self) -> bool:
        "Finish a pass; True once `result` (a uint64 key) is known."
        if self.collect:
            a = np.concatenate(self.parts)
            self.result = np.partition(a, self.k)[self.k]
            return True
        cum = np.cumsum(self.hist)
        b = int(np.searchsorted(cum, self.k, side="right"))
        self.k -= int(cum[b - 1]) if b else 0
        self.n = int(self.hist[b])
        self.prefix = (self.prefix << np.uint64(RADIX_BITS)) | np.uint64(b)
        self.bits += RADIX_BITS
        if self.bits == 64:          # every remaining key equals the prefix
            self.result = self.prefix
            return True
        self._start()
        return False


# ------------------------------------------------------------------------------------------ staging
class Scratch:
    "Raw columns of the first pass in plain files, appended per chunk and re-read in row chunks (no mmap: RSS stays flat)."

    def __init__(self, folder: Path, layout: Dict[str, Tuple[Any, Optional[int]]]):
        "`layout`: name -> (dtype, columns), columns None for a 1-d array."
        self.layout = {k: (np.dtype(d), w) for k, (d, w) in layout.items()}
        self.files = {k: open(folder / f"_scratch_{k}.bin", "x+b") for k in layout}
        self.rows = 0

    def append(self, n: int, **arrays: np.ndarray) -> None:
        for k, a in arrays.items():
            dt, w = self.layout[k]
            a = np.ascontiguousarray(a, dtype=dt)
            if a.size:
                self.files[k].write(memoryview(a).cast("B"))
        self.rows += n

    def chunks(self, names: Sequence[str], rows: int) -> Iterator[Tuple[np.ndarray, ...]]:
        for k in names:
            self.files[k].flush()
            self.files[k].seek(0)
        for start in range(0, self.rows, rows):
            n = min(rows, self.rows - start)
            yield tuple(self._read(k, n) for k in names)

    def _read(self, k: str, n: int) -> np.ndarray:
        dt, w = self.layout[k]
        a = np.empty((n,) if w is None else (n, w), dt)
        if a.size and self.files[k].readinto(memoryview(a).cast("B")) != a.nbytes:
            raise FormatError(f"{self.files[k].name}: staged file shorter than {self.rows} rows (disk full?)")
        return a

    def close(self) -> None:
        for f in self.files.values():
            f.close()
            os.unlink(f.name)


def medians(scratch: Scratch, counts: Dict[int, int], budget: int, block_rows: int) -> Dict[int, float]:
    """Exact medians (pandas' definition) of the non-NaN training values of staged columns `counts` (col -> n).

    Reads ``conts`` and ``train`` of `scratch` `block_rows` rows at a time; keeps at most `budget` keys
    per selected rank in RAM.
    """
    sel = {j: [_RankSelector(k, n, budget) for k in ((n // 2,) if n % 2 else (n // 2 - 1, n // 2))]
           for j, n in counts.items()}
    active = dict(sel)
    while active:
        for raw, train in scratch.chunks(("conts", "train"), block_rows):
            t = train.astype(bool)
            for j, ss in active.items():
                x = raw[t, j]
                keys = _float_keys(x[~np.isnan(x)])
                for s in ss:
                    if s.result is None:
                        s.feed(keys)
        for j in list(active):
            done = [s.end_pass() if s.result is None else True for s in active[j]]
            if all(done):
                del active[j]
    return {j: float(np.mean([_key_float(s.result) for s in ss])) for j, ss in sel.items()}
