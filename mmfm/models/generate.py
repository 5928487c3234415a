"""Batched autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mmfm.models.vlm import VisionLanguageModel


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] left-padded to the longest prompt, and the mask of real tokens."""
    length = max(len(p) for p in prompts)
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


@torch.no_grad()
def generate(model: VisionLanguageModel, prompts: Sequence[Sequence[int]], pixel_values: Optional[torch.Tensor],
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 0.0, top_k: int = 0,
             generator: Optional[torch.Generator] = None, stop_early: bool = True) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), each ending before its first EOS.

    temperature 0 is greedy decoding. Prompts may differ in length: they are left-padded, and padding
    is excluded from attention and from the rotary positions. stop_early=False runs all max_new_tokens steps
    even when every answer has ended (sharded models whose ranks must run the same forwards).
    """
    device = next(model.parameters()).device
    ids, valid = left_pad(prompts, pad_id, device)
    batch, length = ids.shape
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    # Padding queries attend to themselves only, so that no attention row is empty.
    mask = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
    cache = model.new_cache(batch, length + max_new_tokens, next(model.parameters()).dtype, device)
    h = model.embed(ids, pixel_values)
    logits = model.language(h, positions, mask.unsqueeze(1), cache)[:, -1]
    cache.length = length

    key_valid = torch.cat([valid, torch.ones(batch, max_new_tokens, dtype=torch.bool, device=device)], 1)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    never = model.cfg.image_token_id  # an image placeholder is input only, never an answer
    for step in range(max_new_tokens):
        token = _pick(logits.index_fill(-1, torch.tensor([never], device=device), float("-inf")), temperature,
                      top_k, generator)
        for row in torch.nonzero(~done).flatten().tolist():
            if token[row].item() == eos_id:
                done[row] = True
            else:
                out[row].append(token[row].item())
        if (stop_early and bool(done.all())) or step == max_new_tokens - 1:
            break
        step_mask = key_valid[:, None, None, : cache.length + 1]
        h = model.language.embed(token.unsqueeze(1))
        logits = model.language(h, next_pos, step_mask, cache)[:, -1]
        cache.length += 1
        next_pos = next_pos + 1
    return out
