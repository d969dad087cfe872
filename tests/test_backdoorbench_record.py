"""BackdoorBench record folders: poisons read bit-exactly from PNGs and in-memory images, nothing run from the file."""

import builtins
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bdsafety.errors import UsageError
from bdsafety.poisons.backdoorbench import read_record

from backdoorbench_layout import write_record

TRAIN_INDICES = [41, 3, 17, 8, 29, 0]  # out of order: the reader sorts by index
TEST_INDICES = [5, 2, 11, 7]


def split_arrays(indices, channels, seed, side=8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(indices), channels, side, side), dtype=np.uint8)
    labels = rng.integers(1, 10, len(indices))
    return images, labels, np.zeros(len(indices), dtype=np.int64), np.array(indices)


def write(folder, channels=3, in_memory=False, **kwargs):
    train, test = split_arrays(TRAIN_INDICES, channels, 0), split_arrays(TEST_INDICES, channels, 1)
    write_record(folder, *train, *test, in_memory=in_memory, **kwargs)
    return train, test


def assert_split(read, written):
    images, labels, bd_labels, indices = written
    order = np.argsort(indices)
    assert read.indices.dtype == torch.int64 and read.indices.tolist() == sorted(indices.tolist())
    assert torch.equal(read.images.images, torch.from_numpy(images[order]))
    assert read.images.labels.tolist() == bd_labels[order].tolist()
    assert read.original_labels.dtype == torch.int64 and read.original_labels.tolist() == labels[order].tolist()


@pytest.mark.parametrize("channels", [1, 3])
def test_saved_pngs_read_bit_identical_with_labels_indices_and_defenses(tmp_path, channels):
    folder = tmp_path / "record" / "badnet_x"
    train, test = write(folder, channels, defenses={"ft": {"w": torch.ones(2)}, "anp": {"w": torch.zeros(2)}})
    assert (folder / "bd_train_dataset" / str(train[1][0]) / f"{TRAIN_INDICES[0]}.png").is_file()
    record = read_record(folder)
    assert_split(record.train, train)
    assert_split(record.test, test)
    assert (record.model_name, record.num_classes, record.dataset) == ("preactresnet18", 10, "cifar10")
    assert list(record.defense_results) == ["anp", "ft"]
    assert record.defense_results["ft"] == folder / "defense" / "ft" / "defense_result.pt"
    via_file = read_record(folder / "attack_result.pt")
    assert via_file.folder == folder and torch.equal(via_file.test.images.images, record.test.images.images)


@pytest.mark.parametrize("channels", [1, 3])
def test_in_memory_pil_images_decode_like_the_saved_pngs(tmp_path, channels):
    write(tmp_path / "disk", channels)
    train, test = write(tmp_path / "memory", channels, in_memory=True, clean_data="tiny")
    assert not (tmp_path / "memory" / "bd_train_dataset").exists()
    disk, memory = read_record(tmp_path / "disk"), read_record(tmp_path / "memory")
    assert_split(memory.train, train)
    assert_split(memory.test, test)
    assert torch.equal(memory.train.images.images, disk.train.images.images)
    assert memory.dataset == "tiny-imagenet" and memory.defense_results == {}


