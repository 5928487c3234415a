"""Instruction and preference data from the synthetic shape scenes, deterministic from a seed.

A scene is a list of objects (shape, colour, position name): one object at a SINGLE_POSITIONS place, or two
left/right or top/bottom. Questions about a two-object scene name the place they ask about ("what colour is the
shape on the left?"): finding an object by its content ("what colour is the circle?" beside a square) is a skill
the CPU-sized models do not learn within minutes (measured near chance; docs/alignment.md), so it is asked of
one-object scenes only.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from mmfm.data.chat import ChatTemplate
from mmfm.data.synth import COLOURS, SHAPES, SINGLE_POSITIONS, render_scene

Obj = tuple[str, str, str]  # (shape, colour, position name)
PAIR_LAYOUTS = ((("on the left", 0.25, 0.5), ("on the right", 0.75, 0.5)),
                (("at the top", 0.5, 0.25), ("at the bottom", 0.5, 0.75)))
COUNT_WORDS = ("one", "two", "three")
COUNT_QUESTION = "how many shapes are there?"


# Answers name the colour, place or shape after a space, as the captions do ("it is red." like "a red ..."),
# so that a pretrained captioner's tokens for them carry over (a bare "red." is another token). An answer to a
# question that names a place starts with that place ("on the left it is red."), as the shuffled captions put
# the place right before the object ("on the left is a red circle"): the captioner's binding of a place to the
# object there then carries over, where an answer without it left two-object questions at 70-80% on some CPU
# float paths (docs/alignment.md).
def _at(where: str) -> str:
    return f"{where} " if where else ""


def colour_answer(colour: str, where: str = "") -> str:
    return f"{_at(where)}it is {colour}."


def position_answer(where: str) -> str:
    return f"it is {where}."


def shape_answer(shape: str, where: str = "") -> str:
    return f"{_at(where)}it is a {shape}."


def count_answer(n: int) -> str:
    return f"there {'is' if n == 1 else 'are'} {COUNT_WORDS[n - 1]}."


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
    """Every (question, answer) about the scene: count; of one object its colour, place and shape; of each of two
    objects the colour and shape at its place (places are distinct within a scene)."""
    qa = [(COUNT_QUESTION, count_answer(len(objects)))]
    if len(objects) == 1:
        (shape, colour, where), = objects
        return qa + [(f"what colour is the {shape}?", colour_answer(colour)),
                     (f"where is the {colour} {shape}?", position_answer(where)),
                     (f"what shape is {where}?", shape_answer(shape, where))]
    for shape, colour, where in objects:
        qa += [(f"what colour is the shape {where}?", colour_answer(colour, where)),
               (f"what shape is {where}?", shape_answer(shape, where))]
    return qa


def question_place(question: str) -> str:
    """The place a question asks about ("what shape is at the top?" -> "at the top"), "" when it names none."""
    return next((where for where in SINGLE_POSITIONS if question.endswith(f" {where}?")), "")


def question_kind(question: str) -> str:
    for prefix, kind in (("what colour", "colour"), ("how many", "count"), ("where is", "position"),
                         ("what shape", "shape")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a scene question: {question!r}")


def answer_options(kind: str, where: str = "") -> list[str]:
    """Every answer of that kind (to a question about `where`), in a fixed order."""
    return {"colour": [colour_answer(c, where) for c in COLOURS], "count": [count_answer(n) for n in (1, 2, 3)],
            "position": [position_answer(p) for p in SINGLE_POSITIONS],
            "shape": [shape_answer(s, where) for s in SHAPES]}[kind]


def wrong_answer(question: str, answer: str, objects: list[Obj], rng: random.Random) -> str:
    """A wrong answer of the same kind. Prefers a distractor from the scene (the other object's colour,
    position or shape) when it is wrong for this question; otherwise any other answer of that kind."""
    kind, where = question_kind(question), question_place(question)
    scene = {"colour": [colour_answer(c, where) for _, c, _ in objects],
             "position": [position_answer(p) for _, _, p in objects],
             "shape": [shape_answer(s, where) for s, _, _ in objects], "count": []}[kind]
    in_scene = sorted({a for a in scene if a != answer})
    if in_scene and rng.random() < 0.5:
        return rng.choice(in_scene)
    return rng.choice([a for a in answer_options(kind, where) if a != answer])


def _scenes(split: str, count: int, seed: int, size: int, pair_fraction: float, salt: str):
    rng = random.Random(f"{seed}-{split}-{salt}")
    for i in range(count):
        placed = scene_objects(rng, pair_fraction)
        objects = [obj for obj, _, _ in placed]
        yield f"{split}-{salt}-{i:07d}", render_objects(placed, size, rng), objects, rng


def generate_instruct_samples(split: str, count: int, seed: int, size: int, pair_fraction: float = 0.5,
                              max_turns: int = 3) -> Iterator[dict]:
    """LLaVA-style records {"id", "image", "objects", "conversations"}: an image question and its answer,
    followed by up to max_turns - 1 text-only questions about the same image (a uniform number of turns)."""
    for key, image, objects, rng in _scenes(split, count, seed, size, pair_fraction, "instruct"):
        qa = scene_questions(objects)
        rng.shuffle(qa)
        turns = qa[: rng.randint(1, min(max_turns, len(qa)))]
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
    for where in SINGLE_POSITIONS:
        texts += [f"what shape is {where}?", f"what colour is the shape {where}?"]
        texts += answer_options("colour", where) + answer_options("shape", where)
    return texts + ["\n" + t for t in texts if t.endswith("?")]


KINDS = ("sft", "preference")


def tokenizer_texts(prompt: str, pair_captions: str) -> list[str]:
    """The synthetic data sets' tokenizer training text: every caption, question, answer and template string
    (one tokenizer serves pretraining and the later stages, so their checkpoints fit each other)."""
    from mmfm.data.synth import all_caption_texts

    return all_caption_texts(prompt, pair_captions) + all_instruct_texts(ChatTemplate())


def _record(item: dict, kind: str) -> dict:
    buf = io.BytesIO()
    item["image"].save(buf, format="PNG", optimize=False)
    meta = {"objects": [list(o) for o in item["objects"]], "source": "synthetic-scenes"}
    if kind == "sft":
        meta["conversations"] = item["conversations"]
    else:
        meta.update(conversations=[{"from": "human", "value": "<image>\n" + item["prompt"]}],
                    chosen=item["chosen"], rejected=item["rejected"])
    return {"__key__": item["id"], "png": buf.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()}


def build_instruct_dataset(out: str | Path, kind: str = "sft", tokenizer: Optional[str | Path] = None, seed: int = 0,
                           train_size: int = 8000, val_size: int = 500, image_size: int = 64, shard_size: int = 2000,
                           max_turns: int = 3, pair_fraction: float = 0.5, force: bool = False,
                           progress: bool = True) -> dict:
    """Write train/val shards of LLaVA-format conversations (kind sft) or preference pairs (kind preference) about
    the synthetic scenes, the tokenizer and manifest.json (last, atomically) under `out`.

    tokenizer: the pretraining data set's tokenizer.json to copy (so that the stages share one vocabulary), or a
    pretrained model's tokenizer folder (mmfm.data.tokenizer.install_tokenizer); by
    default one is trained on the text of `mmfm data synth --instruct-text --pair-captions shuffled` (the same
    tokenizer at its default vocab_size and prompt). Reuses an identical build.
    """
    from tqdm import tqdm

    from mmfm import __version__
    from mmfm.data import manifest as mf
    from mmfm.data.tokenizer import install_tokenizer, tokenizer_digest, train_tokenizer

    if kind not in KINDS:
        raise mf.DataError(f"--kind {kind!r} is unknown; use one of {KINDS}")
    for name, value in (("train_size", train_size), ("val_size", val_size), ("image_size", image_size),
                        ("shard_size", shard_size)):
        if value <= 0:
            raise mf.DataError(f"{name}={value} must be > 0")
    out = Path(out)
    source_tok = Path(tokenizer) if tokenizer else None
    if source_tok is not None and not source_tok.exists():
        raise mf.DataError(f"--tokenizer {source_tok} does not exist; give a tokenizer.json or a Hugging Face "
                           "model folder")
    params = dict(kind=kind, seed=seed, train_size=train_size, val_size=val_size, image_size=image_size,
                  shard_size=shard_size, max_turns=max_turns, pair_fraction=pair_fraction,
                  tokenizer=tokenizer_digest(source_tok) if source_tok else "trained")
    existing = mf.existing_build(out, params, force)
    if existing is not None:
        return existing
    splits = {}
    for split, count in (("train", train_size), ("val", val_size)):
        items = (generate_instruct_samples(split, count, seed, image_size, pair_fraction, max_turns) if kind == "sft"
                 else generate_preference_pairs(split, count, seed, image_size, pair_fraction))
        items = tqdm(items, total=count, desc=f"rendering {kind} {split}",
                     disable=not progress)
        shards = mf.write_shards((_record(item, kind) for item in items), out, split, shard_size)
        splits[split] = {"samples": count, "shards": shards}
    if source_tok is None:
        train_tokenizer(tokenizer_texts("describe the image.", "shuffled"), 512).save(str(out / mf.TOKENIZER))
    tokenizer_entry = install_tokenizer(source_tok or out / mf.TOKENIZER, out)
    manifest = {
        "format": mf.FORMAT, "generator": f"mmfm data instruct --kind {kind}", "mmfm_version": __version__,
        "params": params, "splits": splits, "sources": {s: {"synthetic-scenes": v["samples"]} for s, v in splits.items()},
        "licences": {"synthetic-scenes": "generated by mmfm, CC0-1.0"},
        "tokenizer": tokenizer_entry,
    }
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest
