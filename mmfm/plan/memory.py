"""Per-rank memory of a layout: model state, FSDP / autocast buffers, activations (docs/planning.md).

Model state (mmfm keeps parameters in fp32; train.precision=bf16 autocasts the compute and FSDP gathers in bf16,
so the fp32 parameters are the master weights and no extra copy exists), per element of the rank's padded share:
    parameters 4 B + gradients 4 B (fp32, reduced in fp32) + AdamW's two moments 8 B = 16 B.
Buffers: under FSDP (dp_shard x cp > 1) the gathered bf16 parameters of the block running and of the one
prefetched, the root unit (kept gathered through backward) and one block's unsharded fp32 gradient before its
reduce-scatter: 2 B x (2 x largest block + root) + 4 B x largest block (tp-local elements). Without FSDP,
autocast's bf16 weight copies, kept for backward: 2 B x the rank's tp-local parameters.

Activations: what autograd keeps for backward, in bf16 (2 B) unless noted, after Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", eq. 1-2: s b h (34 + 5 a s / h) per layer
without parallelism) adapted to what mmfm runs: flash / memory-efficient attention (no s x s scores or softmax kept,
only q, k, v, the output and the fp32 log-sum-exp per head and position), no dropout, RMSNorm and SwiGLU in the
decoder, and PyTorch's tensor + sequence parallel plan, which keeps the all-gathered (whole-sequence) input of the
attention and MLP projections on every tp rank (Megatron re-gathers it in backward instead).
"""

from __future__ import annotations

from mmfm.config.schema import KernelsConfig, LanguageConfig, VisionConfig

ACT = 2  # bytes of a bf16 activation
STATE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}  # per parameter element: fp32 weights, grads, AdamW m and v


def model_state_bytes(elements: int) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state for `elements` parameter elements held by the rank."""
    return {term: size * elements for term, size in STATE_BYTES.items()}


def buffer_bytes(tp_local: int, largest_block: int, root: int, fsdp_shards: int) -> int:
    """FSDP's gathered bf16 units and one unsharded fp32 block gradient; without FSDP autocast's bf16 copies."""
    if fsdp_shards > 1:
        return 2 * (2 * largest_block + root) + 4 * largest_block
    return 2 * tp_local


def head_dim(lm: LanguageConfig) -> int:
    return lm.head_dim or lm.hidden_size // lm.num_heads


def decoder_layer_bytes(lm: LanguageConfig, tokens: int, tp: int = 1, cp: int = 1, fused_swiglu: bool = True) -> float:
    """One decoder layer's saved activations for a micro-batch of `tokens` positions (batch x sequence), with
    t = tokens / cp on this rank, h = hidden, d = head_dim, n_q / n_kv = query / key-value heads (GQA), f = FFN:

        2 B x t x [ 2 h / tp            inputs of the two RMSNorms (sequence parallel splits them)
                    + 2 h               normed inputs of the q/k/v and w1/w3 projections, gathered whole
                    + (n_q + n_kv cp + n_kv cp) d / tp    q (this chunk), k and v (gathered over cp) after rotary
                    + n_q d / tp        attention output (input of wo)
                    + k f / tp ]        SwiGLU: w1 and w3 outputs and the product (k = 3 fused, 4 with silu(w1 x))
        + 4 B x t x n_q / tp            attention's log-sum-exp
    """
    t, h, d = tokens / cp, lm.hidden_size, head_dim(lm)
    k = 3 if fused_swiglu else 4
    per_position = (2 * h / tp + 2 * h + (lm.num_heads + 2 * lm.num_kv_heads * cp) * d / tp
                    + lm.num_heads * d / tp + k * lm.intermediate_size / tp)
    return ACT * t * per_position + 4 * t * lm.num_heads / tp


def checkpointed_layer_bytes(hidden: int, tokens: int, tp: int = 1, cp: int = 1) -> float:
    """A block under full activation checkpointing keeps only its input: 2 B x t x hidden / tp (the residual stream,
    split along the sequence by sequence parallelism)."""
    return ACT * tokens / cp * hidden / tp


def encoder_layer_bytes(v: VisionConfig, positions: int, tp: int = 1, sequence_split: bool = True) -> float:
    """One vision block (pre-norm ViT: LayerNorm, attention, GELU MLP of width m) over `positions` patches (images x
    patches per image), dv = hidden:

        2 B x positions x [ 2 dv / s + 2 dv + 3 dv / tp + dv / tp + 2 m / tp ] + 4 B x positions x heads / tp

    (norm inputs, gathered projection inputs, q/k/v, attention output, the MLP's GELU input and output; s = tp when
    the plan splits the patches along the sequence, else 1)."""
    dv, m = v.hidden_size, v.intermediate_size or int(v.hidden_size * v.mlp_ratio)
    s = tp if sequence_split else 1
    return ACT * positions * (2 * dv / s + 2 * dv + 4 * dv / tp + 2 * m / tp) + 4 * positions * v.num_heads / tp


def projector_bytes(vision_hidden: int, hidden: int, positions: int, tp: int = 1) -> float:
    """The two-layer MLP projector: its input, fc1's output and GELU's output (split over tp)."""
    return ACT * positions * (vision_hidden + 2 * hidden / tp)


def loss_bytes(lm: LanguageConfig, tokens: int, tp: int = 1, fused: bool = False) -> float:
    """The output projection and loss of one micro-batch.

    Materialized logits (no fused loss; under tp they stay split over the vocabulary, loss_parallel): fp32
    log-probabilities kept for backward and their fp32 gradient, 8 B x tokens x V / tp.
    Fused chunked loss (kernels.linear_cross_entropy, tp = pp = 1; mmfm.kernels.fused_linear_cross_entropy): the
    input gradient computed in forward (fp32, 4 B x tokens x h), one chunk's fp32 logits (chunk tokens chosen so
    that they are about as large as the hidden states, at most 256 MiB) and the fp32 weight-gradient accumulator
    (4 B x V x h)."""
    h, vocab = lm.hidden_size, lm.vocab_size
    if not fused:
        return 8 * tokens * vocab / tp
    from mmfm.kernels.fused_linear_cross_entropy import default_chunk_size

    return 4 * tokens * h + 4 * default_chunk_size(tokens, h, vocab) * vocab + 4 * vocab * h


def fused_loss(kernels: KernelsConfig, tp: int, pp: int) -> bool:
    """Whether the chunked loss runs: mmfm.kernels.apply.resolve_kernels takes it for tp = pp = 1 unless
    kernels.linear_cross_entropy=torch (auto: the Triton kernel on GPUs)."""
    return tp == 1 and pp == 1 and kernels.linear_cross_entropy != "torch"


def in_flight(schedule: str, pp: int, virtual: int, microbatches: int, rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of one micro-batch through all of
    the rank's layers:
        pp = 1: 1 (gradient accumulation runs micro-batches one after another);
        gpipe: m (every forward before any backward);
        1f1b: min(m, pp - rank) (the first rank pp: Narayanan et al. 2021);
        interleaved_1f1b, zero_bubble: min(m v, 2 (pp - rank - 1) + (v - 1) pp + 1) model chunks of 1/v of the
        rank's layers (Megatron's warm-up count; the first rank pp + (pp - 1) / v micro-batches, as Korthikanti et
        al. 2022 state for the interleaved schedule). The zero-bubble schedule's deferred weight gradients are not
        counted."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "1f1b":
        return float(min(microbatches, pp - rank))
    chunks = min(microbatches * virtual, 2 * (pp - rank - 1) + (virtual - 1) * pp + 1)
    return chunks / virtual
