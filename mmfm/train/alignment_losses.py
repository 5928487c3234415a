"""Objectives for instruction tuning and alignment: per-sequence log-probs, preference losses (DPO, cDPO, IPO,
SimPO, ORPO) and GRPO. Pure functions of tensors: no model, no trainer.

Preference losses take per-sequence log-probs ([B] each, from `sequence_logprobs`) of the chosen and rejected
answers of B pairs, under the policy and (DPO, IPO) the frozen reference, and return a `PreferenceOutput`.
Reference and old-policy log-probs are detached here: they are constants of every objective below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mmfm.data.loader import IGNORE_INDEX
from mmfm.registry import lookup


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(target_t) at each position [B, T], in fp32 (or fp64 for fp64 logits); 0 where ignored.

    Computed as -cross_entropy(reduction="none"), which tensor parallelism's loss_parallel also computes on
    vocabulary-split logits without gathering them (the result is then made a plain tensor).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none")
    if isinstance(nll, DTensor):
        nll = nll.full_tensor()
    return -nll.view(targets.shape)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum_t log p(target_t) over targets != ignore_index, and that token count (both [B]).

    logits [B, T, V] (any float dtype; the log-softmax runs in fp32), targets [B, T].
    """
    n_tokens = (targets != ignore_index).sum(-1)
    return token_logprobs(logits, targets, ignore_index).sum(-1), n_tokens


# ----------------------------------------------------------------------------------------------------------------
# Preference losses


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar, mean over pairs (carries the gradient)
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    margin: torch.Tensor  # scalar mean(chosen - rejected rewards), detached
    accuracy: torch.Tensor  # scalar fraction of pairs with chosen reward > rejected reward, detached


def _output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PreferenceOutput:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return PreferenceOutput(losses.mean(), c, r, (c - r).mean(), (c > r).float().mean())


def _per_token(logps: torch.Tensor, length) -> torch.Tensor:
    """Mean per-token log-prob: logps / length (length at least 1)."""
    if isinstance(length, torch.Tensor):
        return logps / length.clamp(min=1).to(logps.dtype)
    return logps / max(length, 1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceOutput:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO's label smoothing (Mitchell 2023).

        h    = beta * ((log pi(yc) - log ref(yc)) - (log pi(yr) - log ref(yr)))
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)       (eps = label_smoothing; 0 is DPO)

    eps is the assumed probability that a preference label is flipped (0 <= eps <= 0.5).
    Rewards are the implicit ones: beta * (log pi(y) - log ref(y)).
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen = beta * (policy_chosen - ref_chosen.detach())
    rejected = beta * (policy_rejected - ref_rejected.detach())
    h = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return _output(losses, chosen, rejected)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, chosen_len=None, rejected_len=None) -> PreferenceOutput:
    """IPO (Azar et al. 2023, eq. 17): squared regression of the log-ratio gap on 1 / (2 tau).

        u    = (log pi(yc) - log ref(yc)) - (log pi(yr) - log ref(yr))
        loss = (u - 1 / (2 * beta))**2                                   (the paper's tau is beta here)

    IPO is usually applied to length-averaged log-probs (TRL divides them by the answer length when
    loss_type="ipo"): pass chosen_len / rejected_len ([B] or int) and each log-ratio is divided by its length
    first. Without them, summed log-probs are used as in the paper. Rewards: beta * (log-ratio, averaged if so).
    """
    if (chosen_len is None) != (rejected_len is None):
        raise ValueError("ipo_loss: give both chosen_len and rejected_len, or neither")
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    if chosen_len is not None:
        chosen, rejected = _per_token(chosen, chosen_len), _per_token(rejected, rejected_len)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return _output(losses, beta * chosen, beta * rejected)


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_len, rejected_len,
               beta: float = 2.0, gamma: float = 0.5) -> PreferenceOutput:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target reward margin.

        loss = -log sigmoid(beta * log pi(yc) / |yc| - beta * log pi(yr) / |yr| - gamma)

    gamma is the margin itself, as in eq. 6 (the authors' code takes gamma / beta, "gamma_beta_ratio", instead;
    gamma = beta * gamma_beta_ratio). Rewards: beta * log pi(y) / |y|.
    """
    chosen = beta * _per_token(policy_chosen, chosen_len)
    rejected = beta * _per_token(policy_rejected, rejected_len)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return _output(losses, chosen, rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp) = l - log(1 - exp(l)).

    l is clamped just below 0 (by the dtype's eps) so that an answer given probability 1 keeps finite log-odds.
    """
    l = mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).eps)
    return l - _log1mexp(l)


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_len, rejected_len,
              nll_chosen: torch.Tensor, lam: float = 0.1) -> PreferenceOutput:
    """ORPO (Hong et al. 2024, eqs. 6-7): SFT loss plus an odds-ratio term; no reference model.

        l(y)     = log pi(y) / |y|                      (mean per-token log-prob, so P(y) = exp(l))
        odds(y)  = P(y) / (1 - P(y)),   log odds(y) = l - log(1 - exp(l))
        L_OR     = -log sigmoid(log odds(yc) - log odds(yr))
        loss     = nll_chosen + lam * L_OR

    nll_chosen is the SFT loss on the chosen answers (mean per-token NLL, a scalar or [B]), computed by the
    caller. Rewards: lam * l(y), as TRL logs them (lam plays the role of TRL's beta).
    """
    chosen, rejected = _per_token(policy_chosen, chosen_len), _per_token(policy_rejected, rejected_len)
    l_or = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return _output(nll_chosen + lam * l_or, lam * chosen, lam * rejected)


