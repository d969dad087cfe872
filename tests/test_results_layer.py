"""The results layer against a stored tiny run: its stage keys, results.json and report.md stay byte-identical.

tests/data/tiny-run holds a spec (synthetic data, two seeds, two defenses, every audit), every stage's
record.json as `bdsafety run` stored them, and the results.json and report.md written from them. Assembling the
results reads records only (the clean model's evaluation is a stage), so this does not depend on the CPU. When a
protocol change alters them on purpose, regenerate the folder: `bdsafety run tests/data/tiny-run/spec.yaml --out
DIR`, then copy DIR's stages/*/record.json, results.json and report.md here, and say so in the change.
"""

import shutil
from pathlib import Path

from bdsafety import store
from bdsafety.pipeline.graph import build_graph
from bdsafety.pipeline.specs import build_plan, load_spec
from bdsafety.report import write_report
from bdsafety.results.assemble import results_of

STORED = Path(__file__).parent / "data" / "tiny-run"


def stored_graph(*overrides):
    return build_graph(build_plan(load_spec(STORED / "spec.yaml", list(overrides))))


def assembled(graph):
    """results.json's content and the defense seconds, from the stored records only."""
    done = {node.key: store.Stage(node.key, None, store.load_record(STORED / "stages" / node.directory))
            for node in graph.nodes}
    return results_of(graph, done)


def test_every_stage_key_is_the_stored_runs():
    assert sorted(node.directory for node in stored_graph().nodes) == \
        sorted(path.name for path in (STORED / "stages").iterdir())


def test_results_json_assembled_from_the_stored_records_is_byte_identical(tmp_path):
    results, seconds = assembled(stored_graph())
    store.write_json(tmp_path / "results.json", results)
    assert (tmp_path / "results.json").read_bytes() == (STORED / "results.json").read_bytes()
    assert [sorted(block) for block in seconds] == [["ep", "ft"], ["ep", "ft"]]


def test_the_report_of_the_stored_results_is_byte_identical(tmp_path):
    shutil.copy(STORED / "results.json", tmp_path / "results.json")
    write_report(tmp_path)
    assert (tmp_path / "report.md").read_bytes() == (STORED / "report.md").read_bytes()


def test_a_spec_note_reaches_results_json_the_results_table_and_the_console(tmp_path):
    import json

    from bdsafety.report.tables import console_table, robustness_table

    note = "note=cut far below the demo, so verdicts can differ"
    results, _ = assembled(stored_graph(note))
    assert results["note"] == "cut far below the demo, so verdicts can differ"
    assert robustness_table(results).caption.endswith("Note: cut far below the demo, so verdicts can differ")
    assert console_table(results).startswith("note: cut far below the demo")
    assert "note" not in json.loads((STORED / "results.json").read_text())  # a spec without one: no key
    assert load_spec(STORED / "spec.yaml").digest() != load_spec(STORED / "spec.yaml", [note]).digest()
