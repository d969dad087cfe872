"""Shared fixtures: the seeded synthetic dataset and a backdoored tiny model trained on it (once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bdsafety.pipeline import AttackSpec, DataSpec, prepare
from bdsafety.pipeline.stages import train_model
from bdsafety.train import TrainConfig

torch.set_num_threads(2)

TINY_TRAIN = TrainConfig(epochs=6, batch_size=64, lr=0.05, crop_pad=1, flip=False)


@pytest.fixture(scope="session", autouse=True)
def asset_cache(tmp_path_factory):
    """Fitted attack assets (SSBA, LC) go to a per-session temp cache, never to ~/.cache (session-scoped so
    that it is set before any other fixture, and inherited by the CLI subprocesses some tests start)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BDSAFETY_CACHE", str(tmp_path_factory.mktemp("bdsafety-cache")))
        yield


@pytest.fixture(scope="session")
def badnets_setup():
    # the defenses' unit tests hold the defender's data fixed (one held-out reserve); tests/test_defender_data.py
    # covers the official protocol, the default
    return prepare(DataSpec("synthetic", defender_data="held_out"), AttackSpec("badnets", 0.1, 0), seed=0)


@pytest.fixture(scope="session")
def backdoored(badnets_setup):
    """(model, record) of preact_small trained with BadNets on synthetic data."""
    return train_model(badnets_setup, "preact_small", TINY_TRAIN, seed=0, device=torch.device("cpu"))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A copy of the documentation site's config and results index; the current directory is its root, as for the
    real one (a results page is written there)."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "docs" / "results").mkdir(parents=True)
    shutil.copy(root / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copy(root / "docs" / "results" / "index.md", tmp_path / "docs" / "results" / "index.md")
    monkeypatch.chdir(tmp_path)
    return tmp_path
