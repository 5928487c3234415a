"""Analytic parameter and FLOP counts of the llama family (MFU, planning, pipeline balance)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.models.llama.model import head_dim
from mmfm.models.moe import is_moe_layer


def attention_params(lm: LanguageConfig) -> int:
    if lm.mla.kv_lora_rank:
        return latent_attention_params(lm)
    d, hd = lm.hidden_size, head_dim(lm)
    return d * lm.num_heads * hd * 2 + d * lm.num_kv_heads * hd * 2


def latent_attention_params(lm: LanguageConfig) -> int:
    """Multi-head latent attention's matmuls: queries (through their latent, or direct), the key/value latent with
    the shared rotated key, its up-projection to every head's key and value, and the output."""
    m, d, heads = lm.mla, lm.hidden_size, lm.num_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    queries = d * m.q_lora_rank + m.q_lora_rank * heads * qk if m.q_lora_rank else d * heads * qk
    keys_values = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    return queries + keys_values + heads * m.v_head_dim * d


def layer_matmul_params(lm: LanguageConfig) -> int:
    """A dense layer's matmul parameters: attention and SwiGLU."""
    return attention_params(lm) + 3 * lm.hidden_size * lm.intermediate_size


def ffn_params(lm: LanguageConfig, layer_id: int, active: bool = False) -> int:
    """Layer layer_id's feed-forward matmul parameters: the SwiGLU, or of a mixture of experts the router, the
    shared experts and every routed expert (active=True: the top_k experts a token goes through)."""
    if not is_moe_layer(lm, layer_id):
        return 3 * lm.hidden_size * lm.intermediate_size
    moe, d = lm.moe, lm.hidden_size
    expert = 3 * d * (moe.expert_intermediate_size or lm.intermediate_size)
    return d * moe.num_experts + expert * (moe.num_shared_experts + (moe.top_k if active else moe.num_experts))


def matmul_params(lm: LanguageConfig, active: bool = False) -> int:
    """Every layer's matmul parameters (active=True: those one token goes through)."""
    return sum(attention_params(lm) + ffn_params(lm, i, active) for i in range(lm.num_layers))


def layer_vector_params(lm: LanguageConfig) -> int:
    """The two norms, plus the q/k/v biases (qkv_bias) and the per-head q and k norms (qk_norm), or latent attention's
    norms of its latents."""
    if lm.mla.kv_lora_rank:
        return 2 * lm.hidden_size + lm.mla.q_lora_rank + lm.mla.kv_lora_rank
    hd = head_dim(lm)
    biases = (lm.num_heads + 2 * lm.num_kv_heads) * hd if lm.qkv_bias else 0
    return 2 * lm.hidden_size + biases + (2 * hd if lm.qk_norm else 0)


def num_params(cfg: ModelConfig) -> int:
    lm = cfg.language
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2)
    return embed + matmul_params(lm) + lm.num_layers * layer_vector_params(lm) + d


def attention_widths(lm: LanguageConfig) -> tuple[int, int]:
    """The widths of the attention scores' matmul (q k^T) and the values' (num_heads x head_dim each, hidden_size by
    default; under latent attention num_heads x (qk_nope + qk_rope) and num_heads x v_head_dim)."""
    m = lm.mla
    if m.kv_lora_rank:
        return lm.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), lm.num_heads * m.v_head_dim
    return lm.num_heads * head_dim(lm), lm.num_heads * head_dim(lm)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position: 6 x matmul params (of a mixture of experts the
    active ones) + 6 x (scores' + values' widths) x seq_len per layer."""
    lm = cfg.language
    matmul = matmul_params(lm, active=True) + lm.vocab_size * lm.hidden_size
    attention = 6 * lm.num_layers * sum(attention_widths(lm)) * seq_len
    return 6.0 * matmul + attention


def layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of one decoder layer for one sample of seq_len positions (with experts, the mean over the
    layers of their active parameters)."""
    lm = cfg.language
    return 6.0 * matmul_params(lm, active=True) / lm.num_layers * seq_len + 6.0 * sum(attention_widths(lm)) * seq_len ** 2


def head_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of the output projection for one sample."""
    lm = cfg.language
    return 6.0 * lm.vocab_size * lm.hidden_size * seq_len


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, cp: int, kernels, residual: int = 2,
                           fused_norm: bool = True, backward: bool = False, moe: bool = False) -> float:
    """One decoder layer's saved activations (mmfm.plan.memory.decoder_layer_bytes: SwiGLU keeps 3 FFN-wide tensors
    with the fused kernel, 4 with kernels.swiglu=torch; `residual` the residual stream's element size, memory.
    residual_bytes; fused_norm whether the fused RMSNorm runs, memory.fused_norm); backward=True adds what the
    layer's backward holds besides at its peak (memory.swiglu_backward_bytes); moe: a mixture-of-experts layer's."""
    from mmfm.plan.memory import decoder_layer_bytes, swiglu_backward_bytes

    saved = decoder_layer_bytes(cfg.language, tokens, tp, cp, kernels.swiglu != "torch", fused_norm, residual, moe)
    return saved + (swiglu_backward_bytes(cfg.language, tokens, tp, cp, moe) if backward else 0.0)
