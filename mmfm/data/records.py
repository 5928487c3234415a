"""What flows through offline data construction (`mmfm data build`): sources yield Records, or Dropped
for input they cannot use; each stage maps a Record to a Record (possibly changed) or a Dropped. Nothing
is lost silently: every Dropped is counted by stage and reason in the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Record:
    key: str  # unique within its source
    source: str  # the recipe's name for the source
    text: str = ""  # caption, or a text-only document
    images: list[bytes] = field(default_factory=list)  # encoded image files, in order
    conversations: Optional[list[dict]] = None  # LLaVA turns: {"from": "human"|"gpt", "value": ...}
    license: str = ""
    meta: dict = field(default_factory=dict)
    group: str = ""  # records of one group go to the same split (a robot episode's frames); default: the key


@dataclass
class Dropped:
    key: str
    source: str
    stage: str  # "read", "decode", a filter's name, "dedup", "pii", ...
    reason: str  # short, countable: "corrupt_image", "invalid_json", "empty_caption", ...
    detail: str = ""  # for the log, not counted


Outcome = Union[Record, Dropped]
