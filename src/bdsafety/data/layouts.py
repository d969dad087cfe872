"""GTSRB and Tiny-ImageNet in the layouts they are published in: finding their roots, parsing their label files.

The parsers take text and return rows (pure: no file access, every failure a one-line UsageError naming the file
and the line). The loaders turn rows into (path, label, roi) items and hand them to `formats.decode_images`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Sequence

from ..errors import UsageError
from . import formats
from .imageset import ImageSet

GTSRB_SIZE, TINY_IMAGENET_SIZE = 32, 64
ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")
GT_TEST, GT_TEST_UNLABELLED, GT_TEST_ZIP = "GT-final_test.csv", "GT-final_test.test.csv", "GTSRB_Final_Test_GT.zip"
# entries (exact names) that identify each layout's root folder
OFFICIAL_MARKERS = ("Final_Training", "Final_Test")
REPACK_MARKERS = ("Train", "Train.csv", "Test.csv")
TINY_MARKERS = ("wnids.txt", "val")

Loaded = tuple[ImageSet, ImageSet, int]


class SignRow(NamedTuple):
    """One row of a GTSRB annotation CSV: the image path as written, its inclusive ROI, its class."""

    path: str
    roi: tuple[int, int, int, int]
    class_id: int


class ValRow(NamedTuple):
    """One row of Tiny-ImageNet's val_annotations.txt: file name, class index (wnids.txt order), bounding box."""

    filename: str
    label: int
    box: tuple[int, int, int, int]


# ---- parsers: text -> rows ------------------------------------------------------------------------------------


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines, BOM and CR stripped."""
    lines = text.removeprefix("\ufeff").split("\n")
    return [(n, line.rstrip("\r")) for n, line in enumerate(lines, 1) if line.strip()]


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _integer(text: str, path, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{path} line {line}: {column} is {_shown(text)}, not an integer; "
                         "fix or delete the row") from None


def parse_table(text: str, path, sep: str, columns: Sequence[str]) -> list[tuple[int, list[str]]]:
    """Rows of a header-first `sep`-separated text (no quoting) as (line number, the `columns` fields in order)."""
    lines = _lines(text)
    if not lines:
        raise UsageError(f"{path} is empty; expected a header with the columns {sep.join(columns)}, then rows")
    first, header = lines[0][0], [name.strip() for name in lines[0][1].split(sep)]
    missing = [c for c in columns if c not in header]
    if missing:
        raise UsageError(f"{path} line {first}: the header lacks column {', '.join(missing)} (separator {sep!r}); "
                         "replace the file with the original")
    where = [header.index(c) for c in columns]
    rows = []
    for n, line in lines[1:]:
        fields = line.split(sep)
        if len(fields) != len(header):
            raise UsageError(f"{path} line {n}: {len(fields)} fields where the header has {len(header)}; "
                             "fix or delete the row")
        rows.append((n, [fields[i].strip() for i in where]))
    return rows


def parse_gtsrb_csv(text: str, path, sep: str = ";", path_column: str = "Filename") -> list[SignRow]:
    """GTSRB annotations: official GT-*.csv (`;`, Filename) or the re-packaging's Train/Test.csv (`,`, Path)."""
    rows = []
    for n, (name, *fields) in parse_table(text, path, sep, (path_column, *ROI_COLUMNS, "ClassId")):
        if not name:
            raise UsageError(f"{path} line {n}: empty {path_column}; fix or delete the row")
        x1, y1, x2, y2, class_id = (_integer(v, path, n, c) for v, c in zip(fields, (*ROI_COLUMNS, "ClassId")))
        if class_id < 0:
            raise UsageError(f"{path} line {n}: ClassId {class_id} is negative; fix or delete the row")
        rows.append(SignRow(name, (x1, y1, x2, y2), class_id))
    return rows


def parse_wnids(text: str, path) -> list[str]:
    """wnids.txt: one wnid per line; the line order is the class order."""
    wnids, seen = [], set()
    for n, line in _lines(text):
        wnid = line.strip()
        problem = "holds more than one word" if len(wnid.split()) != 1 else "repeats a wnid" if wnid in seen else ""
        if problem:
            raise UsageError(f"{path} line {n} {problem}; wnids.txt lists each class id once, one per line")
        wnids.append(wnid)
        seen.add(wnid)
    if not wnids:
        raise UsageError(f"{path} lists no wnids; replace it with the original wnids.txt")
    return wnids


def parse_words(text: str, path) -> dict[str, str]:
    """words.txt: `wnid<TAB>names` per line -> {wnid: names} (the first line for a wnid wins)."""
    words: dict[str, str] = {}
    for n, line in _lines(text):
        wnid, tab, names = line.partition("\t")
        if not tab or not wnid.strip():
            raise UsageError(f"{path} line {n}: expected wnid<TAB>names; fix or delete the line")
        words.setdefault(wnid.strip(), names.strip())
    return words


