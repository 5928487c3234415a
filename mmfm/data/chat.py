"""Chat templates for conversation stages (sft, dpo, grpo) on LLaVA-format conversations.

data.chat.template picks one:
  markers    mmfm's role markers (data.chat's strings); a conversation [{"from": "system"|"human"|"gpt",
             "value": ...}, ...] becomes  <bos> (role marker, turn text, turn_end) per turn, <eos>.
             Every turn ends with turn_end; <eos> follows the final turn's turn_end, so the model always closes
             an answer the same way and then learns to stop.
  tokenizer  the pretrained tokenizer's own (Jinja) chat template (mmfm.data.chat_template); <bos> only where
             the template writes it, <eos> after the last answer unless the answer already holds it.
  auto       the tokenizer's template for a pretrained tokenizer, the markers for mmfm's own.
Each image placeholder in a turn's text becomes tokens_per_image image tokens (images in order). Loss only on
the assistant answers (and what the template closes them with) and on the closing <eos>: never on bos, role
markers, system/user text or image tokens. Pieces (marker, text, turn_end; or the template's prompt and answer
pieces) are tokenized separately, so a marker's tokens never merge with the text after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfm.config.schema import ChatConfig
from mmfm.data.chat_template import ROLES, template_segments
from mmfm.data.loader import IGNORE_INDEX, EncodedSample, SkipSample, read_images, read_meta
from mmfm.data.processor import ImageProcessor
from mmfm.data.tokenizer import TextTokenizer

TEMPLATES = ("auto", "markers", "tokenizer")


@dataclass
class ChatTemplate(ChatConfig):
    """The template's strings are data.chat's fields (ChatConfig)."""

    def marker(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown turn role {role!r}; expected one of {sorted(ROLES)}")
        return getattr(self, ROLES[role])

    def uses_tokenizer(self, tokenizer: TextTokenizer) -> bool:
        """Whether conversations go through the tokenizer's own template (data.chat.template, resolved)."""
        return self.template == "tokenizer" or (self.template == "auto" and tokenizer.pretrained)

    def segments(self, turns: list[dict], tokenizer: TextTokenizer) -> tuple[list[tuple[str, bool]], int]:
        """(text, carries_loss) pieces of the conversation and the index of the last answer's first piece."""
        if self.uses_tokenizer(tokenizer):
            return template_segments(tokenizer.chat_template, turns, tokenizer.special_token_strings())
        pieces, answer_start = [], 0
        for turn in turns:
            is_answer = turn.get("from") == "gpt"
            pieces.append((self.marker(turn.get("from")), False))
            answer_start = len(pieces) if is_answer else answer_start
            pieces += [(str(turn.get("value", "")), is_answer), (self.turn_end, is_answer)]
        return pieces, answer_start


def _piece_ids(text: str, tokenizer: TextTokenizer, placeholder: str, tokens_per_image: int) -> list[int]:
    """The piece's tokens, each image placeholder replaced by tokens_per_image image tokens."""
    ids: list[int] = []
    for i, part in enumerate(text.split(placeholder)):
        if i > 0:
            ids += [tokenizer.image_id] * tokens_per_image
        if part:
            ids += tokenizer.encode(part)
    return ids


def encode_conversation(turns: list[dict], images: list[torch.Tensor], tokenizer: TextTokenizer,
                        template: ChatTemplate, tokens_per_image: int, seq_len: int,
                        key: str = "") -> EncodedSample:
    """The conversation as an EncodedSample (targets as the loader's: targets[i] = input_ids[i + 1] where that
    token carries loss). caption = the last assistant answer. ValueError: unknown role, no assistant turn
    last, placeholders != len(images), or a template that fails; SkipSample("too_long"): more than seq_len
    tokens."""
    if not turns or turns[-1].get("from") != "gpt":
        raise ValueError("a conversation must end with an assistant ('gpt') turn")
    placeholders = sum(str(t.get("value", "")).count(template.image_placeholder) for t in turns)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} image placeholder(s) in the turns but {len(images)} image(s)")
    own = template.uses_tokenizer(tokenizer)
    pieces, answer_start = template.segments(turns, tokenizer)
    ids = [] if own else tokenizer.bos()
    loss = [False] * len(ids)
    prompt_len = 0
    for i, (text, carries) in enumerate(pieces):
        if i == answer_start:
            prompt_len = len(ids)  # generation is prompted up to the last answer
        piece = _piece_ids(text, tokenizer, template.image_placeholder, tokens_per_image)
        ids += piece
        loss += [carries and t != tokenizer.image_id for t in piece]
    last_answer = ids[prompt_len:]
    if not own or tokenizer.eos_id not in last_answer:
        ids.append(tokenizer.eos_id)
        loss.append(True)
    if len(ids) > seq_len:
        raise SkipSample("too_long", f"{len(ids)} tokens > data.seq_len={seq_len}")
    targets = [nxt if carries else IGNORE_INDEX for nxt, carries in zip(ids[1:], loss[1:])] + [IGNORE_INDEX]
    return EncodedSample(key, ids, targets, list(images), str(turns[-1].get("value", "")), prompt_len=prompt_len)


