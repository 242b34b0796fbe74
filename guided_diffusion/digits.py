"""scikit-learn's handwritten digits (1,797 8x8 images, 17 gray levels, 10 classes) as uint8 RGB
images with a fixed, seeded, stratified train / held-out split: the small real dataset that
ships with a package, on which the digits models are trained and evaluated."""

import numpy as np
from PIL import Image

from .errors import UsageError

HELD_OUT_FRACTION = 0.2  # 360 of the 1,797 images
SPLIT_SEED = 0


def to_uint8_rgb(gray16, image_size=8, resample="nearest"):
    """[N, 8, 8] gray levels 0..16 as uint8 RGB images [N, S, S, 3], upscaled to S with PIL's filter."""
    gray = np.round(np.asarray(gray16, dtype=np.float64) * (255 / 16)).astype(np.uint8)
    if image_size != gray.shape[-1]:
        filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        if resample not in filters:
            raise UsageError(f"unknown resample filter {resample!r}: use one of {', '.join(filters)}")
        size = (image_size, image_size)
        gray = np.stack([np.array(Image.fromarray(g).resize(size, resample=filters[resample])) for g in gray])
    return np.repeat(gray[..., None], 3, axis=-1)


def digits_split(image_size=8, resample="nearest", seed=SPLIT_SEED, held_out_fraction=HELD_OUT_FRACTION):
    """The split as {"train": (images, labels, indices), "held_out": (...)}: uint8 [N, S, S, 3], int64 labels,
    and each image's index in sklearn's `load_digits()`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise UsageError("the digits need scikit-learn: pip install scikit-learn (or .[digits])") from e
    digits = load_digits()
    indices = np.arange(len(digits.target))
    parts = train_test_split(indices, test_size=held_out_fraction, stratify=digits.target, random_state=seed)
    images = to_uint8_rgb(digits.images, image_size, resample)
    labels = digits.target.astype(np.int64)
    return {name: (images[np.sort(idx)], labels[np.sort(idx)], np.sort(idx)) for name, idx in zip(("train", "held_out"), parts)}
