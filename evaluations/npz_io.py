"""Streaming access to image batches in `.npz` files, and atomic writing of reference batches.

`np.load` of an `.npz` member reads the whole array; a 50,000 x 256 x 256 x 3 batch is 10 GB.
Here the `arr_0.npy` member is read from the zip archive a few images at a time instead
(stored or deflated members alike, since zipfile decompresses while reading).
"""

import os
import tempfile
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np

IMAGES = "arr_0"
# Precomputed statistics a reference batch may carry: (mean, covariance) names and dimension.
STATISTICS = {"pool": ("mu", "sigma", 2048), "spatial": ("mu_s", "sigma_s", 2023)}
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class InputError(Exception):
    """Bad input, reported to the user as one line without a traceback."""


class ImageArrayReader:
    """Reads an NHWC uint8 `.npy` stream (positioned after its header) in batches of images."""

    def __init__(self, path, stream, shape):
        self.path = path
        self.stream = stream
        self.shape = shape

    @property
    def num_images(self):
        """Number of images in the array."""
        return self.shape[0]

    def batches(self, batch_size):
        """Yields [<=batch_size, H, W, 3] uint8 arrays until every image has been read once."""
        image_bytes = int(np.prod(self.shape[1:]))
        for start in range(0, self.num_images, batch_size):
            count = min(batch_size, self.num_images - start)
            data = self._read_exactly(count * image_bytes)
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])

    def _read_exactly(self, size):
        """Reads `size` bytes, failing with an InputError on a short or corrupt file."""
        chunks, remaining = [], size
        try:
            while remaining:
                chunk = self.stream.read(remaining)
                if not chunk:
                    raise InputError(f"{self.path}: truncated file: {IMAGES} ends before its last image")
                chunks.append(chunk)
                remaining -= len(chunk)
        except _READ_ERRORS as err:
            raise InputError(f"{self.path}: corrupt file ({err})") from None
        return b"".join(chunks)


class _MemoryStream:
    """A byte stream over an array already in memory (for the rare Fortran-ordered `.npy`)."""

    def __init__(self, array):
        self.data = memoryview(np.ascontiguousarray(array).reshape(-1))
        self.offset = 0

    def read(self, size):
        """Up to `size` further bytes."""
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += len(chunk)
        return chunk


def _open_zip(path):
    """The `.npz` as an open ZipFile, or an InputError saying why it is not one."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: not a readable .npz file, truncated or corrupt ({err})") from None


def _read_npy_header(path, stream):
    """(shape, fortran_order, dtype) from the header of an `.npy` stream."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: corrupt {IMAGES} header ({err})") from None
    raise InputError(f"{path}: unsupported .npy format version {version} for {IMAGES}")


def _check_images(path, shape, dtype, min_images):
    """Rejects anything but at least `min_images` uint8 RGB images in NHWC layout."""
    if dtype != np.uint8:
        raise InputError(f"{path}: {IMAGES} must be uint8 images, got dtype {dtype}")
    if len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: {IMAGES} must be RGB images shaped [N, H, W, 3], got shape {tuple(shape)}")
    if shape[0] < min_images:
        raise InputError(f"{path}: needs at least {min_images} images, got {shape[0]}")


@contextmanager
def open_images(path, min_images=2):
    """Opens `arr_0` of an `.npz` for streaming; yields an ImageArrayReader after validating it."""
    with _open_zip(path) as archive:
        if f"{IMAGES}.npy" not in archive.namelist():
            raise InputError(f"{path}: no {IMAGES} array in the .npz file")
        try:
            stream = archive.open(f"{IMAGES}.npy")
        except _READ_ERRORS as err:
            raise InputError(f"{path}: corrupt file ({err})") from None
        with stream:
            shape, fortran_order, dtype = _read_npy_header(path, stream)
            _check_images(path, shape, dtype, min_images)
            if fortran_order:
                stream = _MemoryStream(_read_member(path, archive, IMAGES))
            yield ImageArrayReader(path, stream, shape)


def _read_member(path, archive, name):
    """The whole array `name` of an open `.npz` archive."""
    try:
        with archive.open(f"{name}.npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: corrupt {name} array ({err})") from None


def read_statistics(path):
    """Precomputed statistics stored in a batch: {"pool"/"spatial": (mu, sigma)} for those present."""
    found = {}
    with _open_zip(path) as archive:
        names = {name[: -len(".npy")] for name in archive.namelist()}
        for kind, (mu_name, sigma_name, dim) in STATISTICS.items():
            present = [name for name in (mu_name, sigma_name) if name in names]
            if not present:
                continue
            if len(present) == 1:
                raise InputError(f"{path}: has {present[0]} but not its partner ({mu_name}, {sigma_name} go together)")
            mu, sigma = (_read_member(path, archive, name) for name in (mu_name, sigma_name))
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise InputError(
                    f"{path}: {mu_name}/{sigma_name} must be shaped ({dim},)/({dim}, {dim}), "
                    f"got {mu.shape}/{sigma.shape}"
                )
            found[kind] = (mu.astype(np.float64), sigma.astype(np.float64))
    return found


class NpzWriter:
    """Writes named arrays into an open zip archive in `.npz` layout (uncompressed, like np.savez)."""

    def __init__(self, archive):
        self.archive = archive

    def write(self, name, array):
        """Stores a whole array as `name`."""
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    @contextmanager
    def stream_images(self, name, shape):
        """Yields a function that appends uint8 images to the array `name` of the given full shape."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        written = 0
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)

            def append(images):
                nonlocal written
                member.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
                written += len(images)

            yield append
        if written != shape[0]:
            raise RuntimeError(f"{name}: wrote {written} images, expected {shape[0]}")


@contextmanager
def atomic_npz(path):
    """Yields an NpzWriter on a temporary file that replaces `path` only once fully written."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    os.close(handle)
    try:
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            yield NpzWriter(archive)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
