"""Instruction and preference data from the synthetic shape scenes, deterministic from a seed.

A scene is a list of objects (shape, colour, position name): one object at a SINGLE_POSITIONS place, or two
left/right or top/bottom. Questions are asked only where they have one right answer (no "what colour is the
circle?" with two circles).
"""

from __future__ import annotations

import random
from typing import Iterator

from PIL import Image

from mmfm.data.chat import ChatTemplate
from mmfm.data.synth import COLOURS, SHAPES, SINGLE_POSITIONS, render_scene

Obj = tuple[str, str, str]  # (shape, colour, position name)
PAIR_LAYOUTS = ((("on the left", 0.25, 0.5), ("on the right", 0.75, 0.5)),
                (("at the top", 0.5, 0.25), ("at the bottom", 0.5, 0.75)))
COUNT_WORDS = ("one", "two", "three")
COUNT_QUESTION = "how many shapes are there?"


def scene_objects(rng: random.Random, pair_fraction: float = 0.5) -> list[tuple[Obj, float, float]]:
    """A random scene: ((shape, colour, where), x, y) per object, positions wobbled as synth's."""
    def wobble(v):
        return v + rng.uniform(-0.06, 0.06)

    def pick():
        return rng.choice(SHAPES), rng.choice(list(COLOURS))

    if rng.random() >= pair_fraction:
        (shape, colour), where = pick(), rng.choice(list(SINGLE_POSITIONS))
        x, y = SINGLE_POSITIONS[where]
        return [((shape, colour, where), wobble(x), wobble(y))]
    layout = rng.choice(PAIR_LAYOUTS)
    return [((*pick(), where), wobble(x), wobble(y)) for where, x, y in layout]


def render_objects(placed: list[tuple[Obj, float, float]], size: int, rng: random.Random) -> Image.Image:
    return render_scene([(shape, colour, x, y) for (shape, colour, _), x, y in placed], size, rng)


def scene_questions(objects: list[Obj]) -> list[tuple[str, str]]:
    """Every unambiguous (question, answer) about the scene."""
    shapes = [s for s, _, _ in objects]
    pairs = [(s, c) for s, c, _ in objects]
    qa = [(COUNT_QUESTION, f"{COUNT_WORDS[len(objects) - 1]}.")]
    for shape, colour, where in objects:
        if shapes.count(shape) == 1:
            qa.append((f"what colour is the {shape}?", f"{colour}."))
        if pairs.count((shape, colour)) == 1:
            qa.append((f"where is the {colour} {shape}?", f"{where}."))
        qa.append((f"what shape is {where}?", f"a {shape}."))  # positions are distinct within a scene
    return qa


def question_kind(question: str) -> str:
    for prefix, kind in (("what colour", "colour"), ("how many", "count"), ("where is", "position"),
                         ("what shape", "shape")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a scene question: {question!r}")


def answer_options(kind: str) -> list[str]:
    """Every answer of that kind, in a fixed order."""
    return {"colour": [f"{c}." for c in COLOURS], "count": [f"{w}." for w in COUNT_WORDS],
            "position": [f"{p}." for p in SINGLE_POSITIONS], "shape": [f"a {s}." for s in SHAPES]}[kind]


def wrong_answer(question: str, answer: str, objects: list[Obj], rng: random.Random) -> str:
    """A wrong answer of the same kind. Prefers a distractor from the scene (the other object's colour,
    position or shape) when it is wrong for this question; otherwise any other answer of that kind."""
    kind = question_kind(question)
    scene = {"colour": [f"{c}." for _, c, _ in objects], "position": [f"{p}." for _, _, p in objects],
             "shape": [f"a {s}." for s, _, _ in objects], "count": []}[kind]
    in_scene = sorted({a for a in scene if a != answer})
    if in_scene and rng.random() < 0.5:
        return rng.choice(in_scene)
    return rng.choice([a for a in answer_options(kind) if a != answer])


def _scenes(split: str, count: int, seed: int, size: int, pair_fraction: float, salt: str):
    rng = random.Random(f"{seed}-{split}-{salt}")
    for i in range(count):
        placed = scene_objects(rng, pair_fraction)
        objects = [obj for obj, _, _ in placed]
        yield f"{split}-{salt}-{i:07d}", render_objects(placed, size, rng), objects, rng


def generate_instruct_samples(split: str, count: int, seed: int, size: int, pair_fraction: float = 0.5,
                              second_turn_fraction: float = 0.5) -> Iterator[dict]:
    """LLaVA-style records {"id", "image", "objects", "conversations"}: an image question and its answer,
    sometimes followed by a text-only question about the same image."""
    for key, image, objects, rng in _scenes(split, count, seed, size, pair_fraction, "instruct"):
        qa = scene_questions(objects)
        rng.shuffle(qa)
        turns = qa[:2] if len(qa) > 1 and rng.random() < second_turn_fraction else qa[:1]
        conversations = []
        for n, (q, a) in enumerate(turns):
            conversations += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + q},
                              {"from": "gpt", "value": a}]
        yield {"id": key, "image": image, "objects": objects, "conversations": conversations}


def generate_preference_pairs(split: str, count: int, seed: int, size: int,
                              pair_fraction: float = 0.5) -> Iterator[dict]:
    """{"id", "image", "objects", "prompt": question, "chosen": right answer, "rejected": wrong answer}."""
    for key, image, objects, rng in _scenes(split, count, seed, size, pair_fraction, "preference"):
        question, answer = rng.choice(scene_questions(objects))
        yield {"id": key, "image": image, "objects": objects, "prompt": question, "chosen": answer,
               "rejected": wrong_answer(question, answer, objects, rng)}


def all_instruct_texts(template: ChatTemplate) -> list[str]:
    """Every question, answer and template string these generators can emit: tokenizer training text."""
    texts = [template.system, template.user, template.assistant, template.turn_end, COUNT_QUESTION]
    for kind in ("colour", "count", "position", "shape"):
        texts += answer_options(kind)
    for shape in SHAPES:
        texts.append(f"what colour is the {shape}?")
        texts += [f"where is the {colour} {shape}?" for colour in COLOURS]
    texts += [f"what shape is {where}?" for where in SINGLE_POSITIONS]
    return texts + ["\n" + t for t in texts if t.endswith("?")]
