"""Analytic parameter and FLOP counts of the clip family (what the tower builds: the kept layers)."""

from __future__ import annotations

from mmfm.config.schema import ModelConfig, VisionConfig
from mmfm.models.clip.model import kept_layers, layout, num_positions
from mmfm.models.vit.model import mlp_width


def layer_params(v: VisionConfig) -> int:
    d, m = v.hidden_size, mlp_width(v)
    return 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)


def embedding_params(v: VisionConfig) -> int:
    """The patch convolution, the position (and class) embeddings and CLIP's pre-norm."""
    lay, d = layout(v), v.hidden_size
    patch = v.num_channels * d * v.patch_size ** 2 + (d if lay.patch_bias else 0)
    return patch + num_positions(v) * d + (d if lay.class_token else 0) + (2 * d if lay.pre_norm else 0)


def num_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    return embedding_params(v) + kept_layers(v) * layer_params(v)


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) of the tower for one image: 6 per multiply-add of the patch
    convolution and of the kept layers' matmuls on every position, plus attention's two T x T products."""
    v = cfg.vision
    patches, t, layers = (v.image_size // v.patch_size) ** 2, num_positions(v), kept_layers(v)
    d, m = v.hidden_size, mlp_width(v)
    patch = patches * v.num_channels * d * v.patch_size ** 2
    matmul = layers * t * (4 * d * d + 2 * d * m)
    attention = 12 * layers * d * t * t
    return 6.0 * (patch + matmul) + attention
