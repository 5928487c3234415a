"""Per-rank memory of a layout: model state, FSDP / autocast buffers, activations (docs/planning.md).

Model state (mmfm keeps parameters in fp32; train.precision=bf16 autocasts the compute and FSDP gathers in bf16,
so the fp32 parameters are the master weights and no extra copy exists), per element of the rank's padded share:
    parameters 4 B + gradients 4 B (fp32, reduced in fp32) + AdamW's two moments 8 B = 16 B.
Buffers: under FSDP (dp_shard x cp > 1) the gathered bf16 parameters of the block running and of the one
prefetched, the root unit (kept gathered through backward) and one block's unsharded fp32 gradient before its
reduce-scatter: 2 B x (2 x largest block + root) + 4 B x largest block (tp-local elements, padded as FSDP2 gathers
them). Without FSDP, autocast's bf16 weight copies, kept for backward: 2 B x the rank's tp-local parameters.

Activations: what a micro-batch's forward and backward hold at their peak (what autograd keeps for backward, and
the loss's and a recomputed block's backward buffers), checked against the peak measured on CPU (mmfm.plan.bench),
after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1-2: s b h (34 +
5 a s / h) per layer without parallelism) adapted to what mmfm runs: flash / memory-efficient attention (no s x s
scores or softmax kept, only q, k, v, the output and the fp32 log-sum-exp per head and position), no dropout, RMSNorm
and SwiGLU in the decoder, and PyTorch's tensor + sequence parallel plan, which keeps the all-gathered
(whole-sequence) input of the attention and MLP projections on every tp rank (Megatron re-gathers it in backward
instead). The matmuls' outputs are bf16 (2 B); the residual stream is fp32 without FSDP (residual_bytes).
"""

from __future__ import annotations

from torch import nn

from mmfm.config.schema import KernelsConfig, LanguageConfig, VisionConfig

ACT = 2  # bytes of a bf16 activation
FP32 = 4
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


def residual_bytes(fsdp: bool) -> int:
    """Element size of the residual stream (embeddings, block inputs and outputs, the norms' inputs and outputs):
    autocast casts neither the embedding nor the residual adds, so with mmfm's fp32 parameters the stream is fp32
    (4 B); FSDP (any dp_replicate x dp_shard x cp > 1) gathers the parameters in bf16, which makes it bf16 (2 B)."""
    return 2 if fsdp else 4


def rms_norm_bytes(hidden: int, residual: int, fused: bool) -> float:
    """What one RMSNorm keeps per position: the fused kernel its input (residual dtype) and the fp32 1/rms; the
    PyTorch reference (mmfm.models.ops.RMSNorm; always under tp) its input in fp32, the fp32 normalized input and
    1/rms."""
    return (residual * hidden if fused else 2 * FP32 * hidden) + FP32


def projection_copies(residual: int, projections: int) -> int:
    """bf16 copies of a norm's output that the projections reading it keep: one shared copy when the output is
    already bf16, else autocast casts it once per projection (wq, wk, wv; w1, w3)."""
    return 1 if residual == ACT else projections


def moe_ffn_bytes(lm: LanguageConfig, fused_swiglu: bool = True, residual: int = 2) -> float:
    """What a mixture-of-experts feed-forward keeps per position (mmfm.models.moe), E experts, k per token, each He
    wide: the router's fp32 logits and scores (2 x 4 B x E), and for each of the k choices the bf16 copies of its
    gathered input that w1 and w3 read (2 B x h x c, c as projection_copies), the expert's SwiGLU (2 B x k_s x He,
    k_s = 3 fused, 4 without), its bf16 output and, with an fp32 residual stream, that output cast back, both kept
    by the combine (2 B x h + 4 B x h), and the combine weight (4 B). Shared experts: a dense SwiGLU of their
    width. It runs whole on every tp rank."""
    moe, h = lm.moe, lm.hidden_size
    hidden = moe.expert_intermediate_size or lm.intermediate_size
    swiglu = 3 if fused_swiglu else 4
    inputs = ACT * h * projection_copies(residual, 2)
    choice = inputs + ACT * swiglu * hidden + ACT * h + (FP32 * h if residual == FP32 else 0) + FP32
    shared = (inputs + ACT * swiglu * moe.num_shared_experts * hidden) if moe.num_shared_experts else 0
    return 2 * FP32 * moe.num_experts + moe.top_k * choice + shared


