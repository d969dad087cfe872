import gzip
import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bdsafety.data import augment, load_dataset, resolve_dir, split_reserve
from bdsafety.data import sources
from bdsafety.data.augment import random_crop
from bdsafety.data.formats import load_idx_pair, read_idx
from bdsafety.errors import UsageError


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_folder(folder, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        for kind, array in (("images-idx3", arrays[prefix][0]), ("labels-idx1", arrays[prefix][1])):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_reads_real_format(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path, gz=gz)
    bundle = load_dataset("mnist", tmp_path)
    assert bundle.train.images.shape == (20, 1, 28, 28) and bundle.test.images.shape == (10, 1, 28, 28)
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert torch.equal(bundle.test.labels, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))


def test_idx_truncated_file_is_a_clear_error(tmp_path):
    write_mnist_folder(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated"):
        load_idx_pair(tmp_path, "train")


def test_idx_wrong_magic_and_corrupt_gzip(tmp_path):
    bad = tmp_path / "x-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(UsageError, match="bad magic"):
        read_idx(bad, 3)
    gz = tmp_path / "x.gz"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UsageError, match="corrupt or truncated"):
        read_idx(gz, 3)


def test_idx_labels_out_of_range(tmp_path):
    write_mnist_folder(tmp_path, gz=False)
    labels = np.full(20, 12)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UsageError, match="labels outside"):
        load_dataset("mnist", tmp_path)


def write_cifar(folder, variant, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    key = b"labels" if variant == 10 else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if variant == 10 else ["train", "test"]
    for name in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: list(rng.integers(0, variant, n)),
                 b"filenames": [b"a.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("variant", [10, 100])
def test_cifar_python_batches(tmp_path, variant):
    write_cifar(tmp_path, variant)
    bundle = load_dataset(f"cifar{variant}", tmp_path)
    assert bundle.train.images.shape == ((30 if variant == 10 else 6), 3, 32, 32)
    assert bundle.num_classes == variant and bundle.train.images.dtype == torch.uint8


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_cifar_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path, 10)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(UsageError, match="not a valid CIFAR python batch"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "PWNED").exists()


def write_folder_dataset(root, classes=("a", "b"), per_class=3, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_image_folder_layout(tmp_path):
    write_folder_dataset(tmp_path)
    bundle = load_dataset("gtsrb", tmp_path)
    assert bundle.train.images.shape == (6, 3, 32, 32) and bundle.num_classes == 2
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert load_dataset("tiny-imagenet", tmp_path).test.images.shape == (6, 3, 64, 64)


def test_image_folder_empty_class_and_bad_image(tmp_path):
    write_folder_dataset(tmp_path)
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "test" / "c").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        load_dataset("gtsrb", tmp_path)
    (tmp_path / "train" / "c" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot decode"):
        load_dataset("gtsrb", tmp_path)


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("BDSAFETY_DATA", str(tmp_path / "nothing"))
    source = sources.SOURCES["fashion-mnist"]
    monkeypatch.setitem(sources.SOURCES, "fashion-mnist", replace(source, system_paths=(str(tmp_path / "sys"),)))
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist") as info:
        resolve_dir("fashion-mnist", None)
    assert "nothing" in str(info.value)


def test_resolution_order(tmp_path, monkeypatch):
    env_root, explicit = tmp_path / "env", tmp_path / "explicit"
    write_mnist_folder(env_root / "mnist")
    write_mnist_folder(explicit)
    monkeypatch.setenv("BDSAFETY_DATA", str(env_root))
    assert resolve_dir("mnist", None) == env_root / "mnist"
    assert resolve_dir("mnist", explicit) == explicit


def test_synthetic_is_seeded():
    a, b, c = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=2)
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)


def test_reserve_split_is_seeded_and_disjoint():
    split = split_reserve(1000, 0.05, seed=3)
    assert len(split.reserve) == 50 and len(split.train) == 950
    assert set(split.reserve.tolist()).isdisjoint(split.train.tolist())
    assert torch.equal(split.reserve, split_reserve(1000, 0.05, seed=3).reserve)
    with pytest.raises(UsageError):
        split_reserve(1000, 1.5, 0)


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, x[i]) or torch.equal(f, x[i].flip(2)) for i, f in enumerate(flipped))
