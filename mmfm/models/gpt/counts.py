"""Analytic parameter and FLOP counts of the gpt family, and the activations a layer keeps (mmfm.plan)."""

from __future__ import annotations

from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.models.gpt.model import ffn_width
from mmfm.models.llama.counts import head_flops  # the same output projection

ACT = 2  # bytes of a bf16 activation


def layer_matmul_params(lm: LanguageConfig) -> int:
    """q, k, v, out (h x h each) and the MLP's fc1, fc2 (h x f each)."""
    d = lm.hidden_size
    return 4 * d * d + 2 * d * ffn_width(lm)


def layer_vector_params(lm: LanguageConfig) -> int:
    """Two LayerNorms (weight and bias), the biases of q, k, v, out, fc1 and fc2."""
    d = lm.hidden_size
    return 4 * d + 4 * d + ffn_width(lm) + d


def num_params(cfg: ModelConfig) -> int:
    """Token embedding (twice when untied), position embeddings, the layers, the final LayerNorm."""
    lm = cfg.language
    d = lm.hidden_size
    embed = lm.vocab_size * d * (1 if lm.tie_embeddings else 2) + lm.max_seq_len * d
    return embed + lm.num_layers * (layer_matmul_params(lm) + layer_vector_params(lm)) + 2 * d


def layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of one layer for one sample: 6 x matmul params per position + attention scores and values
    (2 x 2 h s per position forward, x 3 with backward)."""
    lm = cfg.language
    return 6.0 * layer_matmul_params(lm) * seq_len + 12.0 * lm.hidden_size * seq_len ** 2


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per sequence position."""
    lm = cfg.language
    return (lm.num_layers * layer_flops(cfg, seq_len) + head_flops(cfg, seq_len)) / seq_len


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, cp: int, kernels=None, residual: int = 2,
                           fused_norm: bool = True, backward: bool = False) -> float:
    """One layer's saved activations for a micro-batch (t = tokens / cp positions on the rank, h hidden, a heads,
    f the MLP width), in the measured convention of mmfm.plan.memory (decoder_layer_bytes, encoder_layer_bytes):

        t x [ 2 x layer_norm_bytes / tp     the two LayerNorms (fp32 input under autocast, whatever the residual
                                            stream's dtype; sequence parallel splits them)
              + 2 B x 4 h                   bf16 casts of their fp32 outputs, one per wq, wk, wv and fc1, gathered
              + 2 B x (3 + 2 cp) h / tp     q (this chunk), k and v (gathered over cp), the attention output and
                                            its copy (input of wo)
              + 4 B x a / tp                attention's log-sum-exp
              + 2 B x 2 f / tp ]            fc1's output (GELU's input) and GELU's output (fc2's input)

    `residual` (memory.residual_bytes) and fused_norm (an RMSNorm choice) leave a LayerNorm layer unchanged: the
    planner counts the residual stream itself (checkpointed block inputs, pipeline hops). backward=True adds the
    MLP backward's two FFN-wide gradients alive together, 2 x 2 B x t x f / tp."""
    from mmfm.plan.memory import FP32, layer_norm_bytes

    lm = cfg.language
    t, h, f = tokens / cp, lm.hidden_size, ffn_width(lm)
    per_position = (2 * layer_norm_bytes(h) / tp + ACT * 4 * h + ACT * (3 + 2 * cp) * h / tp
                    + FP32 * lm.num_heads / tp + ACT * 2 * f / tp)
    return t * per_position + (2 * ACT * t * f / tp if backward else 0.0)
