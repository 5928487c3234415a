"""Running tasks: requests in text (prompt, image, answer prefix), answered by a model or by a constant baseline,
scored by the task type's metrics (docs/evaluation.md).

An answerer has two calls, the two that lm-evaluation-harness and lmms-eval ask of a model:
  generate(requests)       the text a model writes after each request's prompt (and answer prefix), cut before
                           the first of the request's stop strings;
  loglikelihood(requests)  for each request, the log-probability of its continuation after its prompt, its number
                           of tokens, and whether greedy decoding would have written it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from torch import nn

from mmfm.eval import metrics
from mmfm.eval.tasks import Item, Task, TaskItems, render

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    prompt: str
    image: Optional[Path] = None
    answer_prefix: str = ""
    max_new_tokens: int = 32
    until: Sequence[str] = ()


@dataclass
class ScoreRequest:
    prompt: str
    continuation: str
    image: Optional[Path] = None
    answer_prefix: str = ""
    end: bool = True  # the continuation is a whole answer: its end-of-text token is scored too


@dataclass
class Score:
    logprob: float
    tokens: int
    greedy: bool


class Answerer(Protocol):
    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]: ...

    def loglikelihood(self, requests: Sequence[ScoreRequest]) -> list[Score]: ...


def cut(text: str, until: Sequence[str]) -> str:
    """The answer: leading space dropped, cut before the first stop string, trimmed."""
    text = text.lstrip()
    for stop in until:
        if stop in text:
            text = text[: text.index(stop)]
    return text.strip()


class ModelAnswerer:
    """An mmfm model with its tokenizer and sample encoder (captions: the prompt after the image; chat: the
    prompt as the user's turn, the answer after the assistant marker)."""

    def __init__(self, model: nn.Module, tokenizer, encoder, device, batch_size: int = 16, stop_early: bool = True,
                 progress: bool = False, multiple: int = 1):
        """stop_early=False: every generation runs max_new_tokens steps (ranks of a sharded model stay in step).
        progress: a progress bar over each call's batches (on a terminal). multiple: every forward's length a
        multiple of it (tensor parallelism's sequence split: tp)."""
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder
        self.device, self.batch_size, self.stop_early = torch.device(device), batch_size, stop_early
        self.progress, self.multiple = progress, multiple

    def batches(self, requests: Sequence, what: str):
        from tqdm import tqdm

        total = -(-len(requests) // self.batch_size)
        return tqdm(_batches(requests, self.batch_size), total=total, desc=what, unit="batch", leave=False,
                    disable=not self.progress or None)

    def context(self, prompt: str, answer_prefix: str, num_images: int) -> list[int]:
        enc, t = self.encoder, self.tokenizer
        if hasattr(enc, "question"):
            ids = dataclasses.replace(enc, question=prompt).prefix(num_images)
        elif num_images:
            ids = dataclasses.replace(enc, prompt=prompt).prefix(num_images)
        else:  # plain text: the prompt starts it
            ids = t.bos() + (t.encode(prompt) if prompt else []) or [t.eos_id]
        return ids + (t.encode(answer_prefix) if answer_prefix else [])

    def pixels(self, images: Sequence[Optional[Path]]) -> Optional[torch.Tensor]:
        from mmfm.data.loader import load_image

        loaded = [load_image(p.read_bytes(), self.encoder.processor) for p in images if p is not None]
        return torch.stack(loaded).to(self.device) if loaded else None

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        from mmfm.models.generate import generate

        out = []
        for batch in self.batches(requests, "generating"):
            prompts = [self.context(r.prompt, r.answer_prefix, int(r.image is not None)) for r in batch]
            tokens = generate(self.model, prompts, self.pixels([r.image for r in batch]),
                              max(r.max_new_tokens for r in batch), self.tokenizer.eos_id, self.tokenizer.pad_id,
                              stop_early=self.stop_early, multiple=self.multiple)
            out += [cut(self.tokenizer.decode(t[: r.max_new_tokens]), r.until) for r, t in zip(batch, tokens)]
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        out = []
        for batch in self.batches(requests, "scoring"):
            rows = [(self.context(r.prompt, r.answer_prefix, int(r.image is not None)),
                     self.tokenizer.encode(r.continuation) + ([self.tokenizer.eos_id] if r.end else []))
                    for r in batch]
            out += self.score_rows(rows, self.pixels([r.image for r in batch]))
        return out

    def score_rows(self, rows: list[tuple[list[int], list[int]]], pixels: Optional[torch.Tensor]) -> list[Score]:
        """Each row's continuation scored after its context, in one right-padded forward."""
        from mmfm.models.generate import whole

        length = -(-max(len(c) + len(t) for c, t in rows) // self.multiple) * self.multiple
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        for b, (ctx, cont) in enumerate(rows):
            ids[b, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
        logp = whole(self.model(ids.to(self.device), pixels)).float().log_softmax(-1)
        scores = []
        for b, (ctx, cont) in enumerate(rows):
            target = torch.tensor(cont, device=logp.device)
            row = logp[b, len(ctx) - 1: len(ctx) - 1 + len(cont)]
            scores.append(Score(float(row.gather(-1, target[:, None]).sum()), len(cont),
                                bool((row.argmax(-1) == target).all())))
        return scores


class ConstantAnswerer:
    """The constant-answer baseline: the same text for every generation (a task's most common reference answer),
    and every token equally likely (so that multiple choice takes the first option)."""

    def __init__(self, text: str = "", vocab_size: int = 1, tokenizer=None):
        self.text, self.vocab_size, self.tokenizer = text, vocab_size, tokenizer

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        return [self.text for _ in requests]

    def loglikelihood(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        def tokens(r: ScoreRequest) -> int:
            return len(self.tokenizer.encode(r.continuation)) + r.end if self.tokenizer else len(r.continuation.split())

        return [Score(-tokens(r) * math.log(self.vocab_size), tokens(r), False) for r in requests]


def _batches(items: Sequence, size: int):
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --- tasks ------------------------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    name: str
    type: str
    scores: dict[str, float]
    items: int
    missing_images: list[str]
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"type": self.type, **self.scores, "items": self.items, "missing_images": len(self.missing_images)}


def gold_answer(task: Task, item: Item) -> str:
    f = item.fields
    if task.type == "caption":
        return f["references"][0]
    if task.type == "vqa":
        return f["answers"][0]
    if task.type == "multiple_choice":
        return metrics.option_letters(len(f["options"]))[f["answer"]]
    return f["text"]


def constant_baseline(task_items: TaskItems, vocab_size: int, tokenizer=None) -> ConstantAnswerer:
    """The baseline that answers every item of the task with its most common gold answer."""
    golds = [gold_answer(task_items.task, item) for item in task_items.items]
    return ConstantAnswerer(metrics.majority(golds), vocab_size, tokenizer)


def run_task(answerer: Answerer, task_items: TaskItems) -> TaskResult:
    """Every item of the task answered and scored by the task type's metric."""
    task, items = task_items.task, task_items.items
    where = f"task {task.name}"
    if task.type == "perplexity" or (task.type == "multiple_choice" and task.mode == "loglikelihood"):
        scores, predictions = _scored(answerer, task, items, where)
    else:
        requests = [GenerateRequest(render(task.prompt, i, where), i.image, render(task.answer_prefix, i, where),
                                    task.max_new_tokens, task.until) for i in items]
        scores, predictions = _generated(task, items, answerer.generate(requests))
    return TaskResult(task.name, task.type, scores, len(items), task_items.missing_images, predictions)


def run_tasks(answerer: ModelAnswerer, tasks: Sequence[TaskItems]):
    """run_task on each task in turn, yielding its result. Under FSDP the root's own parameters are gathered before
    each task: generation calls the model's submodules, which do not gather them (its blocks gather their own)."""
    from torch.distributed.fsdp import FSDPModule

    for task_items in tasks:
        log.info("evaluating %s (%d items)", task_items.task.name, len(task_items.items))
        if isinstance(answerer.model, FSDPModule):
            answerer.model.unshard()
        yield run_task(answerer, task_items)


def _generated(task: Task, items: list[Item], answers: list[str]) -> tuple[dict, list[dict]]:
    predictions = [{"id": i.id, "prediction": a} for i, a in zip(items, answers)]
    if task.type == "caption":
        scores = metrics.caption_scores({i.id: a for i, a in zip(items, answers)},
                                        {i.id: i.fields["references"] for i in items})
        return scores, predictions
    if task.type == "vqa":
        per_item = [metrics.vqa_accuracy(a, i.fields["answers"]) for i, a in zip(items, answers)]
        for p, s in zip(predictions, per_item):
            p["accuracy"] = s
        return {"vqa_accuracy": _mean(per_item)}, predictions
    choices = [metrics.extract_choice(a, i.fields["options"]) for i, a in zip(items, answers)]
    for p, c, i in zip(predictions, choices, items):
        p["choice"], p["correct"] = c, c == i.fields["answer"]
    return {"accuracy": _mean([p["correct"] for p in predictions]),
            "unparsed": sum(c is None for c in choices)}, predictions


def _scored(answerer: Answerer, task: Task, items: list[Item], where: str) -> tuple[dict, list[dict]]:
    def request(item: Item, continuation: str) -> ScoreRequest:
        return ScoreRequest(render(task.prompt, item, where), continuation, item.image,
                            render(task.answer_prefix, item, where), task.score_end)

    if task.type == "perplexity":
        scores = answerer.loglikelihood([request(i, i.fields["text"]) for i in items])
        total, tokens = sum(s.logprob for s in scores), sum(s.tokens for s in scores)
        predictions = [{"id": i.id, "logprob": s.logprob, "tokens": s.tokens} for i, s in zip(items, scores)]
        return {"perplexity": metrics.perplexity(total, tokens)}, predictions
    flat = [request(i, option) for i in items for option in i.fields["options"]]
    scores = iter(answerer.loglikelihood(flat))
    predictions = []
    for item in items:
        logprobs = [next(scores).logprob for _ in item.fields["options"]]
        choice = max(range(len(logprobs)), key=logprobs.__getitem__)  # the first of equal ones
        predictions.append({"id": item.id, "choice": choice, "correct": choice == item.fields["answer"],
                            "logprobs": logprobs})
    return {"accuracy": _mean([p["correct"] for p in predictions])}, predictions


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