def assistant_positions(sample: EncodedSample) -> list[int]:
    """Input positions whose next token carries loss."""
    return [i for i, t in enumerate(sample.targets) if t != IGNORE_INDEX]


@dataclass
class ConversationEncoder:
    """Raw samples -> encoded conversations for a stage's loader (stage.objective sft, dpo, grpo).

    The JSON member holds LLaVA "conversations"; images are the sample's image members in name order.
    objective:
      sft   the whole conversation, loss on the assistant turns;
      dpo   a preference pair: "conversations" end with the user's turn, "chosen" / "rejected" are the two
            answers, optional "reference_logps": [chosen, rejected] precomputed by the reference model;
      grpo  the prompt only (up to the last assistant marker); the reference answer (the last assistant turn,
            or "chosen") is the caption, for the reward.
    Unusable conversations are skipped as "bad_conversation", pairs without two different answers as "bad_pair".
    """
    tokenizer: TextTokenizer
    template: ChatTemplate
    tokens_per_image: int
    processor: ImageProcessor
    seq_len: int
    objective: str = "sft"
    question: str = ""  # prefix(): the user's question (mmfm generate --prompt)

    def prefix(self, num_images: int) -> list[int]:
        """The tokens that prompt an answer to `question` about num_images images: what generation starts from."""
        ask = [{"from": "human", "value": self.template.image_placeholder * num_images + "\n" + self.question},
               {"from": "gpt", "value": ""}]
        whole = encode_conversation(ask, [None] * num_images, self.tokenizer, self.template, self.tokens_per_image,
                                    self.seq_len)
        return whole.input_ids[: whole.prompt_len]

    def encode(self, turns, images: list[torch.Tensor], key: str) -> EncodedSample:
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise SkipSample("bad_conversation", "'conversations' must be a list of {from, value} turns")
        try:
            return encode_conversation(turns, images, self.tokenizer, self.template, self.tokens_per_image,
                                       self.seq_len, key)
        except ValueError as exc:
            raise SkipSample("bad_conversation", str(exc)) from None

    def __call__(self, raw: dict) -> EncodedSample:
        meta, key = read_meta(raw), raw["__key__"]
        images = read_images(raw, self.processor)
        turns = meta.get("conversations")
        if self.objective == "sft":
            return self.encode(turns, images, key)
        if self.objective == "dpo":
            return self.pair(meta, turns, images, key)
        if "chosen" in meta:
            turns = (turns or []) + [{"from": "gpt", "value": meta["chosen"]}]
        whole = self.encode(turns, images, key)
        prompt = whole.input_ids[: whole.prompt_len]
        return EncodedSample(key, prompt, [IGNORE_INDEX] * len(prompt), images, whole.caption, len(prompt))

    def pair(self, meta: dict, turns, images: list[torch.Tensor], key: str) -> EncodedSample:
        chosen, rejected = meta.get("chosen"), meta.get("rejected")
        if not (isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() and rejected.strip()):
            raise SkipSample("bad_pair", "a preference pair needs non-empty 'chosen' and 'rejected' answers")
        if chosen.strip() == rejected.strip():
            raise SkipSample("bad_pair", "'chosen' and 'rejected' are the same answer")
        sample = self.encode((turns or []) + [{"from": "gpt", "value": chosen}], images, key)
        sample.rejected = self.encode((turns or []) + [{"from": "gpt", "value": rejected}], images, key)
        reference = meta.get("reference_logps")
        if reference is not None:
            if not (isinstance(reference, list) and len(reference) == 2):
                raise SkipSample("bad_pair", "'reference_logps' must be [chosen, rejected]")
            sample.reference_logps = (float(reference[0]), float(reference[1]))
        return sample
