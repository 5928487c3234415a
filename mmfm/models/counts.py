"""Analytic parameter and FLOP counts of the vision-language model (used for MFU and planning)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig, VisionConfig


def _vision_layer_params(v: VisionConfig) -> int:
    d, m = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
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


def vision_params(v: VisionConfig) -> int:
    d, p = v.hidden_size, (v.image_size // v.patch_size) ** 2
    stem = sum(cin * cout * k * k + cout for cin, cout, k, _ in stem_convs(v))
    return stem + p * d + v.num_layers * _vision_layer_params(v) + 2 * d


def projector_params(cfg: ModelConfig) -> int:
    dv, d = cfg.vision.hidden_size, cfg.language.hidden_size
    return dv * d + d + d * d + d


def language_layer_matmul_params(lm: LanguageConfig) -> int:
    d, hd = lm.hidden_size, lm.hidden_size // lm.num_heads
    attn = d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2
    return attn + 3 * d * lm.intermediate_size


def language_params(lm: LanguageConfig) -> int:
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embed + lm.num_layers * (language_layer_matmul_params(lm) + 2 * d) + d


def num_params(cfg: ModelConfig) -> int:
    return vision_params(cfg.vision) + projector_params(cfg) + language_params(cfg.language)


def language_flops_per_token(lm: LanguageConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position: 6 x matmul params + attention scores."""
    matmul = lm.num_layers * language_layer_matmul_params(lm) + lm.vocab_size * lm.hidden_size
    attention = 12 * lm.num_layers * lm.hidden_size * seq_len
    return 6.0 * matmul + attention


def vision_flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) of the vision tower and projector for one image."""
    v = cfg.vision
    p = (v.image_size // v.patch_size) ** 2
    d, m = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    stem = sum(cin * cout * k * k * side * side for cin, cout, k, side in stem_convs(v))
    matmul_per_patch = v.num_layers * (4 * d * d + 2 * d * m)
    proj = cfg.vision.hidden_size * cfg.language.hidden_size + cfg.language.hidden_size**2
    attention = 12 * v.num_layers * d * p * p
    return 6.0 * (stem + p * (matmul_per_patch + proj)) + attention


def training_flops(cfg: ModelConfig, num_positions: int, seq_len: int, num_images: int) -> float:
    """FLOPs of one optimizer step over `num_positions` sequence positions and `num_images` images."""
    return num_positions * language_flops_per_token(cfg.language, seq_len) + num_images * vision_flops_per_image(cfg)
