"""Audit a model backdoored and purified OUTSIDE bdsafety, from the attacker's poison folders.

Everything the "outside" practitioner does is plain PyTorch + numpy + PIL, written here: the architecture
(`scripts/outside_net.py`), the trigger (a 4x4 checkerboard at the top-left, target 3; bdsafety's BadNets is a
3x3 white square at the bottom-right), the backdoor training, the fine-tuning purification and an independent
Retuning Attack in the official recipe. bdsafety is used only to read Fashion-MNIST (`bdsafety.data.load_dataset`)
and, through its command line (a subprocess), to audit the two saved state dicts. Finally the audit is run with
bdsafety's own BadNets trigger (a trigger file, and poison folders made with it): bdsafety must refuse both (exit
code 2), and with `--audit-anyway` its card must carry a WARNING.

    .venv/bin/python scripts/outside_model_audit.py --out runs/outside

The FT purification setting is chosen on 2,000 held-out TRAINING images (never seen by any training, triggered
here for the ASR), never on the test set. Writes into a fresh `--out`: backdoored.pt, purified.pt, poisons/,
wrong-trigger/, audit*/ (bdsafety's), logs/, summary.json (atomically, last).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import outside_net  # noqa: E402  (scripts/ is not a package)

FACTORY = "outside_net:build"
GATE_MESSAGE = "not this model's backdoor"  # bdsafety's refusal when the poisons do not drive the backdoored model
BADNETS_PATCH_32 = 3  # bdsafety/attacks/badnets.py: a 3x3 white square on a 32x32 canvas, scaled with the image


# ----------------------------------------------------------------------------------------------- triggers

def checkerboard_trigger(images: Tensor) -> Tensor:
    """Our trigger on uint8 [N, C, H, W]: a 4x4 checkerboard of 255/0 at rows 1-4, cols 1-4 (top-left)."""
    out = images.clone()
    board = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 == 0).to(torch.uint8) * 255
    out[:, :, 1:5, 1:5] = board
    return out


def badnets_patch_size(height: int) -> int:
    """bdsafety's BadNets patch side on an image of `height` rows: round(3 * H / 32), at least 1 (3 on 28x28)."""
    return max(1, round(BADNETS_PATCH_32 * height / 32))


def badnets_trigger(images: Tensor) -> Tensor:
    """bdsafety's BadNets trigger, reproduced: the bottom-right `p`x`p` square set to white (255)."""
    out, p = images.clone(), badnets_patch_size(images.shape[2])
    out[:, :, -p:, -p:] = 255
    return out


# -------------------------------------------------------------------------------------------- plain torch

def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255)


