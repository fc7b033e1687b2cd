"""The vision layer: images as store rows (`MemmapImageList`), decoded image sets held in RAM
(`ImageListInMemory`), and the converter from image folders to stores.

=========  ======================================================================================
module     concept
=========  ======================================================================================
images     `MemmapImageList`, `MemmapSegmentationLabelList`: an image store's rows as fastai images
inmemory   `ImageListInMemory`: an `ImageList` whose decoded pixels live in one shared buffer
convert    `images_to_memmap`: decode an image folder (in parallel) into an image store
batch_tfms `BatchTfms`: ``get_transforms()`` on whole batches on the device (``databunch(batch_tfms=...)``)
=========  ======================================================================================
"""
from .images import MemmapImageList, MemmapSegmentationLabelList
from .inmemory import ImageListInMemory, SegmentationItemListInMemory, preload, unload
from .convert import images_to_memmap
from .batch_tfms import BatchAugment, BatchTfms

__all__ = ["BatchAugment", "BatchTfms", "ImageListInMemory", "MemmapImageList", "MemmapSegmentationLabelList", "SegmentationItemListInMemory",
           "images_to_memmap", "preload", "unload"]
