"""Writes a record folder exactly as BackdoorBench leaves one, for tests (`from backdoorbench_layout import
write_record`; pytest puts tests/ on sys.path, as for `from conftest import ...`).

What BackdoorBench writes, and where (github.com/SCLBD/BackdoorBench):
- attack_result.pt: utils/save_load_attack.py `save_attack_result` torch.saves {model_name, num_classes, model,
  data_path, img_size, clean_data, bd_train, bd_test}; bd_train / bd_test are
  `prepro_cls_DatasetBD_v2.retrieve_state()` (utils/bd_dataset_v2.py): bd_data_container (save_folder_path,
  data_dict, save_file_format), getitem_all, getitem_all_switch, original_index_array, poison_indicator,
  save_folder_path.
- data_dict: numpy int64 sample index -> {"path": f"{save_folder_path}/{label}/{index}.png", "other_info":
  [bd_label, label]} with the PNG saved by PIL (`poisonedCLSDataContainer.setitem`), or, with save_folder_path
  None, -> (PIL image, bd_label, label) kept in memory. attack/badnet.py passes
  save_folder_path=f"{args.save_path}/bd_train_dataset" (and bd_test_dataset), args.save_path being the
  relative './record/<name>'; bd_test is subset to its poisoned indices (`original_index_array`).
- defense/<name>/defense_result.pt: `save_defense_result` torch.saves {model_name, num_classes, model}.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_record(folder: Path, train_images, train_labels, train_bd_labels, train_indices,
                 test_images, test_labels, test_bd_labels, test_indices, *, in_memory: bool = False,
                 model_state: dict | None = None, model_name: str = "preactresnet18", num_classes: int = 10,
                 clean_data: str = "cifar10", clean_sizes: tuple[int, int] | None = None,
                 defenses: dict[str, dict] | None = None) -> Path:
    """Write a BackdoorBench record folder and return the path of its attack_result.pt.

    Args:
        folder: the record folder to create (its name plays the attack's `record/<name>`).
        train_images: uint8 [N, C, H, W] (C 1 or 3; numpy or torch) poisoned training images, or None for
            an attack that saved no bd_train.
        train_labels: the N original (true) labels.
        train_bd_labels: the N attack (bd) labels.
        train_indices: the N samples' distinct indices in the clean train set.
        test_images, test_labels, test_bd_labels, test_indices: the same for the poisoned test samples.
        in_memory: keep the PIL images inside attack_result.pt (save_folder_path None) instead of PNG files.
        model_state: the state dict stored as 'model' (default: a one-tensor stand-in).
        model_name, num_classes, clean_data: stored as BackdoorBench names them.
        clean_sizes: lengths of the clean (train, test) sets (default: the largest index + 1 of each).
        defenses: defense name -> state dict, each written to defense/<name>/defense_result.pt.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = clean_sizes or (None, None)
    train = None if train_images is None else dataset_state(
        folder, "bd_train_dataset", train_images, train_labels, train_bd_labels, train_indices, in_memory,
        sizes[0], subset=False)
    test = dataset_state(folder, "bd_test_dataset", test_images, test_labels, test_bd_labels, test_indices,
                         in_memory, sizes[1], subset=True)
    first = train_images if train_images is not None else test_images
    state = OrderedDict(model_state if model_state is not None else {"linear.weight": torch.zeros(num_classes, 4)})
    torch.save({"model_name": model_name, "num_classes": num_classes, "model": state, "data_path": "./data",
                "img_size": [first.shape[2], first.shape[3], first.shape[1]], "clean_data": clean_data,
                "bd_train": train, "bd_test": test}, folder / "attack_result.pt")
    for name, defended in (defenses or {}).items():
        (folder / "defense" / name).mkdir(parents=True, exist_ok=True)
        torch.save({"model_name": model_name, "num_classes": num_classes, "model": OrderedDict(defended)},
                   folder / "defense" / name / "defense_result.pt")
    return folder / "attack_result.pt"


def dataset_state(folder: Path, subfolder: str, images, labels, bd_labels, indices, in_memory: bool,
                  clean_size: int | None, subset: bool) -> dict:
    """`prepro_cls_DatasetBD_v2.retrieve_state()` of one split, writing its PNGs unless in memory."""
    images = np.asarray(images, dtype=np.uint8)
    indices = np.asarray(indices, dtype=np.int64)
    clean_size = clean_size or int(indices.max()) + 1
    save_folder_path = None if in_memory else f"./record/{folder.name}/{subfolder}"
    data_dict = {}
    for image, label, bd_label, index in zip(images, labels, bd_labels, indices):
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        if in_memory:
            data_dict[index] = (pil, int(bd_label), int(label))
            continue
        (folder / subfolder / str(int(label))).mkdir(parents=True, exist_ok=True)
        pil.save(folder / subfolder / str(int(label)) / f"{index}.png")
        data_dict[index] = {"path": f"{save_folder_path}/{int(label)}/{index}.png",
                            "other_info": [int(bd_label), int(label)]}
    indicator = np.zeros(clean_size)
    indicator[indices] = 1
    # BackdoorBench subsets bd_test to its poisoned samples; bd_train keeps every index
    original_index_array = np.where(indicator == 1)[0] if subset else np.arange(clean_size)
    return {"bd_data_container": {"save_folder_path": save_folder_path, "data_dict": data_dict,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": original_index_array,
            "poison_indicator": indicator, "save_folder_path": save_folder_path}
