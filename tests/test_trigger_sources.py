"""The audit uses the attacker's own poisons (folders, a trigger file, a BackdoorBench record) or refuses."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bdsafety
from backdoorbench_layout import write_record
from bdsafety.audits import create_audits
from bdsafety.cli import main
from bdsafety.data import load_dataset
from bdsafety.errors import UsageError
from bdsafety.pipeline.setup import prepare_external
from bdsafety.pipeline.specs import DataSpec
from outside_models import (TARGET, backdoored_and_purified, corner_trigger, poisoned_training_set, save_png,
                            write_poison_folders, write_trigger_files)

RA_FAST = {"ra": {"epochs": 10, "repeats": 2}}  # 5 epochs of 40 clean images are 5 steps here


@pytest.fixture(scope="module")
def models():
    return backdoored_and_purified()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_poison_folders(tmp_path_factory.mktemp("poisons"))


@pytest.fixture(scope="module")
def weights(models, tmp_path_factory):
    """The two models as the plain .pt state dicts a practitioner would hand over."""
    folder = tmp_path_factory.mktemp("weights")
    for name, model in zip(("backdoored", "purified"), models):
        torch.save(model.state_dict(), folder / f"{name}.pt")
    return folder


def read_pngs(folder) -> torch.Tensor:
    files = sorted(folder.glob("*/*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f)))[None] for f in files])


def test_poisons_entering_ra_are_the_files_bit_for_bit(folders):
    setup = prepare_external(DataSpec("synthetic"), bdsafety.PoisonFolders(*folders), seed=0)
    ra = create_audits(["ra"], "cpu")["ra"]
    mixed, is_poison = ra.retuning_set(setup.audit_data(), seed=3)
    files = read_pngs(folders[0])
    drawn = mixed.images[is_poison]
    assert len(drawn) == ra.poison_count and bool((mixed.labels[is_poison] == TARGET).all())
    assert all(any(torch.equal(image, f) for f in files) for image in drawn)
    tested = setup.eval_sets.triggered_test
    assert torch.equal(tested.images, read_pngs(folders[1])) and bool((tested.labels == TARGET).all())
    assert setup.trigger_source["kind"] == "poison_folders"


def test_the_folders_poisons_revive_the_model_and_a_same_named_bdsafety_attack_is_refused(models, folders):
    backdoored, purified = models
    report = bdsafety.audit(purified, backdoored, data="synthetic", poisons=bdsafety.PoisonFolders(*folders),
                            checks=("ra",), device="cpu", params=RA_FAST)
    assert report["backdoored"]["asr"] > 0.95 and report["purified"]["asr"] < 0.2
    assert report["ra"]["asr"] > 0.6, report["ra"]
    assert report["card"]["verdict"] == "superficially safe"
    assert report["trigger_source"]["kind"] == "poison_folders"
    with pytest.raises(UsageError, match="not this model's backdoor") as refused:
        bdsafety.audit(purified, backdoored, data="synthetic", attack="badnets", poison_rate=0.1, target=TARGET,
                       checks=("ra",), device="cpu", params=RA_FAST)
    assert "\n" not in str(refused.value)
    anyway = bdsafety.audit(purified, backdoored, data="synthetic", attack="badnets", poison_rate=0.1, target=TARGET,
                            checks=("ra",), device="cpu", params=RA_FAST, audit_anyway=True)
    assert anyway["ra"]["asr"] < report["ra"]["asr"] - 0.3  # bdsafety's patch is not the backdoor RA relearns
    assert "audited anyway" in anyway["card"]["warnings"][0]


def test_a_trigger_file_blends_as_written_and_revives_like_the_folders(models, tmp_path):
    pattern, mask = write_trigger_files(tmp_path)
    source = bdsafety.TriggerFile(pattern, mask, target=TARGET)
    setup = prepare_external(DataSpec("synthetic"), source, seed=0)
    test = load_dataset("synthetic").test
    assert torch.equal(setup.eval_sets.triggered_test.images, corner_trigger(test.images[test.labels != TARGET]))
    half = bdsafety.TriggerFile(pattern, mask, target=TARGET, alpha=0.5).blend((1, 16, 16))
    x = torch.zeros(1, 1, 16, 16)
    assert half(x)[0, 0, 0, 0] == 0.5 and half(x)[0, 0, 8, 8] == 0  # (1 - αm)·x + αm·t
    backdoored, purified = models
    report = bdsafety.audit(purified, backdoored, data="synthetic", poisons=source, checks=("ra",), device="cpu",
                            params=RA_FAST)
    assert report["ra"]["asr"] > 0.6 and report["trigger_source"]["alpha"] == 1.0


def test_the_cli_refuses_weights_without_a_trigger_source_and_audits_them_with_one(weights, folders, tmp_path, capsys):
    base = ["audit", "--purified", str(weights / "purified.pt"), "--backdoored", str(weights / "backdoored.pt"),
            "--model-factory", "outside_models:build", "--dataset", "synthetic", "--device", "cpu", "-q",
            "--checks", "ra", "--set", "ra.repeats=1", "--set", "ra.epochs=10"]
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "trigger is unknown" in error and "--poisons-train" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    sources = ["--poisons-train", str(folders[0]), "--poisons-test", str(folders[1])]
    assert main([*base, *sources, "--out", str(tmp_path / "audit")]) == 0
    printed = capsys.readouterr().out
    assert "poisons: kind poison_folders" in printed
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["trigger_source"]["kind"] == "poison_folders" and audit["ra"]["asr"] > 0.5


def record_of(models, root, in_memory=False):
    """A BackdoorBench-layout record of the corner-trigger attack on synthetic data (the models' own file layout:
    a plain network has no BackdoorBench name, so its files name none and the CLI is given --model-factory)."""
    backdoored, purified = models
    poisoned, chosen = poisoned_training_set()
    train = load_dataset("synthetic").train
    test = load_dataset("synthetic").test
    keep = (test.labels != TARGET).nonzero().flatten()
    return write_record(root, poisoned.images[chosen].numpy(), train.labels[chosen].numpy(),
                        np.full(len(chosen), TARGET), chosen.numpy(), corner_trigger(test.images[keep]).numpy(),
                        test.labels[keep].numpy(), np.full(len(keep), TARGET), keep.numpy(), in_memory=in_memory,
                        model_state=backdoored.state_dict(), model_name=None, num_classes=4, clean_data="synthetic",
                        clean_sizes=(len(train), len(test)), defenses={"ft": purified.state_dict()})


def test_a_backdoorbench_record_is_audited_whole_with_its_own_saved_poisons(models, tmp_path, capsys):
    record = record_of(models, tmp_path / "record" / "corner").parent
    args = ["audit", "--backdoorbench", str(record), "--model-factory", "outside_models:build", "--device", "cpu",
            "-q", "--clean", "train", "--checks", "ra,lmc", "--set", "ra.repeats=1", "--set", "ra.epochs=10",
            "--set", "lmc.points=3"]
    assert main([*args, "--out", str(tmp_path / "audits")]) == 0
    audit = json.loads((tmp_path / "audits" / "ft" / "audit.json").read_text())
    assert audit["trigger_source"]["kind"] == "backdoorbench_record" and audit["trigger_source"]["target"] == TARGET
    assert audit["backdoored"]["asr"] > 0.95 and audit["purified"]["asr"] < 0.2 and audit["ra"]["asr"] > 0.5
    assert len(audit["lmc"]["points"]) == 3 and audit["clean_reference"]["ra"]["asr"] < 0.5
    report = (tmp_path / "audits" / "report.md").read_text()
    assert "| ft |" in report and "| superficially safe |" in report and "ft: SUPERFICIALLY SAFE" in report
    capsys.readouterr()
    assert main(["results", str(tmp_path / "audits"), "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(row["defense"], row["audit"], row["attack"], row["target"]) for row in rows} == {
        ("ft", "ra", "corner", TARGET), ("ft", "lmc", "corner", TARGET)}
    setup = prepare_external(DataSpec("synthetic"), bdsafety.BackdoorBenchPoisons(record), seed=0)
    poisoned, chosen = poisoned_training_set()
    assert torch.equal(setup.audit_data().poisons.images, poisoned.images[chosen.sort().values])
    clean, triggered = setup.external.test_pairs  # BEC's pairs: each saved poison beside the test image it was made of
    assert torch.equal(triggered, corner_trigger(clean)) and torch.equal(triggered, setup.eval_sets.triggered_test.images)


def test_importing_a_backdoorbench_result_as_a_bdsafety_attack_compares_the_triggers(models, tmp_path, capsys):
    record = record_of(models, tmp_path / "record" / "corner")
    imported = ["import", str(record), "--format", "backdoorbench", "--model-factory", "outside_models:build",
                "--dataset", "synthetic", "--poison-rate", "0.1", "--target", str(TARGET), "--device", "cpu", "-q"]
    assert main([*imported, "--attack", "badnets", "--out", str(tmp_path / "bd")]) == 2
    error = capsys.readouterr().err
    assert "not bdsafety's" in error and "--backdoorbench" in error and not (tmp_path / "bd").exists()
    assert main([*imported, "--out", str(tmp_path / "bd")]) == 2
    assert "name the bdsafety attack" in capsys.readouterr().err and not (tmp_path / "bd").exists()


def bad_folder(tmp_path, case: str):
    root = tmp_path / case
    good = np.zeros((1, 16, 16), np.uint8)
    if case == "not a class":
        save_png(good, root / "9" / "0.png")
    elif case == "empty":
        (root / str(TARGET)).mkdir(parents=True)
    elif case == "not an image":
        (root / str(TARGET)).mkdir(parents=True)
        (root / str(TARGET) / "0.png").write_text("not a picture")
    elif case == "colour":
        save_png(np.zeros((3, 16, 16), np.uint8), root / str(TARGET) / "0.png")
    return root


@pytest.mark.parametrize("case, message", [("not a class", "not a class of the dataset"), ("empty", "is empty"),
                                           ("not an image", "is not an image"), ("colour", "3 colour channels")])
def test_bad_poison_folders_are_refused_in_one_line_with_nothing_written(weights, folders, tmp_path, capsys, case,
                                                                         message):
    bad = bad_folder(tmp_path, case)
    args = ["audit", "--purified", str(weights / "purified.pt"), "--model-factory", "outside_models:build",
            "--dataset", "synthetic", "--device", "cpu", "--checks", "ra", "--poisons-train", str(bad),
            "--poisons-test", str(folders[1]), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [("mask size", "give a mask of the trigger's size"),
                                           ("alpha", "--trigger-alpha must be in (0, 1]")])
def test_bad_trigger_files_are_refused_in_one_line(weights, tmp_path, capsys, case, message):
    pattern, mask = write_trigger_files(tmp_path)
    if case == "mask size":
        save_png(np.zeros((1, 8, 8), np.uint8), mask)
    alpha = ["--trigger-alpha", "1.5"] if case == "alpha" else []
    args = ["audit", "--purified", str(weights / "purified.pt"), "--model-factory", "outside_models:build",
            "--dataset", "synthetic", "--device", "cpu", "--checks", "ra", "--trigger", str(pattern),
            "--trigger-mask", str(mask), "--target", str(TARGET), *alpha, "--out", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_record_with_a_code_carrying_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = tmp_path / "record" / "evil"
    folder.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "model": {}, "bd_test": Payload()}, folder / "attack_result.pt",
               pickle_protocol=2)
    args = ["audit", "--backdoorbench", str(folder), "--model", "preact_small", "--dataset", "synthetic",
            "--device", "cpu", "--checks", "ra", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_checks_all_leaves_out_an_audit_the_architecture_cannot_take_and_a_named_one_is_refused():
    from bdsafety.audits import single_shot_checks
    from bdsafety.pipeline.audit_inputs import supported
    from outside_models import PlainNet

    methods = create_audits(single_shot_checks(), "cpu")
    kept, skipped = supported(methods, PlainNet(), skip=True)
    assert "bec" in skipped and "block sequence" in skipped["bec"] and "ra" in kept and "qra" in kept
    with pytest.raises(UsageError, match="bec cannot audit this model"):
        supported(create_audits(["ra", "bec"], "cpu"), PlainNet(), skip=False)