def decoder_layer_bytes(lm: LanguageConfig, tokens: int, tp: int = 1, cp: int = 1, fused_swiglu: bool = True,
                        fused_norm: bool = True, residual: int = 2, moe: bool = False) -> float:
    """One decoder layer's saved activations for a micro-batch of `tokens` positions (batch x sequence), with
    t = tokens / cp on this rank, h = hidden, d = head_dim, n_q = query heads, f = FFN width:

        t x [ 2 x rms_norm_bytes / tp      the two RMSNorms (sequence parallel splits them)
              + 2 B x c x h                the bf16 inputs of the projections, gathered whole: c = 2 when the
                                           residual stream is bf16, else 5 (one cast per wq, wk, wv, w1, w3)
              + 2 B x (n_q + 2 n_q cp + 2 n_q) d / tp   q; k and v repeated to n_q heads (GQA, before the
                                           attention core) and gathered over cp; the attention output, which
                                           the kernel keeps, and its transposed copy, the input of wo
              + 4 B x n_q / tp             attention's log-sum-exp
              + 2 B x k f / tp ]           SwiGLU: w1 and w3 outputs and the product (k = 3 fused, 4 with silu(w1 x))
    moe: a mixture-of-experts layer, whose feed-forward keeps moe_ffn_bytes instead of the SwiGLU term and one
    copy of its input (the router's).
    """
    t, h, d, n_q = tokens / cp, lm.hidden_size, head_dim(lm), lm.num_heads
    k = 3 if fused_swiglu else 4
    norms = 2 * rms_norm_bytes(h, residual, fused_norm) / tp
    ffn_inputs = 1 if moe else projection_copies(residual, 2)
    latent = lm.mla.kv_lora_rank > 0
    inputs = ACT * h * (projection_copies(residual, 2 if latent else 3) + ffn_inputs)
    attention = (latent_attention_bytes(lm, tp, cp) if latent
                 else ACT * n_q * d * (3 + 2 * cp) / tp + FP32 * n_q / tp)
    ffn = moe_ffn_bytes(lm, fused_swiglu, residual) if moe else ACT * k * lm.intermediate_size / tp
    return t * (norms + inputs + attention + ffn)


def latent_attention_bytes(lm: LanguageConfig, tp: int = 1, cp: int = 1) -> float:
    """Multi-head latent attention's saved activations per position (mmfm.models.llama.mla; analytic, not yet
    measured): on every tp rank the latents (q_lora and kv_lora wide) before and after their norms, in bf16, and the
    norms' fp32 1/rms, and the shared rotated key; per head (split by tp) q and k (nope + rope wide; k gathered over
    cp), the keys' and values' up-projection output that the value view keeps alive (nope + v wide, gathered over
    cp), the attention output and its transposed copy (v wide each), and the fp32 log-sum-exp."""
    m, heads = lm.mla, lm.num_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    latents = ACT * (2 * m.q_lora_rank + 2 * m.kv_lora_rank + m.qk_rope_head_dim) + 2 * FP32
    per_head = ACT * (qk * (1 + cp) + (m.qk_nope_head_dim + m.v_head_dim) * cp + 2 * m.v_head_dim) + FP32
    return latents + heads * per_head / tp


def swiglu_backward_bytes(lm: LanguageConfig, tokens: int, tp: int = 1, cp: int = 1, moe: bool = False) -> float:
    """What a decoder layer's backward adds to its saved activations at its peak: in SwiGLU's backward, the
    gradient of its output and of one input alive together, 2 x 2 B x t x f / tp. A mixture of experts (on every
    tp rank) holds, for each of the k choices of a position, the gradients of the rows it combined (fp32 and its
    bf16 cast) and of the gathered input copies (bf16, and their fp32 casts): 3 x (4 B + 2 B) x h, and its
    SwiGLU's two: 2 x 2 B x He (measured 6% above this on CPU)."""
    if moe:
        hidden = lm.moe.expert_intermediate_size or lm.intermediate_size
        return tokens / cp * lm.moe.top_k * (3 * (FP32 + ACT) * lm.hidden_size + 2 * ACT * hidden)
    return 2 * ACT * tokens / cp * lm.intermediate_size / tp


def checkpointed_layer_bytes(hidden: int, tokens: int, tp: int = 1, cp: int = 1, residual: int = 2) -> float:
    """A block under full activation checkpointing keeps only its input: residual x t x hidden / tp (the residual
    stream, split along the sequence by sequence parallelism)."""
    return residual * tokens / cp * hidden / tp


