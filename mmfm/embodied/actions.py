"""Actions as tokens (RT-2, OpenVLA): each dimension of a normalized action, and of the proprioceptive state, falls in
one of `bins` equal bins of [-1, 1], and bin b is the token id `vocab_size - bins + b`, the last ids of the language
model's vocabulary, which the tokenizer never produces (checked before a run). A robot sample (mmfm.data.sources
LeRobotSource) becomes the prompt of its instruction about its image, the state's tokens, and as the answer the
chunk's action tokens then eos, trained with the ordinary next-token loss (stage=vla, docs/embodied.md).

Normalization: values map linearly from [low, high] to [-1, 1] and are clipped; low and high are the data set's
q01 and q99 per dimension (its manifest's statistics), as OpenVLA's bounds, so outliers do not spread the bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mmfm.data.loader import IGNORE_INDEX, EncodedSample, SkipSample, read_images, read_meta


ROBOT_CARD = "robot.json"  # a vla run's data statistics, in its run directory


class ActionSpaceError(ValueError):
    pass


@dataclass
class Bounds:
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def from_stats(cls, stats: dict) -> "Bounds":
        low, high = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
        flat = high - low < 1e-8  # a constant dimension: any bin
        return cls(low, np.where(flat, low + 1.0, high))

    def normalize(self, values: np.ndarray) -> np.ndarray:
        return np.clip(2.0 * (np.asarray(values, dtype=np.float64) - self.low) / (self.high - self.low) - 1.0, -1, 1)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        return self.low + (np.asarray(x, dtype=np.float64) + 1.0) / 2.0 * (self.high - self.low)


@dataclass
class ActionTokens:
    """Values <-> token ids for one vocabulary."""
    vocab_size: int
    bins: int
    action: Bounds
    state: Bounds

    @property
    def first_id(self) -> int:
        return self.vocab_size - self.bins

    def _ids(self, x: np.ndarray) -> list[int]:
        b = np.clip(np.floor((x + 1.0) / 2.0 * self.bins), 0, self.bins - 1).astype(np.int64)
        return (self.first_id + b).reshape(-1).tolist()

    def _values(self, ids, dims: int) -> np.ndarray:
        b = np.asarray(ids, dtype=np.int64) - self.first_id
        if b.size % dims or (b < 0).any() or (b >= self.bins).any():
            raise ActionSpaceError(f"{list(ids)} are not {dims}-dimensional action tokens")
        return ((b + 0.5) / self.bins * 2.0 - 1.0).reshape(-1, dims)

    def encode_actions(self, actions) -> list[int]:
        return self._ids(self.action.normalize(np.asarray(actions, dtype=np.float64)))

    def decode_actions(self, ids) -> np.ndarray:
        """[steps, action dims] from steps x dims ids (bin centres, un-normalized)."""
        return self.action.denormalize(self._values(ids, len(self.action.low))).astype(np.float32)

    def encode_state(self, state) -> list[int]:
        return self._ids(self.state.normalize(np.asarray(state, dtype=np.float64)))

    def is_action(self, token: int) -> bool:
        return self.first_id <= token < self.vocab_size


def action_tokens(robot: dict, vocab_size: int, bins: int) -> ActionTokens:
    """From a data set manifest's "robot" entry (its statistics)."""
    return ActionTokens(vocab_size, bins, Bounds.from_stats(robot["action"]), Bounds.from_stats(robot["state"]))


