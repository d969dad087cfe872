"""The benchmark's table (`benchmarks/bench.py`): the headline numbers of a `speed.run_benchmark` record as
Markdown."""

from __future__ import annotations


def format_table(result: dict) -> str:
    """A Markdown table of the headline numbers, under a one-line description of the machine and workload."""
    env = result["environment"]
    rows = training_rows(result) + compute_rows(result) + evaluation_rows(result)
    header = (f"{env['model']} {'x'.join(map(str, env['input_shape']))}, batch {env['batch_size']}, {env['dtype']}, "
              f"{env['device_name']} ({env['device']}, {env['threads']} threads), torch {env['torch']}")
    width = max(len(name) for name, _ in rows)
    lines = [header, "", f"| {'case'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    return "\n".join(lines + [f"| {name.ljust(width)} | {value} |" for name, value in rows])


def training_rows(result: dict) -> list[tuple[str, str]]:
    train, pipes, best = result["train"], result["input_pipeline"], result["conventional_best"]
    rows = [(f"bdsafety train (`train.fit`, {train.get('precision', 'fp32')})",
             f"{train['images_per_s']:,.0f} img/s ({train['step_ms']:.1f} ms/step)")]
    rows += [(f"conventional PIL + DataLoader, {workers} workers (NCHW, fp32)",
              f"{case['images_per_s']:,.0f} img/s ({case['step_ms']:.1f} ms/step)")
             for workers, case in result["conventional"].items()]
    ablation, spread = result["conventional_channels_last"], result["speedup_rounds"]
    quartiles = f"quartiles {spread['q1']:.2f}-{spread['q3']:.2f} over {spread['rounds']} rounds"
    rows += [(f"speed-up vs best conventional ({best['num_workers']} workers)",
              f"{result['speedup']:.2f}x ({quartiles})"),
             (f"ablation: conventional, {ablation['num_workers']} workers, channels_last model (fp32)",
              f"{ablation['images_per_s']:,.0f} img/s (bdsafety {result['speedup_same_memory_format']:.2f}x)")]
    if "train_other" in result:
        other = result["train_other"]
        rows.append((f"bdsafety train in {other['precision']} (`precision: {other['precision']}`)",
                     f"{other['images_per_s']:,.0f} img/s ({result['speedup_other']:.2f}x conventional)"))
    return rows + [
        ("input pipeline alone, ms/batch (bdsafety / conventional)",
         f"{pipes['bdsafety_ms_per_batch']:.2f} / {pipes['conventional_ms_per_batch']:.2f} ({pipes['ratio']:.0f}x)"),
    ]


def compute_rows(result: dict) -> list[tuple[str, str]]:
    flops, peak, pam = result["flops"], result["peak"], result["pam"]
    return [
        ("model FLOPs / image (forward; train = 3x)", f"{flops['forward_flops_per_image'] / 1e6:.1f} MFLOP"),
        ("achieved training FLOP/s", f"{flops['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        (f"matmul peak ({peak['dtype'].removeprefix('torch.')} mm, n={peak['best_size']})",
         f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s"),
        ("MFU (training)", f"{100 * flops['mfu']:.1f} %"),
        *other_precision_rows(flops),
        ("PAM step / SGD step", f"{pam['ratio']:.2f}x ({pam['pam_step_ms']:.1f} vs {pam['sgd_step_ms']:.1f} ms)"),
    ]


def other_precision_rows(flops: dict) -> list[tuple[str, str]]:
    if "other" not in flops:
        return []
    other, peak = flops["other"], flops["other"]["peak"]
    return [(f"{other['precision']} matmul peak / MFU of {other['precision']} training",
             f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s / {100 * other['mfu']:.1f} %")]


def evaluation_rows(result: dict) -> list[tuple[str, str]]:
    evaluation, lmc = result["eval"], result["lmc"]
    rows = [(f"evaluation (`train.predict`, batch {b})", f"{case['images_per_s']:,.0f} img/s")
            for b, case in evaluation["by_batch_size"].items()]
    return rows + [(f"LMC scan, {lmc['points']} points x {lmc['images_per_point']:,} images",
                    f"{lmc['seconds']:.1f} s ({lmc['images_per_s']:,.0f} img/s)")]
