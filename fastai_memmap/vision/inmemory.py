"""`ImageListInMemory`: decode every image once, in the parent process, into one shared uint8 buffer.

Items stay file paths, so every `ImageList` constructor, split, labelling method, ``transform``,
``databunch``, ``normalize``, ``show_batch``, ``add_test``, export and ``load_learner`` work unchanged.
``load_data()`` decodes the images (in parallel, see `fastai_memmap.vision.convert`) into a
`PixelBuffer`: one contiguous uint8 buffer of every image's ``(H, W, C)`` pixels back to back, int64
byte offsets, int32 shapes, and the sorted item paths (fixed-width bytes), all in one `SharedBuffer`.
Items find their pixels by binary search of their paths (once per list and process, then an int64
slot per item), so sub-lists built by fastai (splits, ``add_test``, filters) need no bookkeeping,
and a path that is not in the buffer (a test set added later, a list never loaded) is read from
disk, item by item, with identical results.

Memory: uint8, 4× less than fastai's float32 ``Image``. DataLoader workers never copy it: under fork
they share the parent's map; under spawn/forkserver the buffer pickles as its file name (see
`fastai_memmap.store.shm`); nothing in it is a Python object, so reading it touches no reference counts
(the copy-on-write blow-up of a list of ``Image``s, pytorch issue 13246, does not happen).

``get(i)`` returns exactly what ``open_image(path, convert_mode=..., after_open=...)`` returns:
fastai's own ``pil2tensor`` on the same uint8 pixels, then ``div_(255)`` (masks: ``open_mask``, no
division). Two deliberate differences: ``size=`` resizes at load time (so items then differ from
disk, by design), and ``after_open`` runs once at load time (a random ``after_open`` is drawn once;
put random augmentation in ``transform``). If ``convert_mode`` or ``after_open`` of a list change
after loading, its items are read from disk again (with a warning).

Batches: without ``tfms``, a batch whose images are all in RAM and of one shape is copied out of the
buffer with one gather (``get_batch``, the `fastai_memmap.data.batching` fast path), equal bit for bit to
the per-item batch; other batches are built item by item. With ``uint8=True``
(``ImageListInMemory.from_folder(path, uint8=True)``) such batches travel as uint8 NCHW and become
float32 on the device (`fastai_memmap.data.device.to_float_tfm`, placed before ``normalize``).
"""
import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import psutil
import PIL.Image
import torch
from fastai.basic_data import DataBunch
from fastai.data_block import ItemList, ItemLists, LabelList, LabelLists
from fastai.vision.data import ImageList, SegmentationLabelList
from fastai.vision.image import Image, ImageSegment, pil2tensor

from ..data.batching import FastLabelList, MemmapImageDataBunch

from .convert import (IMAGE_STORE_TAG, DecodeSpec, ImageReadError, SizeArg, check_meta_size, chunk_bounds,
                      n_workers, plan_shapes, relative_key, run_chunks, decode_into_task)
from ..errors import (ArgumentError, ArgumentTypeError, FormatError, MemoryBudgetError, StoreIOError, StoreNotFoundError,
                      StoreWriteError, WriterConflictError)
from ..store.reader import MemmapArray
from ..store.shm import SharedBuffer
from ..store.writer import MemmapWriter

__all__ = ["NotLoadedWarning", "PixelBuffer", "ImageListInMemory", "SegmentationItemListInMemory", "SegmentationLabelListInMemory",
           "LabelListInMemory", "ItemListsInMemory", "LabelListsInMemory", "ImageDataBunchInMemory",
           "preload", "unload", "write_cache", "check_memory", "MEMORY_FRACTION", "MAX_PAD_RATIO"]

MEMORY_FRACTION = 0.9   # load_data refuses to take more than this share of the memory psutil reports available
MAX_PAD_RATIO = 1.5     # a cache of images of different sizes is padded to the largest: not beyond 1.5x the pixels
ALIGN = 64              # byte alignment of each array inside the shared buffer (cache lines, SIMD loads)
COPY_ROWS = 1024        # images copied per batch between a store and the buffer


