"""Analytic parameter and FLOP counts of the vision-language model (used for MFU and planning)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig, VisionConfig


def _vision_layer_params(v: VisionConfig) -> int:
    d, m = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)


def vision_params(v: VisionConfig) -> int:
    d, p = v.hidden_size, (v.image_size // v.patch_size) ** 2
    patch = v.num_channels * v.patch_size**2 * d + d
    return patch + p * d + v.num_layers * _vision_layer_params(v) + 2 * d


def projector_params(cfg: ModelConfig) -> int:
    dv, d = cfg.vision.hidden_size, cfg.language.hidden_size
    return dv * d + d + d * d + d


def _language_layer_matmul_params(lm: LanguageConfig) -> int:
    d, hd = lm.hidden_size, lm.hidden_size // lm.num_heads
    attn = d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2
    return attn + 3 * d * lm.intermediate_size


def language_params(lm: LanguageConfig) -> int:
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embed + lm.num_layers * (_language_layer_matmul_params(lm) + 2 * d) + d


def num_params(cfg: ModelConfig) -> int:
    return vision_params(cfg.vision) + projector_params(cfg) + language_params(cfg.language)


def language_flops_per_token(lm: LanguageConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position: 6 x matmul params + attention scores."""
    matmul = lm.num_layers * _language_layer_matmul_params(lm) + lm.vocab_size * lm.hidden_size
    attention = 12 * lm.num_layers * lm.hidden_size * seq_len
    return 6.0 * matmul + attention


def vision_flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) of the vision tower and projector for one image."""
    v = cfg.vision
    p = (v.image_size // v.patch_size) ** 2
    d, m = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    matmul_per_patch = v.num_channels * v.patch_size**2 * d + v.num_layers * (4 * d * d + 2 * d * m)
    proj = cfg.vision.hidden_size * cfg.language.hidden_size + cfg.language.hidden_size**2
    attention = 12 * v.num_layers * d * p * p
    return 6.0 * p * (matmul_per_patch + proj) + attention


def training_flops(cfg: ModelConfig, num_positions: int, seq_len: int, num_images: int) -> float:
    """FLOPs of one optimizer step over `num_positions` sequence positions and `num_images` images."""
    return num_positions * language_flops_per_token(cfg.language, seq_len) + num_images * vision_flops_per_image(cfg)
