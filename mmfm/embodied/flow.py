"""Continuous actions by flow matching (pi0's objective; docs/embodied.md): the model's action head
(model.action_head.kind=flow) maps a noisy action chunk, its time t in [0, 1] and the language model's final hidden
state at the prompt's last token to a velocity. Training draws noise e and t per sample, forms x_t = (1 - t) e + t a
from the normalized chunk a, and regresses the velocity on a - e (squared error over the chunk's numbers); acting
integrates dx/dt = v from noise at t = 0 to t = 1 in `steps` Euler steps. pi0 attends from an action expert to every
prefix token; this head is a residual MLP on the one hidden state, which keeps it small and replicated (no tensor
parallel plan of its own).
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


class FlowActionHead(nn.Module):
    def __init__(self, hidden_size: int, horizon: int, dims: int, width: int = 0, layers: int = 3):
        super().__init__()
        width = width or hidden_size
        self.horizon, self.dims = horizon, dims
        self.action_in = nn.Linear(horizon * dims, width)
        self.context_in = nn.Linear(hidden_size, width)
        self.time_in = nn.Linear(2 * TIME_FREQUENCIES, width)
        self.blocks = nn.ModuleList(ResidualMLP(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.action_out = nn.Linear(width, horizon * dims)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        if name.endswith(".bias"):
            nn.init.zeros_(tensor)
        elif "norm" in name:
            nn.init.ones_(tensor)
        elif name.endswith("down.weight"):  # residual outputs scaled down with depth
            nn.init.normal_(tensor, std=std / (2 * len(self.blocks)) ** 0.5, generator=generator)
        else:
            nn.init.normal_(tensor, std=std, generator=generator)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """noisy [B, horizon, dims], t [B], context [B, hidden] -> velocity [B, horizon, dims]."""
        x = (self.action_in(noisy.flatten(1).to(context.dtype)) + self.context_in(context)
             + self.time_in(time_features(t).to(context.dtype)))
        for block in self.blocks:
            x = block(x)
        return self.action_out(self.norm(x)).view(-1, self.horizon, self.dims)


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
    """Normalized chunks [B, horizon, dims] for contexts [B, hidden]: Euler steps from noise at t = 0 to t = 1."""
    x = torch.randn(context.shape[0], head.horizon, head.dims, generator=generator).to(context.device)
    for i in range(steps):
        t = torch.full((context.shape[0],), i / steps, device=context.device)
        x = x + head(x, t, context).float() / steps
    return x.clamp(-1.0, 1.0)
