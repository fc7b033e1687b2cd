"""Decoding images in parallel, and converting image files to stores: `images_to_memmap`.

This is the decode stage shared by `ImageListInMemory.load_data` (pixels into shared RAM) and
`images_to_memmap` (pixels into an image store plus a label store). An image is decoded exactly as
fastai's ``open_image`` does: ``PIL.Image.open(path).convert(convert_mode)``, then ``after_open``,
then (only if `size` is given) ``resize((w, h), resample)``; the result is kept as uint8 ``(H, W, C)``
(``C = 1`` for one-band modes such as ``'L'``), 4× smaller than fastai's float32.

Work is split in chunks of paths over a process pool (``fork`` where available: nothing to import
or pickle per worker, and ``after_open`` may be a lambda; else the default start method), with a
fastprogress bar over completed chunks. Fewer than ``MIN_PER_WORKER`` images per worker are decoded
in the calling process: starting processes would cost more than it saves.

Image stores written here (and by ``load_data(cache=...)``) are ordinary dense stores of uint8 rows
``(H, W, C)`` with ``meta``::

    {"layout": "HWC", "fastai_memmap_images": 1, "kind": "image" | "mask", "convert_mode": "RGB",
     "size": [h, w] | null, "resample": "BILINEAR", "after_open": null | "module.qualname",
     "root": "/data/pets", "paths": ["cats/1.png", ...],       # one per row, relative to root
     "shapes": [[h, w], ...]}                                  # only if rows are padded (ragged images)

so ``MemmapImageList.from_memmap(store)`` reads them as they are. The paths live in the manifest,
which is limited to 64 MiB (about 500,000 paths of 100 characters).
"""
import argparse
import json
import mimetypes
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image

from ..errors import (ArgumentError, ImageReadError, ItemShapeError, LabelError, MemmapError, NotAStoreError,
                      SourceNotFoundError, StoreExistsError, UnsupportedDtypeError)
from ..store.format import check_meta
from ..store.progress import Progress
from ..store.writer import DEFAULT_SHARD_BYTES, MemmapWriter, WriterGroup, check_no_overlap, check_replaceable

__all__ = ["DecodeSpec", "ImageReadError", "ConvertedImages", "images_to_memmap", "read_image", "image_shape",
           "list_image_files", "add_convert_images_parser", "run_convert_images", "cli_convert_images",
           "IMAGE_STORE_TAG", "IMAGE_EXTENSIONS"]

IMAGE_STORE_TAG = "fastai_memmap_images"   # meta key of image stores written here; value: meta version (1)
IMAGE_EXTENSIONS = frozenset(k for k, v in mimetypes.types_map.items() if v.startswith("image/"))  # as fastai
MIN_PER_WORKER = 32       # fewer images per worker than this: decode in-process (pool start-up would dominate)
CHUNKS_PER_WORKER = 8     # chunks per worker: balances uneven files and keeps the progress bar moving
MAX_CHUNK = 256           # images per chunk at most (bounds the pixels a converter chunk returns)

RESAMPLE_NAMES = {int(PIL.Image.NEAREST): "NEAREST", int(PIL.Image.BILINEAR): "BILINEAR",
                  int(PIL.Image.BICUBIC): "BICUBIC", int(PIL.Image.LANCZOS): "LANCZOS",
                  int(PIL.Image.BOX): "BOX", int(PIL.Image.HAMMING): "HAMMING"}

PathLike = Union[str, os.PathLike]
SizeArg = Union[None, int, Tuple[int, int], Sequence[int]]


def normalize_size(size: SizeArg) -> Optional[Tuple[int, int]]:
    "`size` as ``(h, w)``: an int ``n`` means ``(n, n)``; None stays None. Raises ``ValueError``."
    if size is None:
        return None
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in hw):
        raise ArgumentError(f"size: expected a positive int or (height, width), found {size!r}")
    return int(hw[0]), int(hw[1])


def _callable_name(f: Optional[Callable]) -> Optional[str]:
    if f is None:
        return None
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


