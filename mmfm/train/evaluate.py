"""Held-out evaluation: exact-match caption accuracy with greedy decoding (the validation loss is the
training loop's, `Trainer.validate_now`, so that it runs through any parallel layout)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch

from mmfm.data.loader import EncodedSample, SampleEncoder
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
def caption_samples(model, tokenizer: TextTokenizer, encoder: SampleEncoder, samples: Iterable[EncodedSample],
                    batch_size: int, max_new_tokens: int, device) -> list[CaptionResult]:
    """Greedy captions for encoded samples, next to their reference captions."""
    was_training = model.training
    model.eval()
    results: list[CaptionResult] = []
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, batch_size)):
        images = [img for s in chunk for img in s.images]
        pixels = torch.stack(images).to(device) if images else None
        prompts = [encoder.prefix(len(s.images)) for s in chunk]
        outputs = generate(model, prompts, pixels, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
        results += [CaptionResult(s.key, tokenizer.decode(out), s.caption) for s, out in zip(chunk, outputs)]
    model.train(was_training)
    return results


def accuracy(results: list[CaptionResult]) -> float:
    return sum(r.correct for r in results) / max(len(results), 1)
