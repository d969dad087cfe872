"""The only module that knows where things are written: run directories, their stages and records, the
CLI's outputs and the fitted-asset cache. Every write is atomic (temp file + rename).

A run directory holds `spec.yaml`, `results.json`, `timings.json`, the report and `stages/`, one
directory per stage named `<stage>-<label>-<key>` (the key hashes the stage's inputs and its parents'
keys). A stage directory holds `model.safetensors`, `model.json` (constructor arguments), optional
`tensors.safetensors` (indices such as splits and poison masks, a defense's trajectory states) and
`record.json` (a `Record`), written last: a stage with a record is finished.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from . import __version__
from .errors import UsageError
from .models import ModelSpec, create_model

log = logging.getLogger(__name__)

MODEL_FILE, SPEC_FILE, RECORD_FILE, TENSORS_FILE = "model.safetensors", "model.json", "record.json", "tensors.safetensors"
SPEC_YAML, RESULTS_FILE, TIMINGS_FILE, STAGES_DIR = "spec.yaml", "results.json", "timings.json", "stages"
ENV_FILE = "env.json"  # where a run ran (environment()): kept out of results.json, which stays deterministic
AUDIT_FILE, BENCH_FILE = "audit.json", "bench.json"
MARKDOWN_FILE, HTML_FILE = "report.md", "report.html"
CACHE_ENV = "BDSAFETY_CACHE"


def asset_cache_dir() -> Path:
    """Where fitted attack assets are cached: `$BDSAFETY_CACHE`, else `~/.cache/bdsafety` (shared by every run)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bdsafety")


@dataclass
class Record:
    """What every stage writes as record.json. Metrics are fractions in [0, 1] (and losses, timings).

    `stage` is train, evaluate, purify, audit or import; `name` the trained attack ("none": a clean model), the
    defense or the audit; `parents` maps a role ("backdoored", "purified", ...) to the parent stage's key
    (single-shot commands: its directory); `details` holds what only this stage kind has (history, data
    and attack of a trained model, a defense's strength and trajectory, ...).
    """

    stage: str
    name: str
    params: dict
    metrics: dict
    seed: int
    parents: dict = field(default_factory=dict)
    duration_s: float = 0.0
    details: dict = field(default_factory=dict)

    FIELDS = ("stage", "name", "params", "metrics", "seed", "parents", "duration_s")

    def to_json(self) -> dict:
        return {**self.details, **{key: getattr(self, key) for key in self.FIELDS}, "versions": versions()}

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        missing = [key for key in cls.FIELDS if key not in data]
        if missing:
            raise UsageError(f"record.json has no '{missing[0]}': an older bdsafety wrote it; rerun that stage")
        details = {k: v for k, v in data.items() if k not in cls.FIELDS and k != "versions"}
        return cls(**{key: data[key] for key in cls.FIELDS}, details=details)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; is this a bdsafety run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); the run directory is damaged, rerun that stage") from None


def canonical_hash(obj) -> str:
    """The key of a spec or a stage: sha256 of its canonical JSON (sorted keys), 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict:
    return {"bdsafety": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def environment(device: str, commit: str | None = None) -> dict:
    """Where and from what this process runs, for a run's env.json: the command, the checkout's commit (and
    whether it has uncommitted changes), the date, the device, the CPU and GPU model, threads and torch."""
    if commit is None:
        commit, dirty = git_state()
    else:
        dirty = None
    return {"command": shlex.join(sys.argv), "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def git_state() -> tuple[str | None, bool | None]:
    """The source checkout's commit and whether it has uncommitted changes (None, None outside a checkout)."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def is_finished(directory: Path) -> bool:
    return (Path(directory) / RECORD_FILE).is_file()


@contextlib.contextmanager
def publishing(directory: Path) -> Iterator[Path]:
    """Yield a hidden temp directory; on success it is renamed to `directory`, so a stage appears whole or not at all."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} already exists and is not empty; choose another --out or remove it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        yield tmp
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_json(directory: Path, name: str, content: dict) -> None:
    """A new directory holding one JSON file `name` (with the versions), published atomically."""
    with publishing(directory) as tmp:
        write_json(tmp / name, {**content, "versions": versions()})


def save_stage(directory: Path, model: nn.Module | None, spec: ModelSpec | None, record: Record,
               tensors: dict[str, Tensor] | None = None) -> None:
    """Write one finished stage (its model, if any, and its record) atomically as a directory."""
    with publishing(directory) as tmp:
        if model is not None:
            atomic_write_bytes(tmp / MODEL_FILE, save_safetensors_bytes(cpu_state_dict(model)))
            write_json(tmp / SPEC_FILE, spec.to_json())
        if tensors:
            atomic_write_bytes(tmp / TENSORS_FILE, save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))
        write_json(tmp / RECORD_FILE, record.to_json())


def load_stage(directory: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec, Record]:
    """Rebuild a stage's model from its directory (never unpickles)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; pass a bdsafety run directory (made by 'bdsafety train')")
    record = load_record(directory)
    spec = ModelSpec.from_json(read_json(directory / SPEC_FILE))
    model = create_model(spec)
    load_weights_into(model, read_safetensors(directory / MODEL_FILE), directory / MODEL_FILE)
    return model.to(device), spec, record