@dataclass(frozen=True)
class DecodeSpec:
    """How files become pixels: PIL `convert_mode`, optional ``after_open`` hook, optional resize.

    Parameters
    ----------
    convert_mode : str
        PIL mode passed to ``Image.convert`` (fastai's ``convert_mode``). Must decode to uint8 or
        bool pixels ('L', 'RGB', 'RGBA', 'P', '1', 'CMYK', ...); 'I', 'F', 'I;16' are refused.
    size : (int, int) or None
        ``(height, width)`` to resize every image to, after ``after_open``; None keeps file sizes.
    resample : int
        PIL resampling filter for `size` (default ``BILINEAR``; use ``NEAREST`` for masks).
    after_open : callable or None
        fastai's ``after_open``: PIL image -> PIL image, applied once at decode time.
    kind : str
        ``'image'`` (items become ``Image``, divided by 255) or ``'mask'`` (``ImageSegment``, codes).
    """
    convert_mode: str = "RGB"
    size: Optional[Tuple[int, int]] = None
    resample: int = int(PIL.Image.BILINEAR)
    after_open: Optional[Callable] = field(default=None, compare=False)
    kind: str = "image"

    def __post_init__(self):
        object.__setattr__(self, "size", normalize_size(self.size))
        if self.kind not in ("image", "mask"):
            raise ArgumentError(f"DecodeSpec: expected kind 'image' or 'mask', found {self.kind!r}")
        try:
            dt = np.asarray(PIL.Image.new(self.convert_mode, (1, 1))).dtype
        except (ValueError, KeyError):
            raise ArgumentError(f"convert_mode: expected a PIL mode such as 'RGB' or 'L', found {self.convert_mode!r}") from None
        if dt not in (np.uint8, np.bool_):
            raise UnsupportedDtypeError(f"convert_mode {self.convert_mode!r}: decodes to {dt} pixels, expected uint8; "
                                        "in-RAM and stored images are uint8 (use 'L', 'RGB', 'RGBA'...)")

    @property
    def channels(self) -> int:
        "Channels per pixel after ``convert(convert_mode)`` (``C`` of ``(H, W, C)``)."
        return PIL.Image.getmodebands(self.convert_mode)

    def same_pixels(self, other: "DecodeSpec") -> bool:
        "Whether `other` decodes files to the same pixels (same mode, size, filter, kind, and `after_open` object)."
        return self == other and self.after_open is other.after_open

    def meta(self) -> Dict[str, Any]:
        "The spec as store ``meta`` entries (``after_open`` by qualified name)."
        return {"kind": self.kind, "convert_mode": self.convert_mode,
                "size": None if self.size is None else list(self.size),
                "resample": RESAMPLE_NAMES.get(self.resample, str(self.resample)),
                "after_open": _callable_name(self.after_open)}