def parse_val_annotations(text: str, path, wnids: Sequence[str]) -> list[ValRow]:
    """val_annotations.txt: `filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1` per line; wnids from wnids.txt."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    rows = []
    for n, line in _lines(text):
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 6 or not fields[0]:
            raise UsageError(f"{path} line {n}: expected filename, wnid, x0, y0, x1, y1 separated by tabs "
                             f"({len(fields)} fields); fix or delete the line")
        if fields[1] not in index:
            raise UsageError(f"{path} line {n}: wnid {_shown(fields[1])} is not in wnids.txt; "
                             "the annotations and wnids.txt come from different copies, re-extract both")
        box = tuple(_integer(v, path, n, c) for v, c in zip(fields[2:], ("x0", "y0", "x1", "y1")))
        rows.append(ValRow(fields[0], index[fields[1]], box))
    return rows


# ---- files --------------------------------------------------------------------------------------------------


def read_text(path: Path, fix: str) -> str:
    """A label file's text (UTF-8, BOM allowed), or a UsageError naming it and `fix`."""
    if not path.is_file():
        raise UsageError(f"{path} is missing; {fix}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start}); replace it with the original") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc}); {fix}") from None


def find_root(folder: Path, subfolder: str, names: Sequence[str]) -> Path | None:
    """`folder` or `folder/subfolder`, whichever holds an entry named exactly one of `names` (case-sensitive even
    where the file system is not, so that GTSRB's `Train/` is told apart from a class-folder `train/`)."""
    for root in (folder, folder / subfolder):
        if root.is_dir() and not set(names).isdisjoint(os.listdir(root)):
            return root
    return None