def load_record(directory: Path) -> Record:
    data = read_json(Path(directory) / RECORD_FILE)
    try:
        return Record.from_json(data)
    except UsageError as exc:
        raise UsageError(f"{directory}: {exc}") from None


TRAJECTORY_PREFIX = "trajectory"


def trajectory_tensors(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A defense's trajectory states as one flat tensor dict (`trajectory.<i>.<state key>`), for tensors.safetensors."""
    # clones: two fractions of a short run can share one kept state, and safetensors refuses shared memory
    return {f"{TRAJECTORY_PREFIX}.{i}.{key}": value.clone() for i, state in enumerate(states)
            for key, value in state.items()}


def load_trajectory_states(directory: Path, count: int) -> list[dict[str, Tensor]]:
    """The `count` trajectory states stored in a defense stage's tensors.safetensors."""
    if count == 0:
        return []
    states: list[dict[str, Tensor]] = [{} for _ in range(count)]
    for name, value in read_safetensors(Path(directory) / TENSORS_FILE).items():
        prefix, index, key = name.split(".", 2)
        if prefix == TRAJECTORY_PREFIX and int(index) < count:
            states[int(index)][key] = value
    return states


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_safetensors_bytes(Path(path).read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; the run directory is incomplete, rerun that stage") from None
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise UsageError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]}); replace it") from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from a file of unknown origin: safetensors, or a plain state dict via torch.load(weights_only=True).

    Nothing in the file can run code: a pickle that needs more than tensors and containers is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} not found; pass a bdsafety run directory, a .safetensors file or a .pt state dict")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt archives alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"refusing to load {path}: not a plain weights-only state dict ({first[:160]}); "
                         "save it with safetensors or as torch.save(model.state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise UsageError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return loaded


def load_weights_into(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Copy `state` into `model`, naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise UsageError(f"{source} does not fit this architecture: {what} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected); check --model")
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UsageError(f"{source}: key '{key}' has shape {shape}, the model expects "
                             f"{tuple(expected[key].shape)}; check --model and the dataset")
        if value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise UsageError(f"{source}: key '{key}' has dtype {value.dtype}, expected {expected[key].dtype}")
    model.load_state_dict(state)


@dataclass
class Stage:
    """A loaded or freshly computed stage: its key, model (None for record-only stages), record and directory."""

    key: str
    model: nn.Module | None
    record: Record
    path: Path | None = None


class RunStore:
    """The stages of one run directory: a finished stage is loaded, never recomputed."""

    def __init__(self, root: Path, device: torch.device, clean: bool = True):
        """`clean`: remove the temp files of killed writes (only the process that holds the run's lock may)."""
        self.root, self.device = Path(root), device
        self.stages = self.root / STAGES_DIR
        self.stages.mkdir(parents=True, exist_ok=True)
        if clean:
            remove_partial_writes(self.root)
            remove_partial_writes(self.stages)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def stage(self, directory: str, spec: ModelSpec | None,
              build: Callable[[], tuple[nn.Module | None, Record, dict | None]]) -> Stage:
        """The stage in `stages/<directory>` (named `<stage>-<label>-<key>`): loaded when finished, else
        `build()` (model, record, tensors) and saved."""
        path = self.stages / directory
        key = stage_key_of(path)
        if is_finished(path):
            self.reused.append(path.name)
            if not (path / MODEL_FILE).is_file():
                return Stage(key, None, load_record(path), path)
            model, _, record = load_stage(path, self.device)
            return Stage(key, model.to(memory_format=torch.channels_last), record, path)
        model, record, tensors = build()
        save_stage(path, model, spec, record, tensors)
        self.computed.append(path.name)
        return Stage(key, model, record, path)


def stage_key_of(directory: Path | str) -> str:
    """The key of a stage directory named `<stage>-<label>-<key>`."""
    return Path(directory).name.rsplit("-", 1)[-1]


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the run directory for this process: a second run on it waits, saying so, until the first ends
    (its stages are then reused), so two runs never compute or write the same stage."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.warning("%s is in use by another bdsafety run (%s); waiting for it to finish", root, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_partial_writes(folder: Path) -> None:
    """Delete the hidden temp files/directories that a killed run leaves behind (never finished stages)."""
    for leftover in folder.glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
