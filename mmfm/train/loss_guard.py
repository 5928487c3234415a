"""Loss guard: a step whose loss or gradient norm is not finite, or whose loss spikes above a factor of the recent
mean, leaves the parameters and optimizer untouched; too many such steps in a row stop the run."""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from mmfm.errors import MmfmError


class TrainingDiverged(MmfmError):
    """max_bad_steps consecutive steps were skipped; the message names the last good checkpoint."""


class LossGuard:
    """spike_factor 0 checks finiteness only. Every rank must see the same (globally reduced) values."""

    def __init__(self, spike_factor: float = 0.0, window: int = 20, max_bad_steps: int = 3):
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.recent: deque[float] = deque(maxlen=window)
        self.consecutive_bad = 0

    def bad_reason(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this step's update must be skipped, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return f"loss {loss:.4g} is above {self.spike_factor} x the mean {mean:.4g} of the last " \
                       f"{len(self.recent)} steps"
        return None

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """The reason to skip this step's update (None: apply it); TrainingDiverged after max_bad_steps in a row."""
        reason = self.bad_reason(loss, grad_norm)
        if reason is None:
            self.recent.append(loss)
            self.consecutive_bad = 0
            return None
        self.consecutive_bad += 1
        if self.consecutive_bad >= self.max_bad_steps:
            raise TrainingDiverged(f"{self.consecutive_bad} consecutive steps skipped (last: {reason})")
        return reason