def _fmt(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def _key(item: Any) -> Optional[bytes]:
    "Buffer key of an item: its path as bytes (``os.fsencode``); None for items that are not paths."
    return os.fsencode(item) if isinstance(item, (str, os.PathLike)) else None


def item_keys(items: Iterable[Any]) -> np.ndarray:
    "Keys of `items` as a fixed-width bytes array (``b''`` for items that are not paths)."
    keys = [_key(o) or b"" for o in items]
    return np.array(keys, dtype=bytes) if keys else np.zeros(0, "S1")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PixelBuffer:
    """Decoded images back to back in one shared uint8 buffer, found by path.

    Layout of the `SharedBuffer` (each part aligned to 64 bytes): ``pixels`` uint8, the images'
    ``(H, W, C)`` bytes in key order; ``offsets`` int64 ``(n + 1,)``, image ``k`` is
    ``pixels[offsets[k]:offsets[k + 1]]``; ``shapes`` int32 ``(n, 3)``; ``keys`` ``S<width>`` ``(n,)``, the
    item paths as bytes, sorted and unique. Every array is a read-only view of the map.

    Create with `PixelBuffer.allocate` (then fill the pixels). Pickles as the `SharedBuffer` handle,
    `n`, the key width, `nbytes` and the `DecodeSpec` (never the pixels).

    Attributes
    ----------
    spec : DecodeSpec
        How the pixels were decoded (mode, size, ``after_open``, image or mask).
    nbytes : int
        Bytes of decoded pixels (not counting offsets, shapes and keys).
    """

    def __init__(self, shared: SharedBuffer, n: int, key_width: int, nbytes: int, spec: DecodeSpec):
        self.shared, self.n, self.key_width, self.nbytes, self.spec = shared, int(n), int(key_width), int(nbytes), spec
        self._set_views()

    @staticmethod
    def _layout(n: int, key_width: int, nbytes: int) -> Tuple[int, int, int, int]:
        "``(offsets_at, shapes_at, keys_at, total_bytes)`` of the buffer's parts."
        off = _align(nbytes)
        shp = _align(off + 8 * (n + 1))
        key = _align(shp + 4 * 3 * n)
        return off, shp, key, key + key_width * n

    def _set_views(self) -> None:
        if self.shared.closed:
            self.pixels = self.offsets = self.shapes = self.keys = None
            return
        off, shp, key, _ = self._layout(self.n, self.key_width, self.nbytes)
        ro = lambda a: (a.setflags(write=False), a)[1]   # views handed out are read-only, even in the owner
        self.pixels = ro(self.shared.view(np.uint8, 0, (self.nbytes,)))
        self.offsets = ro(self.shared.view(np.int64, off, (self.n + 1,)))
        self.shapes = ro(self.shared.view(np.int32, shp, (self.n, 3)))
        self.keys = ro(self.shared.view(f"S{self.key_width}", key, (self.n,)))

    @classmethod
    def allocate(cls, keys: np.ndarray, shapes: np.ndarray, spec: DecodeSpec,
                 directory: Optional[Union[str, Path]] = None) -> "PixelBuffer":
        """A new zero-filled buffer for images `keys` (sorted unique bytes) of `shapes` (``(n, 3)``).

        Raises `SharedMemoryError` if there is no room (see `SharedBuffer.create`).
        """
        n = len(keys)
        shapes = np.asarray(shapes, np.int64).reshape(n, 3)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.prod(shapes, axis=1), out=offsets[1:])
        width = max(1, keys.dtype.itemsize)
        off, shp, key, total = cls._layout(n, width, int(offsets[-1]))
        shared = SharedBuffer.create(total, directory)
        shared.view(np.int64, off, (n + 1,))[:] = offsets
        shared.view(np.int32, shp, (n, 3))[:] = shapes
        shared.view(f"S{width}", key, (n,))[:] = keys
        return cls(shared, n, width, int(offsets[-1]), spec)

    def writable_pixels(self) -> np.ndarray:
        "Writable view of all pixels (only in the creating process, before sharing)."
        return self.shared.view(np.uint8, 0, (self.nbytes,))

    @property
    def closed(self) -> bool:
        "True once closed (by `close`, or unpickled after its owner freed it)."
        return self.shared.closed

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"PixelBuffer({self.n} images, {self.nbytes:,} bytes, {self.spec.kind} {self.spec.convert_mode}, {self.shared!r})"

    def slots(self, items: Iterable[Any]) -> np.ndarray:
        "Slot of each of `items` (paths) in the buffer (int64), -1 for items it does not hold."
        return self.key_slots(item_keys(items))

    def key_slots(self, q: np.ndarray) -> np.ndarray:
        "Slot of each key of the bytes array `q` (int64), -1 for keys the buffer does not hold."
        if self.closed or not self.n or not len(q):
            return np.full(len(q), -1, np.int64)
        j = np.minimum(np.searchsorted(self.keys, q), self.n - 1)
        return np.where(self.keys[j] == q, j, -1).astype(np.int64)

    def slot(self, item: Any) -> int:
        "Slot of one item, -1 if absent (binary search of its path: no per-process index)."
        k = _key(item)
        if k is None or self.closed or not self.n or len(k) > self.key_width:
            return -1
        j = int(np.searchsorted(self.keys, k))
        return j if j < self.n and self.keys[j] == k else -1

    def image(self, slot: int) -> np.ndarray:
        "Pixels of image `slot`: a read-only uint8 view ``(H, W, C)`` of the shared buffer (no copy)."
        a, b = self.offsets[slot], self.offsets[slot + 1]
        return self.pixels[a:b].reshape(tuple(self.shapes[slot]))

    def close(self) -> None:
        "Free the memory (see `SharedBuffer.close`); every list sharing this buffer falls back to disk."
        self.pixels = self.offsets = self.shapes = self.keys = None
        self.shared.close()

    def __reduce__(self):
        return (PixelBuffer, (self.shared, self.n, self.key_width, self.nbytes, self.spec))


