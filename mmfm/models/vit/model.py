"""The vit family: a ViT image encoder (pre-norm, learned position embeddings, no class token). Plain PyTorch."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import VisionConfig
from mmfm.models.attention import CoreAttention


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention; separate q/k/v projections so that tensor parallelism can
    split them by heads."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.head_dim = dim // num_heads
        self.wq, self.wk, self.wv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.core = CoreAttention(causal=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.wq, self.wk, self.wv))
        return self.proj(self.core(q, k, v).transpose(1, 2).reshape(b, t, -1))


def mlp_width(cfg: VisionConfig) -> int:
    """The MLP's hidden width: model.vision.intermediate_size, or hidden_size * mlp_ratio when it is 0."""
    return cfg.intermediate_size or int(cfg.hidden_size * cfg.mlp_ratio)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Callable[[torch.Tensor], torch.Tensor] = F.gelu):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """A pre-norm transformer block (norm1, attn, norm2, mlp), as transformers' CLIP / SigLIP encoder layers."""

    def __init__(self, cfg: VisionConfig, act: Callable[[torch.Tensor], torch.Tensor] = F.gelu):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, mlp_width(cfg), act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """Stride-2 3x3 convolutions down to one token per patch, then a 1x1 projection: the "early
    convolutions" ViT stem (Xiao et al., 2021), which trains much faster than patchify on small data."""
    layers, channels = [], cfg.num_channels
    steps = cfg.patch_size.bit_length() - 1
    for i in range(steps):
        out = max(cfg.hidden_size >> (steps - i), 8)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.hidden_size, 1))


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2D sine-cosine position table (MAE): the first half of the channels encodes the row, the
    second the column, each as sines then cosines at dim / 4 frequencies from 1 down to 1/10000."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    angles = [axis.reshape(-1, 1) * omega for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


class VisionTransformer(nn.Module):
    """Images [N, C, H, W] -> patch features [N, (H/p)*(W/p), hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        if cfg.stem == "conv":
            self.patch_embed = conv_stem(cfg)
        else:
            self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, cfg.hidden_size))
        self.blocks = nn.ModuleDict({str(i): VisionBlock(cfg) for i in range(cfg.num_layers)})
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialize the full tensor of parameter `name` (relative to this module)."""
        if name == "pos_embed" and self.cfg.position_init == "sincos":
            grid = self.cfg.image_size // self.cfg.patch_size
            tensor.copy_(sincos_2d(grid, tensor.shape[-1]).view_as(tensor))
        elif name == "pos_embed":
            nn.init.normal_(tensor, std=std, generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif name.startswith("norm") or ".norm" in name:  # LayerNorm weights
            nn.init.ones_(tensor)
        elif name.startswith("patch_embed.") and self.cfg.stem == "conv":
            # keep the signal's scale through the stacked convolutions
            nn.init.kaiming_normal_(tensor, nonlinearity="relu", generator=generator)
        else:
            nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks.values():
            x = block(x)
        return self.norm(x)
