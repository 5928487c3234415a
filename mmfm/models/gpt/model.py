"""A GPT decoder as in the published Megatron-LM runs: pre-LayerNorm blocks (with bias), biases on every linear
layer, learned absolute position embeddings, a GELU MLP (4 x hidden by default), the token embedding shared with
the output layer. Plain PyTorch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import LanguageConfig
from mmfm.models.attention import CoreAttention
from mmfm.models.context import BlockContext
from mmfm.models.llama.model import KVCache, TokenEmbeddingOutput
from mmfm.models.ops import LinearCrossEntropy


def ffn_width(cfg: LanguageConfig) -> int:
    """The MLP's width: model.language.intermediate_size, or 4 x hidden_size when it is 0 (GPT's)."""
    return cfg.intermediate_size or 4 * cfg.hidden_size


def head_size(cfg: LanguageConfig) -> int:
    return cfg.hidden_size // cfg.num_heads


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = head_size(cfg)
        d = cfg.hidden_size
        self.wq, self.wk, self.wv = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.wo = nn.Linear(d, d)
        self.core = CoreAttention(causal=True)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_id, k, v)
        out = self.core(q, k, v, ctx.attn_mask, ctx.document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """fc2(gelu(fc1 x)), both with bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_id: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, ffn_width(cfg))

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class GPTLanguageModel(TokenEmbeddingOutput, nn.Module):
    """Decoder over input embeddings (`embed` maps token ids first); the position embeddings are added in forward,
    on the stage that holds them (the first)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, i) for i in range(cfg.num_layers)})
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cross_entropy = LinearCrossEntropy()

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialize the full tensor of parameter `name` (relative to this module)."""
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith(".bias"):
            nn.init.zeros_(tensor)
        elif name.endswith(("wo.weight", "fc2.weight")):  # residual-branch outputs scaled down with depth
            nn.init.normal_(tensor, std=std / (2 * self.cfg.num_layers) ** 0.5, generator=generator)
        else:  # embeddings, output, q/k/v and fc1
            nn.init.normal_(tensor, std=std, generator=generator)

    def init_buffers(self) -> None:
        """No buffers (learned positions)."""

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch, c.num_heads, max_len, head_size(c), dtype, device)

    def forward(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None, attn_mask=None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, final_hidden: bool = False) -> torch.Tensor:
        """As mmfm.models.llama.LanguageModel.forward: h [B, T, D] -> logits [B, T, V], or with targets the summed
        cross-entropy; positions [B, T] (default 0..T-1) index the position embeddings."""
        if self.pos_embeddings is not None:
            if positions is None:
                positions = torch.arange(h.shape[1], device=h.device)
            h = h + self.pos_embeddings(positions)
        ctx = BlockContext(attn_mask=attn_mask, cache=cache, document_ids=document_ids)
        for block in self.layers.values():
            h = block(h, ctx)
        if self.norm is None:
            return h
        if final_hidden:  # the normed hidden states [B, T, D], for a head of the caller's
            return self.norm(h)
        if targets is not None:
            return self.cross_entropy(self.norm(h), self.output_weight(), targets)
        return F.linear(self.norm(h), self.output_weight())
