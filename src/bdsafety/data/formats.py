"""Readers for the standard on-disk formats: IDX (MNIST family), CIFAR python batches, image folders.

Every reader validates what it reads and raises UsageError with the file name and the fix.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .imageset import ImageSet

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping `.gz`."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UsageError(f"cannot read {path}: {exc}; the file is corrupt or truncated, replace it") from None


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Parse an IDX file (magic 0x0000TTDD, big-endian dims, then the data)."""
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise UsageError(f"{path} is not an IDX file (bad magic number); replace it with the original file")
    dims = data[3]
    if dims != expected_dims:
        raise UsageError(f"{path} has {dims} dimensions, expected {expected_dims}; is it the right file?")
    header = 4 + 4 * dims
    if len(data) < header:
        raise UsageError(f"{path} is truncated (header incomplete); replace it with the original file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UsageError(
            f"{path} is truncated or corrupt: header promises {expected} data bytes, file has {len(data) - header}; "
            "replace it with the original file"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_file(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise UsageError(f"{folder} lacks {stems[0]}[.gz]; point --data-dir at the folder holding the IDX files")


def load_idx_pair(folder: Path, split: str) -> ImageSet:
    """Load `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from an MNIST-style folder."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_file(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]), 3)
    labels = read_idx(find_file(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]), 1)
    if images.dtype != np.uint8:
        raise UsageError(f"{folder}: {split} images must be uint8 IDX (type 0x08)")
    if len(images) != len(labels):
        raise UsageError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels; files do not match")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: CIFAR batches need nothing else, and no code runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes through it
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: returns uint8 [N,3,32,32] and int64 [N]."""
    if not path.is_file():
        raise UsageError(f"{path} is missing; point --data-dir at the extracted cifar python folder")
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a bad file
        raise UsageError(f"{path} is not a valid CIFAR python batch ({exc}); replace it with the original file") from None
    if not isinstance(batch, dict):
        raise UsageError(f"{path} is not a valid CIFAR python batch (not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path} lacks 'data' or '{label_key}'; is it the right CIFAR variant?")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UsageError(f"{path}: data must be uint8 [N, 3072] with one label per row")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(folder: Path, variant: int, split: str) -> ImageSet:
    """CIFAR-10 (`data_batch_1..5`, `test_batch`) or CIFAR-100 (`train`, `test`) python batches."""
    if variant == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    else:
        files, key = [split], "fine_labels"
    parts = [read_cifar_batch(folder / f, key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise UsageError(f"{root} is missing; an image-folder dataset needs train/ and test/ with one folder per class")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise UsageError(f"{root} holds no class folders; put each class's images in {root}/<class>/")
    return names


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted (dotfiles such as macOS `._x.png` skipped); at least one."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is missing; every class needs a folder holding its images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UsageError(f"{folder} holds no images; every class folder needs at least one image")
    return files


def roi_box(roi: tuple[int, int, int, int], size: tuple[int, int], file: Path) -> tuple[int, int, int, int]:
    """PIL crop box of an inclusive ROI (X1, Y1, X2, Y2), clamped to a `size` = (width, height) image."""
    (x1, y1, x2, y2), (width, height) = roi, size
    box = (max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise UsageError(f"ROI {tuple(roi)} of {file} is empty or outside its {width}x{height} image; "
                         "fix its row in the CSV, or load without roi_crop")
    return box


def decode_image(file: Path, size: int, channels: int = 3, roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One image file as uint8 [C, size, size]: converted to RGB (or L), cropped to `roi` if given, resized bilinear."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"cannot decode image {file} ({exc}); remove or replace it") from None
    if roi is not None:
        img = img.crop(roi_box(roi, img.size, file))
    array = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return array.reshape(size, size, channels).transpose(2, 0, 1)


def decode_images(items, size: int, channels: int = 3) -> ImageSet:
    """(path, label) or (path, label, roi or None) items -> ImageSet of uint8 [N, C, size, size], in item order."""
    images = np.empty((len(items), channels, size, size), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (file, label, *roi) in enumerate(items):
        images[i] = decode_image(file, size, channels, roi[0] if roi else None)
        labels[i] = label
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def load_image_folder(root: Path, classes: list[str], size: int, channels: int) -> ImageSet:
    """Decode `root/<class>/*.<image>` into uint8 [N,C,size,size] (resized, bilinear)."""
    items = [(file, label) for label, name in enumerate(classes) for file in list_images(root / name)]
    return decode_images(items, size, channels)
