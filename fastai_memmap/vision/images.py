"""`MemmapImageList`: an image store served as fastai `Image`s, and segmentation masks from a label store.

An image store holds one image per row, uint8 (0..255) or float (0..1), laid out as recorded in
``meta['layout']``: ``"HWC"`` (as decoded by PIL; the default for 3-d rows whose last axis has 1, 3
or 4 channels), ``"CHW"`` (torch order) or ``"HW"`` (grayscale, 2-d rows).
"""
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from fastai.vision.data import ImageList
from fastai.vision.image import Image, ImageSegment
from fastai.layers import CrossEntropyFlat

from ..errors import ItemShapeError, LabelError
from ..data.batching import MemmapImageDataBunch
from ..data.items import MemmapItemList, MemmapProcessor
from ..data.labels import MemmapLabelList, CODE_CHUNK_ROWS
from ..store.reader import MemmapArray

__all__ = ["MemmapImageList", "MemmapSegmentationLabelList", "image_layout", "row_to_chw", "rows_to_nchw",
           "rows_to_nchw_uint8"]

LAYOUTS = ("HWC", "CHW", "HW")


def image_layout(item_shape: Tuple[int, ...], meta: Optional[dict] = None) -> str:
    """Layout of image rows of `item_shape`: ``meta['layout']`` if recorded, else guessed.

    Raises ``ItemShapeError`` for rows that are not 2-d or 3-d, or a layout that does not fit.
    """
    layout = (meta or {}).get("layout")
    if layout is None:
        if len(item_shape) == 2:
            layout = "HW"
        elif len(item_shape) == 3:
            layout = "HWC" if item_shape[-1] in (1, 3, 4) else "CHW"
    if layout not in LAYOUTS or len(item_shape) != len(layout):
        raise ItemShapeError(f"expected image rows of layout HWC, CHW or HW, found rows of shape {item_shape} "
                             f"with layout {layout!r}; record meta={{'layout': ...}} when writing the store")
    return layout


def rows_to_nchw(rows: np.ndarray, layout: str, convert_mode: str = "RGB", contiguous: bool = True) -> torch.Tensor:
    """Convert a batch of stored image rows ``(n, *item_shape)`` to a float32 NCHW tensor in [0, 1].

    Returns a new tensor (never a view of `rows`). uint8 rows are divided by 255, float rows are
    taken as they are. ``convert_mode`` follows PIL as `open_image` does: ``'RGB'`` repeats a single
    channel three times (and drops alpha), ``'L'`` averages RGB to one channel with ITU-R 601-2
    luma weights; other modes keep the stored channels. With `contiguous` (the default, what
    stacking items gives) the result is C-contiguous; without, it keeps the stored memory order
    (a cheaper copy; fastai's ``pil2tensor`` does the same for decoded images).
    """
    a = np.asarray(rows)
    a = a[:, None] if layout == "HW" else (a.transpose(0, 3, 1, 2) if layout == "HWC" else a)
    # contiguous NCHW for batches, as stacking items gives; items keep the stored memory order (a faster
    # copy), as fastai's pil2tensor does
    t = torch.from_numpy(np.array(a, dtype=np.float32, order="C" if contiguous else "K"))
    if a.dtype == np.uint8:
        t.div_(255.)
    if convert_mode == "RGB" and t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1).contiguous()
    elif convert_mode == "RGB" and t.shape[1] == 4:
        t = t[:, :3].contiguous()
    elif convert_mode == "L" and t.shape[1] >= 3:
        t = (t[:, 0:1] * 0.299 + t[:, 1:2] * 0.587 + t[:, 2:3] * 0.114)
    return t


def rows_to_nchw_uint8(rows: np.ndarray, layout: str, convert_mode: str = "RGB") -> Optional[torch.Tensor]:
    """uint8 image rows ``(n, *item_shape)`` as a uint8 NCHW tensor sharing their memory where it can.

    Channel conversion follows `rows_to_nchw` where it is exact in uint8 (``'RGB'`` repeats one
    channel or drops alpha; other modes except ``'L'`` keep the stored channels). Returns None
    when it is not (``'L'`` of colour rows needs float arithmetic): use `rows_to_nchw` then.
    ``to_float(result)`` equals ``rows_to_nchw(rows, layout, convert_mode)`` bit for bit.
    """
    t = torch.from_numpy(np.asarray(rows))
    t = t[:, None] if layout == "HW" else (t.permute(0, 3, 1, 2) if layout == "HWC" else t)
    if convert_mode == "RGB" and t.shape[1] == 1:
        return t.expand(-1, 3, -1, -1).contiguous()
    if convert_mode == "RGB" and t.shape[1] == 4:
        return t[:, :3]
    if convert_mode == "L" and t.shape[1] >= 3:
        return None
    return t


