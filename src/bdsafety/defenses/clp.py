"""Channel Lipschitzness-based Pruning (Zheng, Tang, Li, Liu; ECCV 2022, arXiv 2208.03111): data-free pruning.

For a convolution followed by BatchNorm, output channel k computes BN_k(W_k * x): its Lipschitz constant
(in the layer's input) is at most the UCLC

    UCLC_k = |γ_k| / σ_k · σ_max(W_k),   W_k = conv.weight[k] reshaped to [C_in/groups, kh·kw],

the largest singular value of the channel's kernel matrix times the BN scale (σ_k = sqrt(running_var_k),
without BN's eps, as the official code and BackdoorBench's `defense/clp.py` compute it). Backdoor channels
have unusually large UCLCs, so within each conv→BN pair the channels with UCLC > mean + u·std (std with
Bessel's correction, torch's default, as the official code) are pruned by setting their BN weight AND bias
to 0, as the official code does; the architecture and state-dict keys are unchanged. No data is used and
nothing is trained.

Which pairs. A pair is a BatchNorm whose input IS a convolution's output, found in the model's `torch.fx`
graph (no data, no forward pass); the official code instead pairs each BatchNorm with the last Conv2d
before it in module registration order. The two agree wherever BN directly follows its conv:
* `resnet18`/`resnet50` (models/resnet.py, post-activation): every conv, the 1x1 projection shortcuts
  included (stem conv1→bn1, each block's conv_i→bn_i, shortcut.0→shortcut.1): all convs are covered.
* `vgg19_bn`: every conv→BN (16 pairs).
* `preact_small`/`preact_resnet18` (pre-activation): the stem → the first block's bn1, and conv1→bn2 in
  every block (preact_small: 4 pairs of 9 convs; PreAct-ResNet-18: 9 of 20). Not covered: each block's conv2
  and projection shortcut, whose outputs are summed (conv2 + shortcut) before the next block's bn1 or the
  final `body.bn`; no single kernel bounds such a channel, and these convs are not followed by a BN of their
  own. They are neither scored nor pruned (BackdoorBench scores those BNs with whichever of conv2/shortcut
  was registered last, ignoring the other summand; we do not). The record lists the uncovered convs and BNs.
* A pruned channel's BN output is the constant 0. Where that output is then summed with a shortcut (ResNet's
  bn2/bn3 and projection BN) the sum keeps the other branch; where the conv's output also feeds something
  else (preact: the stem's output is the first block's identity shortcut; `conv_output_shared` in the
  record), the channel is removed from the BN's branch only. This is the official pruning, applied as is.

Trajectory. CLP has no optimizer steps, so the default step-snapshot trajectory would be empty. It is defined
along u instead, like ANP's along its threshold: the state at fraction f is the backdoored model pruned at
u_f = u_top + f·(u − u_top), from u_top = max(`trajectory_u_max`, u) (default 10, the top of BackdoorBench's
u grid, cfg u_max, where few or no channels are pruned) down to u at f = 1. Pruning is monotone in u, so
the states prune nested, growing channel sets.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from ..errors import UsageError
from ._common import DEFENSES, DefenderData, DefenseBase

log = logging.getLogger(__name__)

# BackdoorBench's sweep of u (cfg u_min 0, u_max 10, u_num 21); CLP records how many channels each prunes.
U_GRID = tuple(0.5 * i for i in range(21))


@dataclass(frozen=True)
class ConvBatchNorm:
    """A BatchNorm (`bn`) whose input is the output of a Conv2d (`conv`), by qualified module names."""

    conv: str
    bn: str
    conv_output_shared: bool  # the conv's output also feeds something other than this BN


def conv_bn_pairs(model: nn.Module) -> tuple[list[ConvBatchNorm], list[str], list[str]]:
    """The conv→BN pairs of `model` (graph order), and the convs and BNs that are in no pair.

    Raises:
        UsageError: the model cannot be traced by torch.fx.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # any tracing failure means the structure cannot be read
        raise UsageError(f"CLP could not trace the model to find its conv→BatchNorm pairs: {error}") from None
    modules = dict(model.named_modules())

    def module_of(node) -> nn.Module | None:
        return modules.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None

    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.args else None
        if isinstance(module_of(node), nn.modules.batchnorm._BatchNorm) and isinstance(module_of(source), nn.Conv2d):
            pairs.append(ConvBatchNorm(source.target, node.target, len(source.users) > 1))
    paired = {p.conv for p in pairs} | {p.bn for p in pairs}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in paired]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in paired]
    return pairs, convs, bns