# ------------------------------------------------------------------------------------------- one image
def read_image(path: PathLike, spec: DecodeSpec = DecodeSpec()) -> np.ndarray:
    """Decode the image file at `path` as `spec` says (see module docstring).

    Returns
    -------
    ndarray
        A new uint8 array ``(H, W, C)``; ``np.asarray`` of the PIL image that ``open_image`` would
        turn into a tensor (bool pixels of mode '1' become 0/1).

    Raises
    ------
    Whatever PIL raises for an unreadable file; ``ItemShapeError`` if `after_open` returns an image
    whose pixels are not uint8.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # EXIF warnings, as open_image
        with PIL.Image.open(path) as f:   # closed even when decoding fails
            im = f.convert(spec.convert_mode)
    if spec.after_open is not None:
        im = spec.after_open(im)
    if spec.size is not None:
        h, w = spec.size
        if im.size != (w, h):
            im = im.resize((w, h), spec.resample)
    a = np.asarray(im)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype != np.uint8 or a.ndim != 3:
        raise ItemShapeError(f"{path}: expected uint8 pixels (H, W[, C]) after after_open, found {a.dtype} {a.shape}")
    return a


def image_shape(path: PathLike, spec: DecodeSpec = DecodeSpec()) -> Tuple[int, int, int]:
    """``(H, W, C)`` that `read_image` will return for `path`.

    Reads only the file header (cheap) unless `spec` has an ``after_open`` hook, whose effect on
    the size is unknown without decoding. Raises what PIL raises for an unreadable header.
    """
    c = spec.channels
    if spec.size is not None:
        return spec.size + (c,)
    if spec.after_open is not None:
        return tuple(read_image(path, spec).shape)
    with PIL.Image.open(path) as im:
        w, h = im.size
    return (h, w, c)


# ------------------------------------------------------------------------------------------- chunk tasks
_WORKER_SPEC: Optional[DecodeSpec] = None   # set in each pool worker by `_init_worker` (one spec per pool)


def _init_worker(spec: DecodeSpec) -> None:
    global _WORKER_SPEC
    _WORKER_SPEC = spec


def _err(path: Any, e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _shapes_task(paths: Sequence[str], spec: Optional[DecodeSpec] = None):
    "``(shapes int64 (n, 3), errors [(i, message)])`` for a chunk of `paths`; failed rows are 0."
    spec = spec or _WORKER_SPEC
    out, errors = np.zeros((len(paths), 3), np.int64), []
    for i, p in enumerate(paths):
        try:
            out[i] = image_shape(p, spec)
        except Exception as e:   # any decoder failure is reported by name, not raised from the worker
            errors.append((i, _err(p, e)))
    return out, errors


def decode_into_task(job, spec: Optional[DecodeSpec] = None):
    "Decode a chunk into the buffer file: `job` is ``(file, offsets, shapes, paths)``; returns errors."
    spec = spec or _WORKER_SPEC
    file, offsets, shapes, paths = job
    errors = []
    fd = os.open(file, os.O_RDWR | os.O_NOFOLLOW)
    try:
        for i, p in enumerate(paths):
            try:
                a = read_image(p, spec)
                if a.shape != tuple(shapes[i]):
                    raise ItemShapeError(f"expected {tuple(int(s) for s in shapes[i])} pixels (from the file header), "
                                         f"decoded {a.shape}; file changed since it was listed?")
                os.pwrite(fd, memoryview(np.ascontiguousarray(a)).cast("B"), int(offsets[i]))
            except Exception as e:
                errors.append((i, _err(p, e)))
    finally:
        os.close(fd)
    return errors


def _decode_task(job, spec: Optional[DecodeSpec] = None):
    "Decode a chunk of same-shape images: `job` is ``(paths, shape)``; returns ``(pixels (k, *shape), ok (n,), errors)``."
    spec = spec or _WORKER_SPEC
    paths, shape = job
    out = np.empty((len(paths),) + tuple(shape), np.uint8)
    ok, errors = np.zeros(len(paths), bool), []
    for i, p in enumerate(paths):
        try:
            a = read_image(p, spec)
            if a.shape != tuple(shape):
                raise ItemShapeError(f"expected {tuple(shape)} pixels like the other images, decoded {a.shape}; "
                                     "pass size= to resize every image")
            out[i] = a
            ok[i] = True
        except Exception as e:
            errors.append((i, _err(p, e)))
    return out[ok], ok, errors


# ------------------------------------------------------------------------------------------- pool
def n_workers(workers: Optional[int], n_items: int) -> int:
    "Processes to use for `n_items` images: `workers` (default ``os.cpu_count()``), at most one per ``MIN_PER_WORKER``."
    w = (os.cpu_count() or 1) if workers is None else int(workers)
    return max(1, min(w, n_items // MIN_PER_WORKER))


def chunk_bounds(n_items: int, workers: int) -> List[Tuple[int, int]]:
    "``[(start, stop), ...]`` covering ``range(n_items)`` in about ``CHUNKS_PER_WORKER`` chunks per worker."
    size = max(1, min(MAX_CHUNK, -(-n_items // (workers * CHUNKS_PER_WORKER))))
    return [(a, min(a + size, n_items)) for a in range(0, n_items, size)]


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def run_chunks(task: Callable, jobs: Sequence[Any], spec: DecodeSpec, workers: int, progress: bool = True,
               ordered: bool = False, label: str = "", sizes: Optional[Sequence[int]] = None) -> Iterator[Tuple[int, Any]]:
    """Run ``task(job, spec)`` for every job; yield ``(job_number, result)``.

    The progress bar counts ``sizes[k]`` units (e.g. images) for job ``k`` (default: 1 per job), so it
    shows the unit the user knows, named in `label`.

    In order if `ordered`, else as they complete. ``workers <= 1`` runs in this process. At most
    ``2 * workers`` jobs are in flight, so results a slow consumer has not taken yet stay bounded.
    An exception in a task propagates (pending jobs are cancelled).
    """
    units = np.ones(len(jobs), np.int64) if sizes is None else np.asarray(sizes, np.int64)
    bar, counted = Progress(int(units.sum()), progress, label), 0
    if workers <= 1 or len(jobs) <= 1:
        for k, job in enumerate(jobs):
            res = task(job, spec)
            counted += int(units[k])
            bar.update(counted)
            yield k, res
        return
    with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker, initargs=(spec,)) as ex:
        pending, done, next_job, next_yield, finished = {}, {}, 0, 0, 0
        try:
            while finished < len(jobs):
                while next_job < len(jobs) and len(pending) + len(done) < 2 * workers:
                    pending[ex.submit(task, jobs[next_job])] = next_job
                    next_job += 1
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in ready:
                    done[pending.pop(fut)] = fut.result()
                while done:
                    k = next_yield if ordered else next(iter(done))
                    if k not in done:
                        break
                    res = done.pop(k)
                    next_yield += ordered
                    finished += 1
                    counted += int(units[k])
                    bar.update(counted)
                    yield k, res
        finally:
            for fut in pending:
                fut.cancel()


def _raise_read_error(path: Any, message: str, fix: str) -> None:
    raise ImageReadError(f"{path}: cannot read image ({message}); {fix}")


def plan_shapes(paths: Sequence[str], spec: DecodeSpec, workers: int, progress: bool = True,
                on_error: str = "raise", fix: str = "fix or remove the file") -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """``(H, W, C)`` of every image of `paths` (int64 ``(n, 3)``) from headers, in parallel; see `image_shape`.

    Returns the shapes and the failures ``[(index, message)]`` (their rows are 0). With
    ``on_error='raise'`` the first failure raises `ImageReadError` naming the file instead.
    """
    n = len(paths)
    if spec.size is not None and spec.after_open is None:
        return np.tile(np.array(spec.size + (spec.channels,), np.int64), (n, 1)), []
    shapes, errors = np.zeros((n, 3), np.int64), []
    bounds = chunk_bounds(n, workers)
    jobs = [list(paths[a:b]) for a, b in bounds]
    for k, (sh, errs) in run_chunks(_shapes_task, jobs, spec, workers, progress, label="image headers read",
                                     sizes=[b - a for a, b in bounds]):
        a = bounds[k][0]
        shapes[a:a + len(sh)] = sh
        for i, msg in errs:
            if on_error == "raise":
                _raise_read_error(paths[a + i], msg, fix)
            errors.append((a + i, msg))
    return shapes, sorted(errors)


# ------------------------------------------------------------------------------------------- sources
def list_image_files(root: PathLike, extensions: Optional[Sequence[str]] = None) -> List[Path]:
    "Image files under `root`, recursively, sorted; `extensions` default: every image type mimetypes knows (as fastai)."
    exts = {e.lower() for e in (extensions or IMAGE_EXTENSIONS)}
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [Path(d) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in exts]
    return out


def _resolve_source(source: Any, label_from: Any, folder: Optional[PathLike], path_col: Any,
                    extensions: Optional[Sequence[str]]) -> Tuple[Path, List[Path], Optional[List[Any]]]:
    "``(root, files, labels or None)`` for a folder, a DataFrame or a sequence of paths."
    try:
        import pandas as pd
        is_df = isinstance(source, pd.DataFrame)
    except ImportError:   # pandas comes with fastai; without it, no DataFrame source
        is_df = False
    if is_df:
        root = Path(folder) if folder is not None else Path(".")
        col = source[path_col] if not isinstance(path_col, int) else source.iloc[:, path_col]
        files = [root / str(p) for p in col]
    elif isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise SourceNotFoundError(f"{root}: expected a folder of images (or a DataFrame of paths), found no folder")
        files = list_image_files(root, extensions)
    else:
        root = Path(folder) if folder is not None else Path(".")
        files = [root / str(p) for p in source]
    if label_from is None:
        return root, files, None
    if label_from == "folder":
        return root, files, [p.parent.name for p in files]
    if callable(label_from):
        return root, files, [label_from(p) for p in files]
    if is_df:
        col = source.iloc[:, label_from] if isinstance(label_from, int) else source[label_from]
        return root, files, [_plain(v) for v in col]
    raise ArgumentError(f"label_from: expected 'folder', a callable, None, or (for a DataFrame) a column, found {label_from!r}")


def _plain(v: Any) -> Any:
    "A NumPy scalar as the Python value (JSON-compatible), other values unchanged."
    return v.item() if isinstance(v, np.generic) else v


def relative_key(p: Path, root: Path) -> str:
    "`p` relative to `root` (POSIX separators) if it lies under it, else `p` made absolute."
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.abspath(p)).as_posix()


def check_meta_size(meta: Dict[str, Any], where: PathLike) -> None:
    "Raise ``FormatError`` if `meta` would make the manifest larger than a reader accepts (`format.check_meta`)."
    check_meta(meta, str(where))


# ------------------------------------------------------------------------------------------- converter
@dataclass(frozen=True)
class ConvertedImages:
    """What `images_to_memmap` wrote.

    Attributes
    ----------
    x : Path
        The image store: ``rows`` rows of uint8 ``(H, W, C)``, meta as in the module docstring.
    y : Path or None
        The label store: ``rows`` int64 class codes, ``meta['classes']`` the class names; None without labels.
    rows : int
        Images written.
    classes : list or None
        Class names, sorted; code ``k`` means ``classes[k]``.
    skipped : tuple of (str, str)
        ``(path, reason)`` of every unreadable image that was skipped (``on_error='skip'``).
    """
    x: Path
    y: Optional[Path]
    rows: int
    classes: Optional[List[Any]]
    skipped: Tuple[Tuple[str, str], ...]


def images_to_memmap(source: Any, out: PathLike, size: SizeArg = None, label_from: Any = "folder",
                     convert_mode: str = "RGB", on_error: str = "skip", workers: Optional[int] = None,
                     progress: bool = True, overwrite: bool = False, folder: Optional[PathLike] = None,
                     path_col: Any = 0, extensions: Optional[Sequence[str]] = None,
                     resample: int = int(PIL.Image.BILINEAR), shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConvertedImages:
    """Decode image files in parallel into an image store ``out/x`` and a label store ``out/y``.

    The result reads back with ``MemmapImageList.from_memmap(out/'x').split_by_rand_pct()
    .label_from_memmap(out/'y')``, or as a cache of ``ImageListInMemory.load_data(cache=out/'x')``.

    Parameters
    ----------
    source : folder, DataFrame or sequence of paths
        A folder is searched recursively for image files (ImageNet style: ``root/<class>/<image>``).
        A DataFrame gives paths in column `path_col` (relative to `folder`, default the current
        directory); a sequence gives paths relative to `folder`.
    out : path
        Directory to create (if needed) holding the stores ``x`` and ``y``.
    size : int or (int, int), optional
        Resize every image to ``(h, w)`` (an int ``n``: ``(n, n)``) with `resample`. Without it
        every image must have the same size (checked from the headers before decoding).
    label_from : 'folder', callable, column, or None
        Label of each image: its parent folder's name; ``label_from(path)``; a column of the
        DataFrame (name or position); None writes no label store.
    convert_mode : str
        PIL mode, as fastai's ``convert_mode`` ('RGB' gives C=3, 'L' C=1, 'RGBA' C=4).
    on_error : 'skip' or 'raise'
        Unreadable/corrupt images are skipped (named in a warning and in ``skipped``), or stop the
        run with `ImageReadError` naming the file (nothing is written then).
    workers : int, optional
        Decoding processes (default ``os.cpu_count()``).
    progress : bool
        Show fastprogress bars.
    overwrite : bool
        Replace existing stores ``out/x`` and ``out/y``.

    Returns
    -------
    ConvertedImages
        Store paths, row count, class names and the skipped files.

    Raises
    ------
    ImageReadError
        An unreadable image with ``on_error='raise'``.
    ItemShapeError
        Images of different sizes and no `size`.
    StoreExistsError
        ``out/x`` or ``out/y`` exists and not `overwrite`.
    """
    if on_error not in ("skip", "raise"):
        raise ArgumentError(f"on_error: expected 'skip' or 'raise', found {on_error!r}")
    spec = DecodeSpec(convert_mode, size, resample)
    out = Path(out)
    root, files, labels = _resolve_source(source, label_from, folder, path_col, extensions)
    if not files:
        raise SourceNotFoundError(f"{root}: expected image files (extensions {sorted(IMAGE_EXTENSIONS)[:6]}...), "
                                  "found none")
    targets = [out / name for name in (("x", "y") if labels is not None else ("x",))]
    check_no_overlap(targets, [root, *sorted({os.path.dirname(os.path.abspath(f)) for f in files})])
    for t in targets:
        if (t.exists() or t.is_symlink()) and not overwrite:
            raise StoreExistsError(f"{t}: a store exists already; pass overwrite=True to replace it")
        if overwrite and (t.exists() or t.is_symlink()):
            check_replaceable(t)   # before decoding anything: refuse early, delete nothing
    if out.exists() and not out.is_dir():
        raise NotAStoreError(f"{out}: expected a directory to hold the stores x and y, found a file")
    paths = [str(p) for p in files]
    w = n_workers(workers, len(paths))
    fix = "fix or delete it, or pass on_error='skip'"
    shapes, bad = plan_shapes(paths, spec, w, progress, on_error, fix)
    keep = np.ones(len(paths), bool)
    keep[[i for i, _ in bad]] = False
    shape = _common_shape(paths, shapes, keep)
    skipped = [(paths[i], msg) for i, msg in bad]
    meta = {"layout": "HWC", IMAGE_STORE_TAG: 1, **spec.meta(), "root": Path(os.path.abspath(root)).as_posix()}
    out.mkdir(parents=True, exist_ok=True)
    classes = y = None
    with WriterGroup() as group:   # x and y appear together or not at all
        wx = group.add(MemmapWriter(targets[0], np.uint8, shape, overwrite=overwrite, shard_bytes=shard_bytes))
        kept = _write_pixels(wx, paths, keep, spec, w, progress, on_error, fix, skipped, meta, root)
        if labels is not None:
            kept_labels = [labels[i] for i in np.flatnonzero(kept)]
            classes = _classes(kept_labels, paths)
            code = {c: k for k, c in enumerate(classes)}
            wy = group.add(MemmapWriter(targets[1], np.int64, (), overwrite=overwrite, meta={"classes": classes}))
            wy.append(np.array([code[v] for v in kept_labels], np.int64))
            y = targets[1]
        group.commit()
    skipped.sort()
    if skipped:
        names = ", ".join(f"{p} ({m})" for p, m in skipped[:10])
        warnings.warn(f"images_to_memmap: skipped {len(skipped)} unreadable image(s) of {len(paths)}: {names}"
                      f"{' ...' if len(skipped) > 10 else ''}")
    return ConvertedImages(out / "x", y, int(kept.sum()), classes, tuple(skipped))


def _common_shape(paths: List[str], shapes: np.ndarray, keep: np.ndarray) -> Tuple[int, int, int]:
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise ImageReadError(f"no readable image among {len(paths)} files (first: {paths[0]})")
    first = shapes[idx[0]]
    diff = idx[np.any(shapes[idx] != first, axis=1)]
    if len(diff):
        j = diff[0]
        raise ItemShapeError(f"{paths[j]}: expected every image of size {tuple(first[:2])} (h, w) like {paths[idx[0]]}, "
                             f"found {tuple(shapes[j][:2])} ({len(diff)} images differ); pass size=(h, w) to resize them")
    return tuple(int(s) for s in first)


def _classes(labels: List[Any], paths: List[str]) -> list:
    "Sorted distinct labels; a missing label (None, NaN) is refused: it would become a class 'nan'."
    for i, v in enumerate(labels):
        if v is None or (isinstance(v, float) and v != v):
            raise LabelError(f"label of {paths[i]}: expected a label for every image, found {v!r}; fill it in or "
                             "drop the image from the source")
    return sorted(set(labels), key=lambda v: (str(type(v)), v))


def _write_pixels(wr: MemmapWriter, paths: List[str], keep: np.ndarray, spec: DecodeSpec,
                  workers: int, progress: bool, on_error: str, fix: str, skipped: List[Tuple[str, str]],
                  meta: Dict[str, Any], root: Path) -> np.ndarray:
    "Decode the `keep` images in order with the open writer `wr`; returns the mask of images written."
    idx = np.flatnonzero(keep)
    bounds = chunk_bounds(len(idx), workers)
    jobs = [([paths[i] for i in idx[a:b]], wr.item_shape) for a, b in bounds]
    kept = np.zeros(len(paths), bool)
    for k, (pixels, ok, errs) in run_chunks(_decode_task, jobs, spec, workers, progress, ordered=True,
                                            label="images decoded", sizes=[b - a for a, b in bounds]):
        rows = idx[bounds[k][0]:bounds[k][1]]
        for i, msg in errs:
            if on_error == "raise":
                _raise_read_error(paths[rows[i]], msg, fix)
            skipped.append((paths[rows[i]], msg))
        wr.append(pixels)
        kept[rows[ok]] = True
    wr.meta.update(meta, paths=[relative_key(Path(paths[i]), root) for i in np.flatnonzero(kept)])
    check_meta_size(wr.meta, wr.path)
    return kept


# ------------------------------------------------------------------------------------------- command line
def add_convert_images_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert-images`` sub-command to `subparsers` (from ``ArgumentParser.add_subparsers``).

    Sets ``func=run_convert_images``. Returns the new sub-parser.
    """
    p = subparsers.add_parser("convert-images", help="decode an image folder (class subfolders) or a CSV of paths "
                              "into an image store OUT/x and a label store OUT/y")
    p.add_argument("source", help="folder of images (labels from subfolder names) or a .csv file of paths")
    p.add_argument("out", help="output directory (gets the stores x and y)")
    p.add_argument("--size", type=int, nargs="+", metavar="N", help="resize to N x N, or to H W")
    p.add_argument("--mode", default="RGB", help="PIL convert mode (RGB, L, RGBA...); default RGB")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable images: skip them (listed, counted) or stop (default skip)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--no-labels", action="store_true", help="write no label store")
    p.add_argument("--path-col", default="0", help="CSV: column of the paths (name or position; default 0)")
    p.add_argument("--label-col", default="1", help="CSV: column of the labels (name or position; default 1)")
    p.add_argument("--folder", default=None, help="CSV: folder the paths are relative to (default: the CSV's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing stores")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_convert_images)
    return p


