"""Evaluation tasks as files: a YAML naming the type, prompt and generation settings, a JSONL of items, and an image
folder (docs/evaluation.md, "Task files"). A task file is data: its templates only substitute item fields, its
image paths stay inside its image folder, and nothing in it runs.

    name: my_vqa                 # default: the YAML's file name
    type: vqa                    # caption | vqa | multiple_choice | perplexity
    data: items.jsonl            # beside the YAML
    images: images               # the folder item "image" paths are relative to
    prompt: "{question}"         # the text after the image ({field} takes the item's field; {options} lists the
                                 # options "A. ...\\nB. ..." of a multiple-choice item)
    answer_prefix: ""            # text the answer starts with, which the model continues (a cloze question)
    until: []                    # stop strings: the answer is cut before the first one
    max_new_tokens: 32
    mode: loglikelihood          # multiple_choice: loglikelihood (score each option) | generate (extract a letter)
    score_end: true              # loglikelihood and perplexity: the answer's end-of-text token is scored too

Items by type: caption {id, image, references: [..]}; vqa {id, image, question, answers: [..]}; multiple_choice
{id, image, question, options: [..], answer: index or letter}; perplexity {id, text, image}. The image is optional
but for captions: a text item's prompt follows the beginning-of-text token (a chat model: its user turn).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

from mmfm.errors import MmfmError
from mmfm.eval.metrics import LETTERS, render_options

TASK_TYPES = ("caption", "vqa", "multiple_choice", "perplexity")
MC_MODES = ("loglikelihood", "generate")
TASK_FILE = "task.yaml"
REQUIRED_FIELDS = {"caption": ("image", "references"), "vqa": ("question", "answers"),
                   "multiple_choice": ("options", "answer"), "perplexity": ("text",)}
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TaskError(MmfmError):
    """A task file that cannot be read: the message names the file and the fix."""


@dataclass
class Task:
    name: str
    type: str
    folder: Path
    data: str = "items.jsonl"
    images: str = "images"
    prompt: str = ""
    answer_prefix: str = ""
    until: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    mode: str = "loglikelihood"
    score_end: bool = True


@dataclass
class Item:
    id: str
    fields: dict
    image: Optional[Path] = None  # resolved inside the task's image folder


@dataclass
class TaskItems:
    task: Task
    items: list[Item]
    missing_images: list[str]  # ids of items whose image file is absent (left out, counted)


OPTIONAL_KEYS = {f.name for f in fields(Task)} - {"folder"}


def load_task(path: Path) -> Task:
    """The task of a YAML file (or of a folder's task.yaml), its keys and types checked."""
    path = Path(path)
    if path.is_dir():
        path = path / TASK_FILE
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TaskError(f"task file {path} is not valid YAML ({type(exc).__name__}); fix or regenerate it") from None
    if not isinstance(raw, dict):
        raise TaskError(f"task file {path} must hold a mapping of keys (name, type, data, prompt, ...)")
    unknown = sorted(set(raw) - OPTIONAL_KEYS)
    if unknown:
        raise TaskError(f"task file {path}: unknown key(s) {unknown}; known: {sorted(OPTIONAL_KEYS)}")
    raw.setdefault("name", path.stem if path.name != TASK_FILE else path.parent.name)
    task = Task(folder=path.parent, **raw)
    _check_task(task, path)
    return task


def _check_task(task: Task, path: Path) -> None:
    if task.type not in TASK_TYPES:
        raise TaskError(f"task file {path}: type={task.type!r} is unknown; use one of {TASK_TYPES}")
    for name in ("name", "data", "images", "prompt", "answer_prefix"):
        if not isinstance(getattr(task, name), str):
            raise TaskError(f"task file {path}: {name} must be a string")
    if not (isinstance(task.until, list) and all(isinstance(s, str) and s for s in task.until)):
        raise TaskError(f"task file {path}: until must be a list of non-empty strings")
    if not isinstance(task.max_new_tokens, int) or isinstance(task.max_new_tokens, bool) or task.max_new_tokens < 1:
        raise TaskError(f"task file {path}: max_new_tokens={task.max_new_tokens!r} must be an integer >= 1")
    if not isinstance(task.score_end, bool):
        raise TaskError(f"task file {path}: score_end must be true or false")
    if task.mode not in MC_MODES:
        raise TaskError(f"task file {path}: mode={task.mode!r} is unknown; use one of {MC_MODES}")
    for name in ("data", "images"):
        inside(task.folder, getattr(task, name), f"task file {path}: {name}")


def inside(folder: Path, relative: str, what: str) -> Path:
    """folder / relative, refused when the path is absolute or leaves the folder."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise TaskError(f"{what}={relative!r} must be a relative path inside {folder}")
    return folder / candidate


def render(template: str, item: Item, where: str) -> str:
    """The template with each {field} replaced by the item's field ({options}: the lettered option list)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "options" and isinstance(item.fields.get("options"), list):
            return render_options(item.fields["options"])
        if name not in item.fields:
            raise TaskError(f"{where}: item {item.id!r} has no field {name!r} that the template names")
        return str(item.fields[name])

    return _FIELD.sub(value, template)


def load_items(task: Task, limit: int = 0) -> TaskItems:
    """The task's items (the first `limit` when > 0), checked for their type's fields; items whose image file is
    missing are left out and listed."""
    data = inside(task.folder, task.data, f"task {task.name}: data")
    if not data.is_file():
        raise TaskError(f"task {task.name}: its data file {data} does not exist")
    image_root = inside(task.folder, task.images, f"task {task.name}: images")
    items, missing = [], []
    with data.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit and len(items) + len(missing) >= limit:
                break
            where = f"{data}:{number}"
            item = _parse_item(line, where, task)
            image = item.fields.get("image")
            if image is not None:
                item.image = inside(image_root, image, f"{where}: image")
                if not item.image.is_file():
                    missing.append(item.id)
                    continue
            items.append(item)
    if not items and not missing:
        raise TaskError(f"task {task.name}: {data} holds no items")
    return TaskItems(task, items, missing)


def _parse_item(line: str, where: str, task: Task) -> Item:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{where}: not a JSON object ({exc.msg}); each line must be one item") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: each line must be a JSON object")
    lacking = [name for name in REQUIRED_FIELDS[task.type] if name not in raw]
    if lacking:
        raise TaskError(f"{where}: a {task.type} item needs the field(s) {lacking}")
    item = Item(str(raw.get("id", where.rsplit(":", 1)[1])), raw)
    _check_item(item, where, task.type)
    return item


