"""Held-out evaluation: exact-match caption accuracy with greedy decoding (the validation loss is the
training loop's, `Trainer.validate_now`, so that it runs through any parallel layout)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch

from mmfm.data.loader import EncodedSample
from mmfm.data.tokenizer import TextTokenizer
from mmfm.models.generate import generate


@dataclass
class CaptionResult:
    key: str
    prediction: str
    truth: str

    @property
    def correct(self) -> bool:
        return self.prediction.strip() == self.truth.strip()


@torch.no_grad()
def caption_samples(model, tokenizer: TextTokenizer, samples: Iterable[EncodedSample], batch_size: int,
                    max_new_tokens: int, device, stop_early: bool = True) -> list[CaptionResult]:
    """Greedy captions (or answers) generated from each sample's prompt, next to its reference.
    stop_early=False: decode max_new_tokens steps in every batch (data-parallel ranks then stay in step)."""
    was_training = model.training
    model.eval()
    results: list[CaptionResult] = []
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, batch_size)):
        images = [img for s in chunk for img in s.images]
        pixels = torch.stack(images).to(device) if images else None
        prompts = [s.input_ids[: s.prompt_len] for s in chunk]
        outputs = generate(model, prompts, pixels, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                           stop_early=stop_early)
        results += [CaptionResult(s.key, tokenizer.decode(out), s.caption) for s, out in zip(chunk, outputs)]
    model.train(was_training)
    return results


def accuracy(results: list[CaptionResult]) -> float:
    return sum(r.correct for r in results) / max(len(results), 1)