def listed(base: Path, name: str, listed_in: Path) -> Path:
    """The image `name` (relative to `base`) that `listed_in` lists: it must exist and stay below `base`."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        raise UsageError(f"{listed_in} lists {name!r}, a path outside {base}; image paths must be relative")
    file = base / relative
    if not file.is_file():
        raise UsageError(f"{file} is listed in {listed_in} but missing; re-extract the archive or delete its row")
    return file


def numbered_class_folders(folder: Path) -> list[Path]:
    """The class folders of `folder`, named by integer class ids 0..C-1 (`0`, `00042`, ...), in class order."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is missing; it holds one folder per class, named by class id")
    by_id: dict[int, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not re.fullmatch(r"[0-9]+", sub.name) or int(sub.name) in by_id:
            raise UsageError(f"{sub} is not a class folder: {folder} must hold only folders named 0..C-1, once each")
        by_id[int(sub.name)] = sub
    gaps = sorted(set(range(len(by_id))) - set(by_id))
    if not by_id or gaps:
        what = f"lacks class folder {gaps[0]}" if gaps else "holds no class folders"
        raise UsageError(f"{folder} {what}; class folders must be named by the class ids 0..C-1")
    return [by_id[i] for i in range(len(by_id))]


def _check_test_classes(rows: list[SignRow], csv: Path, num_classes: int) -> None:
    if not rows:
        raise UsageError(f"{csv} lists no images; replace it with the original")
    bad = next((r for r in rows if r.class_id >= num_classes), None)
    if bad:
        raise UsageError(f"{csv}: ClassId {bad.class_id} of {bad.path} is not among the {num_classes} training "
                         f"classes 0..{num_classes - 1}; the test labels and training images do not match")


# ---- GTSRB, official archives: Final_Training/Images/000NN/, Final_Test/Images/ ---------------------------------


def gtsrb_official_root(folder: Path) -> Path | None:
    return find_root(folder, "GTSRB", OFFICIAL_MARKERS)


def _official_train(root: Path, roi_crop: bool) -> list:
    items = []
    for label, sub in enumerate(numbered_class_folders(root / "Final_Training" / "Images")):
        csv = sub / f"GT-{sub.name}.csv"
        rows = parse_gtsrb_csv(read_text(csv, "re-extract GTSRB_Final_Training_Images.zip"), csv)
        if not rows:
            raise UsageError(f"{csv} lists no images; re-extract GTSRB_Final_Training_Images.zip")
        bad = next((r for r in rows if r.class_id != label), None)
        if bad:
            raise UsageError(f"{csv}: ClassId {bad.class_id} of {bad.path} differs from its folder's class {label}")
        items += [(listed(sub, r.path, csv), label, r.roi if roi_crop else None) for r in rows]
    return items


def find_gt_test(root: Path, data_dir: Path) -> Path:
    """GT-final_test.csv in Final_Test/Images/, Final_Test/, the root or the data dir (the GT zip extracts flat)."""
    places = list(dict.fromkeys([root / "Final_Test" / "Images", root / "Final_Test", root, data_dir]))
    found = next((p / GT_TEST for p in places if (p / GT_TEST).is_file()), None)
    if found:
        return found
    only = any((p / GT_TEST_UNLABELLED).is_file() for p in places)
    note = f" ({GT_TEST_UNLABELLED}, found, has no ClassId)" if only else ""
    raise UsageError(f"GTSRB test labels missing: no {GT_TEST} in {', '.join(map(str, places))}{note}; "
                     f"download {GT_TEST_ZIP} and extract {GT_TEST} into {places[0]}")


def _official_test(root: Path, data_dir: Path, num_classes: int, roi_crop: bool) -> list:
    images = root / "Final_Test" / "Images"
    if not images.is_dir():
        raise UsageError(f"{images} is missing; extract GTSRB_Final_Test_Images.zip next to Final_Training")
    csv = find_gt_test(root, data_dir)
    rows = parse_gtsrb_csv(read_text(csv, f"download {GT_TEST_ZIP} again"), csv)
    _check_test_classes(rows, csv, num_classes)
    return [(listed(images, r.path, csv), r.class_id, r.roi if roi_crop else None) for r in rows]


def load_gtsrb_official(root: Path, data_dir: Path | None = None, roi_crop: bool = False) -> Loaded:
    """GTSRB from the official archives extracted at `root` (DIR or DIR/GTSRB): 43 classes, 32x32 RGB."""
    train = _official_train(root, roi_crop)
    num_classes = train[-1][1] + 1  # class folders are 0..C-1, none empty: the last item is of class C-1
    test = _official_test(root, data_dir or root, num_classes, roi_crop)
    return formats.decode_images(train, GTSRB_SIZE), formats.decode_images(test, GTSRB_SIZE), num_classes


# ---- GTSRB, common re-packaging (Kaggle gtsrb-german-traffic-sign): Train/<id>/, Test/, Test.csv -------------------


def gtsrb_repack_root(folder: Path) -> Path | None:
    return find_root(folder, "GTSRB", REPACK_MARKERS)


def _repack_train(root: Path, roi_crop: bool) -> list:
    folders = numbered_class_folders(root / "Train")
    files = [(file, label) for label, sub in enumerate(folders) for file in formats.list_images(sub)]
    if not roi_crop:
        return [(file, label, None) for file, label in files]
    csv = root / "Train.csv"
    text = read_text(csv, "roi_crop reads the training ROIs from it: restore it, or load without roi_crop")
    rois = {PurePosixPath(r.path.replace("\\", "/")).as_posix(): r.roi for r in parse_gtsrb_csv(text, csv, ",", "Path")}
    items = []
    for file, label in files:
        key = file.relative_to(root).as_posix()
        if key not in rois:
            raise UsageError(f"{file} has no row in {csv}, so it has no ROI; add its row, or load without roi_crop")
        items.append((file, label, rois[key]))
    return items


def _repack_test(root: Path, num_classes: int, roi_crop: bool) -> list:
    csv = root / "Test.csv"
    rows = parse_gtsrb_csv(read_text(csv, "it holds the test labels (ClassId per Test/ image): restore it"), csv,
                           ",", "Path")
    _check_test_classes(rows, csv, num_classes)
    return [(listed(root, r.path, csv), r.class_id, r.roi if roi_crop else None) for r in rows]


def load_gtsrb_repack(root: Path, roi_crop: bool = False) -> Loaded:
    """GTSRB re-packaged as Train/<class id>/*.png, Test/*.png and Test.csv (paths relative to `root`)."""
    train = _repack_train(root, roi_crop)
    num_classes = train[-1][1] + 1  # class folders are 0..C-1, none empty: the last item is of class C-1
    test = _repack_test(root, num_classes, roi_crop)
    return formats.decode_images(train, GTSRB_SIZE), formats.decode_images(test, GTSRB_SIZE), num_classes


# ---- Tiny-ImageNet: tiny-imagenet-200/{wnids.txt, train/<wnid>/images/, val/images/, val/val_annotations.txt} ------


def tiny_imagenet_root(folder: Path) -> Path | None:
    return find_root(folder, "tiny-imagenet-200", TINY_MARKERS)


def read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    return parse_wnids(read_text(path, "re-extract tiny-imagenet-200.zip"), path)


def tiny_imagenet_class_names(root: Path) -> list[str]:
    """Class names in class order, from words.txt (a class it does not name keeps its wnid)."""
    wnids, path = read_wnids(root), root / "words.txt"
    words = parse_words(read_text(path, "re-extract tiny-imagenet-200.zip"), path) if path.is_file() else {}
    return [words.get(wnid, wnid) for wnid in wnids]


def load_tiny_imagenet(root: Path) -> Loaded:
    """Tiny-ImageNet as published at `root`: train/ is the train split, val/ the test split; 64x64 RGB."""
    wnids = read_wnids(root)
    train = [(file, label) for label, wnid in enumerate(wnids)
             for file in formats.list_images(root / "train" / wnid / "images")]
    ann = root / "val" / "val_annotations.txt"
    text = read_text(ann, "it holds the val labels: re-extract tiny-imagenet-200.zip")
    rows = parse_val_annotations(text, ann, wnids)
    if not rows:
        raise UsageError(f"{ann} lists no images; re-extract tiny-imagenet-200.zip")
    test = [(listed(root / "val" / "images", r.filename, ann), r.label) for r in rows]
    size = TINY_IMAGENET_SIZE
    return formats.decode_images(train, size), formats.decode_images(test, size), len(wnids)
