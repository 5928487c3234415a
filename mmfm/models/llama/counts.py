"""Analytic parameter and FLOP counts of the llama family (MFU, planning, pipeline balance)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.models.llama.model import head_dim


def layer_matmul_params(lm: LanguageConfig) -> int:
    d, hd = lm.hidden_size, head_dim(lm)
    attn = d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2
    return attn + 3 * d * lm.intermediate_size


def layer_vector_params(lm: LanguageConfig) -> int:
    """The two norms, plus the q/k/v biases (qkv_bias) and the per-head q and k norms (qk_norm)."""
    hd = head_dim(lm)
    biases = (lm.num_heads + 2 * lm.num_kv_heads) * hd if lm.qkv_bias else 0
    return 2 * lm.hidden_size + biases + (2 * hd if lm.qk_norm else 0)


def num_params(cfg: ModelConfig) -> int:
    lm = cfg.language
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embed + lm.num_layers * (layer_matmul_params(lm) + layer_vector_params(lm)) + d


def attention_width(lm: LanguageConfig) -> int:
    """num_heads x head_dim: the width of the attention scores' and values' matmuls (hidden_size by default)."""
    return lm.num_heads * head_dim(lm)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position: 6 x matmul params + attention scores."""
    lm = cfg.language
    matmul = lm.num_layers * layer_matmul_params(lm) + lm.vocab_size * lm.hidden_size
    attention = 12 * lm.num_layers * attention_width(lm) * seq_len
    return 6.0 * matmul + attention


def layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of one decoder layer for one sample of seq_len positions."""
    lm = cfg.language
    return 6.0 * layer_matmul_params(lm) * seq_len + 12.0 * attention_width(lm) * seq_len ** 2


def head_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of the output projection for one sample."""
    lm = cfg.language
    return 6.0 * lm.vocab_size * lm.hidden_size * seq_len


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, cp: int, kernels, residual: int = 2,
                           fused_norm: bool = True, backward: bool = False) -> float:
    """One decoder layer's saved activations (mmfm.plan.memory.decoder_layer_bytes: SwiGLU keeps 3 FFN-wide tensors
    with the fused kernel, 4 with kernels.swiglu=torch; `residual` the residual stream's element size, memory.
    residual_bytes; fused_norm whether the fused RMSNorm runs, memory.fused_norm); backward=True adds what the
    layer's backward holds besides at its peak (memory.swiglu_backward_bytes)."""
    from mmfm.plan.memory import decoder_layer_bytes, swiglu_backward_bytes

    saved = decoder_layer_bytes(cfg.language, tokens, tp, cp, kernels.swiglu != "torch", fused_norm, residual)
    return saved + (swiglu_backward_bytes(cfg.language, tokens, tp, cp) if backward else 0.0)
