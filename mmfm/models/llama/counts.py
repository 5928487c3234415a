"""Analytic parameter and FLOP counts of the llama family (MFU, planning, pipeline balance)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig


def layer_matmul_params(lm: LanguageConfig) -> int:
    d, hd = lm.hidden_size, lm.hidden_size // lm.num_heads
    attn = d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2
    return attn + 3 * d * lm.intermediate_size


def num_params(cfg: ModelConfig) -> int:
    lm = cfg.language
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embed + lm.num_layers * (layer_matmul_params(lm) + 2 * d) + d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position: 6 x matmul params + attention scores."""
    lm = cfg.language
    matmul = lm.num_layers * layer_matmul_params(lm) + lm.vocab_size * lm.hidden_size
    attention = 12 * lm.num_layers * lm.hidden_size * seq_len
    return 6.0 * matmul + attention


def layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of one decoder layer for one sample of seq_len positions."""
    lm = cfg.language
    return 6.0 * layer_matmul_params(lm) * seq_len + 12.0 * lm.hidden_size * seq_len ** 2


def head_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of the output projection for one sample."""
    lm = cfg.language
    return 6.0 * lm.vocab_size * lm.hidden_size * seq_len
