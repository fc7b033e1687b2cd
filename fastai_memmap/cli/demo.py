"""The main job: train a CNN on scikit-learn's bundled digits, read from an image store.

Steps: write 1,797 real 8×8 grayscale digit images (uint8) and their labels to two stores with
`MemmapWriter`, build a `MemmapImageList` data bunch with ``get_transforms()`` and
``num_workers=2``, train ``cnn_learner(resnet18, pretrained=False)``, print validation accuracy,
then ``export`` → ``load_learner`` → ``predict`` on images held out of the stores.
Needs no network: the digits ship inside scikit-learn.
"""
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..data import compat
from ..store.writer import MemmapWriter

__all__ = ["run_demo", "HELD_OUT"]

HELD_OUT = 20          # images kept out of the stores, predicted after load_learner
DIGIT_SCALE = 255 / 16  # sklearn digits are 0..16 gray levels; stored as 0..255 uint8


def _write_digits(out: Path, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> None:
    "Write `images` (n, 8, 8) uint8 and `labels` (n,) int64 to stores ``out/x`` and ``out/y`` in batches."
    classes = [str(i) for i in range(10)]
    with MemmapWriter(out / "x", np.uint8, images.shape[1:], meta={"layout": "HW"},
                      total=len(images), progress=True) as wx, \
            MemmapWriter(out / "y", np.int64, (), meta={"classes": classes}) as wy:
        for a in range(0, len(images), batch):
            wx.append(images[a:a + batch])
            wy.append(labels[a:a + batch])


def run_demo(workdir: Optional[Path] = None, epochs: int = 6, size: int = 32, num_workers: int = 2,
             bs: int = 64, seed: int = 0) -> Dict[str, float]:
    """Run the demo end to end and return ``{'accuracy', 'held_out_accuracy', 'seconds'}``.

    `workdir` receives the stores, ``models/`` and ``export.pkl`` (default: a temporary directory,
    deleted afterwards). `size` is the side, in pixels, the 8×8 digits are resized to.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fastai_memmap_demo_") as d:
            return run_demo(Path(d), epochs, size, num_workers, bs, seed)
    compat.apply()
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator")   # fastai pins by default
    warnings.filterwarnings("ignore", message="Arguments other than a weight enum")  # pretrained=False
    import torch
    from sklearn.datasets import load_digits
    from fastai.basic_train import load_learner
    from fastai.metrics import accuracy
    from fastai.vision import cnn_learner, get_transforms, imagenet_stats, models
    from ..vision.images import MemmapImageList

    t0 = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    workdir = Path(workdir)
    digits = load_digits()
    images = np.round(digits.images * DIGIT_SCALE).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    print(f"writing {len(images) - HELD_OUT} digit images to {workdir / 'x'} (+ {HELD_OUT} held out)")
    _write_digits(workdir, images[:-HELD_OUT], labels[:-HELD_OUT])

    data = (MemmapImageList.from_memmap(workdir / "x")
            .split_by_rand_pct(0.2, seed=seed)
            .label_from_memmap(workdir / "y")
            .transform(get_transforms(do_flip=False), size=size)
            .databunch(bs=bs, num_workers=num_workers)
            .normalize(imagenet_stats))
    print(data)
    learn = cnn_learner(data, models.resnet18, pretrained=False, metrics=accuracy)
    learn.fit_one_cycle(epochs, 3e-3)
    acc = float(learn.validate()[1])
    print(f"validation accuracy: {acc:.4f}")

    learn.export()
    inference = load_learner(workdir)
    from ..vision.images import row_to_chw
    from fastai.vision.image import Image
    hits = 0
    for img, lab in zip(images[-HELD_OUT:], labels[-HELD_OUT:]):
        pred, _, _ = inference.predict(Image(row_to_chw(img, "HW")))
        hits += int(str(pred) == str(lab))
    held = hits / HELD_OUT
    print(f"held-out images predicted after export/load_learner: {hits}/{HELD_OUT} correct "
          f"(e.g. true {labels[-1]} -> predicted {pred})")
    secs = time.time() - t0
    print(f"done in {secs:.0f} s")
    return {"accuracy": acc, "held_out_accuracy": held, "seconds": secs}