# ------------------------------------------------------------------------------------------- item lists
class NotLoadedWarning(UserWarning):
    """An in-memory image list is read from disk, item by item, because ``load_data()`` was never called.

    Issued with `warnings.warn` once per list object and process (a DataLoader worker that reads such
    a list may issue its own); silence it with ``warnings.simplefilter("ignore", NotLoadedWarning)``.
    """


class _InMemoryMixin:
    "What the image and the mask lists share: the `pixels` handle, `load_data`, `purge`, `loaded`, `nbytes`."
    _kind = "image"

    def __init__(self, items: Any, pixels: Optional[PixelBuffer] = None, **kwargs):
        super().__init__(items, **kwargs)
        self.pixels = pixels
        self.copy_new.append("pixels")
        self._label_list, self._split = LabelListInMemory, ItemListsInMemory
        self._spec_warned = False
        self._disk_warned = False   # NotLoadedWarning issued by this list (in this process)
        self._slot_cache = None   # (items, weakref to the buffer, slot of each item): built on first get, per process

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_slot_cache"] = None   # rebuilt where needed: never pickled to workers
        return state

    def decode_spec(self, size: SizeArg = None, resample: Optional[int] = None) -> DecodeSpec:
        "How `load_data` decodes this list's files (its ``convert_mode`` and ``after_open``, plus `size`)."
        if self._kind == "mask":   # class codes must stay codes: always NEAREST
            return DecodeSpec("L", size, int(PIL.Image.NEAREST), self.after_open, "mask")
        resample = PIL.Image.BILINEAR if resample is None else resample
        return DecodeSpec(self.convert_mode, size, int(resample), self.after_open, "image")

    def _buffer(self) -> Optional[PixelBuffer]:
        "The buffer, if open and decoded the way this list decodes (else None: read from disk)."
        buf = self.pixels
        if buf is None or buf.closed:
            return None
        mode = "L" if self._kind == "mask" else self.convert_mode   # per item: no DecodeSpec built here
        spec = buf.spec
        if spec.kind == self._kind and spec.convert_mode == mode and spec.after_open is self.after_open:
            return buf
        if not self._spec_warned:
            self._spec_warned = True
            warnings.warn(f"{type(self).__name__}: convert_mode or after_open changed since load_data() "
                          f"(loaded {spec.convert_mode!r}, now {mode!r}): reading images from disk; "
                          "call load_data() again")
        return None

    def _pixels_for(self, fn: Any) -> Optional[np.ndarray]:
        "Pixels of the file `fn` (a view of the buffer) or None if not in RAM."
        buf = self._buffer()
        if buf is None:
            return None
        k = buf.slot(fn)
        return None if k < 0 else buf.image(k)

    def _slots(self, buf: PixelBuffer) -> np.ndarray:
        "Slot in `buf` of every item (-1: not in RAM), looked up once per list and process."
        cache = self._slot_cache   # a weak reference: a replaced or purged buffer is freed, not kept by the cache
        if cache is None or cache[0] is not self.items or cache[1]() is not buf:
            cache = self._slot_cache = (self.items, weakref.ref(buf), buf.slots(self.items))
        return cache[2]

    def _pixels_at(self, i: int) -> Optional[np.ndarray]:
        "Pixels of item `i` (a view of the buffer) or None; slots of all items are looked up once per list."
        buf = self._buffer()
        if buf is None:
            return None
        k = int(self._slots(buf)[i])
        return None if k < 0 else buf.image(k)

    def _batch_pixels(self, idxs: np.ndarray) -> Optional[np.ndarray]:
        """Pixels of items `idxs` as one new uint8 array ``(n, H, W, C)``, copied out of the buffer with
        one gather; None unless every item is in RAM and all have the same shape."""
        buf = self._buffer()
        idxs = np.asarray(idxs, np.int64)
        if buf is None or not len(idxs):
            return None
        slots = self._slots(buf)[idxs]
        if (slots < 0).any():
            return None
        shapes = buf.shapes[slots]
        if (shapes != shapes[0]).any():
            return None
        h, w, c = (int(v) for v in shapes[0])
        size = h * w * c
        if size == 0:
            return None
        # every byte offset as the start of a row of `size` bytes (a view, no copy): one fancy-index gather
        rows = np.lib.stride_tricks.as_strided(buf.pixels, (buf.nbytes - size + 1, size), (1, 1), writeable=False)
        out = rows[buf.offsets[slots]].reshape(len(slots), h, w, c)
        self.sizes.update(dict.fromkeys(idxs.tolist(), torch.Size((h, w))))   # as `get` records them
        return out

    def get(self, i: int) -> Any:
        "Item `i` from RAM if loaded, else from its file."
        a = self._pixels_at(i)
        if a is None:
            self._warn_not_loaded()
            return super().get(i)
        res = self._from_pixels(a)
        self.sizes[i] = res.size
        return res

    def open(self, fn: Any) -> Any:
        "Open `fn` from RAM if loaded, else from disk."
        a = self._pixels_for(fn)
        return super().open(fn) if a is None else self._from_pixels(a)

    def _warn_not_loaded(self) -> None:
        "Issue `NotLoadedWarning` once for this list if it was never loaded (no buffer at all)."
        if self.pixels is None and not getattr(self, "_disk_warned", False):
            self._disk_warned = True
            warnings.warn(f"{type(self).__name__} of {len(self.items)} items: expected the images decoded in RAM, "
                          "found no buffer, so every image is read and decoded from disk on each access; call "
                          ".load_data() on the list (before splitting and labelling) to decode them once",
                          NotLoadedWarning, stacklevel=3)

    @property
    def loaded(self) -> bool:
        "True if every item of this list is held in RAM (an empty list is never loaded)."
        buf = self._buffer()
        return buf is not None and len(self.items) > 0 and bool((buf.slots(self.items) >= 0).all())

    @property
    def nbytes(self) -> int:
        "Bytes of decoded pixels held in RAM by this list's buffer (shared with its sub-lists), 0 if none."
        buf = self._buffer()
        return 0 if buf is None else buf.nbytes

    def load_data(self, size: SizeArg = None, workers: Optional[int] = None, force: bool = False,
                  cache: Optional[Union[str, Path]] = None, progress: bool = True, resample: Optional[int] = None,
                  buffer_dir: Optional[Union[str, Path]] = None) -> "ItemList":
        """Decode every image of this list into shared RAM, once; see `preload` for the parameters.

        Returns `self`. Items of lists built from this one afterwards (splits, labels) come from RAM too.
        """
        return preload(self, size=size, workers=workers, force=force, cache=cache, progress=progress,
                       resample=resample, buffer_dir=buffer_dir)

    def purge(self) -> "ItemList":
        """Free the decoded pixels (for every list sharing them); items are read from disk afterwards.

        Returns `self`.
        """
        if self.pixels is not None:
            self.pixels.close()
        self.pixels = None
        return self


