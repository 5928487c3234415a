"""The clip family: the vision towers of CLIP (kind clip) and SigLIP / SigLIP2 (kind siglip), as the LLaVA
line of models uses them: the output of one chosen layer, not the pooled embedding. Plain PyTorch.

The math is that of transformers' CLIPVisionModel and SiglipVisionModel: a patchify convolution, learned
position embeddings, pre-norm encoder layers (LayerNorm, attention with biased q/k/v/out projections,
LayerNorm, fc1-activation-fc2). The kinds differ only in `LAYOUTS`: CLIP prepends a class token and
normalizes the embeddings (`pre_layrnorm`), has no bias on its patch convolution and uses quick GELU;
SigLIP has none of the three and uses tanh GELU.

The tower returns transformers' `hidden_states[feature_layer]`, what LlavaModel.get_image_features takes:
the chosen layer's output before `post_layernorm` (transformers does not tie hidden_states[-1] to the
normed last_hidden_state for these two models), with CLIP's class token dropped (LLaVA's "default" feature
strategy). Neither `post_layernorm`, SigLIP's attention-pooling head, nor the layers after the chosen one
change that output, so they are not built: mmfm trains and counts only what the features depend on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import VisionConfig
from mmfm.models.vit.model import VisionBlock


@dataclass(frozen=True)
class Layout:
    """What tells the kinds apart."""

    class_token: bool  # a learned class embedding before the patches (dropped from the output)
    pre_norm: bool  # a LayerNorm over the embeddings before the first layer (CLIP's pre_layrnorm)
    patch_bias: bool  # a bias on the patchify convolution
    act: str  # the MLP activation unless model.vision.act names another


LAYOUTS = {
    "clip": Layout(class_token=True, pre_norm=True, patch_bias=False, act="quick_gelu"),
    "siglip": Layout(class_token=False, pre_norm=False, patch_bias=True, act="gelu_tanh"),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu}


def layout(cfg: VisionConfig) -> Layout:
    return LAYOUTS[cfg.kind]


def activation(cfg: VisionConfig) -> str:
    return cfg.act or layout(cfg).act


def kept_layers(cfg: VisionConfig) -> int:
    """How many layers feed the chosen feature layer: hidden_states[i] is the output of layer i (1-based)."""
    return cfg.feature_layer % (cfg.num_layers + 1)


def num_positions(cfg: VisionConfig) -> int:
    """The sequence the layers run on: the patches, and CLIP's class token."""
    return (cfg.image_size // cfg.patch_size) ** 2 + int(layout(cfg).class_token)


def encoder_layer(cfg: VisionConfig) -> VisionBlock:
    """transformers' CLIPEncoderLayer / SiglipEncoderLayer (layer_norm1, self_attn, layer_norm2, mlp): vit's block
    with the kind's activation."""
    return VisionBlock(cfg, ACTIVATIONS[activation(cfg)])


class ClipVisionTower(nn.Module):
    """Images [N, C, H, W] -> the features of layer cfg.feature_layer, [N, (H/p)*(W/p), hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg, self.layout = cfg, layout(cfg)
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2  # tokens per image in the VLM
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                     bias=self.layout.patch_bias)
        if self.layout.class_token:
            self.class_embed = nn.Parameter(torch.empty(cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.empty(num_positions(cfg), cfg.hidden_size))
        if self.layout.pre_norm:
            self.pre_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.blocks = nn.ModuleDict({str(i): encoder_layer(cfg) for i in range(kept_layers(cfg))})

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialize the full tensor of parameter `name` (relative to this module)."""
        if name in ("pos_embed", "class_embed"):
            nn.init.normal_(tensor, std=std, generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif "norm" in name:  # LayerNorm weights
            nn.init.ones_(tensor)
        else:
            nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std, generator=generator)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """transformers' hidden_states[0]: patches (after the class token), plus positions, CLIP's pre-norm."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.layout.class_token:
            x = torch.cat([self.class_embed.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.pre_norm(x) if self.layout.pre_norm else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks.values():
            x = block(x)
        return x[:, 1:] if self.layout.class_token else x