def test_in_memory_palette_image_is_expanded_by_its_palette(tmp_path):
    write(tmp_path / "memory", 3, in_memory=True)
    loaded = torch.load(tmp_path / "memory" / "attack_result.pt", weights_only=False)
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    palette = rgb.quantize(16)
    key = next(iter(loaded["bd_test"]["bd_data_container"]["data_dict"]))
    loaded["bd_test"]["bd_data_container"]["data_dict"][key] = (palette, 0, 5)
    torch.save(loaded, tmp_path / "memory" / "attack_result.pt")
    record = read_record(tmp_path / "memory")
    row = record.test.indices.tolist().index(int(key))
    expected = np.array(palette.convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(record.test.images.images[row], torch.from_numpy(expected))


def test_channels_and_size_convert_like_the_datasets_own_readers(tmp_path):
    train, _ = write(tmp_path / "gray", 1)
    record = read_record(tmp_path / "gray", channels=3, size=16)
    assert record.train.images.shape == (3, 16, 16)
    first = Image.fromarray(train[0][np.argsort(train[3])[0], 0]).convert("RGB").resize((16, 16), Image.BILINEAR)
    assert torch.equal(record.train.images.images[0], torch.from_numpy(np.asarray(first).transpose(2, 0, 1).copy()))
    _, rgb_test = write(tmp_path / "rgb", 3)
    gray = read_record(tmp_path / "rgb", channels=1)
    first = Image.fromarray(rgb_test[0][np.argsort(rgb_test[3])[0]].transpose(1, 2, 0)).convert("L")
    assert gray.test.images.shape == (1, 8, 8)
    assert torch.equal(gray.test.images.images[0, 0], torch.from_numpy(np.array(first)))


def test_a_record_without_bd_train_gives_only_test_poisons(tmp_path):
    test = split_arrays(TEST_INDICES, 3, 1)
    write_record(tmp_path / "r", None, None, None, None, *test)
    record = read_record(tmp_path / "r")
    assert record.train is None
    assert_split(record.test, test)


class Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle is hostile on purpose
def test_a_code_carrying_attack_result_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    carrier = Reduce(builtins.exec, f"open({str(marker)!r}, 'w').write('x')")
    write(tmp_path / "zip")
    loaded = torch.load(tmp_path / "zip" / "attack_result.pt", weights_only=False)
    key = next(iter(loaded["bd_train"]["bd_data_container"]["data_dict"]))
    loaded["bd_train"]["bd_data_container"]["data_dict"][key] = (carrier, 0, 1)
    torch.save(loaded, tmp_path / "zip" / "attack_result.pt")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "attack_result.pt").write_bytes(pickle.dumps({"bd_test": carrier}, protocol=2))
    for folder in ("zip", "plain"):
        with pytest.raises(UsageError) as refused:
            read_record(tmp_path / folder)
        assert "\n" not in str(refused.value) and "exec" in str(refused.value) and "nothing" in str(refused.value)
    assert not marker.exists()


def refusal(path, **kwargs) -> str:
    with pytest.raises(UsageError) as refused:
        read_record(path, **kwargs)
    message = str(refused.value)
    assert "\n" not in message and (refused.value.__context__ is None or refused.value.__suppress_context__)
    return message


def edit_state(folder, edit):
    loaded = torch.load(folder / "attack_result.pt", weights_only=False)
    edit(loaded)
    torch.save(loaded, folder / "attack_result.pt")


def test_bad_records_are_refused_with_one_line_that_names_the_fix(tmp_path):
    assert "holds no attack_result.pt" in refusal(tmp_path / "nothing")
    train, _ = write(tmp_path / "r")
    png = tmp_path / "r" / "bd_train_dataset" / str(train[1][0]) / f"{TRAIN_INDICES[0]}.png"
    png.unlink()
    assert f"{png} is missing" in refusal(tmp_path / "r")
    png.write_bytes(b"these are not the pixels you are looking for")
    assert f"{png} is not a readable PNG image" in refusal(tmp_path / "r")

    write(tmp_path / "empty")
    edit_state(tmp_path / "empty", lambda d: d["bd_test"]["bd_data_container"]["data_dict"].clear())
    assert "bd_test holds no poisoned samples" in refusal(tmp_path / "empty")

    write(tmp_path / "label")
    edit_state(tmp_path / "label", lambda d: d.update(num_classes=5))
    assert "not an int in 0..4" in refusal(tmp_path / "label")

    def float_label(d):
        next(iter(d["bd_test"]["bd_data_container"]["data_dict"].values()))["other_info"][0] = 0.5
    write(tmp_path / "float")
    edit_state(tmp_path / "float", float_label)
    assert "the bd (attack) label 0.5, not an int in 0..9" in refusal(tmp_path / "float")

    def escape(d):
        entry = next(iter(d["bd_test"]["bd_data_container"]["data_dict"].values()))
        entry["path"] = "../../secret.png"
    write(tmp_path / "escape")
    edit_state(tmp_path / "escape", escape)
    assert "not <folder>/<label>/<index>.png inside the record" in refusal(tmp_path / "escape")


def test_poisons_of_different_shapes_need_channels_and_size(tmp_path):
    train, test = split_arrays(TRAIN_INDICES, 3, 0), split_arrays(TEST_INDICES, 1, 1, side=6)
    write_record(tmp_path / "mixed", *train, *test)
    assert "pass the dataset's channels and size" in refusal(tmp_path / "mixed")
    record = read_record(tmp_path / "mixed", channels=3, size=8)
    assert record.train.images.shape == record.test.images.shape == (3, 8, 8)
    assert torch.equal(record.train.images.images, torch.from_numpy(train[0][np.argsort(train[3])]))
    png = tmp_path / "mixed" / "bd_train_dataset" / str(train[1][0]) / f"{TRAIN_INDICES[0]}.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16) + 300).save(png)  # 16-bit gray: no 8-bit form
    assert "has no 8-bit L or RGB form" in refusal(tmp_path / "mixed", channels=3, size=8)
