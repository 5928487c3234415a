"""An lm-evaluation-harness model for mmfm checkpoints: `mmfm` answers lm-eval's three requests (loglikelihood,
loglikelihood_rolling, generate_until) with a run's checkpoint or a Hugging Face LLaVA folder, on text.

lm-eval finds models in its own registry only (it has no plugin entry point), so this module registers `mmfm` and
then runs lm-eval's command line with the same arguments:

    python -m mmfm.eval.harness run --model mmfm --model_args checkpoint=runs/demo --tasks TASK ...

From Python: `lm_eval.simple_evaluate(model=MmfmLM("runs/demo"), tasks=[...])`. Texts are the model's plain text:
beginning-of-text, then the tokens; no chat template (lm-eval's --apply_chat_template is not supported).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mmfm.eval.runner import ModelAnswerer, cut


@register_model("mmfm")
class MmfmLM(LM):
    def __init__(self, checkpoint: str, batch_size: int | str = 16, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None, answerer: Optional[ModelAnswerer] = None, **_):
        """checkpoint: a run directory (its latest checkpoint), a step_* folder or a Hugging Face LLaVA folder."""
        super().__init__()
        from mmfm.eval.report import load_answerer, model_source

        size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" (lm-eval's) -> 16
        if answerer is None:
            path, step = model_source(Path(checkpoint))
            answerer = load_answerer(path, step, size, device or "auto")
        self.answerer = answerer
        self.tokenizer = answerer.tokenizer
        self.max_length = answerer.model.cfg.language.max_seq_len

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens; a space that ends the context moves to the continuation (as lm-eval's
        Hugging Face model does), so that it is tokenized with the word after it."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.context_ids(context), self.text_ids(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self.split(*r.args) for r in requests]
        scores = []
        for start in range(0, len(rows), self.answerer.batch_size):
            scores += self.answerer.score_rows(rows[start: start + self.answerer.batch_size], None)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, scored in disjoint windows of the model's length."""
        prefix = self.tokenizer.bos()[0] if self.tokenizer.bos() else self.tokenizer.eos_id
        out = []
        for request in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.text_ids(request.args[0]), prefix, self.max_length, 1)]
            out.append(sum(s.logprob for s in self.answerer.score_rows(windows, None)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mmfm.models.generate import generate

        out, size = [], self.answerer.batch_size
        for start in range(0, len(requests), size):
            batch = [r.args for r in requests[start: start + size]]
            limits = [int(kwargs.get("max_gen_toks", 32)) for _, kwargs in batch]
            tokens = generate(self.answerer.model, [self.context_ids(context) for context, _ in batch], None,
                              max(limits), self.tokenizer.eos_id, self.tokenizer.pad_id)
            for (_, kwargs), limit, written in zip(batch, limits, tokens):
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(cut(self.tokenizer.decode(written[:limit]), until))
        return out

    def context_ids(self, context: str) -> list[int]:
        """Beginning-of-text and the context's tokens (end-of-text alone for an empty context without a BOS)."""
        return self.tokenizer.bos() + self.text_ids(context) or [self.tokenizer.eos_id]


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
