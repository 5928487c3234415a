"""An lmms-eval model for mmfm checkpoints: `lmms-eval --model mmfm --model_args checkpoint=RUN --tasks ...` scores a
run's checkpoint (or a Hugging Face LLaVA folder) on any lmms-eval image task. mmfm declares it through lmms-eval's
entry-point group `lmms_eval.models` (pyproject.toml), so an installed mmfm is found without a plugin variable.

A request's context is the prompt after its images, as `mmfm eval` places a task's prompt (mmfm.eval.runner): a
captioner reads image, then context; a chat model gets both as its user turn. Images are the task's visuals (PIL),
read by the model's own image processor. Video and audio requests, and multi-round generation, are refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from mmfm.errors import MmfmError
from mmfm.eval.runner import ModelAnswerer, cut

MANIFEST = ModelManifest(model_id="mmfm", simple_class_path="mmfm.eval.lmms.MmfmLMMS")


class MmfmLMMS(lmms):
    def __init__(self, checkpoint: str, batch_size: int | str = 16, device: Optional[str] = None,
                 answerer: Optional[ModelAnswerer] = None, **_):
        """checkpoint: a run directory (its latest checkpoint), a step_* folder or a Hugging Face LLaVA folder."""
        super().__init__()
        from mmfm.eval.report import load_answerer, model_source

        size = int(batch_size) if str(batch_size).isdigit() else 16
        if answerer is None:
            path, step = model_source(Path(checkpoint))
            answerer = load_answerer(path, step, size, device or "auto")
        self.answerer = answerer

    def visuals(self, doc_to_visual, doc_id, task, split) -> list[torch.Tensor]:
        """The request's images through the model's processor; anything but images is refused."""
        from mmfm.data.loader import load_image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = []
        for visual in visuals or []:
            if not hasattr(visual, "save"):
                raise MmfmError(f"lmms-eval task {task}: the mmfm model reads images only, not {type(visual).__name__}")
            buffer = io.BytesIO()
            visual.convert("RGB").save(buffer, format="PNG")
            images.append(load_image(buffer.getvalue(), self.answerer.encoder.processor))
        return images

    def loglikelihood(self, requests) -> list:
        """(negative log-likelihood, greedy) per request. lmms-eval's multiple-choice scoring takes the option of the
        smallest first value (its models return a loss): mmfm returns the continuation's summed negative
        log-probability, so that it picks the option `mmfm eval` picks. Each pair is wrapped in lmms-eval's
        GenerationResult: its evaluator (0.7.3) turns any other non-text answer into its str()."""
        from lmms_eval.api.instance import GenerationResult

        out = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self.visuals(doc_to_visual, doc_id, task, split)
            a = self.answerer
            row = (a.context(context, "", len(images)), a.tokenizer.encode(continuation))
            pixels = torch.stack(images).to(a.device) if images else None
            score = a.score_rows([row], pixels)[0]
            out.append(GenerationResult((-score.logprob, score.greedy)))
        return out

    def generate_until(self, requests) -> list[str]:
        from mmfm.models.generate import generate

        a, out = self.answerer, []
        for context, kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            images = self.visuals(doc_to_visual, doc_id, task, split)
            pixels = torch.stack(images).to(a.device) if images else None
            limit = int(kwargs.get("max_new_tokens", kwargs.get("max_gen_toks", 32)))
            written = generate(a.model, [a.context(context, "", len(images))], pixels, limit, a.tokenizer.eos_id,
                               a.tokenizer.pad_id)[0]
            until = kwargs.get("until") or []
            out.append(cut(a.tokenizer.decode(written), [until] if isinstance(until, str) else list(until)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise MmfmError("the mmfm lmms-eval model answers single-round tasks only")