def _col(v: str) -> Union[int, str]:
    return int(v) if v.lstrip("-").isdigit() else v


def run_convert_images(args: argparse.Namespace) -> int:
    "Run ``convert-images`` from parsed `args`; prints a summary; returns 0 (errors are raised)."
    src = Path(args.source)
    size = None if not args.size else (args.size[0] if len(args.size) == 1 else tuple(args.size[:2]))
    kwargs = dict(size=size, convert_mode=args.mode, on_error=args.on_error, workers=args.workers,
                  progress=not args.quiet, overwrite=args.overwrite)
    if src.is_file():
        import pandas as pd
        df = pd.read_csv(src)
        label = None if args.no_labels else _col(args.label_col)
        res = images_to_memmap(df, args.out, label_from=label, path_col=_col(args.path_col),
                               folder=args.folder or src.parent, **kwargs)
    else:
        res = images_to_memmap(src, args.out, label_from=None if args.no_labels else "folder", **kwargs)
    labels = f", {len(res.classes)} classes in {res.y}" if res.y is not None else ""
    print(f"{res.x}: {res.rows} images{labels}; skipped {len(res.skipped)} unreadable")
    for p, msg in res.skipped:
        print(f"  skipped {p}: {msg}")
    return 0


def cli_convert_images(argv: Optional[List[str]] = None) -> int:
    "``fastai-memmap convert-images`` as a function: parse `argv`, run, return the exit status (1 on error)."
    parser = argparse.ArgumentParser(prog="fastai-memmap")
    add_convert_images_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["convert-images", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (MemmapError, FileNotFoundError, ValueError) as e:
        print(f"fastai-memmap convert-images: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