PREFERENCE_LOSSES = {
    "dpo": dpo_loss,
    "cdpo": partial(dpo_loss, label_smoothing=0.1),
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


def preference_loss(name: str, **kwargs) -> PreferenceOutput:
    """Call the preference loss `name` with keyword arguments (tensors and hyperparameters)."""
    return lookup(PREFERENCE_LOSSES, name, "preference loss")(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome-supervision advantages (Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps)
    within each group of `group_size` consecutive completions of one prompt. Returns [N * G].

    std is the population std (unbiased=False); TRL uses the Bessel-corrected one, which makes |A| smaller by
    sqrt((G - 1) / G). A group whose rewards are all equal gets exactly 0 (it carries no signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    flat = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)
    return adv.masked_fill(flat, 0.0).flatten()


@dataclass
class GrpoOutput:
    loss: torch.Tensor  # scalar, carries the gradient
    kl: torch.Tensor  # mean k3 KL to the reference (same averaging as the loss), detached
    clip_fraction: torch.Tensor  # fraction of tokens in mask where the clipped term is the min, detached
    n_sequences: int  # sequences with at least one token in mask (the ones averaged over)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.04) -> GrpoOutput:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3, with the KL estimator of eq. 4).

        ratio_t = exp(log pi(o_t) - log pi_old(o_t))
        surr_t  = min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
        KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (k3: unbiased, >= 0)
        loss    = -1/G sum_i 1/|o_i| sum_t (surr_t - kl_coef * KL_t)

    logp, old_logp, ref_logp and mask are [B, T] (token log-probs of the completions); advantages [B].
    Tokens where `mask` is False contribute nothing (even if their log-probs are inf or NaN), and sequences with
    no token in `mask` are left out of the mean over sequences (the loss is 0 if all are).
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(mask, logp - old_logp.detach(), zero)
    ref_gap = torch.where(mask, ref_logp.detach() - logp, zero)
    ratio = log_ratio.exp()
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    kl = ref_gap.exp() - ref_gap - 1
    objective = torch.where(mask, torch.minimum(unclipped, clipped) - kl_coef * kl, zero)

    n_tok = mask.sum(1)
    n_seq = int((n_tok > 0).sum())

    def per_seq(x):  # mean over sequences of the mean over their masked tokens; empty rows add 0
        return (x.sum(1) / n_tok.clamp(min=1)).sum() / max(n_seq, 1)

    is_clipped = mask & (unclipped > clipped)
    return GrpoOutput(loss=-per_seq(objective),
                      kl=per_seq(torch.where(mask, kl, zero)).detach(),
                      clip_fraction=is_clipped.to(logp.dtype).sum() / mask.sum().clamp(min=1),
                      n_sequences=n_seq)
