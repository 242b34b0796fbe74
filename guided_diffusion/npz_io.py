"""Streaming access to image batches in `.npz` files, and atomic writing of outputs.

`np.load` of an `.npz` member reads the whole array; a 50,000 x 256 x 256 x 3 batch is 10 GB.
Here the `arr_0.npy` member is read from the zip archive a few images at a time instead
(stored or deflated members alike, since zipfile decompresses while reading). Every member's
header is checked before its data is read: no object arrays (their pickles could run code)
and no more data declared than the member holds (a forged count would exhaust memory).
"""

import math
import os
import uuid
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np

from .errors import UsageError

IMAGES = "arr_0"
LABELS = "arr_1"
# Precomputed statistics a reference batch may carry: (mean, covariance) names and dimension.
STATISTICS = {"pool": ("mu", "sigma", 2048), "spatial": ("mu_s", "sigma_s", 2023)}
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class InputError(UsageError):
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
        image_bytes = math.prod(self.shape[1:])
        for start in range(0, self.num_images, batch_size):
            count = min(batch_size, self.num_images - start)
            data = _read_exactly(self.path, IMAGES, self.stream, count * image_bytes)
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_exactly(path, name, stream, size):
    """Reads `size` bytes of array `name`, failing with an InputError on a short or corrupt file."""
    chunks, remaining = [], size
    try:
        while remaining:
            chunk = stream.read(remaining)
            if not chunk:
                raise InputError(f"{path}: truncated file: {name} ends before its last element")
            chunks.append(chunk)
            remaining -= len(chunk)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: corrupt file ({err})") from None
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


def _read_npy_header(path, name, stream):
    """(shape, fortran_order, dtype) from the header of the `.npy` stream of array `name`."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: corrupt {name} header ({err})") from None
    raise InputError(f"{path}: unsupported .npy format version {version} for {name}")


@contextmanager
def _open_array(path, archive, name):
    """Opens array `name` of an open `.npz`; yields (stream after the header, shape, fortran_order, dtype).

    Object arrays are refused (reading them would unpickle), and so is a header declaring more
    data than the member holds, before anything is allocated for it.
    """
    try:
        info = archive.getinfo(f"{name}.npy")
        stream = archive.open(info)
    except KeyError:
        raise InputError(f"{path}: no {name} array in the .npz file") from None
    except _READ_ERRORS as err:
        raise InputError(f"{path}: corrupt file ({err})") from None
    with stream:
        shape, fortran_order, dtype = _read_npy_header(path, name, stream)
        if dtype.hasobject:
            raise InputError(
                f"{path}: {name} is an array of Python objects; only numeric arrays are read (unpickling could run code)"
            )
        if any(side < 0 for side in shape):
            raise InputError(f"{path}: corrupt {name} header (negative size in shape {shape})")
        declared, held = math.prod(shape) * dtype.itemsize, info.file_size - stream.tell()
        if declared > held:
            raise InputError(
                f"{path}: {name}'s header declares shape {shape} ({declared:,} bytes) but the file holds "
                f"{max(held, 0):,} bytes of it: truncated or corrupt"
            )
        yield stream, shape, fortran_order, dtype


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
    with _open_zip(path) as archive, _open_array(path, archive, IMAGES) as (stream, shape, fortran_order, dtype):
        _check_images(path, shape, dtype, min_images)
        if fortran_order:
            stream = _MemoryStream(_read_whole(path, IMAGES, stream, shape, fortran_order, dtype))
        yield ImageArrayReader(path, stream, shape)


def read_labeled_images(path, min_images=2):
    """(images uint8 [N, H, W, 3], labels int64 [N] or None when the file has no arr_1), read whole: small batches only."""
    with open_images(path, min_images) as reader:
        images = np.concatenate(list(reader.batches(max(reader.num_images, 1))))
    with _open_zip(path) as archive:
        if f"{LABELS}.npy" not in archive.namelist():
            return images, None
        with _open_array(path, archive, LABELS) as (stream, shape, fortran_order, dtype):
            if dtype.kind not in "iu" or tuple(shape) != (len(images),):
                raise InputError(f"{path}: {LABELS} must hold one integer label per image ({len(images)}), got {dtype} {tuple(shape)}")
            labels = _read_whole(path, LABELS, stream, shape, fortran_order, dtype).astype(np.int64)
    return images, labels


def _read_whole(path, name, stream, shape, fortran_order, dtype):
    """The whole array `name` from its stream positioned after the header."""
    data = _read_exactly(path, name, stream, math.prod(shape) * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def _array_shape(path, archive, name):
    """The shape that array `name` of an open `.npz` declares (after the header checks)."""
    with _open_array(path, archive, name) as (_, shape, _, _):
        return shape


def _read_statistic(path, archive, name):
    """The array `name` of an open `.npz` as float64, refusing anything but finite real numbers."""
    with _open_array(path, archive, name) as (stream, shape, fortran_order, dtype):
        if dtype.kind not in "fiu":
            raise InputError(f"{path}: {name} must hold real numbers, got dtype {dtype}")
        array = _read_whole(path, name, stream, shape, fortran_order, dtype).astype(np.float64)
    if not np.isfinite(array).all():
        raise InputError(
            f"{path}: {name} holds NaN or infinite values: unusable statistics "
            "(rebuild them with evaluations/make_ref_batch.py)"
        )
    return array


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
            mu_shape, sigma_shape = (_array_shape(path, archive, name) for name in (mu_name, sigma_name))
            if (mu_shape, sigma_shape) != ((dim,), (dim, dim)):
                raise InputError(
                    f"{path}: {mu_name}/{sigma_name} must be shaped ({dim},)/({dim}, {dim}), got {mu_shape}/{sigma_shape}"
                )
            found[kind] = tuple(_read_statistic(path, archive, name) for name in (mu_name, sigma_name))
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


def check_output(path, inputs=()):
    """Refuses, before any work, an output path that is a folder, lies in no folder, or is one of the inputs."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; name the file to write")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise InputError(f"{path}: its folder does not exist")
    for source in inputs:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(source, path):
            raise InputError(f"{path}: is the input {source} itself; write to another file")


@contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path`, unique to this process, that replaces `path` once the block
    completes; on any failure (a full disk, Ctrl-C) `path` is left as it was and the temporary removed."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or err}); it is left as it was") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


@contextmanager
def atomic_npz(path):
    """Yields an NpzWriter on a temporary file that replaces `path` only once fully written."""
    with atomic_output(path) as tmp_path:
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            yield NpzWriter(archive)