class ImageListInMemory(_InMemoryMixin, ImageList):
    """`ImageList` whose images can be decoded once into shared RAM with `load_data` (see module docstring).

    Parameters
    ----------
    items, **kwargs
        As `ImageList` (file paths; ``convert_mode``, ``after_open``, ``path``...).
    pixels : PixelBuffer, optional
        Decoded pixels to read from (set by `load_data`; carried to sub-lists).
    """

    def __init__(self, items: Any, pixels: Optional[PixelBuffer] = None, uint8: bool = False, **kwargs):
        super().__init__(items, pixels=pixels, **kwargs)
        self.uint8 = bool(uint8)
        self.copy_new.append("uint8")

    def _from_pixels(self, a: np.ndarray) -> Image:
        "`Image` of uint8 pixels `a` (H, W, C), exactly as `open_image` builds it (a new float32 tensor)."
        return Image(pil2tensor(a, np.float32).div_(255))

    def get_batch(self, idxs: np.ndarray) -> Optional[torch.Tensor]:
        """Images of positions `idxs` as one NCHW tensor (batch fast path), or None (read item by item).

        float32, equal bit for bit to stacking ``get(i).data``; with ``uint8=True`` the uint8 pixels (an
        NCHW view of the gathered ``(n, H, W, C)`` copy) that `to_float_tfm` turns into exactly that.
        None unless every image is in RAM and all have the same shape.
        """
        a = self._batch_pixels(idxs)
        if a is None:
            return None
        t = torch.from_numpy(a).permute(0, 3, 1, 2)
        return t if self.uint8 else t.contiguous().to(torch.float32).div_(255.)


class SegmentationLabelListInMemory(_InMemoryMixin, SegmentationLabelList):
    """`SegmentationLabelList` whose masks can be held in RAM like `ImageListInMemory`'s images.

    Masks are decoded as ``open_mask`` does (mode 'L', no division); ``size=`` resizes them with
    ``NEAREST`` so class codes stay codes.
    """
    _kind = "mask"

    def _from_pixels(self, a: np.ndarray) -> ImageSegment:
        "`ImageSegment` of uint8 codes `a` (H, W, 1), exactly as `open_mask` builds it (float32 codes, a new tensor)."
        return ImageSegment(pil2tensor(a, np.float32))

    def get_batch(self, idxs: np.ndarray) -> Optional[torch.Tensor]:
        "Masks of positions `idxs` as int64 ``(n, 1, H, W)`` (as collating ``ImageSegment.data``), or None."
        a = self._batch_pixels(idxs)
        return None if a is None else torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().long()


class SegmentationItemListInMemory(ImageListInMemory):
    "`ImageListInMemory` for segmentation: labels are `SegmentationLabelListInMemory` masks."
    _label_cls, _square_show_res = SegmentationLabelListInMemory, False


