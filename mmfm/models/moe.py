"""Mixture of experts for the decoder's feed-forward sub-block. Plain PyTorch: no parallel code here.

Token-choice top-k routing (softmax or sigmoid scores, optionally limited to the best groups of experts as in
DeepSeek-V3), dropless dispatch by default (an optional capacity factor drops what overflows an expert),
SwiGLU experts held as 3-D weights [E, ...] and run as one grouped matrix product per projection, optional
shared experts that see every token. Balancing: the auxiliary load-balancing loss (Switch Transformer's
E * sum_e f_e P_e), the router z-loss (ST-MoE), and DeepSeek-V3's auxiliary-loss-free bias, which shifts
each expert's selection score (not its weight) toward balance between steps (`update_expert_bias`).

The auxiliary losses reach the objective through the layer's output: `AuxLossInGraph` returns the output
unchanged and, in backward, adds the gradient of coef * loss (DeepSeek-V2/V3's approach), so the training
loop needs no side channel. Each layer keeps its last step's statistics (`stats`) for the metrics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmfm.config.schema import LanguageConfig, MoEConfig
from mmfm.models.ops import SiluMul

SCORE_FUNCS = ("softmax", "sigmoid")


def is_moe_layer(cfg: LanguageConfig, layer_id: int) -> bool:
    """Layer layer_id's feed-forward is a mixture of experts: experts configured, past the first
    `moe.first_dense_layers` layers, and on every `moe.every`-th layer after them."""
    moe = cfg.moe
    return moe.num_experts > 0 and layer_id >= moe.first_dense_layers and (
        (layer_id - moe.first_dense_layers) % moe.every == 0)


class AuxLossInGraph(torch.autograd.Function):
    """Identity on x; backward also sends d(loss)/d(loss) = 1 into `loss`, so its gradient reaches the router."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype, ctx.loss_device = loss.shape, loss.dtype, loss.device
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=ctx.loss_device)


