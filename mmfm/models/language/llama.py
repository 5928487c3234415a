"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU. Plain PyTorch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import LanguageConfig
from mmfm.models.attention import CoreAttention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_len, head_dim // 2] for rotate-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by per-position angles cos/sin: [B, T, D/2], or [T, D/2] for every row."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Rotary(nn.Module):
    """Rotary embeddings of q and k as a module, so that a kernel can replace it from outside."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class LinearCrossEntropy(nn.Module):
    """Summed next-token cross-entropy of the output projection (fp32, ignore_index positions skipped),
    as a module so that a fused kernel can replace it from outside."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.ignore_index,
                               reduction="sum")


class KVCache:
    """Preallocated keys and values for incremental decoding, one pair per layer."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; decoding needs {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.rotary = Rotary()
        self.core = CoreAttention(causal=True)

    def forward(self, x, cos, sin, attn_mask=None, cache: Optional[KVCache] = None, layer: int = 0,
                document_ids=None):
        """cos/sin: [B, T, D/2] per position, or whole [max_len, D/2] tables for positions 0..T-1."""
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if cos.dim() == 2:
            cos, sin = cos[:t], sin[:t]
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.core(q, k, v, attn_mask, document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, document_ids=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer, document_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class LanguageModel(nn.Module):
    """Decoder over input embeddings; `embed` maps token ids to embeddings first."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cross_entropy = LinearCrossEntropy()
        head_dim = cfg.hidden_size // cfg.num_heads
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, head_dim // 2), persistent=False)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialize the full tensor of parameter `name` (relative to this module)."""
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith(("wo.weight", "w2.weight")):  # residual-branch outputs scaled down with depth
            nn.init.normal_(tensor, std=std / (2 * self.cfg.num_layers) ** 0.5, generator=generator)
        else:  # embeddings, output, q/k/v and w1/w3
            nn.init.normal_(tensor, std=std, generator=generator)

    def init_buffers(self) -> None:
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        cos, sin = rotary_tables(head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None, attn_mask=None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        for name, block in self.layers.items():
            h = block(h, cos, sin, attn_mask, cache, int(name), document_ids)
        if self.norm is None:
            return h
        if targets is not None:
            return self.cross_entropy(self.norm(h), self.output_weight(), targets)
        return F.linear(self.norm(h), self.output_weight())
