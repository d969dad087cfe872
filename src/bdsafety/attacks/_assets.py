"""Fitted attack assets (SSBA's encoder, LC's source model and adversarial images), cached by content hash.

Some attacks need an expensive local fit before they can poison (docs/methods/attacks.md). Such an attack
implements the `Fittable` protocol: `fit_assets` computes a flat dict of tensors from the attacker's
training set, and `with_assets` returns a frozen copy of the attack that holds them. `fit_attack`
puts a content-addressed cache in between: the key hashes the training images and labels, the attack's
name and parameters (its seed included) and the target, so the same inputs never refit and any change
refits. Files are safetensors, written atomically; nothing is ever unpickled. The caller names the cache
directory (the pipeline: `store.asset_cache_dir()`, shared by every run and stage on the machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from ..data import ImageSet
from ..errors import UsageError
from ..store import atomic_write_bytes, read_safetensors
from ._common import Attack

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when an attack's asset layout or fitting algorithm changes
FIT_TIME = "stat.fit_s"


@runtime_checkable
class Fittable(Protocol):
    """An attack that must be fitted on the attacker's training set before `apply` works."""

    name: str

    def fit_assets(self, train: ImageSet, target: int, device: torch.device) -> dict[str, Tensor]: ...

    def with_assets(self, assets: dict[str, Tensor], target: int) -> Attack: ...


def asset_key(attack: Fittable, train: ImageSet, target: int) -> str:
    """sha256 over the training set's bytes, the attack's name and parameters, the target and the format."""
    digest = hashlib.sha256()
    header = {"attack": attack.name, "params": dataclasses.asdict(attack), "target": int(target),
              "shape": list(train.images.shape), "format": FORMAT_VERSION}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(train.images.cpu().contiguous().numpy().tobytes())
    digest.update(train.labels.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def asset_path(attack: Fittable, train: ImageSet, target: int, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{attack.name}-{asset_key(attack, train, target)[:40]}.safetensors"


def load_or_fit(attack: Fittable, train: ImageSet, target: int, cache_dir: Path,
                device: torch.device) -> tuple[dict[str, Tensor], bool]:
    """The attack's assets from the cache, or fitted now and written to it (atomically); also whether it was a hit."""
    path = asset_path(attack, train, target, cache_dir)
    if path.is_file():
        try:
            assets = read_safetensors(path)
            log.info("%s: fitted assets from the cache, %s", attack.name, path)
            return assets, True
        except UsageError as exc:  # a damaged cache file is refitted, never trusted
            log.warning("%s: ignoring a damaged cache file (%s)", attack.name, exc)
    started = time.perf_counter()
    assets = attack.fit_assets(train, target, device)
    assets[FIT_TIME] = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
    atomic_write_bytes(path, save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in assets.items()}))
    log.info("%s: fitted in %.1f s, cached at %s", attack.name, float(assets[FIT_TIME]), path)
    return assets, False


def fit_attack(attack: Attack, train: ImageSet, target: int, cache_dir: Path | str,
               device: torch.device | str = "cpu") -> Attack:
    """Fit `attack` on the attacker's training set (through the cache); attacks without a fit pass through.

    Args:
        attack: a created attack (its `seed` field seeds the fit).
        train: the attacker's training set (uint8), before poisoning.
        target: the attack's target class.
        cache_dir: where fitted assets live.
        device: where a fit computes (assets are stored on the CPU).

    Returns:
        A frozen, fitted copy of the attack (or `attack` itself when it needs no fit); its `fit_report`
        holds the fit statistics and `cache_hit`.
    """
    if not isinstance(attack, Fittable):
        return attack
    assets, hit = load_or_fit(attack, train, target, Path(cache_dir), torch.device(device))
    fitted = attack.with_assets(assets, target)
    object.__setattr__(fitted, "fit_report", {**stats(assets), "cache_hit": hit})
    return fitted


def attach(attack: Attack, state: Any) -> Attack:
    """A copy of a frozen attack carrying its fitted `state` (not a dataclass field: params and hashes ignore it)."""
    fitted = dataclasses.replace(attack)
    object.__setattr__(fitted, "_fitted", state)
    return fitted


def fitted_state(attack: Attack) -> Any:
    state = getattr(attack, "_fitted", None)
    if state is None:
        raise UsageError(f"{attack.name} must be fitted on the training images first "
                         "(bdsafety.attacks.fit_attack; the pipeline does it in experiment.prepare)")
    return state


def fit_report(attack: Attack | None) -> dict:
    """The fitted attack's JSON-able statistics (trigger PSNR/L-inf, fit time, ...); {} for other attacks."""
    return dict(getattr(attack, "fit_report", {}) or {})


def stats(assets: dict[str, Tensor]) -> dict[str, float]:
    """The `stat.*` scalars of an asset dict, as floats keyed without the prefix."""
    return {k.removeprefix("stat."): float(v) for k, v in assets.items() if k.startswith("stat.")}


def stat_tensors(measure: dict[str, float]) -> dict[str, Tensor]:
    return {f"stat.{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in measure.items()}


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in state.items()}


def unprefixed(prefix: str, assets: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in assets.items() if k.startswith(prefix + ".")}