def _check_item(item: Item, where: str, kind: str) -> None:
    f = item.fields

    def strings(name: str) -> bool:
        return isinstance(f[name], list) and bool(f[name]) and all(isinstance(s, str) for s in f[name])

    if "image" in f and not isinstance(f["image"], str):
        raise TaskError(f"{where}: image must be a path string")
    if kind == "caption" and not strings("references"):
        raise TaskError(f"{where}: references must be a non-empty list of strings")
    if kind == "vqa" and not strings("answers"):
        raise TaskError(f"{where}: answers must be a non-empty list of strings")
    if kind == "perplexity" and not (isinstance(f["text"], str) and f["text"].strip()):
        raise TaskError(f"{where}: text must be a non-empty string")
    if kind == "multiple_choice":
        if not strings("options") or len(f["options"]) > len(LETTERS):
            raise TaskError(f"{where}: options must be a list of 1 to {len(LETTERS)} strings")
        f["answer"] = answer_index(f["answer"], len(f["options"]), where)


def answer_index(answer, count: int, where: str) -> int:
    """A multiple-choice item's answer as an option index (given as an index or a letter)."""
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[:count]:
        return LETTERS.index(answer.upper())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < count:
        return answer
    raise TaskError(f"{where}: answer={answer!r} must be an option index in [0, {count}) or its letter")


def resolve_task(name: str) -> Task:
    """A task by name: `synth/<task>` (the synthetic suite, written on first use), a task YAML file, or a folder
    holding task.yaml."""
    from mmfm.eval import synth_suite

    if name.startswith("synth/"):
        short = name.removeprefix("synth/")
        if short not in synth_suite.SUITE_TASKS:
            raise TaskError(f"unknown task {name!r}; the synthetic suite has "
                            f"{', '.join('synth/' + t for t in synth_suite.SUITE_TASKS)}")
        return load_task(synth_suite.ensure_suite() / short)
    path = Path(name)
    if path.is_file() or (path / TASK_FILE).is_file():
        return load_task(path)
    raise TaskError(f"unknown task {name!r}: give a task YAML file, a folder holding {TASK_FILE}, or one of "
                    f"{', '.join('synth/' + t for t in synth_suite.SUITE_TASKS)}")