@torch.no_grad()
def channel_lipschitz_bound(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """UCLC per output channel: σ_max(conv.weight[k] as a [C_in/groups, kh·kw] matrix) · |γ_k| / sqrt(var_k)."""
    if bn.weight is None or bn.running_var is None:
        raise UsageError("CLP needs affine BatchNorm layers with running statistics")
    kernels = conv.weight.detach().float().flatten(2)  # [C_out, C_in/groups, kh·kw]
    spectral = torch.linalg.matrix_norm(kernels, ord=2)
    return (spectral * (bn.weight.detach().float().abs() / bn.running_var.float().sqrt())).cpu()


def outlier_channels(uclc: Tensor, u: float) -> tuple[Tensor, float]:
    """Channels with UCLC > mean + u·std (std with Bessel's correction), and that threshold."""
    spread = uclc.std() if len(uclc) > 1 else torch.zeros(())  # one channel: nothing is an outlier
    threshold = float(uclc.mean() + u * spread)
    return (uclc > threshold).nonzero().flatten(), threshold


@torch.no_grad()
def zero_bn_channels(model: nn.Module, channels: dict[str, Tensor]) -> nn.Module:
    """Set weight and bias of the given BatchNorm channels to 0, in place."""
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        idx = idx.to(bn.weight.device)
        bn.weight[idx] = 0.0
        bn.bias[idx] = 0.0
    return model


def pruned_at(uclcs: dict[str, Tensor], u: float) -> dict[str, Tensor]:
    """Per BN layer, the channels CLP prunes at `u`."""
    return {name: outlier_channels(values, u)[0] for name, values in uclcs.items()}


@DEFENSES.register("clp")
@dataclass(frozen=True)
class ChannelLipschitzPruning(DefenseBase):
    """CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022); data-free, prunes high-UCLC channels.

    Args of `purify`: the backdoored model (a copy, modified in place); the defender's data is not read.
    """

    display_name: ClassVar[str] = "CLP"  # in tables; the paper's name first (Min et al. 2024, Table 1)
    short_name: ClassVar[str] = "CLP"  # in figures
    table_order: ClassVar[int] = 10  # the paper's row order, then the defenses beyond it

    u: float = 3.0  # cfg u (config/defense/clp/cifar10.yaml; tiny.yaml: 5), the paper's default
    trajectory_u_max: float = 10.0  # cfg u_max: where the trajectory along u starts (docstring)

    # No length to cut (data-free: one pass over the weights); u from the strength grid: at the paper's u = 3
    # (and at 2.5) CLP stays above the rule's calibration O-ASR on the demo's model, at u = 2 it purifies
    # (grid: docs/calibration.md)
    cpu_overrides: ClassVar[dict] = {"u": 2.0}
    uses_attack: ClassVar[bool] = False
    model_parts: ClassVar[tuple[str, ...]] = ("batchnorm",)  # prunes BN channels (ConvNeXt and ViT have none)

    def __post_init__(self):
        if not 0 <= self.u < float("inf") or not 0 <= self.trajectory_u_max < float("inf"):
            raise UsageError(f"CLP needs finite u >= 0 and trajectory_u_max >= 0, got u={self.u}, "
                             f"trajectory_u_max={self.trajectory_u_max}")

    def purify(self, model: nn.Module, data: DefenderData, seed: int) -> tuple[nn.Module, dict]:
        started = time.perf_counter()
        pairs, uncovered_convs, uncovered_bns = conv_bn_pairs(model)
        if not pairs:
            raise UsageError("CLP found no BatchNorm layer that directly follows a Conv2d in this model")
        uclcs = {p.bn: channel_lipschitz_bound(model.get_submodule(p.conv), model.get_submodule(p.bn)) for p in pairs}
        layers = [self.layer_record(pair, uclcs[pair.bn]) for pair in pairs]
        zero_bn_channels(model, pruned_at(uclcs, self.u))
        num_pruned, num_channels = (sum(layer[key] for layer in layers) for key in ("num_pruned", "channels"))
        log.info("CLP pruned %d of %d channels in %d conv-BN pairs (u=%.2f)", num_pruned, num_channels,
                 len(layers), self.u)
        sweep = [{"u": u, "num_pruned": sum(len(idx) for idx in pruned_at(uclcs, u).values())} for u in U_GRID]
        return model, {"u": self.u, "num_pruned": num_pruned, "num_channels": num_channels, "layers": layers,
                       "uncovered_convs": uncovered_convs, "uncovered_batchnorms": uncovered_bns, "u_sweep": sweep,
                       "duration_s": time.perf_counter() - started}

    def layer_record(self, pair: ConvBatchNorm, uclc: Tensor) -> dict:
        """One pair's UCLCs, their statistics, the threshold at u and the channels it prunes."""
        idx, threshold = outlier_channels(uclc, self.u)
        return {"conv": pair.conv, "bn": pair.bn, "conv_output_shared": pair.conv_output_shared,
                "channels": len(uclc), "num_pruned": len(idx), "pruned_channels": idx.tolist(), "threshold": threshold,
                "mean": float(uclc.mean()), "std": float(uclc.std()) if len(uclc) > 1 else 0.0, "uclc": uclc.tolist()}

    def trajectory_states(self, backdoored: nn.Module, record: dict,
                          fractions: list[float]) -> list[tuple[dict, dict[str, Tensor]]]:
        """The backdoored model pruned at u_f = u_top + f·(u − u_top) for each fraction f (docstring)."""
        uclcs = {layer["bn"]: torch.tensor(layer["uclc"], dtype=torch.float32) for layer in record["layers"]}
        top = max(self.trajectory_u_max, record["u"])
        states = []
        for fraction in fractions:
            u = top + fraction * (record["u"] - top)
            pruned = zero_bn_channels(copy.deepcopy(backdoored), pruned_at(uclcs, u))
            states.append(({"fraction": fraction, "u": u}, pruned.state_dict()))
        return states
