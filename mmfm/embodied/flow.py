"""Continuous actions by flow matching (pi0's objective; docs/embodied.md): the model's action head
(model.action_head.kind=flow) maps a noisy action chunk, its time t in [0, 1] and the language model's final hidden
states over the prompt to a velocity. Training draws noise e and t per sample, forms x_t = (1 - t) e + t a
from the normalized chunk a, and regresses the velocity on a - e (squared error over the chunk's numbers); acting
integrates dx/dt = v from noise at t = 0 to t = 1 in `steps` Euler steps. As pi0's action expert, the chunk attends
to every prompt position's hidden state; unlike it, it does not share the language model's layers (a small head of
its own, replicated: no tensor parallel plan).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import nn

TIME_FREQUENCIES = 16


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 2 * TIME_FREQUENCIES]: sines and cosines of t at frequencies pi * 2^k."""
    freqs = math.pi * 2.0 ** torch.arange(TIME_FREQUENCIES, device=t.device, dtype=torch.float32)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.silu(self.up(self.norm(x))))


class CrossAttention(nn.Module):
    """Queries x [B, Q, width] attend to the prompt's hidden states (projected to the head's width) where mask [B, T]
    is true."""

    def __init__(self, width: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, width // head_dim)
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(self.query(self.norm(x))), split(self.key(memory)), split(self.value(memory))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class FlowActionHead(nn.Module):
    """The noisy chunk is one token (its numbers, the time and the prompt's last hidden state); `layers` blocks of
    attention to the prompt's hidden states and a residual MLP; the chunk's velocity."""

    def __init__(self, hidden_size: int, horizon: int, dims: int, width: int = 0, layers: int = 3):
        super().__init__()
        width = width or hidden_size
        self.horizon, self.dims = horizon, dims
        self.action_in = nn.Linear(horizon * dims, width)
        self.time_in = nn.Linear(2 * TIME_FREQUENCIES, width)
        self.last_in = nn.Linear(hidden_size, width)
        self.context_in = nn.Linear(hidden_size, width)
        self.attention = nn.ModuleList(CrossAttention(width) for _ in range(layers))
        self.blocks = nn.ModuleList(ResidualMLP(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.action_out = nn.Linear(width, horizon * dims)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        if name.endswith(".bias"):
            nn.init.zeros_(tensor)
        elif "norm" in name:
            nn.init.ones_(tensor)
        elif name.endswith(("down.weight", "out.weight")) and name != "action_out.weight":  # residual outputs
            nn.init.normal_(tensor, std=std / (2 * len(self.blocks)) ** 0.5, generator=generator)
        else:
            nn.init.normal_(tensor, std=std, generator=generator)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """noisy [B, horizon, dims], t [B], hidden states [B, T, hidden] whose positions 0..last [B] are each row's
        prompt -> velocity [B, horizon, dims]."""
        rows = torch.arange(context.shape[0], device=context.device)
        mask = torch.arange(context.shape[1], device=context.device)[None, :] <= last[:, None]
        x = (self.action_in(noisy.flatten(1).to(context.dtype)) + self.time_in(time_features(t).to(context.dtype))
             + self.last_in(context[rows, last]))[:, None, :]
        memory = self.context_in(context)
        for attention, block in zip(self.attention, self.blocks):
            x = block(attention(x, memory, mask))
        return self.action_out(self.norm(x[:, 0])).view(-1, self.horizon, self.dims)


def flow_draws(keys: Sequence[str], seed: int, step: int, horizon: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise [B, horizon, dims] and times [B] for these samples: a function of (seed, step, sample key) alone, so
    any data-parallel layout draws the same for the same sample."""
    noise, times = [], []
    for key in keys:
        digest = hashlib.sha256(f"{seed}/{step}/{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        noise.append(torch.randn(horizon, dims, generator=generator))
        times.append(torch.rand((), generator=generator))
    return torch.stack(noise), torch.stack(times)


def flow_loss(velocity: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed squared error of the velocity against a - e over the chunk's numbers whose step mask [B, horizon] is 1."""
    error = (velocity.float() - (actions - noise)) ** 2
    return (error * mask[:, :, None]).sum()


def interpolate(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = t[:, None, None].to(actions.dtype)
    return (1 - w) * noise + w * actions


@torch.no_grad()
def sample_actions(head: FlowActionHead, context: torch.Tensor, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Normalized chunks [B, horizon, dims] for prompts' hidden states [B, T, hidden] (every position attended):
    Euler steps from noise at t = 0 to t = 1."""
    b, device = context.shape[0], context.device
    last = torch.full((b,), context.shape[1] - 1, device=device)
    x = torch.randn(b, head.horizon, head.dims, generator=generator).to(device)
    for i in range(steps):
        t = torch.full((b,), i / steps, device=device)
        x = x + head(x, t, context, last).float() / steps
    return x.clamp(-1.0, 1.0)
