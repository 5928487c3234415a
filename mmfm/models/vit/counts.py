"""Analytic parameter and FLOP counts of the vit family."""

from __future__ import annotations

from mmfm.config.schema import ModelConfig, VisionConfig
from mmfm.models.vit.model import mlp_width


def _layer_params(v: VisionConfig) -> int:
    d, m = v.hidden_size, mlp_width(v)
    return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)


def stem_convs(v: VisionConfig) -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, kernel, output side) of each convolution of the patch embedding."""
    side = v.image_size // v.patch_size
    if v.stem != "conv":
        return [(v.num_channels, v.hidden_size, v.patch_size, side)]
    convs, channels = [], v.num_channels
    steps = v.patch_size.bit_length() - 1
    for i in range(steps):
        out = max(v.hidden_size >> (steps - i), 8)
        convs.append((channels, out, 3, v.image_size >> (i + 1)))
        channels = out
    return convs + [(channels, v.hidden_size, 1, side)]


def num_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    d, p = v.hidden_size, (v.image_size // v.patch_size) ** 2
    stem = sum(cin * cout * k * k + cout for cin, cout, k, _ in stem_convs(v))
    return stem + p * d + v.num_layers * _layer_params(v) + 2 * d


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) of the tower for one image."""
    v = cfg.vision
    p = (v.image_size // v.patch_size) ** 2
    d, m = v.hidden_size, mlp_width(v)
    stem = sum(cin * cout * k * k * side * side for cin, cout, k, side in stem_convs(v))
    matmul_per_patch = v.num_layers * (4 * d * d + 2 * d * m)
    attention = 12 * v.num_layers * d * p * p
    return 6.0 * (stem + p * matmul_per_patch) + attention
