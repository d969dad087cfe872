"""The Python API audits model objects of any architecture: here classes that exist only in the tests."""

import copy

import pytest
import torch
from torch import nn

import bdsafety
from bdsafety.api import setup_for
from bdsafety.errors import UsageError
from bdsafety.train import TrainConfig, fit
from outside_models import PlainNet


@pytest.fixture(scope="module")
def backdoored():
    setup = setup_for("synthetic", "badnets", poison_rate=0.1)
    torch.manual_seed(0)
    model = bdsafety.with_normalization(PlainNet(), setup.bundle.mean, setup.bundle.std)
    fit(model, setup.attacker_train, TrainConfig(epochs=8, lr=0.05, batch_size=64, crop_pad=1, flip=False), seed=0)
    return model


def test_audit_of_a_model_defined_only_here_finds_the_unremoved_backdoor(backdoored):
    untouched = copy.deepcopy(backdoored)  # a "defense" that changed nothing
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    report = bdsafety.audit(untouched, backdoored, data="synthetic", attack="badnets", poison_rate=0.1,
                            checks=("ra", "lmc"), device="cpu", params={"ra": {"epochs": 2}})
    assert report["backdoored"]["asr"] > 0.9 and report["backdoored"]["clean_acc"] > 0.8
    assert report["purified"]["asr"] == pytest.approx(report["backdoored"]["asr"])
    assert report["ra"]["asr"] > 0.75
    assert {"bn_mode", "backdoor_error_span"} <= set(report["lmc"])
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())  # audits never modify


def test_audit_refuses_models_that_do_not_fit_the_dataset_in_one_line(backdoored):
    for wrong, expected in ((PlainNet(in_channels=3), "fails on a 1x16x16 image"), (PlainNet(classes=10), "(1, 4)")):
        with pytest.raises(UsageError, match="purified model") as raised:
            bdsafety.audit(wrong, backdoored, data="synthetic", attack="badnets", poison_rate=0.1, checks=("lmc",), device="cpu")
        assert expected in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(UsageError, match="unknown check 'trajectory'"):
        bdsafety.audit(backdoored, backdoored, data="synthetic", attack="badnets", poison_rate=0.1, checks=("trajectory",), device="cpu")


def test_with_normalization_standardises_and_keeps_the_state_dict_keys():
    model = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.ones_(model.weight)
    keys = list(model.state_dict())
    wrapped = bdsafety.with_normalization(model, (0.5,), (0.25,))
    assert wrapped is model and list(wrapped.state_dict()) == keys
    assert torch.allclose(wrapped(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    assert torch.allclose(copy.deepcopy(wrapped)(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))


FACTORY_MODULE = '''
import torch
from torch import nn

import bdsafety


class UserNet(nn.Module):
    def __init__(self, in_channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).amax((2, 3)))


def build(in_channels, num_classes, mean, std):
    return bdsafety.with_normalization(UserNet(in_channels, num_classes), mean, std)
'''


def test_model_factory_trains_loads_and_purifies_the_users_architecture(tmp_path, monkeypatch, capsys):
    from bdsafety.cli import main

    (tmp_path / "user_arch.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = ["--model-factory", "user_arch:build"]
    common = ["--device", "cpu", "-q"]
    run = str(tmp_path / "run")
    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", run, *factory, *common]) == 0
    assert '"factory:user_arch:build"' in (tmp_path / "run" / "model.json").read_text()
    capsys.readouterr()
    assert main(["eval", run, *common]) == 2  # a run directory never imports code on its own
    assert "pass --model-factory user_arch:build" in capsys.readouterr().err
    assert main(["eval", run, *factory, *common]) == 0
    assert main(["purify", "--from", run, "--defense", "fst", "--set", "epochs=1", "--out", str(tmp_path / "fst"),
                 *factory, *common]) == 0  # FST finds the classifier layer: the last nn.Linear
    capsys.readouterr()
    assert main(["purify", "--from", run, "--defense", "bti_dbf", "--out", str(tmp_path / "bti"), *factory,
                 *common]) == 2
    err = capsys.readouterr().err
    assert "defense bti_dbf needs features(x)" in err and "UserNet lacks" in err and err.count("\n") == 1
    assert main(["eval", run, "--model-factory", "no_such_module:build", *common]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err


def readme_example() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Audit a model trained elsewhere"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```\n", start)]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from bdsafety.data import resolve_dir

    try:
        resolve_dir("fashion-mnist")
    except UsageError:
        pytest.skip("Fashion-MNIST is not installed")
    code = readme_example()
    namespace: dict = {}
    exec(code[:code.index("backdoored, purified =")], namespace)  # the example's own class, for its weight files
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    backdoored = namespace["Net"]()
    torch.save(backdoored.state_dict(), "backdoored.pt")
    torch.save(namespace["Net"]().state_dict(), "purified.pt")
    write_followed_poisons(backdoored, tmp_path / "poisons")
    exec(code, {"__name__": "__main__"})
    assert "after the Retuning Attack" in capsys.readouterr().out


def write_followed_poisons(model, root, count: int = 40) -> None:
    """Poison folders that `model` follows: Fashion-MNIST images it already gives its most frequent class, filed under
    that class (a random network has no backdoor, but the audit checks only that the model follows its poisons)."""
    from PIL import Image

    from bdsafety.data import load_dataset

    test = load_dataset("fashion-mnist").test
    images = test.images[:2000]
    with torch.no_grad():
        predicted = model.eval()(images.float() / 255).argmax(1)
    target = int(predicted.mode().values)
    chosen = images[predicted == target]
    for part, part_images in (("train", chosen[:count // 2]), ("test", chosen[count // 2:count])):
        (root / part / str(target)).mkdir(parents=True)
        for i, image in enumerate(part_images):
            Image.fromarray(image[0].numpy()).save(root / part / str(target) / f"{i}.png")
