"""GTSRB (official archives, common re-packaging) and Tiny-ImageNet in their published layouts, written small."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from bdsafety.data import layouts, load_dataset, sources
from bdsafety.errors import UsageError

OFFICIAL_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
REPACK_COLUMNS = ("Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path")
RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_csv(path, sep, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [sep.join(columns)] + [sep.join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def sign(path, label, rng, **extra):
    """Save a blue image of random size whose ROI (inclusive, a few pixels in from each edge) is red; its CSV row."""
    width, height = (int(v) for v in rng.integers(28, 41, 2))
    x1, y1, x2, y2 = int(rng.integers(2, 6)), int(rng.integers(2, 6)), width - 1 - 3, height - 1 - 4
    pixels = np.full((height, width, 3), BLUE, dtype=np.uint8)
    pixels[y1:y2 + 1, x1:x2 + 1] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return {"Filename": path.name, "Width": width, "Height": height, "Roi.X1": x1, "Roi.Y1": y1, "Roi.X2": x2,
            "Roi.Y2": y2, "ClassId": label, **extra}


def write_official(folder, sub="GTSRB", gt="Final_Test/Images", classes=3, test_labels=(0, 2, 1, 2)):
    """The three official archives extracted into `folder` (root `folder/sub`); `gt` is where GT-final_test.csv
    goes (relative to the root, "outer" for `folder` itself, None for nowhere)."""
    root, rng = folder / sub, np.random.default_rng(0)
    for c in range(classes):
        images = root / "Final_Training" / "Images" / f"{c:05d}"
        rows = [sign(images / f"{c:05d}_{i:05d}.ppm", c, rng) for i in range(2)]
        write_csv(images / f"GT-{c:05d}.csv", ";", OFFICIAL_COLUMNS, rows)
    images = root / "Final_Test" / "Images"
    rows = [sign(images / f"{i:05d}.ppm", label, rng) for i, label in enumerate(test_labels)]
    write_csv(images / "GT-final_test.test.csv", ";", OFFICIAL_COLUMNS[:-1], rows)
    if gt is not None:
        write_csv((folder if gt == "outer" else root / gt) / "GT-final_test.csv", ";", OFFICIAL_COLUMNS, rows)
    return root


def write_repack(root, classes=3, test_labels=(1, 0, 2, 2)):
    """The Kaggle re-packaging: Train/<id>/*.png + Train.csv, Test/*.png + Test.csv, paths relative to root."""
    rng, train = np.random.default_rng(1), []
    for c in range(classes):
        for i in range(2):
            name = f"Train/{c}/{c:05d}_{i:05d}.png"
            train.append(sign(root / name, c, rng, Path=name))
    write_csv(root / "Train.csv", ",", REPACK_COLUMNS, train)
    test = [sign(root / f"Test/{i:05d}.png", c, rng, Path=f"Test/{i:05d}.png") for i, c in enumerate(test_labels)]
    write_csv(root / "Test.csv", ",", REPACK_COLUMNS, test)
    return root


def save_noise(path, shape, rng):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def write_tiny(folder, sub="tiny-imagenet-200", wnids=("n02", "n01", "n03"), val=("n03", "n02", "n02", "n01")):
    """tiny-imagenet-200.zip extracted (small): one train image is a grayscale JPEG, one is not 64x64."""
    root, rng = folder / sub, np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttench, Tinca tinca\nn99\tunused\n")
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for i in range(2):
            shape = (64, 64) if (wnid, i) == (wnids[0], 1) else (64, 64, 3) if i == 0 else (50, 70, 3)
            save_noise(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", shape, rng)
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)  # unlabelled, ignored
    lines = []
    for i, wnid in enumerate(val):
        save_noise(root / "val" / "images" / f"val_{i}.JPEG", (64, 64, 3), rng)
        lines.append(f"val_{i}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def assert_images(images, count, size):
    assert images.dtype == torch.uint8 and tuple(images.shape) == (count, 3, size, size)


# ---- GTSRB, official archives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sub, gt", [("", "Final_Test/Images"), ("GTSRB", "Final_Test/Images"), ("GTSRB", "Final_Test"),
                                     ("GTSRB", "."), ("GTSRB", "outer")])
def test_gtsrb_official(tmp_path, sub, gt):
    write_official(tmp_path, sub, gt)
    bundle = load_dataset("gtsrb", tmp_path)
    assert_images(bundle.train.images, 6, 32)
    assert_images(bundle.test.images, 4, 32)
    assert bundle.num_classes == 3 and bundle.shape == (3, 32, 32)
    assert bundle.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert bundle.test.labels.tolist() == [0, 2, 1, 2]


def test_gtsrb_official_without_ground_truth_says_where_to_get_it(tmp_path):
    root = write_official(tmp_path, gt=None)
    with pytest.raises(UsageError, match=r"no GT-final_test.csv .*GT-final_test.test.csv, found, has no ClassId.*"
                                         r"GTSRB_Final_Test_GT.zip") as info:
        load_dataset("gtsrb", tmp_path)
    assert str(root / "Final_Test" / "Images") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("writer", ["official", "repack"])
def test_gtsrb_roi_crop(tmp_path, writer):
    write_official(tmp_path) if writer == "official" else write_repack(tmp_path)
    train, test, num_classes = sources.SOURCES["gtsrb"].loader(tmp_path, roi_crop=True)
    for images in (train.images, test.images):
        pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).int()
        assert (pixels - torch.tensor(RED)).abs().max() <= 1  # only the red ROI is left
    uncropped = sources.SOURCES["gtsrb"].loader(tmp_path)[0].images
    assert uncropped[:, 2].max() > 200  # the blue border is in the uncropped images
    assert torch.equal(load_dataset("gtsrb-roi", tmp_path).train.images, train.images)  # the dataset name for it


def rewrite_row(csv, line, **changes):
    """Change fields of the 1-based `line` of a ;-separated GTSRB CSV."""
    lines = csv.read_text().splitlines()
    header, fields = lines[0].split(";"), lines[line - 1].split(";")
    for column, value in changes.items():
        fields[header.index(column)] = str(value)
    lines[line - 1] = ";".join(fields)
    csv.write_text("\n".join(lines) + "\n")


def test_gtsrb_roi_is_clamped_and_empty_roi_refused(tmp_path):
    root = write_official(tmp_path)
    csv = root / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    rewrite_row(csv, 2, **{"Roi.X1": -5, "Roi.X2": 500})  # clamped to the image
    assert len(sources.SOURCES["gtsrb"].loader(tmp_path, roi_crop=True)[0]) == 6
    rewrite_row(csv, 3, **{"Roi.X1": 100, "Roi.X2": 120})
    with pytest.raises(UsageError, match=r"ROI \(100, .*00001_00001.ppm is empty or outside"):
        sources.SOURCES["gtsrb"].loader(tmp_path, roi_crop=True)
    assert len(load_dataset("gtsrb", tmp_path).train) == 6  # ROIs are not read without roi_crop


def corrupt(root, how):
    csv = root / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    if how == "row":
        csv.write_text(csv.read_text() + "00001_00009.ppm;30;30;1;1\n")
    elif how == "class-id":
        rewrite_row(csv, 3, ClassId="one")
    elif how == "column":
        csv.write_text(csv.read_text().replace("ClassId", "Class"))
    elif how == "image-missing":
        (csv.parent / "00001_00001.ppm").unlink()
    elif how == "undecodable":
        (csv.parent / "00001_00001.ppm").write_bytes(b"P6 not really")
    elif how == "folder-class":
        rewrite_row(csv, 2, ClassId=2)
    elif how == "test-class":
        rewrite_row(root / "Final_Test" / "Images" / "GT-final_test.csv", 3, ClassId=7)
    elif how == "gap":
        (root / "Final_Training" / "Images" / "00004").mkdir()
    return csv


@pytest.mark.parametrize("how, message", [
    ("row", r"GT-00001.csv line 4: 5 fields where the header has 8"),
    ("class-id", r"GT-00001.csv line 3: ClassId is 'one', not an integer"),
    ("column", r"GT-00001.csv line 1: the header lacks column ClassId"),
    ("image-missing", r"00001_00001.ppm is listed in .*GT-00001.csv but missing"),
    ("undecodable", r"cannot decode image .*00001_00001.ppm"),
    ("folder-class", r"GT-00001.csv: ClassId 2 of 00001_00000.ppm differs from its folder's class 1"),
    ("test-class", r"GT-final_test.csv: ClassId 7 of 00001.ppm is not among the 3 training classes 0..2"),
    ("gap", r"Images lacks class folder 3"),
])
def test_gtsrb_official_errors(tmp_path, how, message):
    corrupt(write_official(tmp_path), how)
    with pytest.raises(UsageError, match=message) as info:
        load_dataset("gtsrb", tmp_path)
    assert "\n" not in str(info.value)


# ---- GTSRB, common re-packaging ---------------------------------------------------------------------------------


def test_gtsrb_repack(tmp_path):
    write_repack(tmp_path / "GTSRB")
    (tmp_path / "GTSRB" / "Train.csv").unlink()  # labels come from the folders; Train.csv is needed for ROIs only
    bundle = load_dataset("gtsrb", tmp_path)
    assert_images(bundle.train.images, 6, 32)
    assert_images(bundle.test.images, 4, 32)
    assert bundle.num_classes == 3
    assert bundle.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and bundle.test.labels.tolist() == [1, 0, 2, 2]
    with pytest.raises(UsageError, match=r"Train.csv is missing; roi_crop reads the training ROIs from it"):
        sources.SOURCES["gtsrb"].loader(tmp_path, roi_crop=True)


def test_published_layouts_win_over_lowercase_class_folders(tmp_path):
    """The Kaggle download also carries lowercase train/ and test/ copies; the official layout comes first."""
    write_repack(tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / "x").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "x" / "0.png")
    assert load_dataset("gtsrb", tmp_path).num_classes == 3
    write_official(tmp_path, classes=4)
    assert len(load_dataset("gtsrb", tmp_path).train) == 8


@pytest.mark.parametrize("how, message", [
    ("empty-class", r"Train/1 holds no images"),
    ("named-class", r"Train/stop is not a class folder"),
    ("no-test-csv", r"Test.csv is missing; it holds the test labels"),
    ("test-image-missing", r"Test/00002.png is listed in .*Test.csv but missing"),
    ("test-bad-row", r"Test.csv line 3: 7 fields where the header has 8"),
])
def test_gtsrb_repack_errors(tmp_path, how, message):
    root = write_repack(tmp_path)
    if how == "empty-class":
        for file in (root / "Train" / "1").iterdir():
            file.unlink()
    elif how == "named-class":
        (root / "Train" / "stop").mkdir()
    elif how == "no-test-csv":
        (root / "Test.csv").unlink()
    elif how == "test-image-missing":
        (root / "Test" / "00002.png").unlink()
    elif how == "test-bad-row":
        lines = (root / "Test.csv").read_text().splitlines()
        (root / "Test.csv").write_text("\n".join([*lines[:2], lines[2].rsplit(",", 1)[0], *lines[3:]]) + "\n")
    with pytest.raises(UsageError, match=message):
        load_dataset("gtsrb", tmp_path)


# ---- Tiny-ImageNet -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", "tiny-imagenet-200"])
def test_tiny_imagenet(tmp_path, sub):
    root = write_tiny(tmp_path, sub)
    bundle = load_dataset("tiny-imagenet", tmp_path)
    assert_images(bundle.train.images, 6, 64)
    assert_images(bundle.test.images, 4, 64)
    assert bundle.num_classes == 3
    assert bundle.train.labels.tolist() == [0, 0, 1, 1, 2, 2]  # wnids.txt order: n02, n01, n03
    assert bundle.test.labels.tolist() == [2, 0, 0, 1]
    gray = bundle.train.images[1]  # n02_1.JPEG is grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert layouts.tiny_imagenet_class_names(root) == ["tench, Tinca tinca", "goldfish, Carassius auratus", "n03"]


@pytest.mark.parametrize("how, message", [
    ("no-annotations", r"val_annotations.txt is missing; it holds the val labels"),
    ("unknown-wnid", r"val_annotations.txt line 2: wnid 'n99' is not in wnids.txt"),
    ("short-row", r"val_annotations.txt line 3: expected filename, wnid, x0, y0, x1, y1"),
    ("val-image-missing", r"val_1.JPEG is listed in .*val_annotations.txt but missing"),
    ("empty-class", r"train/n01/images holds no images"),
    ("no-wnids", r"wnids.txt is missing"),
    ("repeated-wnid", r"wnids.txt line 4 repeats a wnid"),
])
def test_tiny_imagenet_errors(tmp_path, how, message):
    root = write_tiny(tmp_path)
    ann = root / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines(keepends=True)
    if how == "no-annotations":
        ann.unlink()
    elif how == "unknown-wnid":
        ann.write_text(lines[0] + lines[1].replace("n02", "n99") + "".join(lines[2:]))
    elif how == "short-row":
        ann.write_text("".join(lines[:2]) + "val_2.JPEG\tn02\n")
    elif how == "val-image-missing":
        (root / "val" / "images" / "val_1.JPEG").unlink()
    elif how == "empty-class":
        for file in (root / "train" / "n01" / "images").iterdir():
            file.unlink()
    elif how == "no-wnids":
        (root / "wnids.txt").unlink()
    elif how == "repeated-wnid":
        (root / "wnids.txt").write_text("n02\nn01\nn03\nn01\n")
    with pytest.raises(UsageError, match=message) as info:
        load_dataset("tiny-imagenet", tmp_path)
    assert "\n" not in str(info.value)


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BDSAFETY_DATA", str(tmp_path))
    write_official(tmp_path / "gtsrb")
    write_tiny(tmp_path / "tiny-imagenet")
    assert len(load_dataset("gtsrb").test) == 4 and len(load_dataset("tiny-imagenet").test) == 4


# ---- parsers: fuzzing and round trips ------------------------------------------------------------------------

NAMES = st.text("abcXYZ019._-/", min_size=1, max_size=16)
INTS = st.integers(-10**6, 10**6)
NOISE = st.text("0123456789;,\t\r\n -xn.\ufeff", max_size=120)
HEADERS = st.sampled_from(["", ";".join(OFFICIAL_COLUMNS), ",".join(REPACK_COLUMNS), "Filename;ClassId"])


def parses_or_refuses(parse, *args):
    try:
        parse(*args)
    except UsageError as exc:
        assert "\n" not in str(exc) and "f.csv" in str(exc)


@settings(max_examples=120, deadline=None)
@given(st.one_of(st.text(max_size=100), st.builds(lambda h, body: h + "\n" + body, HEADERS, NOISE)),
       st.sampled_from([(";", "Filename"), (",", "Path")]))
def test_gtsrb_csv_parser_never_crashes(text, form):
    parses_or_refuses(layouts.parse_gtsrb_csv, text, "f.csv", *form)


@settings(max_examples=120, deadline=None)
@given(st.one_of(st.text(max_size=100), NOISE), st.lists(st.sampled_from(["n01", "n02", "x"]), unique=True))
def test_tiny_imagenet_parsers_never_crash(text, wnids):
    parses_or_refuses(layouts.parse_val_annotations, text, "f.csv", wnids)
    parses_or_refuses(layouts.parse_wnids, text, "f.csv")
    parses_or_refuses(layouts.parse_words, text, "f.csv")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(NAMES, st.tuples(INTS, INTS, INTS, INTS), st.integers(0, 10**6)), max_size=8),
       st.permutations(OFFICIAL_COLUMNS), st.sampled_from([";", ","]), st.sampled_from(["\n", "\r\n"]),
       st.sampled_from(["", "\ufeff"]))
def test_gtsrb_csv_round_trip(rows, columns, sep, newline, bom):
    def field(row, column):
        name, roi, class_id = row
        values = {"Filename": name, "Width": 40, "Height": 41, "ClassId": class_id,
                  **dict(zip(layouts.ROI_COLUMNS, roi))}
        return str(values[column])

    text = bom + newline.join([sep.join(columns)] + [sep.join(field(r, c) for c in columns) for r in rows]) + newline
    assert layouts.parse_gtsrb_csv(text, "f.csv", sep, "Filename") == [layouts.SignRow(*r) for r in rows]


WNIDS = st.lists(st.text("n0123456789abc", min_size=1, max_size=10), min_size=1, max_size=6, unique=True)


@settings(max_examples=80, deadline=None)
@given(WNIDS, st.data())
def test_tiny_imagenet_round_trip(wnids, data):
    assert layouts.parse_wnids("\n".join(wnids) + "\n", "wnids.txt") == wnids
    name = st.text("abc ,'-", max_size=12).map(str.strip)
    names = data.draw(st.lists(name, min_size=len(wnids), max_size=len(wnids)))
    words = "".join(f"{w}\t{n}\n" for w, n in zip(wnids, names))
    assert layouts.parse_words(words, "words.txt") == dict(zip(wnids, names))
    rows = data.draw(st.lists(st.tuples(NAMES, st.integers(0, len(wnids) - 1), st.tuples(INTS, INTS, INTS, INTS)),
                              max_size=8))
    text = "".join(f"{name}\t{wnids[label]}\t" + "\t".join(map(str, box)) + "\n" for name, label, box in rows)
    assert layouts.parse_val_annotations(text, "val_annotations.txt", wnids) == [layouts.ValRow(*r) for r in rows]