@dataclass
class VLAEncoder:
    """Raw robot samples -> encoded samples for stage=vla: the prompt (the instruction about the image, as the
    stage's conversation encoder renders a question), the state's tokens, then the first `horizon` actions' tokens
    and eos carry the loss; the padding past the episode's end (its final action repeated: the grasp) only with
    pad_loss."""
    conversation: object  # mmfm.data.chat.ConversationEncoder: the prompt's rendering
    tokens: ActionTokens
    horizon: int
    use_state: bool = True
    pad_loss: bool = True
    flow: bool = False  # the chunk as numbers for the action head (extras "actions", "action_mask"), not tokens

    def prompt(self, instruction: str, state) -> list[int]:
        enc = self.conversation
        turns = [{"from": "human", "value": enc.template.image_placeholder + "\n" + instruction},
                 {"from": "gpt", "value": ""}]
        whole = enc.encode(turns, [None], "")
        ids = whole.input_ids[: whole.prompt_len]
        return ids + (self.tokens.encode_state(state) if self.use_state else [])

    def __call__(self, raw: dict) -> EncodedSample:
        meta, key = read_meta(raw), raw["__key__"]
        robot = (meta.get("meta") or {}).get("robot")
        if not isinstance(robot, dict) or "actions" not in robot or "state" not in robot:
            raise SkipSample("not_robot", "the sample has no meta.robot state and actions (a lerobot source's)")
        actions, pad = robot["actions"], robot.get("actions_pad") or [False] * len(robot["actions"])
        if len(actions) < self.horizon:
            raise SkipSample("short_chunk", f"{len(actions)} actions < stage.vla.horizon={self.horizon}")
        images = read_images(raw, self.conversation.processor)
        prompt = self.prompt(str(meta.get("caption", "")), robot["state"])
        if self.flow:
            return self.flow_sample(key, prompt, images, actions, pad)
        answer = self.tokens.encode_actions(actions[: self.horizon])
        carries = [self.pad_loss or not p for p in pad[: self.horizon] for _ in range(len(actions[0]))]
        eos = self.conversation.tokenizer.eos_id
        ids = self.fitting(prompt + answer + [eos])
        loss = [False] * len(prompt) + carries + [True]
        targets = [nxt if c else IGNORE_INDEX for nxt, c in zip(ids[1:], loss[1:])] + [IGNORE_INDEX]
        return EncodedSample(key, ids, targets, images, "", prompt_len=len(prompt))

    def fitting(self, ids: list[int]) -> list[int]:
        if len(ids) > self.conversation.seq_len:
            raise SkipSample("too_long", f"{len(ids)} tokens > data.seq_len={self.conversation.seq_len}")
        return ids

    def flow_sample(self, key: str, prompt: list[int], images, actions, pad) -> EncodedSample:
        import torch

        prompt = self.fitting(prompt)
        chunk = self.tokens.action.normalize(np.asarray(actions[: self.horizon], dtype=np.float64))
        mask = [float(self.pad_loss or not p) for p in pad[: self.horizon]]
        extras = {"actions": torch.tensor(chunk, dtype=torch.float32), "action_mask": torch.tensor(mask)}
        return EncodedSample(key, prompt, [IGNORE_INDEX] * len(prompt), images, "", prompt_len=len(prompt),
                             extras=extras)


def robot_entry(manifest: dict) -> Optional[dict]:
    """The one robot source's statistics of a data set manifest (None: no robot source)."""
    entries = [s["robot"] for s in (manifest.get("sources") or {}).values()
               if isinstance(s, dict) and isinstance(s.get("robot"), dict) and s["robot"].get("episodes")]
    return entries[0] if len(entries) == 1 else None


def ordinal_bin_embeddings(bins: int, dim: int, norm: float, seed: int = 0) -> "torch.Tensor":
    """[bins, dim] rows that vary smoothly with the bin: Fourier features of the bin's centre t in [0, 1]
    (cos and sin of pi k t, k = 1..K) along random orthonormal directions, each row of length `norm`. Neighbouring
    bins start close and far ones apart, so an answer one bin off is nearly right from the first step (random rows
    make every wrong bin equally wrong)."""
    import torch

    k = max(1, min(dim // 4, bins // 2))
    generator = torch.Generator().manual_seed(seed)
    directions, _ = torch.linalg.qr(torch.randn(dim, 2 * k, generator=generator, dtype=torch.float64))
    t = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    angles = torch.pi * t[:, None] * torch.arange(1, k + 1, dtype=torch.float64)[None, :]
    features = torch.cat([angles.cos(), angles.sin()], dim=1) / k ** 0.5
    return (features @ directions.T * norm).float()
