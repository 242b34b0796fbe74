"""The low-resolution images (and labels) of an .npz that a super-resolution model upsamples (--base_samples)."""

import numpy as np
import torch as th

from .errors import UsageError


class BaseSamples:
    """The images and labels of a base-samples .npz, checked against the upsampler."""

    def __init__(self, path, small_size, num_classes=None):
        """:param num_classes: the upsampler's classes when it is class-conditional (labels are then required)."""
        if not path:
            raise UsageError("--base_samples is required: an .npz of low-resolution samples (arr_0) and their labels (arr_1)")
        try:
            with np.load(path) as data:
                self.images = data["arr_0"]
                self.labels = data["arr_1"] if "arr_1" in data.files else None
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read --base_samples {path}: expected an .npz with arr_0 images ({e})") from e
        shape = self.images.shape
        if self.images.dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or not len(self.images):
            raise UsageError(f"--base_samples {path} holds arr_0 {self.images.dtype} {list(shape)}: expected uint8 [N, H, W, 3] images")
        if shape[1:3] != (small_size, small_size):
            raise UsageError(f"--base_samples {path} holds {shape[1]}x{shape[2]} images but the upsampler takes {small_size}x{small_size} (--small_size)")
        if self.labels is None and num_classes:
            raise UsageError(f"--base_samples {path} has no labels (arr_1) but the upsampler is class-conditional")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise UsageError(f"--base_samples {path}: arr_1 has shape {list(self.labels.shape)} but there are {len(self.images)} images")
        if num_classes and not ((self.labels >= 0) & (self.labels < num_classes)).all():
            raise UsageError(f"--base_samples {path} has labels outside 0..{num_classes - 1}, the upsampler's classes")

    def __len__(self):
        return len(self.images)

    def inputs(self, indices):
        """model_kwargs for samples `indices` (cycling through the base samples): low_res in [-1, 1] NCHW, y."""
        rows = np.asarray(indices) % len(self)
        kwargs = {"low_res": th.from_numpy(self.images[rows]).float().div(127.5).sub(1).permute(0, 3, 1, 2)}
        if self.labels is not None:
            kwargs["y"] = th.from_numpy(self.labels[rows].astype(np.int64))
        return kwargs
