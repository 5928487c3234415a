"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU. Plain PyTorch.

Options of the same code path (model.language): head_dim apart from the width, biases on q/k/v (Qwen2),
RMSNorm over each head's q and k (Qwen3), Llama 3.1's rescaled rotary frequencies."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import LanguageConfig
from mmfm.models.attention import CoreAttention
from mmfm.models.context import BlockContext
from mmfm.models.llama.mla import LatentAttention
from mmfm.models.moe import MoE, is_moe_layer
from mmfm.models.ops import LinearCrossEntropy, RMSNorm, Rotary, SiluMul, rotary_frequencies, rotary_tables


def head_dim(cfg: LanguageConfig) -> int:
    """Each attention head's width: model.language.head_dim, or hidden_size / num_heads when 0."""
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def llama3_frequencies(inv_freq: torch.Tensor, cfg: LanguageConfig) -> torch.Tensor:
    """Llama 3.1's rescaling (as transformers' _compute_llama3_parameters): wavelengths above
    original_max_positions / low_freq_factor slow down by `factor`, those below original_max_positions /
    high_freq_factor stay, those between blend smoothly."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotary_dim(cfg: LanguageConfig) -> int:
    """The width rotary embeddings turn: the head's, or under latent attention its rotated part's."""
    return cfg.mla.qk_rope_head_dim if cfg.mla.kv_lora_rank else head_dim(cfg)


def cache_dims(cfg: LanguageConfig) -> tuple[int, int, int]:
    """Heads, key width and value width a KV cache holds per position."""
    mla = cfg.mla
    if mla.kv_lora_rank:
        return cfg.num_heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    return cfg.num_kv_heads, head_dim(cfg), head_dim(cfg)


def rope_frequencies(cfg: LanguageConfig, device=None) -> torch.Tensor:
    inv_freq = rotary_frequencies(rotary_dim(cfg), cfg.rope_theta, device)
    return llama3_frequencies(inv_freq, cfg) if cfg.rope_scaling == "llama3" else inv_freq


class KVCache:
    """Preallocated keys and values for incremental decoding, one pair per layer."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, value_dim: int = 0):
        shape = (batch, num_kv_heads, max_len, head_dim)
        value_shape = (*shape[:3], value_dim or head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(value_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; decoding needs {end}")
        if self.keys[layer].shape[1] != k.shape[1]:  # tensor parallelism: this rank's heads only
            self.keys[layer] = k.new_zeros((*k.shape[:2], self.max_len, k.shape[3]))
            self.values[layer] = v.new_zeros((*v.shape[:2], self.max_len, v.shape[3]))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = head_dim(cfg)
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # per-head norms of q and k (one weight of head_dim shared by all heads); absent without qk_norm
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary()
        self.core = CoreAttention(causal=True)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = ctx.cos, ctx.sin
        if cos.dim() == 2:
            cos, sin = cos[:t], sin[:t]
        q, k = self.rotary(q, k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_id, k, v)
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.core(q, k, v, ctx.attn_mask, ctx.document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.act = SiluMul()

    def forward(self, x):
        return self.w2(self.act(self.w1(x), self.w3(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = LatentAttention(cfg, layer_id) if cfg.mla.kv_lora_rank else Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = (MoE(cfg.hidden_size, cfg.moe, cfg.intermediate_size) if is_moe_layer(cfg, layer_id)
                             else FeedForward(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class TokenEmbeddingOutput:
    """A decoder's token embedding (tok_embeddings) and output projection (output, None when tied to the
    embedding)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight


class LanguageModel(TokenEmbeddingOutput, nn.Module):
    """Decoder over input embeddings; `embed` maps token ids to embeddings first."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, i) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cross_entropy = LinearCrossEntropy()
        half = rotary_dim(cfg) // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialize the full tensor of parameter `name` (relative to this module)."""
        if name.endswith("norm.weight"):  # also the per-head q_norm / k_norm
            nn.init.ones_(tensor)
        elif name.endswith(".bias"):  # q/k/v biases
            nn.init.zeros_(tensor)
        elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):  # residual-branch outputs scaled down with depth
            nn.init.normal_(tensor, std=std / (2 * self.cfg.num_layers) ** 0.5, generator=generator)
        else:  # embeddings, output, q/k/v, w1/w3 (of the experts too) and the routers' gates
            nn.init.normal_(tensor, std=std, generator=generator)

    def init_buffers(self) -> None:
        c, device = self.cfg, self.rope_cos.device
        cos, sin = rotary_tables(rotary_dim(c), c.max_seq_len, c.rope_theta, device, rope_frequencies(c, device))
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            for module in self.modules():
                if isinstance(module, MoE):
                    module.router.expert_bias.zero_()
                    module.reset_counts()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        heads, key_dim, value_dim = cache_dims(self.cfg)
        return KVCache(self.cfg.num_layers, batch, heads, max_len, key_dim, dtype, device, value_dim)

    def forward(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None, attn_mask=None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, final_hidden: bool = False) -> torch.Tensor:
        """h [B, T, D] embeddings, positions [B, T] (default 0..T-1 on every row) -> logits [B, T, V], or
        with targets [B, T] the summed cross-entropy over positions whose target is not -100.

        attn_mask None means causal attention over the whole sequence; otherwise a boolean
        [B, 1, T, S] mask (True = may attend), as built by generation for padded prompts. document_ids
        [B, T] marks packed documents (contiguous runs), which never attend to each other; their
        positions should restart at each document.
        A pipeline stage may hold only some layers, and no final norm: it then returns hidden states.
        """
        if positions is None:
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        ctx = BlockContext(cos, sin, attn_mask, cache, document_ids)
        for block in self.layers.values():
            h = block(h, ctx)
        if self.norm is None:
            return h
        if final_hidden:  # the normed hidden states [B, T, D], for a head of the caller's
            return self.norm(h)
        if targets is not None:
            return self.cross_entropy(self.norm(h), self.output_weight(), targets)
        return F.linear(self.norm(h), self.output_weight())
