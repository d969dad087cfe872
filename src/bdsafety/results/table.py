"""One flat table of every finished audit in one or many run or audit directories (`bdsafety results`).

A row per purified model × audit (and per clean reference model × audit): the run, dataset, model,
attack, poison rate, target and seed of its backdoored model, the defense, how far it moved the weights,
its own metrics (`o_*`), the audit's name and the audit's scalar metrics. Read from the stage records
only, so it spans runs of different specs, and loads straight into pandas, DuckDB or a spreadsheet.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import store
from ..errors import UsageError
from ..store import Record


def records_of(run_dir: Path) -> dict[str, Record]:
    """The finished stage records of one run directory, by stage key."""
    stages = Path(run_dir) / store.STAGES_DIR
    if not stages.is_dir():
        raise UsageError(f"{run_dir} has no {store.STAGES_DIR}/ folder; pass a directory made by 'bdsafety run'")
    return {store.stage_key_of(path): store.load_record(path)
            for path in sorted(stages.iterdir()) if not path.name.startswith(".") and store.is_finished(path)}


def scalars(metrics: dict, prefix: str = "") -> dict:
    """The numbers and strings of `metrics` (lists and nested records left out), keys prefixed."""
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def model_columns(record: Record, defense: str) -> dict:
    """What identifies an audited model: its backdoored model's data, attack and seed, and the defense."""
    attack = record.details.get("attack", {})
    target = "all2all" if attack.get("labels") == "all2all" else attack.get("target")
    return {"dataset": record.details.get("data", {}).get("name"), "model": record.details.get("model"),
            "attack": attack.get("name"), "poison_rate": attack.get("poison_rate"), "target": target,
            "seed": record.seed, "defense": defense}


def audited_model(audit: Record, records: dict[str, Record]) -> tuple[Record, Record | None, str] | None:
    """(the record that names the attack, the purify record or None, the defense) of an audit's model."""
    parents = audit.parents
    purified = records.get(parents.get("purified") or parents.get("defense_run", ""))
    setup = records.get(parents.get("setup", ""))
    if purified is not None and purified.stage == "purify":
        return purified, purified, purified.name
    if purified is not None and setup is not None:  # a reference audit of the clean model
        return setup, None, "none (clean model)"
    return None


def cell_rows(run_dir: Path, audit: Record, records: dict[str, Record]) -> list[dict]:
    """The rows of a cell-scope audit (one stage over every purified model of an attack and seed, e.g.
    `uap_transfer`): one per purified model, with the audit's part that concerns it (`for_defense`)."""
    from ..audits import AUDITS

    method, setup, rows = AUDITS.create(audit.name, **audit.params), records.get(audit.parents["setup"]), []
    for role, key in audit.parents.items():
        purified = records.get(key)
        if not role.startswith("purified@") or purified is None or setup is None:
            continue
        part = method.for_defense(audit.metrics, purified.name) or {}
        rows.append({"run": str(run_dir), **model_columns(setup, purified.name),
                     **scalars(purified.details.get("strength", {})), **scalars(purified.metrics, "o_"),
                     "audit": audit.name, **scalars(part)})
    return rows


def run_rows(run_dir: Path) -> list[dict]:
    records = records_of(run_dir)
    rows = []
    for record in records.values():
        if record.stage == "audit" and any(role.startswith("purified@") for role in record.parents):
            rows += cell_rows(run_dir, record, records)
            continue
        if record.stage != "audit" or (found := audited_model(record, records)) is None:
            continue
        source, purified, defense = found
        strength = purified.details.get("strength", {}) if purified else {}
        rows.append({"run": str(run_dir), **model_columns(source, defense), **scalars(strength),
                     **(scalars(purified.metrics, "o_") if purified else {}), "audit": record.name,
                     **scalars(record.metrics)})
    return rows


def audit_rows(audit_dir: Path) -> list[dict]:
    """The rows of one `bdsafety audit` directory (its audit.json): one per audit of its purified model, the
    attack named by the source of the poisons (a BackdoorBench record: its folder's name)."""
    audited = store.read_json(Path(audit_dir) / store.AUDIT_FILE)
    source = audited.get("trigger_source") or {}
    attack = Path(source["folder"]).name if "folder" in source else source.get("attack", source.get("kind"))
    target = "all2all" if source.get("labels") == "all2all" else source.get("target")
    columns = {"run": str(audit_dir), "dataset": audited.get("dataset"), "model": audited.get("model"),
               "attack": attack, "poison_rate": None, "target": target, "seed": audited.get("seed"),
               "defense": audited.get("defense", Path(audit_dir).name), "trigger_source": source.get("kind"),
               **scalars(audited.get("purified", {}), "o_")}
    return [{**columns, "audit": name, **scalars(audited[name])} for name in audited.get("checks", [])
            if isinstance(audited.get(name), dict)]


def run_directories(folder: Path) -> list[Path]:
    """`folder` itself when it is a run or audit directory, else the run or audit directories inside it."""
    folder = Path(folder)
    if (folder / store.STAGES_DIR).is_dir() or (folder / store.AUDIT_FILE).is_file():
        return [folder]
    found = sorted({p.parent for pattern in (f"*/{store.STAGES_DIR}", f"*/{store.AUDIT_FILE}")
                    for p in folder.glob(pattern)})
    if not found:
        raise UsageError(f"{folder} has no {store.STAGES_DIR}/ folder or {store.AUDIT_FILE}; pass a directory made by "
                         "'bdsafety run' or 'bdsafety audit'")
    return found


def rows_of(directory: Path) -> list[dict]:
    return audit_rows(directory) if (directory / store.AUDIT_FILE).is_file() else run_rows(directory)


def results_rows(run_dirs: list[Path], where: dict | None = None) -> list[dict]:
    """Every audit row of `run_dirs` (or of the grids and audits inside them), keeping those whose columns equal
    every `where` value."""
    rows = [row for folder in run_dirs for directory in run_directories(folder) for row in rows_of(directory)]
    return [row for row in rows if all(matches(row.get(k), v) for k, v in (where or {}).items())]


def matches(value, wanted) -> bool:
    return value == wanted or str(value) == str(wanted)


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
