"""Training data: a folder of images, labelled by file-name prefix, as an endless batch iterator."""

import math
import random

import blobfile as bf
import numpy as np
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .dist_util import mpi_comm
from .errors import UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def load_data(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, random_crop=False, random_flip=True):
    """Yield (images, kwargs) batches forever: images [N, 3, S, S] in [-1, 1], kwargs {"y": labels}.

    With class_cond the class of `dog_123.png` is "dog" (the text before the first
    underscore); classes are numbered in sorted order. Each rank reads its own shard. Bad
    input raises UsageError at the call, before any batch is drawn.
    """
    if not data_dir:
        raise UsageError("no --data_dir given: point it at a folder of images")
    if not bf.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir} is not a folder")
    all_files = list_image_files_recursively(data_dir)
    if not all_files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir}")
    classes = None
    if class_cond:
        class_names = [bf.basename(path).split("_")[0] for path in all_files]
        sorted_classes = {name: i for i, name in enumerate(sorted(set(class_names)))}
        classes = [sorted_classes[name] for name in class_names]
    rank, size = _rank_and_size()
    dataset = ImageDataset(image_size, all_files, classes=classes, shard=rank, num_shards=size, random_crop=random_crop, random_flip=random_flip)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=1, drop_last=True)
    if len(dataset) < batch_size:
        raise UsageError(f"{len(dataset)} images per rank are fewer than --batch_size {batch_size}")
    return _forever(loader)


def _forever(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _rank_and_size():
    """This process's shard of the data: its rank and the number of ranks (torch.distributed's, else MPI's)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    comm = mpi_comm()
    return (comm.rank, comm.size) if comm is not None else (0, 1)


def list_image_files_recursively(data_dir):
    """All image files under data_dir, sorted."""
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full_path = bf.join(data_dir, entry)
        if "." in entry and entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(list_image_files_recursively(full_path))
    return results


_list_image_files_recursively = list_image_files_recursively  # upstream's name


class ImageDataset(Dataset):
    """Images (and labels) of one shard, cropped to `resolution` and scaled to [-1, 1], CHW."""

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        with bf.BlobFile(self.local_images[idx], "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        pil_image = pil_image.convert("RGB")
        crop = random_crop_arr if self.random_crop else center_crop_arr
        arr = crop(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict


def center_crop_arr(pil_image, image_size):
    """Resize so the short side is image_size (box-filter halvings, then bicubic) and crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """Resize so the short side is a random size between image_size/max and /min frac, then crop at random."""
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = random.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = random.randrange(arr.shape[0] - image_size + 1)
    crop_x = random.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