def layer_norm_bytes(hidden: int) -> float:
    """A LayerNorm keeps its input in fp32 (CUDA autocast runs layer_norm in fp32), its mean and 1/std."""
    return FP32 * hidden + 2 * FP32


def encoder_layer_bytes(v: VisionConfig, positions: int, tp: int = 1, sequence_split: bool = True) -> float:
    """One vision block (pre-norm ViT: LayerNorm, attention, GELU MLP of width m) over `positions` patches (images x
    patches per image), dv = hidden:

        positions x [ 2 x layer_norm_bytes / s     the two LayerNorms (s = tp when the plan splits the patches)
                      + 2 B x 4 dv                 bf16 casts of their fp32 outputs, one per wq, wk, wv and fc1
                      + 2 B x 5 dv / tp            q, k, v, the attention output and its copy (input of proj)
                      + 4 B x heads / tp           the log-sum-exp
                      + 2 B x 2 m / tp ]           the MLP's GELU input and output
    """
    dv, m = v.hidden_size, v.intermediate_size or int(v.hidden_size * v.mlp_ratio)
    s = tp if sequence_split else 1
    return positions * (2 * layer_norm_bytes(dv) / s + ACT * 4 * dv + ACT * 5 * dv / tp + FP32 * v.num_heads / tp
                        + ACT * 2 * m / tp)


def projector_bytes(vision_hidden: int, hidden: int, positions: int, tp: int = 1) -> float:
    """The tower's final LayerNorm and the two-layer MLP projector: the bf16 copy of its input, fc1's output and
    GELU's output (split over tp)."""
    return positions * (layer_norm_bytes(vision_hidden) + ACT * (vision_hidden + 2 * hidden / tp))


def stem_bytes(model: nn.Module, image_size: int, images: int) -> float:
    """The vision stem's convolutions (the only Conv2d of a model) over `images` images: each keeps its input in
    bf16, and each nn.GELU module between them its input (the convolution's bf16 output). Sizes follow the
    convolutions in module order from the image size."""
    channels, size, total = None, None, 0.0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if size is None:
                channels, size = module.in_channels, image_size
            total += ACT * channels * size * size
            k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
            channels, size = module.out_channels, (size + 2 * p - k) // s + 1
        elif isinstance(module, nn.GELU) and size is not None:
            total += ACT * channels * size * size
    return images * total


MATERIALIZED_LOSS = 12  # bytes per logit at the loss's backward peak (see loss_bytes)


def loss_bytes(lm: LanguageConfig, tokens: int, tp: int = 1, fused: bool = False, residual: int = 2,
               fused_norm: bool = True) -> float:
    """The final norm, the output projection and the loss of one micro-batch, at their peak.

    Both keep the final RMSNorm (rms_norm_bytes, split by sequence parallelism).
    Materialized logits (no fused loss; under tp they stay split over the vocabulary, loss_parallel): the bf16
    input of the output projection (2 B x tokens x h), and in backward the fp32 log-probabilities kept for it,
    their gradient and log-softmax's input gradient, alive together: 12 B x tokens x V / tp.
    Fused chunked loss (kernels.linear_cross_entropy, tp = pp = 1; mmfm.kernels.fused_linear_cross_entropy): the
    input gradient computed in forward (bf16, 2 B x tokens x h), one chunk's bf16 logits (chunk tokens chosen so
    that they are about as large as the hidden states, at most 256 MiB in fp32) and the fp32 weight-gradient
    accumulator (4 B x V x h)."""
    h, vocab = lm.hidden_size, lm.vocab_size
    norm = tokens * rms_norm_bytes(h, residual, fused_norm) / tp
    if not fused:
        return norm + ACT * tokens * h + MATERIALIZED_LOSS * tokens * vocab / tp
    from mmfm.kernels.fused_linear_cross_entropy import default_chunk_size

    return norm + ACT * tokens * h + ACT * default_chunk_size(tokens, h, vocab) * vocab + FP32 * vocab * h


def fused_norm(kernels: KernelsConfig, tp: int) -> bool:
    """Whether the fused RMSNorm runs: resolve_kernels keeps the PyTorch reference under tp (sequence-parallel norms
    run on DTensors) and for kernels.rms_norm=torch (auto: the Triton kernel on GPUs)."""
    return tp == 1 and kernels.rms_norm != "torch"


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
