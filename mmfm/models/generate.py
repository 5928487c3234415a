"""Batched autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.distributed.tensor import DTensor

from mmfm.models.vlm import VisionLanguageModel


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device, multiple: int = 1) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Token ids [B, L] left-padded to the longest prompt (L rounded up to a multiple), and the mask of real
    tokens."""
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[row, length - len(prompt):] = True
    return ids, valid


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def whole(logits: torch.Tensor) -> torch.Tensor:
    """Logits as a plain tensor (under tensor parallelism they come split over the vocabulary)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


@torch.no_grad()
def generate(model: VisionLanguageModel, prompts: Sequence[Sequence[int]], pixel_values: Optional[torch.Tensor],
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 0.0, top_k: int = 0,
             generator: Optional[torch.Generator] = None, stop_early: bool = True,
             multiple: int = 1, allowed: Optional[tuple[int, int]] = None) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), each ending before its first EOS.

    temperature 0 is greedy decoding. Prompts may differ in length: they are left-padded, and padding
    is excluded from attention and from the rotary positions. stop_early=False runs all max_new_tokens steps
    even when every answer has ended (sharded models whose ranks must run the same forwards). multiple: every
    forward's length a multiple of it (sequence parallelism splits the sequence over the tp ranks): the prompt is
    left-padded to one, and each step decodes its token followed by padding that no real token attends to.
    allowed: (first, end): only ids in [first, end) are decoded (a policy's action tokens).
    """
    device = next(model.parameters()).device
    ids, valid = left_pad(prompts, pad_id, device, multiple)
    batch, length = ids.shape
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    # Padding queries attend to themselves only, so that no attention row is empty.
    mask = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
    cache = model.new_cache(batch, length + max_new_tokens + multiple, next(model.parameters()).dtype, device)
    h = model.embed(ids, pixel_values)
    logits = whole(model.language(h, positions, mask.unsqueeze(1), cache))[:, -1]
    cache.length = length

    key_valid = torch.cat([valid, torch.ones(batch, max_new_tokens + multiple, dtype=torch.bool, device=device)], 1)
    offsets = torch.arange(multiple, device=device)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    never = model.cfg.image_token_id  # an image placeholder is input only, never an answer
    for step in range(max_new_tokens):
        logits = logits.index_fill(-1, torch.tensor([never], device=device), float("-inf"))
        if allowed is not None:
            outside = torch.ones(logits.shape[-1], dtype=torch.bool, device=device)
            outside[allowed[0]:allowed[1]] = False
            logits = logits.masked_fill(outside, float("-inf"))
        token = _pick(logits, temperature, top_k, generator)
        for row in torch.nonzero(~done).flatten().tolist():
            if token[row].item() == eos_id:
                done[row] = True
            else:
                out[row].append(token[row].item())
        if (stop_early and bool(done.all())) or step == max_new_tokens - 1:
            break
        keys = cache.length + multiple
        causal = torch.arange(keys, device=device)[None, :] <= cache.length + offsets[:, None]
        step_mask = key_valid[:, None, None, :keys] & causal  # [B, 1, multiple, keys]
        step_ids = torch.cat([token.unsqueeze(1), token.new_full((batch, multiple - 1), pad_id)], 1)
        h = model.language.embed(step_ids)
        logits = whole(model.language(h, next_pos + offsets, step_mask, cache))[:, 0]
        cache.length += 1  # the padding's keys are overwritten by the next step
        next_pos = next_pos + 1
    return out
