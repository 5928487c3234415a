"""A pretrained tokenizer's chat template (Jinja, from tokenizer_config.json or chat_template.jinja) applied to
LLaVA-format conversations, split into the pieces that carry loss and those that do not.

The template comes from a download, so it runs in Jinja's immutable sandbox (no attribute access to Python
internals, no mutation of the inputs), with only the variables transformers documents for templates. It is
rendered once per prefix of the conversation: the text an assistant turn adds after the generation prompt is
the answer (loss), everything else is prompt (no loss). A template that rewrites earlier turns when later ones
follow (so a prefix is not a prefix of the whole) is refused: its loss mask would be guesswork.
"""

from __future__ import annotations

from functools import lru_cache

from mmfm.errors import MmfmError

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # LLaVA "from" -> chat template role


class ChatTemplateError(MmfmError):
    pass


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled in the immutable sandbox, as transformers renders templates (trim_blocks,
    lstrip_blocks, the loop-controls extension, the tojson filter, raise_exception)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    import json

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the tokenizer's chat template does not compile ({exc}); fix or replace "
                                "chat_template.jinja / tokenizer_config.json's chat_template") from None


def to_messages(turns: list[dict]) -> list[dict]:
    """LLaVA turns {"from", "value"} -> chat messages {"role", "content"} (ValueError on an unknown role)."""
    messages = []
    for turn in turns:
        role = turn.get("from")
        if role not in ROLES:
            raise ValueError(f"unknown turn role {role!r}; expected one of {sorted(ROLES)}")
        messages.append({"role": ROLES[role], "content": str(turn.get("value", ""))})
    return messages


def render(source: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    from jinja2 import TemplateError

    try:
        return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               tools=None, documents=None, **special_tokens)
    except ChatTemplateError as exc:
        raise ValueError(str(exc)) from None
    except TemplateError as exc:
        raise ValueError(f"the chat template failed on this conversation ({type(exc).__name__}: {exc})") from None


def template_segments(source: str, turns: list[dict], special_tokens: dict) -> tuple[list[tuple[str, bool]], int]:
    """The rendered conversation as (text, carries_loss) pieces, and the index of the piece where the last
    assistant answer starts (generation is prompted up to it). ValueError: unknown role, or a template that
    is not prefix-stable."""
    messages = to_messages(turns)
    pieces, done, answer_start = [], "", 0
    for k, message in enumerate(messages, 1):
        if message["role"] == "assistant":
            prompt = render(source, messages[:k - 1], True, special_tokens)
            _require_prefix(done, prompt, k)
            pieces.append((prompt[len(done):], False))
            done = prompt
            answer_start = len(pieces)
        whole = render(source, messages[:k], False, special_tokens)
        _require_prefix(done, whole, k)
        pieces.append((whole[len(done):], message["role"] == "assistant"))
        done = whole
    return pieces, answer_start


def _require_prefix(before: str, after: str, turn: int) -> None:
    if not after.startswith(before):
        raise ValueError(f"the chat template renders turns 1..{turn - 1} differently once turn {turn} follows, so "
                         "the answers cannot be told from the prompt; set data.chat.template=markers or use a "
                         "template that only appends")