def augment(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop (zero padding `pad`, like torchvision's RandomCrop) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [N, H, W, C] -> NCHW
    if flip:
        flipped = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def train_epochs(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, weight_decay: float,
                 seed: int, pad: int = 2, flip: bool = True, cosine: bool = False, batch_size: int = 128,
                 on_epoch=None) -> list[float]:
    """SGD (momentum 0.9) with cross-entropy in train mode; `pad`/`flip` redrawn every batch (pad 0, flip False:
    none); cosine decay per step or a constant lr. `on_epoch(epoch)` runs after each epoch. Returns epoch losses."""
    gen = torch.Generator().manual_seed(seed)
    model.to(memory_format=torch.channels_last)  # the faster layout for convolutions on CPU
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = augment(x[idx], pad, flip, gen) if pad or flip else x[idx]
            loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def asr(model: nn.Module, x: Tensor, target: int) -> float:
    """Share of triggered images (all of non-target classes) predicted as `target`."""
    return float((predict(model, x) == target).float().mean())


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [float(a) for a in v]}


# ----------------------------------------------------------------------------------------------- files

def write_png_folder(folder: Path, images: Tensor, names: list[int]) -> None:
    """uint8 [N, 1, H, W] as lossless 8-bit grey PNGs `folder/<name>.png` (the folder is new)."""
    folder.mkdir(parents=True)
    for image, name in zip(images, names):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{name}.png")


def read_png_folder(folder: Path) -> Tensor:
    files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    return torch.from_numpy(np.stack([np.asarray(Image.open(p), dtype=np.uint8) for p in files]))[:, None]


def write_json_atomic(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def save_state_atomic(model: nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the outside work

def split_training_set(labels: Tensor, target: int, holdout: int, poison_rate: float, ft_size: int,
                       seed: int) -> dict[str, Tensor]:
    """Disjoint index sets of the training set: the held-out selection images (never trained on), the poisoned
    images (poison_rate of the non-target training images) and the defender's clean fine-tuning images."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    held, used = order[:holdout], order[holdout:]
    non_target = used[labels[used] != target]
    count = round(poison_rate * len(non_target))
    poison = non_target[torch.randperm(len(non_target), generator=gen)[:count]]
    unpoisoned = used[~torch.isin(used, poison)]
    ft = unpoisoned[torch.randperm(len(unpoisoned), generator=gen)[:ft_size]]
    return {"holdout": held.sort().values, "attacker_train": used.sort().values, "poison": poison.sort().values,
            "finetune": ft.sort().values}


def train_backdoored(bundle, split: dict, target: int, args) -> tuple[nn.Module, dict]:
    """The attacker's model: trained from scratch on the training set minus the hold-out, with `split["poison"]`
    triggered and relabelled `target`."""
    images, labels = bundle.train.images.clone(), bundle.train.labels.clone()
    images[split["poison"]] = checkerboard_trigger(images[split["poison"]])
    labels[split["poison"]] = target
    used = split["attacker_train"]
    torch.manual_seed(args.seed)
    model = outside_net.build(bundle.shape[0], bundle.num_classes, bundle.mean, bundle.std)
    started = time.perf_counter()
    def progress(epoch):
        print(f"  epoch {epoch}/{args.epochs} ({time.perf_counter() - started:.0f}s)", flush=True)

    losses = train_epochs(model, to_float(images[used]), labels[used], epochs=args.epochs, lr=args.lr,
                          weight_decay=5e-4, seed=args.seed + 1, cosine=True, on_epoch=progress)
    return model, {"epoch_losses": losses, "train_s": time.perf_counter() - started, "num_train": len(used),
                   "num_poisoned": len(split["poison"]), "params": sum(p.numel() for p in model.parameters())}


def purify_by_finetuning(backdoored: nn.Module, bundle, split: dict, held_x: Tensor, held_y: Tensor,
                         held_triggered: Tensor, target: int, args) -> tuple[nn.Module, dict]:
    """Plain fine-tuning (SGD 0.9, wd 5e-4, constant lr, crop+flip) on clean unpoisoned training images. The
    setting is the mildest (lowest lr, then fewest epochs) of the grid whose HOLD-OUT ASR < `ft_max_asr` with
    hold-out C-Acc >= `ft_min_acc`; else the one of lowest hold-out ASR among those keeping the accuracy."""
    x, y = to_float(bundle.train.images[split["finetune"]]), bundle.train.labels[split["finetune"]]
    grid, chosen, states = [], None, {}
    for lr in args.ft_lrs:
        model = _copy(backdoored, bundle)

        def check(epoch, model=model, lr=lr):
            if epoch in args.ft_epochs:
                row = {"lr": lr, "epochs": epoch, "holdout_clean_acc": accuracy(model, held_x, held_y),
                       "holdout_asr": asr(model, held_triggered, target)}
                grid.append(row)
                states[(lr, epoch)] = {k: v.clone() for k, v in model.state_dict().items()}
                print(f"  FT lr {lr} epochs {epoch}: hold-out C-Acc {row['holdout_clean_acc']:.4f} "
                      f"ASR {row['holdout_asr']:.4f}", flush=True)

        train_epochs(model, x, y, epochs=max(args.ft_epochs), lr=lr, weight_decay=5e-4, seed=args.seed + 2,
                     on_epoch=check)
        passing = [r for r in grid if r["lr"] == lr and r["holdout_asr"] < args.ft_max_asr
                   and r["holdout_clean_acc"] >= args.ft_min_acc]
        if passing:
            chosen = min(passing, key=lambda r: r["epochs"])
            break
    rule = (f"mildest setting (lowest lr, then fewest epochs) with hold-out ASR < {args.ft_max_asr} and hold-out "
            f"C-Acc >= {args.ft_min_acc}, on {len(held_y)} held-out TRAINING images (test set never used)")
    if chosen is None:
        keeping = [r for r in grid if r["holdout_clean_acc"] >= args.ft_min_acc] or grid
        chosen = min(keeping, key=lambda r: r["holdout_asr"])
        rule += "; none passed, so the lowest hold-out ASR keeping the accuracy"
    purified = _copy(backdoored, bundle)
    purified.load_state_dict(states[(chosen["lr"], chosen["epochs"])])
    return purified.eval(), {"grid": grid, "chosen": chosen, "rule": rule, "num_finetune": len(y)}


def _copy(model: nn.Module, bundle) -> nn.Module:
    fresh = outside_net.build(bundle.shape[0], bundle.num_classes, bundle.mean, bundle.std)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def plain_retuning_attack(purified: nn.Module, bundle, train_poisons: Tensor, test_poisons: Tensor,
                          test_x: Tensor, test_y: Tensor, target: int, args) -> dict:
    """The official ft_poison.py recipe, per draw: 2% of the training set as clean attacker data (true labels),
    its FIRST 5 replaced by 5 random poisons of the train folder (label `target`); the clean images get ONE crop
    + flip drawn once and frozen, the poisons none; SGD 0.01 / 0.9 / no wd, constant lr, 5 epochs, batch 128."""
    draws = []
    for draw in range(args.ra_draws):
        seed = args.seed * 1000 + 100 + draw
        gen = torch.Generator().manual_seed(seed)
        count = round(0.02 * len(bundle.train))
        chosen = torch.randperm(len(bundle.train), generator=gen)[:count]
        x, y = to_float(bundle.train.images[chosen]), bundle.train.labels[chosen].clone()
        x = augment(x, 2, True, gen)  # frozen: drawn once, the same for every epoch
        picks = torch.randperm(len(train_poisons), generator=gen)[:5]
        x[:5], y[:5] = to_float(train_poisons[picks]), target
        model = _copy(purified, bundle)
        started = time.perf_counter()
        train_epochs(model, x, y, epochs=5, lr=0.01, weight_decay=0.0, seed=seed + 1, pad=0, flip=False)
        draws.append({"seed": seed, "clean_acc": accuracy(model, test_x, test_y),
                      "asr": asr(model, test_poisons, target), "seconds": time.perf_counter() - started,
                      "num_clean": count - 5, "num_poison": 5})
        print(f"  plain RA draw {draw} (seed {seed}): C-Acc {draws[-1]['clean_acc']:.4f} ASR {draws[-1]['asr']:.4f}",
              flush=True)
    return {"draws": draws, "asr": spread([d["asr"] for d in draws]),
            "clean_acc": spread([d["clean_acc"] for d in draws])}


# ------------------------------------------------------------------------------------------- bdsafety's CLI

def bdsafety_command() -> list[str]:
    entry = Path(sys.executable).parent / "bdsafety"
    return [str(entry)] if entry.is_file() else [sys.executable, "-m", "bdsafety.cli"]


def run_cli(arguments: list[str], out: Path, name: str) -> dict:
    """Run `bdsafety <arguments>` with PYTHONPATH=scripts and a cache inside `out`; stdout/stderr to logs/."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "BDSAFETY_CACHE": str(out / "bdsafety-cache")}
    command = bdsafety_command() + arguments
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    (out / "logs" / f"{name}.stdout").write_text(done.stdout)
    (out / "logs" / f"{name}.stderr").write_text(done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("bdsafety: error:")]
    return {"command": "PYTHONPATH=scripts " + shlex.join(command), "returncode": done.returncode,
            "seconds": seconds, "error_line": errors[-1] if errors else None, "stdout": done.stdout,
            "stderr_tail": done.stderr.splitlines()[-5:]}


def audit_arguments(out: Path, source: list[str], audit_dir: str, args, checks: str | None = None) -> list[str]:
    clean = ["--clean", args.clean] if args.clean != "none" else []
    return ["audit", "--purified", str(out / "purified.pt"), "--backdoored", str(out / "backdoored.pt"),
            "--model-factory", FACTORY, "--dataset", "fashion-mnist", *source, *clean,
            "--checks", checks or args.checks, "--out", str(out / audit_dir), "--device", "cpu", "--seed", str(args.seed)]


def compare_ra(plain: dict, ours: dict | None) -> dict | None:
    """The plain-PyTorch RA's ASR against bdsafety's RA P-ASR: the difference of the means, its standard error
    from the two spreads, and whether they agree (ranges overlap, or the difference is within 2 standard errors)."""
    if not ours or ours.get("ra_asr") is None:
        return None
    theirs = [r["asr"] for r in ours["ra_repeats"]]
    diff = plain["asr"]["mean"] - ours["ra_asr"]
    se = float(np.sqrt(plain["asr"]["sd"] ** 2 / len(plain["draws"]) + ours["ra_asr_sd"] ** 2 / len(theirs)))
    overlap = plain["asr"]["min"] <= max(theirs) and min(theirs) <= plain["asr"]["max"]
    return {"plain_minus_bdsafety": diff, "standard_error": se, "ranges_overlap": overlap,
            "agree": bool(overlap or abs(diff) <= 2 * se)}


def audit_summary(audit: dict) -> dict:
    """The numbers of bdsafety's audit.json this report quotes."""
    ra, card = audit.get("ra") or {}, audit["card"]
    pick = dict(card_verdict=card["verdict"], card_rule=card["rule"], card_evidence=card["evidence"],
                card_warnings=card.get("warnings"), existence_bec=card.get("existence"),
                purified=audit.get("purified"), backdoored=audit.get("backdoored"),
                ra_asr=ra.get("asr"), ra_asr_sd=ra.get("asr_sd"), ra_asr_min=ra.get("asr_min"),
                ra_asr_max=ra.get("asr_max"), ra_repeats=[{k: r.get(k) for k in ("seed", "clean_acc", "asr")}
                                                          for r in ra.get("repeats", [])],
                ra_num_clean=ra.get("num_clean"), ra_num_poison=ra.get("num_poison"),
                clean_reference=audit.get("clean_reference"),
                durations_s={name: value.get("duration_s") for name, value in audit.items()
                             if isinstance(value, dict) and "duration_s" in value})
    for name in ("qra", "lmc", "ra_curve", "position", "bec", "uap"):
        if isinstance(audit.get(name), dict):
            pick[name] = {k: v for k, v in audit[name].items() if not isinstance(v, (list, dict)) or k == "curve"}
    return pick


def make_badnets_trigger_files(folder: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """bdsafety's BadNets patch as a trigger file: pattern white on the patch, mask 255 on the patch."""
    folder.mkdir(parents=True)
    _, h, w = shape
    canvas = np.zeros((h, w), dtype=np.uint8)
    p = badnets_patch_size(h)
    canvas[-p:, -p:] = 255
    pattern, mask = folder / "badnets_pattern.png", folder / "badnets_mask.png"
    Image.fromarray(canvas, mode="L").save(pattern)
    Image.fromarray(canvas.copy(), mode="L").save(mask)
    return pattern, mask


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="a new directory (refused if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--poison-rate", type=float, default=0.05, help="share of the non-target training images")
    parser.add_argument("--epochs", type=int, default=8, help="backdoor training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="backdoor training lr (cosine decay)")
    parser.add_argument("--holdout", type=int, default=2000, help="held-out training images for choosing FT")
    parser.add_argument("--ft-size", type=int, default=3000, help="clean unpoisoned images for FT")
    parser.add_argument("--ft-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--ft-epochs", type=int, nargs="+", default=[5, 10, 15, 20])
    parser.add_argument("--ft-max-asr", type=float, default=0.20)
    parser.add_argument("--ft-min-acc", type=float, default=0.85)
    parser.add_argument("--ra-draws", type=int, default=3)
    parser.add_argument("--checks", default="all", help="bdsafety audit --checks of the main audit")
    parser.add_argument("--clean", default="train", help="bdsafety audit --clean: 'train' (cached inside --out), "
                        "a model path, or 'none' (a quick smoke run: no clean reference, no QRA)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bdsafety.data import load_dataset  # the dataset reader only

    out, t0, timings = args.out, time.perf_counter(), {}
    out.mkdir(parents=True, exist_ok=False)
    (out / "logs").mkdir()
    torch.manual_seed(args.seed)
    bundle = load_dataset("fashion-mnist")
    target = args.target
    split = split_training_set(bundle.train.labels, target, args.holdout, args.poison_rate, args.ft_size, args.seed)

    # the evaluation sets: the test set, every non-target test image triggered, the hold-out likewise
    test_x, test_y = to_float(bundle.test.images), bundle.test.labels
    test_keep = (test_y != target).nonzero().flatten()
    test_poison_uint8 = checkerboard_trigger(bundle.test.images[test_keep])
    held_x, held_y = to_float(bundle.train.images[split["holdout"]]), bundle.train.labels[split["holdout"]]
    held_triggered = to_float(checkerboard_trigger(bundle.train.images[split["holdout"]][held_y != target]))

    print(f"training the backdoored model: {len(split['attacker_train'])} images, {len(split['poison'])} poisoned "
          f"-> {target}", flush=True)
    backdoored, train_info = train_backdoored(bundle, split, target, args)
    timings["backdoor_train_s"] = train_info["train_s"]
    bd = {"clean_acc": accuracy(backdoored, test_x, test_y), "asr": asr(backdoored, to_float(test_poison_uint8), target)}
    print(f"backdoored: C-Acc {bd['clean_acc']:.4f} ASR {bd['asr']:.4f} ({train_info['train_s']:.0f}s)", flush=True)

    print("purifying by plain fine-tuning (choosing the setting on the hold-out)", flush=True)
    started = time.perf_counter()
    purified, ft_info = purify_by_finetuning(backdoored, bundle, split, held_x, held_y, held_triggered, target, args)
    timings["finetune_s"] = time.perf_counter() - started
    pu = {"clean_acc": accuracy(purified, test_x, test_y), "asr": asr(purified, to_float(test_poison_uint8), target)}
    print(f"purified (FT lr {ft_info['chosen']['lr']}, {ft_info['chosen']['epochs']} epochs): C-Acc "
          f"{pu['clean_acc']:.4f} ASR {pu['asr']:.4f}", flush=True)

    started = time.perf_counter()
    save_state_atomic(backdoored, out / "backdoored.pt")
    save_state_atomic(purified, out / "purified.pt")
    train_poison_uint8 = checkerboard_trigger(bundle.train.images[split["poison"]])
    write_png_folder(out / "poisons" / "train" / str(target), train_poison_uint8, split["poison"].tolist())
    write_png_folder(out / "poisons" / "test" / str(target), test_poison_uint8, test_keep.tolist())
    wrong = out / "wrong-trigger"
    write_png_folder(wrong / "poisons" / "train" / str(target), badnets_trigger(bundle.train.images[split["poison"]]),
                     split["poison"].tolist())
    write_png_folder(wrong / "poisons" / "test" / str(target), badnets_trigger(bundle.test.images[test_keep]),
                     test_keep.tolist())
    pattern, mask = make_badnets_trigger_files(wrong / "trigger", bundle.shape)
    # the attacker's files, read back: lossless, and what both RA implementations use
    train_poisons = read_png_folder(out / "poisons" / "train" / str(target))
    test_poisons = read_png_folder(out / "poisons" / "test" / str(target))
    roundtrip = bool(torch.equal(train_poisons, train_poison_uint8) and torch.equal(test_poisons, test_poison_uint8))
    timings["write_files_s"] = time.perf_counter() - started

    print(f"plain-PyTorch Retuning Attack ({args.ra_draws} draws, official recipe)", flush=True)
    started = time.perf_counter()
    plain_ra = plain_retuning_attack(purified, bundle, train_poisons, to_float(test_poisons), test_x, test_y, target,
                                     args)
    timings["plain_ra_s"] = time.perf_counter() - started
    print(f"plain RA: ASR {plain_ra['asr']['mean']:.4f} ± {plain_ra['asr']['sd']:.4f} (range "
          f"{plain_ra['asr']['min']:.4f}-{plain_ra['asr']['max']:.4f}), C-Acc {plain_ra['clean_acc']['mean']:.4f}",
          flush=True)

    folders = ["--poisons-train", str(out / "poisons" / "train"), "--poisons-test", str(out / "poisons" / "test")]
    wrong_folders = ["--poisons-train", str(wrong / "poisons" / "train"), "--poisons-test",
                     str(wrong / "poisons" / "test")]
    wrong_trigger = ["--trigger", str(pattern), "--trigger-mask", str(mask), "--target", str(target)]
    print("bdsafety audit (CLI) ...", flush=True)
    audit_run = run_cli(audit_arguments(out, folders, "audit", args), out, "audit")
    timings["bdsafety_audit_s"] = audit_run["seconds"]
    print(audit_run["stdout"], flush=True)
    if audit_run["returncode"] != 0:
        print(f"bdsafety audit FAILED (exit {audit_run['returncode']}): {audit_run['stderr_tail']}", flush=True)
    audited = (audit_summary(json.loads((out / "audit" / "audit.json").read_text()))
               if audit_run["returncode"] == 0 else None)

    refusals = {}
    for name, source in (("wrong_trigger_file", wrong_trigger), ("wrong_poison_folders", wrong_folders)):
        run = run_cli(audit_arguments(out, source, f"audit-{name}", args), out, name)
        run["refused"] = run["returncode"] == 2 and GATE_MESSAGE in (run["error_line"] or "")
        refusals[name] = {k: v for k, v in run.items() if k != "stdout"}
        print(f"{name}: exit {run['returncode']} ({run['seconds']:.1f}s): {run['error_line']}", flush=True)
    anyway = run_cli(audit_arguments(out, wrong_folders + ["--audit-anyway"], "audit-anyway", args, "ra"), out,
                     "audit_anyway")
    anyway_card = (json.loads((out / "audit-anyway" / "audit.json").read_text())["card"]
                   if anyway["returncode"] == 0 else None)
    anyway_warnings = [line for line in anyway["stdout"].splitlines() if line.startswith("WARNING")]
    print(f"--audit-anyway: exit {anyway['returncode']} ({anyway['seconds']:.1f}s), verdict "
          f"{anyway_card and anyway_card['verdict']}; {anyway_warnings}", flush=True)
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["main", *argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "git_head": git_head(), "load_avg_end": os.getloadavg()},
        "trigger": {"ours": "4x4 checkerboard (255 where (r+c) even, else 0) at rows 1-4, cols 1-4 (top-left)",
                    "bdsafety_badnets": f"{badnets_patch_size(28)}x{badnets_patch_size(28)} white square at the "
                                        "bottom-right (rows/cols 25-27 of 28)", "target": target},
        "split": {k: len(v) for k, v in split.items()},
        "backdoored": {**bd, **{k: v for k, v in train_info.items() if k != "train_s"},
                       "recipe": f"SGD lr {args.lr} cosine, momentum 0.9, wd 5e-4, {args.epochs} epochs, batch 128, "
                                 "random crop pad 2 + horizontal flip"},
        "purified": {**pu, **ft_info},
        "poison_folders": {"train": len(train_poisons), "test": len(test_poisons), "png_roundtrip_exact": roundtrip},
        "plain_ra": {**plain_ra, "recipe": "official ft_poison.py: 2% of the training set, first 5 replaced by "
                                           "poisons; one frozen crop(pad 2)+flip on the clean images, poisons "
                                           "unaugmented; SGD 0.01/0.9/wd 0, constant, 5 epochs, batch 128"},
        "bdsafety_audit": {"command": audit_run["command"], "returncode": audit_run["returncode"],
                           "seconds": audit_run["seconds"], "stderr_tail": audit_run["stderr_tail"], **(audited or {})},
        "ra_comparison": compare_ra(plain_ra, audited),
        "refusals": refusals,
        "audit_anyway": {"command": anyway["command"], "returncode": anyway["returncode"], "seconds": anyway["seconds"],
                         "verdict": anyway_card and anyway_card["verdict"], "warning_lines": anyway_warnings,
                         "card_warnings": anyway_card and anyway_card.get("warnings")},
        "timings_s": timings,
    }
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", markdown_summary(summary))
    print(f"summary: {out / 'summary.json'}, {out / 'summary.md'} (total {timings['total_s']:.0f}s)", flush=True)
    ok = audit_run["returncode"] == 0 and all(r["refused"] for r in refusals.values()) and anyway["returncode"] == 0
    return 0 if ok else 1


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown_summary(summary: dict) -> str:
    """The README's results block, from summary.json (regenerate: `scripts/outside_model_audit.py --markdown DIR`)."""
    audit, plain, machine = summary["bdsafety_audit"], summary["plain_ra"], summary["machine"]
    chosen, agree = summary["purified"]["chosen"], summary["ra_comparison"] or {}
    refused = all(r["refused"] for r in summary["refusals"].values())
    ra = [r["asr"] for r in audit.get("ra_repeats") or []]
    ra_acc = [r["clean_acc"] for r in audit.get("ra_repeats") or [] if r.get("clean_acc") is not None]
    command = re.sub(r"--out \S+", "--out OUT", summary["command"].replace(str(REPO) + "/", ""))  # no machine paths
    lines = [
        f"Measured by `{command}` at commit `{(machine['git_head'] or '?')[:10]}` on {machine['cpu']} "
        f"({machine['threads']} threads, torch {machine['torch']}).",
        "",
        "| | C-Acc | ASR (attacker's test poisons) |",
        "|---|---|---|",
        f"| backdoored outside bdsafety | {pct(summary['backdoored']['clean_acc'])} | "
        f"{pct(summary['backdoored']['asr'])} |",
        f"| purified outside (plain FT, lr {chosen['lr']}, {chosen['epochs']} epochs, chosen on held-out training "
        f"images) | {pct(summary['purified']['clean_acc'])} | {pct(summary['purified']['asr'])} |",
        f"| after plain-PyTorch RA, official recipe, {len(plain['draws'])} draws | "
        f"{pct(plain['clean_acc']['mean'])} | {pct(plain['asr']['mean'])} (range {pct(plain['asr']['min'])} to "
        f"{pct(plain['asr']['max'])}) |",
        f"| after bdsafety's RA from the poison folders, {len(ra)} draws | "
        f"{pct(sum(ra_acc) / len(ra_acc) if ra_acc else None)} | {pct(audit.get('ra_asr'))} (range "
        f"{pct(min(ra) if ra else None)} to {pct(max(ra) if ra else None)}) |",
        "",
        f"bdsafety's verdict: **{audit.get('card_verdict')}**; the two RA implementations "
        f"{'agree' if agree.get('agree') else 'DISAGREE'} (difference of the means "
        f"{100 * agree.get('plain_minus_bdsafety', float('nan')):+.1f} points, ranges "
        f"{'overlap' if agree.get('ranges_overlap') else 'do not overlap'}). With bdsafety's BadNets trigger as a "
        f"trigger file or as poison folders the audit is "
        f"{'refused (exit 2: the backdoored model follows them at ' + pct(first_asr(summary)) + ')' if refused else 'NOT refused'}"
        f"; `--audit-anyway` audits all the same and its card carries the warning.",
        "",
        f"The rest of the card (`--checks all`): {other_audits(audit)}.",
    ]
    return "\n".join(lines) + "\n"


def other_audits(audit: dict) -> str:
    """QRA, the universal perturbation, LMC and the weight position, as one sentence."""
    qra, uap, lmc, position = (audit.get(name) or {} for name in ("qra", "uap", "lmc", "position"))
    parts = [f"QRA {pct(qra.get('asr_purified'))} (clean model {pct(qra.get('asr_clean_model'))})",
             f"universal perturbation {pct(uap.get('asr_purified', uap.get('asr')))}",
             f"LMC: backdoor error above 50 % over the last {lmc.get('backdoor_error_span', float('nan')):.2f} of the "
             "path from the backdoored to the purified weights",
             f"weight position toward the clean model {position.get('toward_clean', float('nan')):+.2f}"]
    return "; ".join(parts)


def first_asr(summary: dict) -> float | None:
    """The backdoored model's ASR quoted in the refusal line (e.g. "... is 2.1% (< 50%) ...")."""
    line = next(iter(summary["refusals"].values()))["error_line"] or ""
    found = re.search(r"is ([0-9.]+)%", line)
    return float(found[1]) / 100 if found else None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def git_head() -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:  # re-render the README block of a finished run directory
        print(markdown_summary(json.loads((Path(sys.argv[2]) / "summary.json").read_text())), end="")
        sys.exit(0)
    sys.exit(main())
