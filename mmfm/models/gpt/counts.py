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


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, cp: int, kernels=None) -> float:
    """One layer's saved activations for a micro-batch (t = tokens / cp positions on the rank, h hidden, a heads,
    f the MLP width), as mmfm.plan.memory.decoder_layer_bytes for the llama family:

        2 B x t x [ 2 h / tp      inputs of the two LayerNorms (sequence parallel splits them)
                    + 2 h         normed inputs of q/k/v and fc1, gathered whole
                    + (h + 2 h cp) / tp   q (this chunk), k and v (gathered over cp)
                    + h / tp      attention output (input of wo)
                    + 2 f / tp ]  fc1's output (GELU's input) and GELU's output (fc2's input)
        + 4 B x t x a / tp        attention's log-sum-exp
    """
    lm = cfg.language
    t, h = tokens / cp, lm.hidden_size
    per_position = 2 * h / tp + 2 * h + (h + 2 * h * cp) / tp + h / tp + 2 * ffn_width(lm) / tp
    return ACT * t * per_position + 4 * t * lm.num_heads / tp
