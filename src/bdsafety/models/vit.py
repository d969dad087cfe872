"""torchvision's ViT-B/16 (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929) in torchvision's state-dict
layout, behind BackdoorBench's resize to 224x224.

BackdoorBench's `generate_cls_model` (utils/aggregate_block/model_trainer_generate.py) builds
`torchvision.models.vit_b_16(pretrained=True)`, replaces `heads.head` by a `num_classes` linear layer and
wraps it as `nn.Sequential(Resize((224, 224)), net)`: whatever the dataset (CIFAR's 32x32, Tiny-ImageNet's
64x64), the already normalised images are resized bilinearly to 224x224 inside the model, and its
checkpoints carry the network's keys under the prefix `1.` (`models.backdoorbench.WRAPPER_PREFIXES` drops it
on import). `vit_b_16_torchvision` has the network's keys and does the same in `features`: normalise, resize
to 224x224 (bilinear, `align_corners=False`, no antialiasing: torchvision 0.12's tensor `Resize`, the version
BackdoorBench's sh/install.sh pins; torchvision >= 0.17 antialiases by default, which changes only inputs
larger than 224 pixels), then the ViT. Normalising before or after the resize gives the same image, since
bilinear weights sum to 1.

Layout: `class_token`, `conv_proj` (16x16 stride-16 patch embedding, with bias), `encoder.pos_embedding`
(1 x 197 x 768), `encoder.layers.encoder_layer_{0..11}` (pre-norm blocks: `ln_1`, `self_attention`
(`in_proj_weight`, `in_proj_bias`, `out_proj`; 12 heads), `ln_2`, `mlp.0`/`mlp.3` (768 -> 3072 -> 768,
GELU)), `encoder.ln`, `heads.head`. LayerNorm eps 1e-6; no dropout (torchvision's default 0). torchvision
< 0.14 named the MLP's layers `mlp.linear_1`/`mlp.linear_2`; `interop` renames them on import, as
torchvision itself does when it loads them.

The bdsafety contract: `features(x)` is the class token's final representation (after `encoder.ln`) as an
[N, 768, 1, 1] map, the input of `heads.head`, where BackdoorBench's FP and AC hook a ViT (defense/fp.py,
defense/ac.py); `pool` flattens it; `linear` is `heads.head`. The encoder blocks give token sequences, not
feature maps, so the model names no block sequence (defenses that need one, such as NAD, refuse it), and it
has no BatchNorm (ANP and CLP refuse it).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import MODELS, Classifier, Normalize

IMAGE_SIZE = 224  # BackdoorBench's Resize((224, 224)); torchvision's vit_b_16 image_size


class EncoderBlock(nn.Module):
    """torchvision's pre-norm `EncoderBlock`: x + attention(ln_1(x)), then y + mlp(ln_2(y))."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.ln_1(x)
        x = x + self.self_attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """torchvision's ViT `Encoder`: learned position embedding, `layers.encoder_layer_{i}`, final `ln`."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim)) for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.ln(self.layers(tokens + self.pos_embedding))


class TorchvisionViT(Classifier):
    """torchvision's VisionTransformer behind BackdoorBench's resize (see the module docstring)."""

    def __init__(self, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 in_channels: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder((IMAGE_SIZE // patch_size) ** 2 + 1, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    @property
    def linear(self) -> nn.Linear:  # type: ignore[override]
        return self.heads.head

    def features(self, x: Tensor) -> Tensor:
        """The class token after `encoder.ln`, [N, hidden_dim, 1, 1], for [N, C, H, W] images in [0, 1]."""
        x = F.interpolate(self.normalize(x), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, 196, hidden_dim]
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), patches], dim=1)
        return self.encoder(tokens)[:, 0, :, None, None]

    def pool(self, z: Tensor) -> Tensor:
        return torch.flatten(z, 1)

    def head(self, z: Tensor) -> Tensor:
        return self.heads(self.pool(z))


@MODELS.register("vit_b_16_torchvision")
def vit_b_16_torchvision(in_channels: int, num_classes: int, mean, std) -> TorchvisionViT:
    """torchvision's `vit_b_16` behind BackdoorBench's 224x224 resize (BackdoorBench's `vit_b_16`): 12 layers,
    12 heads, width 768, MLP 3072; 86.6 M parameters at 1000 classes."""
    return TorchvisionViT(16, 12, 12, 768, 3072, in_channels, num_classes, mean, std)