def row_to_chw(row: np.ndarray, layout: str, convert_mode: str = "RGB") -> torch.Tensor:
    "One stored image row to a float32 CHW tensor in [0, 1] (a copy); see `rows_to_nchw`."
    return rows_to_nchw(np.asarray(row)[None], layout, convert_mode, contiguous=False)[0]


class MemmapImageProcessor(MemmapProcessor):
    "`MemmapProcessor` that also turns a raw image (stored layout, ndarray) into an `Image` at predict time."

    def process_one(self, item: Any) -> Any:
        "Pass fastai `Image`s through; convert an ndarray row of the store's shape to an `Image`."
        if isinstance(item, Image):
            return item
        a = np.asarray(item)
        if self.item_shape is not None and tuple(a.shape) != self.item_shape:
            raise ItemShapeError(f"predict: expected an image of shape {self.item_shape} (layout "
                                 f"{image_layout(self.item_shape, self.meta)}), found {a.shape}")
        return Image(row_to_chw(a, image_layout(a.shape, self.meta)))


class MemmapImageList(MemmapItemList, ImageList):
    """An `ImageList` whose images are the rows of an image store (see module docstring).

    ``get(i)`` returns a fastai `Image` (float32 CHW in [0, 1], a copy), so ``transform
    (get_transforms())``, ``normalize``, ``show_batch``, `cnn_learner` and `unet_learner` work
    as with files. ``convert_mode`` is honoured as by ``open_image``; ``after_open`` (a PIL hook)
    does not apply to stored pixels and is ignored.

    With ``uint8=True`` (``MemmapImageList.from_memmap(path, uint8=True)``) and a uint8 store,
    whole batches (the batch fast path, no ``tfms``) travel as uint8 NCHW and become float32 in
    [0, 1] on the target device (`fastai_memmap.data.device.to_float_tfm`, which the data bunch puts
    before ``normalize``): equal values, 4× fewer bytes. Items (``get``) stay float `Image`s.
    """
    _bunch = MemmapImageDataBunch
    _processor = MemmapImageProcessor
    show_xys, show_xyzs = ImageList.show_xys, ImageList.show_xyzs

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, uint8: bool = False, **kwargs):
        super().__init__(items, store=store, **kwargs)
        self.uint8 = bool(uint8)
        self.copy_new.append("uint8")

    @property
    def layout(self) -> str:
        "Layout of the stored rows: ``'HWC'``, ``'CHW'`` or ``'HW'``."
        return image_layout(tuple(self._store().item_shape), self._store().meta)

    @property
    def image_hw(self) -> Tuple[int, int]:
        "(height, width) of the stored images."
        shape, layout = self._store().item_shape, self.layout
        return (shape[0], shape[1]) if layout in ("HWC", "HW") else (shape[1], shape[2])

    def get_label_cls(self, labels: Any, label_cls: Optional[type] = None, label_delim: Optional[str] = None,
                      classes: Optional[Any] = None, **kwargs: Any) -> type:
        """`MemmapSegmentationLabelList` for a dense integer label store whose rows are maps of the
        images' height × width (``(H, W)`` or ``(..., H, W)``); else `MemmapItemList.get_label_cls`."""
        if label_cls is None and isinstance(labels, MemmapArray) and labels.dtype.kind in "iu" \
                and len(labels.item_shape) >= 2 and tuple(labels.item_shape[-2:]) == self.image_hw:
            return MemmapSegmentationLabelList
        return super().get_label_cls(labels, label_cls=label_cls, label_delim=label_delim, classes=classes, **kwargs)

    def get(self, i: int) -> Image:
        "Image of row `self.items[i]` as a fastai `Image`."
        store = self._store()
        return Image(row_to_chw(store[int(self.items[i])], self.layout, self.convert_mode))

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        """Images of positions `idxs` as one NCHW tensor (batch fast path): float32, equal to stacking
        `get`, or with ``uint8=True`` on a uint8 store uint8 pixels (a possibly strided NCHW view of
        the gathered rows) that `to_float_tfm` turns into exactly that float batch."""
        rows = self._store().read(np.asarray(self.items)[idxs])
        if self.uint8 and rows.dtype == np.uint8:
            t = rows_to_nchw_uint8(rows, self.layout, self.convert_mode)
            if t is not None:
                return t
        return rows_to_nchw(rows, self.layout, self.convert_mode)

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> Image:
        "`Image` from a CHW float tensor (clamped to [0, 1])."
        return Image(t.float().clamp(min=0, max=1))


