"""A grid cell whose backdoored model does not follow its poisons is reported "backdoor not implanted", its audits
skipped, and the rest of the run goes on; `audit_unimplanted: true` audits it all the same, and its cards say so."""

import json

import pytest

from bdsafety.cli import main
from bdsafety.results import assemble

SPEC = """
dataset: synthetic
seed: 0
attacks: [{name: badnets, poison_rate: 0.1, target: 0}]
train: {epochs: 2, batch_size: 64, lr: 0.05, crop_pad: 1, flip: false}
defenses: [ft]
defense_params: {ft: {epochs: 1}}
checks: [ra, lmc]
audit_params: {ra: {epochs: 1, repeats: 1}, lmc: {points: 3}}
"""


@pytest.fixture
def unreachable_gate(monkeypatch):
    """Every backdoor counts as not implanted (the gate above any ASR), so the test does not depend on which
    attack fails to implant on synthetic data."""
    monkeypatch.setattr(assemble, "IMPLANTED_ASR", 1.01)


def test_a_cell_whose_backdoor_did_not_implant_skips_its_audits_and_says_why(tmp_path, unreachable_gate, capsys):
    (tmp_path / "spec.yaml").write_text(SPEC)
    assert main(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    block = results["attacks"][0]
    assert block["backdoor_implanted"] is False and "p_asr" not in block["rows"][0]
    card = block["rows"][0]["card"]
    assert card["verdict"] == "backdoor not implanted" and "not its backdoor" in card["rule"]
    skipped = [json.loads(p.read_text()) for p in (tmp_path / "out" / "stages").glob("*/record.json")
               if json.loads(p.read_text())["stage"] == "audit"]
    assert skipped and all(r["metrics"] == {"skipped": "backdoor not implanted"} for r in skipped)
    assert "backdoor not implanted" in (tmp_path / "out" / "report.md").read_text()
    assert main(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu", "-q",
                 "--set", "audit_unimplanted=true"]) == 0
    anyway = json.loads((tmp_path / "out" / "results.json").read_text())["attacks"][0]
    assert "backdoor_implanted" not in anyway and 0 <= anyway["rows"][0]["p_asr"] <= 1
    assert "audited anyway" in anyway["rows"][0]["card"]["warnings"][0]
