"""The synthetic benchmark suite: captioning, VQA, multiple-choice and perplexity tasks about freshly rendered shape
scenes and held-out handwritten digits (mmfm.data.synth), deterministic from a fixed seed, written as ordinary task
files (mmfm.eval.tasks) the first time a `synth/...` task is asked for.

    synth/caption      caption every scene; references in each caption style the data sets use (mmfm.data.synth:
                       a two-object scene's ordered, shuffled and one-place captions)
    synth/vqa          the instruction data's questions (mmfm data instruct), for chat models
    synth/vqa_cloze    colours, shapes and digits asked of a captioner: the caption's start as answer prefix, its
                       next word the answer ("describe the image." + "a" -> "red", + "a red" -> "circle")
    synth/mc           four captions, one true and three that change its colour, shape or place (or digit),
                       scored by log-likelihood
    synth/perplexity   the true caption's perplexity given the image

Scenes of one object and digits make up the cloze, multiple-choice and perplexity tasks, whose answers do not
depend on how a data set words two-object captions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import yaml

from mmfm.data.synth import COLOURS, DIGIT_WORDS, SHAPES, SINGLE_POSITIONS, digit_image, load_digits_split
from mmfm.data.synth_instruct import render_objects, scene_objects, scene_questions

SUITE_VERSION = 1
SUITE_SEED = 12345  # apart from the data sets' seeds
ITEMS = 200
IMAGE_SIZE = 64
CAPTION_PROMPT = "describe the image."
SUITE_TASKS = ("caption", "vqa", "vqa_cloze", "mc", "perplexity")
# what `mmfm eval` runs without tasks=: a captioner (stage.objective pretrain) is asked in its own words, a chat
# model the instruction data's questions
DEFAULT_TASKS = {"pretrain": ["synth/caption", "synth/vqa_cloze", "synth/mc", "synth/perplexity"],
                 "chat": ["synth/vqa", "synth/mc", "synth/perplexity"]}
TASK_FILES = {
    "caption": {"type": "caption", "prompt": CAPTION_PROMPT, "max_new_tokens": 24},
    "vqa": {"type": "vqa", "prompt": "{question}", "max_new_tokens": 16},
    "vqa_cloze": {"type": "vqa", "prompt": CAPTION_PROMPT, "answer_prefix": "{lead}", "until": [" ", "."],
                  "max_new_tokens": 8},
    "mc": {"type": "multiple_choice", "prompt": CAPTION_PROMPT, "mode": "loglikelihood"},
    "perplexity": {"type": "perplexity", "prompt": CAPTION_PROMPT},
}


def suite_root() -> Path:
    """Where the suite is written: $MMFM_CACHE/eval/synth-v<version> (default ~/.cache/mmfm)."""
    cache = Path(os.environ.get("MMFM_CACHE") or Path.home() / ".cache" / "mmfm")
    return cache / "eval" / f"synth-v{SUITE_VERSION}"


def ensure_suite(root: Path | None = None) -> Path:
    """The suite's folder, written first if absent (into a temporary folder renamed into place, so that a stopped
    write leaves nothing half-made)."""
    root = root or suite_root()
    if (root / "suite.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=root.parent))
    try:
        write_suite(tmp)
        try:
            tmp.rename(root)
        except OSError:  # another process wrote it first
            if not (root / "suite.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_suite(out: Path) -> None:
    rng = random.Random(f"mmfm-eval-{SUITE_SEED}")
    _, (digit_pixels, digit_labels) = load_digits_split(0)  # the held-out digits of the data sets' default seed
    builders = {"caption": _caption_item, "vqa": _vqa_item, "vqa_cloze": _cloze_item, "mc": _mc_item,
                "perplexity": _perplexity_item}
    for name in SUITE_TASKS:
        folder = out / name
        (folder / "images").mkdir(parents=True)
        with (folder / "items.jsonl").open("w") as f:
            for i in range(ITEMS):
                key = f"{name}-{i:04d}"
                image, item = _scene_or_digit(rng, name, digit_pixels, digit_labels, builders[name])
                image.save(folder / "images" / f"{key}.png")
                f.write(json.dumps({"id": key, "image": f"{key}.png", **item}) + "\n")
        (folder / "task.yaml").write_text(yaml.safe_dump({"name": f"synth/{name}", **TASK_FILES[name]},
                                                         sort_keys=False))
    (out / "suite.json").write_text(json.dumps({"version": SUITE_VERSION, "seed": SUITE_SEED, "items": ITEMS,
                                                "tasks": list(SUITE_TASKS)}, indent=2))


def _scene_or_digit(rng, name, digit_pixels, digit_labels, build):
    """A digit one time in five (not for the VQA task: the instruction data asks nothing about digits), else a scene
    (of one or two objects for the caption and VQA tasks, one else)."""
    if name != "vqa" and rng.random() < 0.2:
        j = rng.randrange(len(digit_labels))
        return digit_image(digit_pixels[j], IMAGE_SIZE, rng, augment=False), build(rng, digit=DIGIT_WORDS[digit_labels[j]])
    pairs = 0.45 if name in ("caption", "vqa") else 0.0
    placed = scene_objects(rng, pairs)
    return render_objects(placed, IMAGE_SIZE, rng), build(rng, objects=[obj for obj, _, _ in placed])


def _digit_caption(digit: str) -> str:
    return f"the handwritten digit {digit}."


def _single_caption(shape: str, colour: str, where: str) -> str:
    return f"a {colour} {shape} {where}."


def _caption_item(rng, digit=None, objects=None) -> dict:
    if digit:
        return {"references": [_digit_caption(digit)]}
    if len(objects) == 1:
        return {"references": [_single_caption(*objects[0])]}
    (s1, c1, w1), (s2, c2, w2) = objects
    ordered = f"a {c1} {s1} {w1} and a {c2} {s2} {w2}."
    first, second = f"{w1} is a {c1} {s1}", f"{w2} is a {c2} {s2}"
    return {"references": [ordered, f"{first} and {second}.", f"{second} and {first}.", f"{first}.", f"{second}."]}


def _vqa_item(rng, objects=None) -> dict:
    question, answer = rng.choice(scene_questions(objects))
    said = answer.rstrip(".")
    bare = said.split()[-1] if said.startswith("there") else said.split("it is ")[-1].removeprefix("a ")
    return {"question": question, "answers": [answer, bare]}


def _cloze_item(rng, digit=None, objects=None) -> dict:
    if digit:
        return {"lead": "the handwritten digit", "answers": [digit], "question": "which digit?"}
    (shape, colour, _), = objects
    lead, answer, question = rng.choice([("a", colour, "what colour?"), (f"a {colour}", shape, "what shape?")])
    return {"lead": lead, "answers": [answer], "question": question}


def _mc_item(rng, digit=None, objects=None) -> dict:
    if digit:
        wrong = rng.sample([d for d in DIGIT_WORDS if d != digit], 3)
        options = [_digit_caption(d) for d in [digit, *wrong]]
    else:
        (shape, colour, where), = objects
        options = [_single_caption(shape, colour, where),
                   _single_caption(shape, rng.choice([c for c in COLOURS if c != colour]), where),
                   _single_caption(rng.choice([s for s in SHAPES if s != shape]), colour, where),
                   _single_caption(shape, colour, rng.choice([w for w in SINGLE_POSITIONS if w != where]))]
    order = list(range(4))
    rng.shuffle(order)
    return {"question": CAPTION_PROMPT, "options": [options[i] for i in order], "answer": order.index(0)}


def _perplexity_item(rng, digit=None, objects=None) -> dict:
    return {"text": _digit_caption(digit) if digit else _single_caption(*objects[0])}
