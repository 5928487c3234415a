"""Multi-head latent attention (DeepSeek-V2/V3), plain PyTorch: keys and values are projected up from one small
latent per position, so that a cache would hold kv_lora_rank + qk_rope_head_dim numbers per position instead of
2 x heads x head_dim.

    latent, k_rope = split(wkv_a x)                       [kv_lora_rank], [qk_rope_head_dim] shared by the heads
    k_nope, v      = split(wkv_b kv_norm(latent))         per head: [qk_nope_head_dim], [v_head_dim]
    q              = wq_b q_norm(wq_a x)  (or wq x)       per head: [qk_nope_head_dim + qk_rope_head_dim]
    q = [q_nope, rope(q_rope)], k = [k_nope, rope(k_rope)]; out = wo(softmax(q k^T / sqrt(q width)) v)

Rotary embeddings rotate halves (as the rest of the family); DeepSeek's checkpoints interleave them."""

from __future__ import annotations

import torch
from torch import nn

from mmfm.config.schema import LanguageConfig
from mmfm.models.attention import CoreAttention
from mmfm.models.context import BlockContext
from mmfm.models.ops import RMSNorm, Rotary


class SharedKey(nn.Module):
    """The rotated key part every head shares, [B, 1, T, rope], as a module of its own: under tensor parallelism
    each rank's heads see it, and the plan sums its gradient over the ranks here."""

    def forward(self, k_rope: torch.Tensor) -> torch.Tensor:
        return k_rope


class LatentAttention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_id: int):
        super().__init__()
        mla, d, heads = cfg.mla, cfg.hidden_size, cfg.num_heads
        self.layer_id = layer_id
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.q_latent = mla.q_lora_rank > 0
        if self.q_latent:
            self.wq_a = nn.Linear(d, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(mla.q_lora_rank, heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(d, heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d, mla.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(heads * self.v_dim, d, bias=False)
        self.shared_key = SharedKey()
        self.rotary = Rotary()
        self.core = CoreAttention(causal=True)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_latent else self.wq(x)
        return q.view(*x.shape[:2], -1, self.nope_dim + self.rope_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.queries(x)  # [B, heads, T, nope + rope]; -1 heads: under tp a rank holds a slice
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, t, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = ctx.cos, ctx.sin
        if cos.dim() == 2:
            cos, sin = cos[:t], sin[:t]
        q_rope, k_rope = self.rotary(q_rope, self.shared_key(k_rope[:, None]), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_id, k, v)
        out = self.core(q, k, v, ctx.attn_mask, ctx.document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))
