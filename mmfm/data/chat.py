"""A chat template for supervised fine-tuning on LLaVA-format conversations.

A conversation [{"from": "system"|"human"|"gpt", "value": ...}, ...] becomes

    <bos> (role marker, turn text, turn_end) per turn, <eos>

where each image placeholder in a turn's text becomes tokens_per_image <image> tokens (images in order).
Every turn ends with turn_end; <eos> comes after the final turn's turn_end, so the model always closes an
answer the same way and then learns to stop. Loss only on the assistant turns' text and turn_end, and on
the closing <eos>: never on bos, role markers, system/user text or image tokens. Segments (marker, text
pieces, turn_end) are tokenized separately, so a marker's tokens never merge with the text after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfm.data.loader import IGNORE_INDEX, EncodedSample, SkipSample
from mmfm.data.tokenizer import TextTokenizer

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # LLaVA "from" -> template field


@dataclass
class ChatTemplate:
    system: str = "system: "
    user: str = "user: "
    assistant: str = "assistant: "
    turn_end: str = "\n"
    image_placeholder: str = "<image>"

    def marker(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown turn role {role!r}; expected one of {sorted(ROLES)}")
        return getattr(self, ROLES[role])


def _turn_ids(text: str, tokenizer: TextTokenizer, template: ChatTemplate, tokens_per_image: int) -> list[int]:
    """The turn text's tokens, each placeholder replaced by tokens_per_image image tokens."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(template.image_placeholder)):
        if i > 0:
            ids += [tokenizer.image_id] * tokens_per_image
        if piece:
            ids += tokenizer.encode(piece)
    return ids


def encode_conversation(turns: list[dict], images: list[torch.Tensor], tokenizer: TextTokenizer,
                        template: ChatTemplate, tokens_per_image: int, seq_len: int,
                        key: str = "") -> EncodedSample:
    """The conversation as an EncodedSample (targets as the loader's: targets[i] = input_ids[i + 1] where that
    token carries loss). caption = the last assistant answer. ValueError: unknown role, no assistant turn
    last, or placeholders != len(images); SkipSample("too_long"): more than seq_len tokens."""
    if not turns or turns[-1].get("from") != "gpt":
        raise ValueError("a conversation must end with an assistant ('gpt') turn")
    placeholders = sum(str(t.get("value", "")).count(template.image_placeholder) for t in turns)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} image placeholder(s) in the turns but {len(images)} image(s)")
    ids, loss = [tokenizer.bos_id], [False]
    end_ids = tokenizer.encode(template.turn_end) if template.turn_end else []
    for turn in turns:
        role, text = turn.get("from"), str(turn.get("value", ""))
        marker = tokenizer.encode(template.marker(role))
        body = _turn_ids(text, tokenizer, template, tokens_per_image) + end_ids
        is_answer = role == "gpt"
        ids += marker + body
        loss += [False] * len(marker) + [is_answer and t != tokenizer.image_id for t in body]
    ids.append(tokenizer.eos_id)
    loss.append(True)
    if len(ids) > seq_len:
        raise SkipSample("too_long", f"{len(ids)} tokens > data.seq_len={seq_len}")
    targets = [nxt if carries else IGNORE_INDEX for nxt, carries in zip(ids[1:], loss[1:])] + [IGNORE_INDEX]
    return EncodedSample(key, ids, targets, list(images), str(turns[-1].get("value", "")))


def assistant_positions(sample: EncodedSample) -> list[int]:
    """Input positions whose next token carries loss."""
    return [i for i, t in enumerate(sample.targets) if t != IGNORE_INDEX]