class MemmapSegmentationProcessor(MemmapProcessor):
    "Holds the class names of a mask store (from `classes`, ``meta['classes']``, or ``range(max + 1)``)."

    def __init__(self, ds: Optional["MemmapSegmentationLabelList"] = None):
        super().__init__(ds)
        self.classes = getattr(ds, "classes", None)
        store = getattr(ds, "store", None)
        if self.classes is None and store is not None:
            self.classes = store.meta.get("classes") or list(range(_max_code(store, np.asarray(ds.items)) + 1))
        self.classes = None if self.classes is None else list(self.classes)

    def process(self, ds: "MemmapSegmentationLabelList") -> None:
        "Set `ds.classes` and `ds.c`."
        super().process(ds)
        ds.classes, ds.c = self.classes, len(self.classes or ())


def _max_code(store: MemmapArray, rows: np.ndarray) -> int:
    "Largest code over the masks of `rows`, read in chunks of about `CODE_CHUNK_ROWS` values."
    step = max(1, CODE_CHUNK_ROWS // max(1, int(np.prod(store.item_shape))))
    hi = 0
    for a in range(0, len(rows), step):
        m = store.read(rows[a:a + step])
        if m.size and m.min() < 0:
            raise LabelError(f"{store.path}: expected mask codes >= 0, found {int(m.min())}")
        hi = max(hi, int(m.max()) if m.size else 0)
    return hi


class MemmapSegmentationLabelList(MemmapLabelList):
    """Segmentation masks from a label store of integer class maps (rows ``(H, W)`` or ``(1, H, W)``).

    ``get(i)`` returns a fastai `ImageSegment` (``(1, H, W)``: float32 pixels like ``open_mask``,
    int64 through ``.data``), transformed with the image
    when ``tfm_y=True``. Loss: ``CrossEntropyFlat(axis=1)``; ``c = len(classes)``.
    """
    _processor = MemmapSegmentationProcessor

    def __init__(self, items: Any, store: Optional[MemmapArray] = None, classes: Optional[List] = None, **kwargs):
        super().__init__(items, store=store, **kwargs)
        self.classes = None if classes is None else list(classes)
        self.copy_new.append("classes")
        self.loss_func = CrossEntropyFlat(axis=1)
        self.c = len(self.classes or ())

    def get(self, i: int) -> ImageSegment:
        "Mask of item `i` as an `ImageSegment`."
        m = np.asarray(self._store()[int(self.items[i])], dtype=np.float32)   # float pixels, as open_mask
        return ImageSegment(torch.from_numpy(m.reshape((1,) + m.shape[-2:])))

    def get_batch(self, idxs: np.ndarray) -> torch.Tensor:
        "Masks of positions `idxs` as int64 ``(n, 1, H, W)``, equal to collating `get(i).data`."
        m = self._store().read(np.asarray(self.items)[idxs])
        return torch.from_numpy(m.astype(np.int64).reshape((len(m), 1) + m.shape[-2:]))

    def analyze_pred(self, pred: torch.Tensor, thresh: float = 0.5) -> torch.Tensor:
        "Most likely class per pixel, shape ``(1, H, W)``."
        return pred.argmax(dim=0)[None]

    def reconstruct(self, t: torch.Tensor, x: Any = None) -> ImageSegment:
        "`ImageSegment` of `t`."
        return ImageSegment(t)