class Router(nn.Module):
    """Scores [N, E] of N tokens for E experts, and each token's top-k experts with their combine weights."""

    def __init__(self, dim: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        # DeepSeek-V3's balancing bias: added to the scores for the choice of experts only
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k], experts [N, k], scores [N, E], logits [N, E]), in fp32 (or x's wider type)."""
        moe = self.moe
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        scores = logits.softmax(-1) if moe.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if moe.bias_update_rate > 0 else scores
        if moe.num_groups > 1:
            choice = limit_to_groups(choice, moe.num_groups, moe.topk_groups)
        experts = choice.topk(moe.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if moe.normalize_weights and moe.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights * moe.route_scale, experts, scores, logits


def limit_to_groups(choice: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep the experts of each token's `topk_groups` best groups (a group's score: the sum of its two best
    experts, as DeepSeek-V3; its best one for groups of one expert), the others at -inf."""
    n, e = choice.shape
    grouped = choice.view(n, num_groups, e // num_groups)
    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)


def load_balancing_loss(scores: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e the share of the N * k choices that went to expert e, P_e its mean score (scores
    normalized per token, so that sigmoid scores count like softmax ones). 1 when balanced; E when every token
    sends all its choices to one expert it scores 1."""
    probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    share = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype) / experts.numel()
    return num_experts * (share * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return logits.logsumexp(-1).pow(2).mean()


def capacity(num_tokens: int, moe: MoEConfig) -> Optional[int]:
    """Token slots per expert: ceil(capacity_factor * N * k / E); None (no limit) when the factor is 0."""
    if moe.capacity_factor <= 0:
        return None
    return math.ceil(moe.capacity_factor * num_tokens * moe.top_k / moe.num_experts)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: w1, w3 [E, D, H] and w2 [E, H, D]; tokens arrive sorted by expert with their counts."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.act = SiluMul()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D], rows grouped by expert (counts[e] rows for expert e) -> [M, D]. Under expert parallelism the
        weights are DTensors sharded on the expert dim, and x and counts are this rank's experts' (hooks in
        mmfm.parallel.expert_parallel)."""
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        return self.product(x, counts, w1, w3, w2)

    def product(self, x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
        """The experts' SwiGLU over the local weights: one matmul per expert (kernels.experts swaps it)."""
        return grouped_swiglu(x, counts.tolist(), w1, w3, w2, self.act)


def grouped_swiglu(x: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   act: nn.Module) -> torch.Tensor:
    """The portable grouped product: one matmul per expert over its rows. An expert with no rows still runs (an
    empty product), so that the result stays in x's autograd graph when no expert got a row: under expert
    parallelism every rank's backward must then still reach the all-to-all its peers wait in."""
    return torch.cat([act(chunk @ w1[e], chunk @ w3[e]) @ w2[e] for e, chunk in enumerate(torch.split(x, counts))])


def grouped_mm_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                      act: nn.Module) -> torch.Tensor:
    """The same product as grouped_swiglu in three torch._grouped_mm calls (one per projection, every expert at once;
    rows of expert e end at offsets[e]). Autocast does not cover the op: x and the weights are cast here to the
    autocast type, else to x's. With no rows at all (which the op refuses) the loop's empty products keep the output
    in x's graph."""
    if not x.shape[0]:
        return grouped_swiglu(x, counts.tolist(), w1, w3, w2, act)
    offsets = counts.cumsum(0).to(torch.int32)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    hidden = act(torch._grouped_mm(x, w1, offs=offsets), torch._grouped_mm(x, w3, offs=offsets))
    return torch._grouped_mm(hidden, w2, offs=offsets)


class MoE(nn.Module):
    """The mixture-of-experts feed-forward: x [B, T, D] -> [B, T, D]."""

    def __init__(self, dim: int, moe: MoEConfig, default_hidden: int):
        super().__init__()
        from mmfm.models.llama.model import FeedForward

        self.moe = moe
        hidden = moe.expert_intermediate_size or default_hidden
        self.router = Router(dim, moe)
        self.experts = GroupedExperts(moe.num_experts, dim, hidden)
        self.shared = FeedForward(dim, moe.num_shared_experts * hidden) if moe.num_shared_experts else None
        # tokens each expert received since the last bias update (for the aux-free balancing)
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.stats: dict[str, torch.Tensor] = {}
        # the auxiliary losses' weight in this forward: the training loop sets 1 / micro-batches per step, so that
        # they count as their mean over the step's micro-batches (and, FSDP averaging, over its ranks)
        self.aux_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts, scores, logits = self.router(flat)
        routed, kept = self.dispatch_and_combine(flat, weights, experts)
        out = routed if self.shared is None else routed + self.shared(flat)
        balance, z = load_balancing_loss(scores, experts, self.moe.num_experts), z_loss(logits)
        self.record(experts, kept, balance, z)
        if self.training and torch.is_grad_enabled():
            aux = self.aux_loss(balance, z)
            if aux is not None:
                out = AuxLossInGraph.apply(out, aux * self.aux_scale)
        return out.view(shape)

    def dispatch_and_combine(self, x: torch.Tensor, weights: torch.Tensor,
                             experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort the N * k (token, expert) choices by expert, run the experts, scale by the combine weights and sum
        back per token. Returns the output [N, D] and the mask [N * k] of choices kept within capacity."""
        n, k = experts.shape
        num_experts = self.moe.num_experts
        choice_expert = experts.flatten()
        order = torch.argsort(choice_expert, stable=True)
        counts = torch.bincount(choice_expert, minlength=num_experts)
        kept = torch.ones(n * k, dtype=torch.bool, device=x.device)
        limit = capacity(n, self.moe)
        if limit is not None:  # a choice's rank among its expert's choices, in token order
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(n * k, device=x.device) - starts[choice_expert[order]]
            kept[order[rank >= limit]] = False
            order = order[kept[order]]
            counts = counts.clamp(max=limit)
        token = order // k
        out_sorted = self.experts(x.index_select(0, token), counts)  # backward: index_add_, not index_put_
        out_sorted = out_sorted * weights.flatten()[order].unsqueeze(-1).to(out_sorted.dtype)
        out = torch.zeros_like(x).index_add_(0, token, out_sorted.to(x.dtype))
        return out, kept

    def aux_loss(self, balance: torch.Tensor, z: torch.Tensor) -> Optional[torch.Tensor]:
        """The weighted sum of the losses whose coefficient is set; None when neither is."""
        terms = [coef * loss for coef, loss in ((self.moe.aux_loss_coef, balance), (self.moe.z_loss_coef, z))
                 if coef > 0]
        return sum(terms) if terms else None

    @torch.no_grad()
    def record(self, experts: torch.Tensor, kept: torch.Tensor, balance: torch.Tensor, z: torch.Tensor) -> None:
        """Count each expert's tokens (training) and keep this forward's figures as tensors: read once a step by
        mmfm.train.experts, so that a forward waits on no device-to-host copy."""
        dropped = (~kept).sum()
        if self.training:
            self.tokens_per_expert += torch.bincount(experts.flatten()[kept], minlength=self.moe.num_experts)
            self.dropped_tokens += dropped
        self.stats = {"dropped": dropped, "aux_loss": balance.detach(), "z_loss": z.detach()}

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """DeepSeek-V3's update after an optimizer step: bias_e += rate * sign(mean load - load_e), from the tokens
        counted since the last update (pass them summed over data-parallel ranks)."""
        rate = self.moe.bias_update_rate
        counts = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if rate > 0 and counts.sum() > 0:
            self.router.expert_bias += rate * torch.sign(counts.mean() - counts).to(self.router.expert_bias.dtype)

    @torch.no_grad()
    def reset_counts(self) -> None:
        self.tokens_per_expert.zero_()
        self.dropped_tokens.zero_()


def validate_moe(lm: LanguageConfig) -> None:
    """Raise ConfigError naming the field and the fix when model.language.moe cannot build."""
    from mmfm.config.checks import require

    moe, p = lm.moe, "model.language.moe"
    require(moe.num_experts >= 0, f"{p}.num_experts={moe.num_experts} must be >= 0 (0: a dense SwiGLU)")
    if moe.num_experts == 0:
        return
    require(1 <= moe.top_k <= moe.num_experts,
            f"{p}.top_k={moe.top_k} must lie in [1, num_experts={moe.num_experts}]")
    require(moe.score_func in SCORE_FUNCS, f"{p}.score_func={moe.score_func!r} is unknown; use one of {SCORE_FUNCS}")
    require(moe.expert_intermediate_size >= 0 and moe.num_shared_experts >= 0,
            f"{p}.expert_intermediate_size={moe.expert_intermediate_size} and num_shared_experts="
            f"{moe.num_shared_experts} must be >= 0")
    require(moe.num_groups >= 1 and moe.num_experts % moe.num_groups == 0,
            f"{p}.num_groups={moe.num_groups} must divide num_experts={moe.num_experts} (1: no group limit)")
    require(1 <= moe.topk_groups <= moe.num_groups,
            f"{p}.topk_groups={moe.topk_groups} must lie in [1, num_groups={moe.num_groups}]")
    require(moe.top_k <= moe.topk_groups * (moe.num_experts // moe.num_groups),
            f"{p}.top_k={moe.top_k} exceeds the {moe.topk_groups * (moe.num_experts // moe.num_groups)} experts of "
            f"topk_groups={moe.topk_groups} groups; raise topk_groups or lower top_k")
    require(moe.route_scale > 0, f"{p}.route_scale={moe.route_scale} must be > 0")
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
        require(getattr(moe, name) >= 0, f"{p}.{name}={getattr(moe, name)} must be >= 0 (0: off)")
    require(moe.every >= 1, f"{p}.every={moe.every} must be >= 1")
    require(0 <= moe.first_dense_layers < lm.num_layers,
            f"{p}.first_dense_layers={moe.first_dense_layers} leaves no mixture-of-experts layer among the "
            f"{lm.num_layers}; lower it, or set {p}.num_experts=0 for a dense model")
