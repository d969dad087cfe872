"""The poisoned samples of a BackdoorBench record folder, read without running anything from it.

BackdoorBench (github.com/SCLBD/BackdoorBench) leaves every attack in a folder `record/<attack>/`:

    attack_result.pt            `save_attack_result` (utils/save_load_attack.py): a torch.save'd dict of
                                model_name, num_classes, model, data_path, img_size, clean_data, bd_train
                                (None or a dataset state), bd_test (a dataset state) and attack extras
    bd_train_dataset/<y>/<i>.png  the poisoned samples the attack saved with PIL: `<y>` the original label,
    bd_test_dataset/<y>/<i>.png   `<i>` the sample's index in the clean set (a few attacks name these folders
                                  differently, e.g. BppAttack's `bd_train_dataset_Save`)
    defense/<name>/defense_result.pt  `save_defense_result`: model_name, num_classes, model

A dataset state is `prepro_cls_DatasetBD_v2.retrieve_state()` (utils/bd_dataset_v2.py). Its
`bd_data_container.data_dict` maps each poisoned sample's index to
`{"path": f"{save_folder_path}/{y}/{i}.png", "other_info": [bd_label, y]}` when the attack saved it to disk,
or to `(PIL image, bd_label, y)` when it kept it in memory (`save_folder_path` None). `save_folder_path` is a
path on the attacker's machine (`./record/<attack>/bd_train_dataset`), so each file is looked up by the last
three components of its saved path under the record folder given here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import ImageSet
from ..errors import UsageError
from ..interop import BACKDOORBENCH_DATASETS, PickledImage, load_restricted

log = logging.getLogger(__name__)

ATTACK_RESULT = "attack_result.pt"
DEFENSE_RESULT = "defense_result.pt"
# 8-bit PIL modes -> their channels as saved (alpha dropped, palettes expanded). Other modes (32-bit "I",
# float "F", 16-bit "I;16") have no 8-bit L or RGB form that keeps their range, so they are refused.
SAVED_CHANNELS = {"1": 1, "L": 1, "LA": 1, "P": 3, "PA": 3, "RGB": 3, "RGBA": 3, "RGBX": 3, "CMYK": 3, "YCbCr": 3}
RAW_BYTES = {"L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBX": 4, "CMYK": 4}  # per pixel


@dataclass(frozen=True)
class RecordPoisons:
    """The poisoned samples of one split of a record, sorted by their index in the clean split."""

    images: ImageSet  # uint8 [N, C, H, W]; labels: the attack's (bd) labels as saved
    original_labels: Tensor  # int64 [N]: each sample's true label
    indices: Tensor  # int64 [N]: each sample's index in the clean train (or test) set


@dataclass(frozen=True)
class BackdoorBenchRecord:
    """What a BackdoorBench record folder holds: its result files and its poisoned samples."""

    folder: Path
    attack_result: Path
    defense_results: dict[str, Path]  # defense sub-folder name -> its defense_result.pt, sorted by name
    model_name: str | None
    num_classes: int | None
    dataset: str | None  # bdsafety's name of `clean_data`
    train: RecordPoisons | None  # None where the attack saved no bd_train
    test: RecordPoisons


def read_record(folder: Path, channels: int | None = None, size: int | None = None) -> BackdoorBenchRecord:
    """Read a BackdoorBench record folder: its poisoned train and test samples and its defense results.

    `attack_result.pt` goes through `interop.load_restricted`, so a file that pickles anything beyond
    tensors, containers, numpy arrays and PIL images is refused before any of it runs. Saved PNG files are
    decoded with PIL (PNG only, as BackdoorBench writes nothing else); in-memory PIL images are rebuilt from
    their pickled raw bytes with `Image.frombytes`.

    Conversion, as the dataset readers do it (`data.formats.decode_image`): every 8-bit image (modes 1, L,
    LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr) is converted to L for `channels=1` or RGB for `channels=3`
    (alpha dropped, palettes expanded, gray replicated), then resized bilinear to `size` x `size` where
    it differs. 16-bit, 32-bit and float images are refused: they have no 8-bit form that keeps their
    range. With `channels` or `size` None, the images keep their own (L and LA give 1 channel, the rest 3)
    and must then all agree in shape, train and test alike.

    Args:
        folder: the record folder (`record/<attack>/`) or the `attack_result.pt` inside it.
        channels: 1 or 3 to convert every image to the dataset's channels; None keeps them as saved.
        size: side length to resize every image to; None keeps them as saved.

    Returns:
        The record, each split's poisons sorted by their index in the clean split.

    Raises:
        UsageError: on a missing or code-carrying `attack_result.pt`, a listed PNG that is missing or not
            an image, an image that cannot be converted, a label outside 0..num_classes-1, an empty split.
    """
    if channels not in (None, 1, 3):
        raise UsageError(f"channels must be 1 or 3 (or None to keep the saved images'), not {channels}")
    if size is not None and size < 1:
        raise UsageError(f"size must be a positive side length (or None to keep the saved images'), not {size}")
    folder, attack_result = locate(folder)
    loaded = load_restricted(attack_result)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("bd_test"), dict):
        raise UsageError(f"{attack_result} holds no 'bd_test' dataset state; pass the attack_result.pt that "
                         "BackdoorBench's save_attack_result writes into the attack's record folder")
    name, classes, data = loaded.get("model_name"), loaded.get("num_classes"), loaded.get("clean_data")
    num_classes = as_int(classes)
    num_classes = num_classes if num_classes is not None and num_classes > 0 else None
    split = Split(attack_result, folder, num_classes, channels, size)
    train = None if loaded.get("bd_train") is None else split.read("bd_train", loaded["bd_train"])
    test = split.read("bd_test", loaded["bd_test"])
    if train is not None and train.images.shape != test.images.shape:
        raise UsageError(f"{attack_result}: bd_train poisons are {shape_text(train.images.shape)} but bd_test "
                         f"poisons {shape_text(test.images.shape)}; pass the dataset's channels and size to "
                         "convert them alike")
    defenses = {path.parent.name: path for path in sorted((folder / "defense").glob(f"*/{DEFENSE_RESULT}"))}
    log.info("read %d train and %d test poisons from %s", len(train.indices) if train else 0, len(test.indices),
             folder)
    return BackdoorBenchRecord(folder, attack_result, defenses, name if isinstance(name, str) else None,
                               num_classes,
                               BACKDOORBENCH_DATASETS.get(data, data) if isinstance(data, str) else None,
                               train, test)


def locate(path: Path) -> tuple[Path, Path]:
    """(record folder, its attack_result.pt) from either of them."""
    path = Path(path)
    folder = path.parent if path.name == ATTACK_RESULT else path
    if not (folder / ATTACK_RESULT).is_file():
        raise UsageError(f"{folder} holds no {ATTACK_RESULT}; pass a BackdoorBench record folder "
                         "(record/<attack>/, as the attack wrote it) or the attack_result.pt inside it")
    return folder, folder / ATTACK_RESULT


@dataclass(frozen=True)
class Split:
    """Reads the dataset states of one record: the settings shared by its train and test split."""

    attack_result: Path
    folder: Path
    num_classes: int | None
    channels: int | None
    size: int | None

    def read(self, split: str, state) -> RecordPoisons:
        """One split's poisons from its `prepro_cls_DatasetBD_v2` state, sorted by index."""
        entries = data_dict(state, split, self.attack_result)
        parsed = sorted((self.entry(split, key, value) for key, value in entries.items()), key=lambda e: e[0])
        # One thread: a 32x32 PNG spends most of its ~50 us in PIL's Python chunk parsing, under the GIL; a
        # thread pool of 2 on 2 cores measured about twice as slow as this loop.
        images = None
        for row, (index, source, _, _) in enumerate(parsed):
            array = decode_file(source, self.channels, self.size) if isinstance(source, str) else \
                decode_pickled(source, f"{self.attack_result} {split} sample {index}", self.channels, self.size)
            if images is None:
                images = np.empty((len(parsed), *array.shape), dtype=np.uint8)
            elif array.shape != images.shape[1:]:
                raise UsageError(f"{self.attack_result}: {split} poisons differ in shape ({hwc_text(images.shape[1:])} "
                                 f"for sample {parsed[0][0]}, {hwc_text(array.shape)} for sample {index}); pass the "
                                 "dataset's channels and size to convert them alike")
            images[row] = array
        indices, _, original, bd = (list(column) for column in zip(*parsed))
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return RecordPoisons(ImageSet(nchw, torch.tensor(bd, dtype=torch.int64)),
                             original_labels=torch.tensor(original, dtype=torch.int64),
                             indices=torch.tensor(indices, dtype=torch.int64))

    def entry(self, split: str, key, value) -> tuple[int, str | PickledImage, int, int]:
        """(index, PNG path or pickled image, original label, bd label) of one `data_dict` item."""
        where = f"{self.attack_result}: {split} entry {short(key)}"
        index = as_int(key)
        if index is None or index < 0:
            raise UsageError(f"{where} is keyed by {short(key)}, not a sample index; the record is damaged or "
                             "was not written by BackdoorBench")
        if isinstance(value, dict):  # saved to disk: {"path": ..., "other_info": [bd_label, label]}
            source, info = self.resolve(where, value.get("path")), value.get("other_info")
        elif isinstance(value, (tuple, list)) and value and isinstance(value[0], PickledImage):
            source, info = value[0], list(value[1:])  # kept in memory: (image, bd_label, label)
        else:
            raise UsageError(f"{where} is neither a saved file ({{'path', 'other_info'}}) nor an in-memory "
                             "(image, bd_label, label); the record is damaged or was not written by BackdoorBench")
        if not isinstance(info, (list, tuple)) or len(info) < 2:
            raise UsageError(f"{where} lacks its labels (bd_label, original label); the record is damaged or "
                             "was not written by BackdoorBench")
        return index, source, self.label(where, "original", info[1]), self.label(where, "bd (attack)", info[0])

    def label(self, where: str, kind: str, value) -> int:
        label = as_int(value)
        top = self.num_classes - 1 if self.num_classes is not None else None
        if label is None or label < 0 or (top is not None and label > top):
            bounds = f"0..{top}" if top is not None else "0 or more"
            raise UsageError(f"{where} has the {kind} label {short(value)}, not an int in {bounds}; the record "
                             "is damaged, or its num_classes is wrong")
        return label

    def resolve(self, where: str, saved) -> str:
        """The saved file's path under the record folder, by its last three components (<folder>/<y>/<i>.png),
        never outside it."""
        parts = saved.replace("\\", "/").split("/")[-3:] if isinstance(saved, str) else []
        if len(parts) < 3 or any(part in ("", ".", "..") for part in parts):
            raise UsageError(f"{where} names the file {short(saved)}, not <folder>/<label>/<index>.png inside the "
                             "record; the record is damaged or was not written by BackdoorBench")
        return "/".join([str(self.folder), *parts])  # a string: pathlib costs ~10 us a file


