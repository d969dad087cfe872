"""Property-based bad input for the loaders, and defender hygiene: defenses never reach test data."""

import gzip
import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdsafety import store
from bdsafety.data import ImageSet
from bdsafety.data.formats import read_cifar_batch, read_idx
from bdsafety.defenses import DEFENSES, trace_defense
from bdsafety.errors import UsageError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_idx() -> bytes:
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    return struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", 2, 4, 4) + images.tobytes()


@SETTINGS
@given(cut=st.integers(0, 47), flips=st.lists(st.tuples(st.integers(0, 47), st.integers(0, 255)), max_size=4),
       gz=st.booleans())
def test_mangled_idx_loads_or_fails_cleanly(tmp_path, cut, flips, gz):
    data = bytearray(valid_idx()[:cut] if cut < 48 else valid_idx())
    for position, value in flips:
        if position < len(data):
            data[position] = value
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    try:
        array = read_idx(path, 3)
    except UsageError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert array.ndim == 3


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_random_bytes_never_crash_the_loaders(tmp_path, blob):
    for reader in (lambda p: read_idx(p, 3), lambda p: read_cifar_batch(p, "labels"), store.read_safetensors):
        path = tmp_path / "blob"
        path.write_bytes(blob)
        with pytest.raises(UsageError):
            reader(path)


@SETTINGS
@given(payload=st.recursive(st.one_of(st.integers(), st.text(max_size=5), st.binary(max_size=5), st.none()),
                            lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                                               children, max_size=3),
                            max_leaves=8))
def test_cifar_reader_refuses_anything_but_a_batch(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UsageError):
        read_cifar_batch(path, "labels")


class Tripwire(ImageSet):
    """An ImageSet whose tensors raise on any access: proves nobody reads it."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "armed", True)

    def __getattribute__(self, name):
        if name in ("images", "labels", "subset", "to") and object.__getattribute__(self, "__dict__").get("armed"):
            raise AssertionError(f"a defense touched the test set ({name})")
        return super().__getattribute__(name)


TINY = {"ep": {"epochs": 1}, "ft": {"epochs": 1}, "fst": {"epochs": 1}, "ft_sam": {"epochs": 1},
        "anp": {"iterations": 5}, "i_bau": {"n_rounds": 1}, "nad": {"teacher_epochs": 1, "epochs": 1},
        "sau": {"epochs": 1, "batch_size": 32, "pgd_steps": 1}, "fp": {"epochs": 1}, "clp": {},
        "mcr": {"finetune_epochs": 1, "epochs": 1, "scan_points": 2}, "tsc": {"rounds": 1, "epochs": 1, "finetune_epochs": 0},
        "bti_dbf": {"preround": 1, "mround": 1, "uround": 1, "nround": 1, "ul_round": 1},
        "pam": {"preround": 1, "mround": 1, "uround": 1, "nround": 1, "ul_round": 1}}


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defenses_never_read_test_data_or_poison_indices(badnets_setup, backdoored, name):
    test = badnets_setup.bundle.test
    guarded = replace(badnets_setup, bundle=replace(badnets_setup.bundle, test=Tripwire(test.images, test.labels)),
                      triggered_test=Tripwire(test.images[:2], test.labels[:2]), poisoned=None)
    model, _ = backdoored
    defense = DEFENSES.create(name, "cpu", **TINY[name])
    purified, record, _ = trace_defense(defense, model, guarded.defender_data(), seed=0, keep_snapshots=False)
    assert isinstance(record, dict)
    assert all(torch.isfinite(p).all() for p in purified.parameters())


def test_only_ep_is_given_the_attack():
    assert [n for n in DEFENSES.names() if getattr(DEFENSES.get(n), "uses_attack", False)] == ["ep"]