# ------------------------------------------------------------------------------------------- containers
class LabelListInMemory(FastLabelList):
    """`LabelList` of in-RAM lists: `load_data` loads its x (and masks in y), `purge` frees them.

    A `FastLabelList`: without tfms, a batch of images all in RAM and of one shape is copied out of
    the buffer at once (``get_batch``); any other batch is built item by item, with identical values.
    """

    def load_data(self, **kwargs: Any) -> "LabelListInMemory":
        "Decode the images (and masks) of this dataset into RAM; parameters as `preload`."
        return preload(self, **kwargs)

    def purge(self) -> "LabelListInMemory":
        "Free the decoded pixels of this dataset."
        return unload(self)


class _SplitMixin:
    """`load_data`/`purge` for the split and labelled containers.

    fastai turns an `ItemLists` into a `LabelLists` with ``self.__class__ = LabelLists``
    (data_block.py, ``ItemLists.__getattr__`` and ``label_from_lists``); `__setattr__` redirects that
    assignment to `LabelListsInMemory`, so the methods survive labelling without patching fastai.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__class__" and value is LabelLists:
            value = LabelListsInMemory
        super().__setattr__(name, value)

    def load_data(self, **kwargs: Any):
        "Decode the images (and masks) of train, valid and test into RAM; parameters as `preload`."
        return preload(self, **kwargs)

    def purge(self):
        "Free the decoded pixels of train, valid and test."
        return unload(self)


class ItemListsInMemory(_SplitMixin, ItemLists):
    "`ItemLists` (train and valid) of `ImageListInMemory`s, with `load_data`/`purge`."


class LabelListsInMemory(_SplitMixin, LabelLists):
    "`LabelLists` (train, valid, test) of in-RAM lists, with `load_data`/`purge`."


class ImageDataBunchInMemory(MemmapImageDataBunch):
    """`ImageDataBunch` whose `load_data` decodes train, valid and test (images and masks) into RAM.

    Created as `MemmapImageDataBunch` is: `memmap_collate` (the batch fast path), ``num_workers='auto'``,
    and with ``uint8=True`` lists `to_float_tfm` first in ``dl_tfms``.
    """

    def load_data(self, **kwargs: Any) -> "ImageDataBunchInMemory":
        "Decode the images (and masks) of every dataset into RAM; parameters as `preload`."
        return preload(self, **kwargs)

    def purge(self) -> "ImageDataBunchInMemory":
        "Free the decoded pixels of every dataset."
        return unload(self)


ImageListInMemory._bunch = ImageDataBunchInMemory


# ------------------------------------------------------------------------------------------- loading
def _lists_in(obj: Any) -> List[_InMemoryMixin]:
    "The in-RAM item lists inside `obj` (list, LabelList, ItemLists/LabelLists, DataBunch), each once."
    if isinstance(obj, _InMemoryMixin):
        found = [obj]
    elif isinstance(obj, LabelList):
        found = [obj.x, obj.y]
    elif isinstance(obj, ItemLists):
        found = [o for ds in obj.lists for o in _lists_in(ds)]
    elif isinstance(obj, DataBunch):
        dss = [obj.train_ds, obj.valid_ds] + ([obj.test_ds] if obj.test_dl is not None else [])
        found = [o for ds in dss for o in _lists_in(ds)]
    else:
        raise ArgumentTypeError(f"preload: expected an ImageListInMemory, a LabelList, LabelLists or DataBunch of them, "
                        f"found {type(obj).__name__}")
    seen, out = set(), []
    for o in found:
        if isinstance(o, _InMemoryMixin) and id(o) not in seen:
            seen.add(id(o))
            out.append(o)
    return out


def preload(obj: Any, size: SizeArg = None, workers: Optional[int] = None, force: bool = False,
            cache: Optional[Union[str, Path]] = None, progress: bool = True, resample: Optional[int] = None,
            buffer_dir: Optional[Union[str, Path]] = None) -> Any:
    """Decode the images of every in-RAM list inside `obj` into one shared buffer, in the parent process.

    `obj` is an `ImageListInMemory` (or mask list), a `LabelList`, `ItemLists`/`LabelLists` (train,
    valid and test) or a `DataBunch`. Lists that decode the same way (mode, ``after_open``) share one
    buffer holding the union of their paths; images already in RAM are copied, not decoded again.

    Parameters
    ----------
    size : int or (int, int), optional
        Resize every image to ``(h, w)`` (an int ``n``: ``(n, n)``) at load time, after
        ``after_open``, with `resample` (default ``BILINEAR``; masks always ``NEAREST``). Items then
        differ from the files by design. Default: keep file sizes (images may differ in size).
        With an ``after_open`` hook the sizes are not known from the file headers: each image is
        decoded once to learn its size (the memory check comes after that pass), then again into RAM.
    workers : int, optional
        Decoding processes (default ``os.cpu_count()``); small sets decode in-process.
    force : bool
        Load even if the estimated size exceeds ``MEMORY_FRACTION`` of the available memory.
    cache : path, optional
        An image store of the decoded pixels. If it exists and holds every image decoded the same
        way, pixels are copied from it (no decoding); else the images are decoded and the store is
        (re)written. Images of one size give a dense store ``(n, H, W, C)`` that
        ``MemmapImageList.from_memmap(cache)`` reads too; images of different sizes are padded to
        the largest (bottom/right zeros, true sizes in ``meta['shapes']``), unless that takes more
        than ``MAX_PAD_RATIO`` times their bytes (then no cache is written: pass `size`). Masks go
        to the store ``<cache>-masks``. Edited image files are not detected: delete the cache.
    progress : bool
        Show fastprogress bars.
    buffer_dir : path, optional
        Directory of the shared buffer file (default ``/dev/shm``, see `fastai_memmap.store.shm`).

    Returns
    -------
    `obj`, with ``pixels`` set on its lists.

    Raises
    ------
    MemoryBudgetError
        The decoded images (estimated from the file headers, before decoding) would not fit.
    ImageReadError
        An image cannot be read (named in the message).
    SharedMemoryError
        No room for the shared buffer in ``/dev/shm`` nor in the temporary directory.
    """
    _check_preload_args(workers, resample)
    groups: Dict[Tuple, List[_InMemoryMixin]] = {}
    for lst in _lists_in(obj):
        spec = lst.decode_spec(size, resample)
        groups.setdefault((spec, id(spec.after_open)), []).append(lst)
    if cache is not None and sum(s.kind == "image" for s, _ in groups) > 1:
        raise ArgumentError("preload: cache= holds one decoding; these lists decode with different convert_mode or "
                         "after_open: load them separately, each with its own cache")
    for (spec, _), lists in groups.items():
        where = None if cache is None else (Path(cache) if spec.kind == "image" else Path(f"{cache}-masks"))
        _load_group(lists, spec, workers, force, where, progress, buffer_dir)
    return obj


def _check_preload_args(workers: Any, resample: Any) -> None:
    "Refuse `workers` other than None or an int >= 0 and `resample` other than None or a PIL filter, typed."
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))):
        raise ArgumentTypeError(f"workers: expected None or an int >= 0 (decoding processes), found "
                                f"{type(workers).__name__} {workers!r:.50}")
    if workers is not None and workers < 0:
        raise ArgumentError(f"workers: expected None or an int >= 0 (decoding processes), found {workers}")
    filters = sorted(int(f) for f in PIL.Image.Resampling) if hasattr(PIL.Image, "Resampling") else list(range(6))
    if resample is not None and (isinstance(resample, bool) or not isinstance(resample, (int, np.integer))
                                 or int(resample) not in filters):
        raise ArgumentError(f"resample: expected None or a PIL filter ({filters}, e.g. PIL.Image.BILINEAR), "
                            f"found {resample!r:.50}")


def unload(obj: Any) -> Any:
    "Free the decoded pixels of every in-RAM list inside `obj` (as `preload` walks it); returns `obj`."
    for lst in _lists_in(obj):
        lst.purge()
    return obj


def _load_group(lists: List[_InMemoryMixin], spec: DecodeSpec, workers: Optional[int], force: bool,
                cache: Optional[Path], progress: bool, directory: Any) -> None:
    keys = np.unique(np.concatenate([item_keys(lst.items) for lst in lists]))
    keys = keys[keys != b""]
    root = Path(lists[0].path)
    olds = [lst.pixels for lst in lists if lst.pixels is not None and not lst.pixels.closed
            and lst.pixels.spec.same_pixels(spec)]
    old = max(olds, key=lambda b: b.n, default=None)
    from_cache = False
    if old is not None and all(lst.pixels is old for lst in lists) and (old.key_slots(keys) >= 0).all():
        buf = old   # already loaded
    else:
        buf = _from_cache(cache, keys, spec, root, force, directory) if cache is not None else None
        from_cache = buf is not None
        if buf is None:
            buf = _decode(keys, spec, old, workers, force, progress, directory)
    if cache is not None and not from_cache:
        _refresh_cache(buf, cache, spec, root, keep_on_error=buf is old)
    for lst in lists:
        lst.pixels = buf


def _refresh_cache(buf: PixelBuffer, cache: Path, spec: DecodeSpec, root: Path, keep_on_error: bool) -> None:
    """Write `buf` to `cache` unless it already holds it. The cache is a copy: when another process is
    writing it, or the disk is full, the decoded pixels are kept (with a warning), never discarded.
    On any other error a new `buf` is closed (its shared memory freed) before the error propagates."""
    try:
        if _cache_rows(cache, buf.keys, spec, root)[0] is None:
            write_cache(buf, cache, root)
    except (WriterConflictError, StoreWriteError, StoreIOError) as e:
        warnings.warn(f"{cache}: cache not written ({e}); the decoded images are kept in RAM")
    except BaseException:
        if not keep_on_error:
            buf.close()
        raise


def check_memory(need: int, n: int, force: bool, what: str = "load_data") -> None:
    """Raise `MemoryBudgetError` if `need` bytes exceed ``MEMORY_FRACTION`` of the available memory.

    The message names both sizes and the ways out (``size=``, a subset, ``force=True``).
    """
    avail = int(psutil.virtual_memory().available)
    if need > MEMORY_FRACTION * avail and not force:
        raise MemoryBudgetError(
            f"{what}: {n} decoded images need {_fmt(need)} ({need:,} bytes), but only {_fmt(avail)} ({avail:,} bytes) "
            f"of memory is available (psutil), of which load_data uses at most {MEMORY_FRACTION:.0%}; pass size=(h, w) "
            "to downsize the images at load time, load fewer images, or force=True to load anyway")


def _decode(keys: np.ndarray, spec: DecodeSpec, old: Optional[PixelBuffer], workers: Optional[int], force: bool,
            progress: bool, directory: Any) -> PixelBuffer:
    "A new buffer of `keys`: copied from `old` where it has them, decoded (in parallel) otherwise."
    n = len(keys)
    paths = [os.fsdecode(k) for k in keys]
    src = old.key_slots(keys) if old is not None else np.full(n, -1, np.int64)
    todo = np.flatnonzero(src < 0)
    w = n_workers(workers, len(todo))
    fix = "fix or delete the file, or remove it from the list"
    shapes = np.zeros((n, 3), np.int64)
    if old is not None:
        shapes[src >= 0] = old.shapes[src[src >= 0]]
    shapes[todo] = plan_shapes([paths[i] for i in todo], spec, w, progress, "raise", fix)[0]
    check_memory(int(np.prod(shapes, axis=1).sum()), n, force)
    buf = PixelBuffer.allocate(keys, shapes, spec, directory)
    try:
        dst, off = buf.writable_pixels(), buf.offsets
        for i in np.flatnonzero(src >= 0):
            dst[off[i]:off[i + 1]] = old.image(int(src[i])).reshape(-1)
        bounds = chunk_bounds(len(todo), w)
        jobs = [(str(buf.shared.path), off[todo[a:b]], shapes[todo[a:b]], [paths[i] for i in todo[a:b]])
                for a, b in bounds]
        for k, errors in run_chunks(decode_into_task, jobs, spec, w, progress, label="images decoded",
                                    sizes=[b - a for a, b in bounds]):
            for i, msg in errors:
                raise ImageReadError(f"{jobs[k][3][i]}: cannot read image ({msg}); {fix}")
    except BaseException:
        buf.close()
        raise
    return buf


# ------------------------------------------------------------------------------------------- cache store
def _cache_meta(spec: DecodeSpec) -> Dict[str, Any]:
    return {"layout": "HWC", IMAGE_STORE_TAG: 1, **spec.meta()}


def _open_cache(cache: Path) -> Optional[MemmapArray]:
    "The image store at `cache`, None if there is none; ``FormatError`` if it is something else."
    try:
        store = MemmapArray.open(cache)
    except StoreNotFoundError:
        if Path(cache).exists():
            raise FormatError(f"{cache}: expected an image store (or nothing) as cache, found something else; "
                              "pass another cache path") from None
        return None
    if store.meta.get(IMAGE_STORE_TAG) != 1 or store.dtype != np.uint8 or len(store.item_shape) != 3:
        raise FormatError(f"{cache}: expected an image store written by load_data(cache=) or images_to_memmap "
                          f"(uint8 rows (H, W, C), meta {IMAGE_STORE_TAG!r}), found {store!r}; pass another cache path")
    return store


def _cache_shapes(cache: Path, store: MemmapArray) -> np.ndarray:
    """``meta['shapes']`` of a padded cache as int64 ``(rows, 2)``, each ``(h, w)`` within the stored rows.

    Raises ``FormatError`` for anything else (a hostile or damaged manifest): not a list of int pairs,
    one per row, or a size beyond the padded ``(H, W)`` (it would read outside the row)."""
    raw, (hh, ww) = store.meta["shapes"], store.item_shape[:2]
    ok = isinstance(raw, list) and len(raw) == len(store) and all(
        isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in raw)
    hw = np.array(raw, np.int64).reshape(-1, 2) if ok else None
    if hw is None or ((hw < 0) | (hw > np.array([hh, ww]))).any():
        raise FormatError(f"{cache}: expected meta['shapes'] to be {len(store)} [h, w] pairs of ints with "
                          f"0 <= h <= {hh}, 0 <= w <= {ww} (the padded rows), found {raw!r:.120}; the cache is damaged: "
                          "delete it (it is rebuilt from the image files)")
    return hw


def _cache_rows(cache: Path, keys: np.ndarray, spec: DecodeSpec, root: Path) -> Tuple[Optional[np.ndarray], Any, str]:
    """``(rows, store, why)``: the row of each of `keys` in the cache store, or None and why it cannot serve them."""
    store = _open_cache(cache)
    if store is None:
        return None, None, "no cache yet"
    meta = store.meta
    diff = {k: (meta.get(k), v) for k, v in _cache_meta(spec).items() if meta.get(k) != v}
    if diff:
        return None, store, "decoded differently: " + ", ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in diff.items())
    paths = meta.get("paths", [])
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise FormatError(f"{cache}: expected meta['paths'] to be a list of str, found {paths!r:.120}; the cache is "
                          "damaged: delete it (it is rebuilt from the image files)")
    if "shapes" in meta:
        _cache_shapes(cache, store)
    names = np.array(paths, dtype=str).reshape(-1)
    if len(names) != len(store):
        return None, store, f"{len(names)} paths for {len(store)} rows"
    if not len(keys):
        return np.zeros(0, np.int64), store, ""
    if not len(names):
        return None, store, f"holds none of the {len(keys)} images"
    order = np.argsort(names, kind="stable")
    want = np.array([relative_key(Path(os.fsdecode(k)), root) for k in keys], dtype=str).reshape(-1)
    j = np.minimum(np.searchsorted(names[order], want), len(names) - 1)
    found = names[order][j] == want
    if not found.all():
        return None, store, f"holds {int(found.sum())} of the {len(keys)} images"
    return order[j].astype(np.int64), store, ""


def _from_cache(cache: Path, keys: np.ndarray, spec: DecodeSpec, root: Path, force: bool,
                directory: Any) -> Optional[PixelBuffer]:
    "A buffer of `keys` copied from the cache store, or None (with a warning) if it does not hold them all."
    rows, store, why = _cache_rows(cache, keys, spec, root)
    if rows is None:
        if store is not None:
            warnings.warn(f"{cache}: cache {why}; decoding the images again and replacing it")
        return None
    meta, c = store.meta, store.item_shape[2]
    hw = _cache_shapes(cache, store)[rows] if "shapes" in meta else np.tile(store.item_shape[:2], (len(rows), 1))
    shapes = np.concatenate([hw.reshape(-1, 2), np.full((len(rows), 1), c)], axis=1)
    check_memory(int(np.prod(shapes, axis=1).sum()), len(keys), force, f"load_data from {cache}")
    buf = PixelBuffer.allocate(keys, shapes, spec, directory)
    try:
        _copy_from_store(buf, store, rows, shapes, "shapes" in meta)
    except BaseException:      # a store truncated under us...: free the shared memory, then raise
        buf.close()
        raise
    return buf


def _copy_from_store(buf: PixelBuffer, store: MemmapArray, rows: np.ndarray, shapes: np.ndarray, ragged: bool) -> None:
    "Copy the (padded, if `ragged`) cache rows `rows` into the pixels of `buf`."
    dst, off = buf.writable_pixels(), buf.offsets
    for a in range(0, len(rows), COPY_ROWS):
        b = min(a + COPY_ROWS, len(rows))
        block = store.read(rows[a:b])
        if not ragged:
            dst[off[a]:off[b]] = block.reshape(-1)
            continue
        for i in range(a, b):
            h, w, _ = shapes[i]
            dst[off[i]:off[i + 1]] = block[i - a, :h, :w].reshape(-1)


def write_cache(buf: PixelBuffer, cache: Union[str, Path], root: Union[str, Path]) -> Optional[Path]:
    """Write the pixels of `buf` to the image store `cache` (replacing it), paths relative to `root`.

    Returns the store path, or None (with a warning) when padding images of different sizes would
    take more than ``MAX_PAD_RATIO`` times their bytes.
    """
    cache, root = Path(cache), Path(root)
    shapes = np.asarray(buf.shapes, np.int64)
    item = tuple(int(s) for s in shapes.max(axis=0)) if len(shapes) else (0, 0, buf.spec.channels)
    ragged = bool(len(shapes)) and bool((shapes != shapes[0]).any())
    padded = len(shapes) * int(np.prod(item))
    if ragged and padded > MAX_PAD_RATIO * max(buf.nbytes, 1):
        warnings.warn(f"{cache}: cache not written: images of different sizes padded to {item[:2]} would take "
                      f"{padded / buf.nbytes:.1f}x their {_fmt(buf.nbytes)}; pass size=(h, w) to load_data")
        return None
    meta = {**_cache_meta(buf.spec), "root": Path(os.path.abspath(root)).as_posix(),
            "paths": [relative_key(Path(os.fsdecode(k)), root) for k in buf.keys]}
    if ragged:
        meta["shapes"] = shapes[:, :2].tolist()
    check_meta_size(meta, cache)
    with MemmapWriter(cache, np.uint8, item, overwrite=True, meta=meta) as w:
        for a in range(0, buf.n, COPY_ROWS):
            b = min(a + COPY_ROWS, buf.n)
            if not ragged:
                w.append(buf.pixels[buf.offsets[a]:buf.offsets[b]].reshape((b - a,) + item))
                continue
            block = np.zeros((b - a,) + item, np.uint8)
            for i in range(a, b):
                h, wd, _ = shapes[i]
                block[i - a, :h, :wd] = buf.image(i)
            w.append(block)
    return cache