def data_dict(state, split: str, attack_result: Path) -> dict:
    """The non-empty `bd_data_container.data_dict` of a `prepro_cls_DatasetBD_v2.retrieve_state()`."""
    container = state.get("bd_data_container") if isinstance(state, dict) else None
    entries = container.get("data_dict") if isinstance(container, dict) else None
    if not isinstance(entries, dict):
        raise UsageError(f"{attack_result}: {split} is not a BackdoorBench v2 dataset state (no "
                         "bd_data_container.data_dict); re-save the record with BackdoorBench v2")
    if not entries:
        raise UsageError(f"{attack_result}: {split} holds no poisoned samples (its data_dict is empty); pass the "
                         "record of an attack that finished poisoning")
    return entries


def decode_file(path: str, channels: int | None, size: int | None) -> np.ndarray:
    """A saved PNG as uint8 [H, W, C] (see `to_array`)."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG",)) as img:
            img.load()
            return to_array(img, path, channels, size)
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{path} is missing, but the record lists it; copy the record folder whole, with its "
                         "bd_train_dataset/ and bd_test_dataset/ folders") from None
    except Exception as exc:  # whatever PIL's decoders raise on a bad file: not an image, truncated, a bomb
        reason = " ".join(str(exc).split())[:120]
        raise UsageError(f"{path} is not a readable PNG image ({type(exc).__name__}: {reason}); restore it from "
                         "the attack's original record folder") from None


def decode_pickled(image: PickledImage, name: str, channels: int | None, size: int | None) -> np.ndarray:
    """An in-memory PIL image from its pickled state, PIL's `Image.__getstate__`:
    [info, mode, size, palette, raw bytes]; only the mode, size, palette and bytes are used."""
    from PIL import Image

    state = getattr(image, "state", None)
    _, mode, dims, palette, data = state[:5] if isinstance(state, (list, tuple)) and len(state) >= 5 else [None] * 5
    width, height = (as_int(d) for d in dims) if isinstance(dims, (list, tuple)) and len(dims) == 2 else (None, None)
    if not isinstance(mode, str) or mode not in SAVED_CHANNELS:
        raise UsageError(f"{name} is an in-memory image of mode {short(mode)}, which has no 8-bit L or RGB form; "
                         "the attack must keep 8-bit grayscale or RGB images")
    if width is None or height is None or width < 1 or height < 1 \
            or width * height > (Image.MAX_IMAGE_PIXELS or 1 << 31):
        raise UsageError(f"{name} is an in-memory image of size {short(dims)}; the record is damaged")
    expected = (width + 7) // 8 * height if mode == "1" else RAW_BYTES[mode] * width * height
    if not isinstance(data, bytes) or len(data) != expected:
        raise UsageError(f"{name} is an in-memory {width}x{height} {mode} image without its {expected} bytes of "
                         "pixels; the record is damaged")
    img = Image.frombytes(mode, (width, height), data)
    if mode in ("P", "PA") and palette:
        try:
            img.putpalette(palette)
        except (TypeError, ValueError):
            raise UsageError(f"{name} is an in-memory palette image with a malformed palette; the record is "
                             "damaged") from None
    return to_array(img, name, channels, size)


def to_array(img, name: str, channels: int | None, size: int | None) -> np.ndarray:
    """A loaded PIL image as uint8 [H, W, C]: converted to L or RGB, resized bilinear where `size` differs."""
    from PIL import Image

    if img.mode not in SAVED_CHANNELS:
        raise UsageError(f"{name} is a '{img.mode}' image, which has no 8-bit L or RGB form that keeps its range; "
                         "save the poisons as 8-bit grayscale or RGB")
    want = channels or SAVED_CHANNELS[img.mode]
    target = "L" if want == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, want)


def as_int(value) -> int | None:
    """An integer label or index as BackdoorBench stores them (int, numpy integer, one-element integer
    tensor); None for anything else, booleans included."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value.item())
    return None


def short(value) -> str:
    """A value's repr on one line, cut to 60 characters: messages stay one line whatever a file holds."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def shape_text(shape: tuple[int, int, int]) -> str:
    return "x".join(str(d) for d in shape)


def hwc_text(shape: tuple[int, int, int]) -> str:
    return shape_text((shape[2], shape[0], shape[1]))
