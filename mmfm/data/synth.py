"""`mmfm data synth`: a learnable image-caption data set made on the spot, deterministic from a seed.

Two sources: scenes of one or two shapes rendered with PIL (shape x colour x position, captioned from a
template) and the handwritten digits that scikit-learn ships (upscaled, captioned with the digit).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 45, 45), "green": (50, 175, 70), "blue": (55, 95, 230),
           "yellow": (230, 205, 40), "purple": (150, 65, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
SINGLE_POSITIONS = {"on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
                    "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RENDER_SCALE = 4


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    source: str


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.85 * r), (cx + r, cy + 0.85 * r)], fill=colour)
    else:
        w = 0.35 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)


def _jitter(colour, rng: random.Random):
    return tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)


def render_scene(objects: list[tuple[str, str, float, float]], size: int, rng: random.Random) -> Image.Image:
    """objects: (shape, colour, x, y) with x, y in [0, 1]; drawn large, then downsampled (antialiased)."""
    big = size * RENDER_SCALE
    bg = tuple(rng.randint(0, 45) for _ in range(3))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for shape, colour, x, y in objects:
        radius = big * rng.uniform(0.17, 0.22)
        _draw_shape(draw, shape, x * big, y * big, radius, _jitter(COLOURS[colour], rng))
    return img.resize((size, size), Image.BOX)


PAIR_CAPTIONS = ("ordered", "shuffled", "one-place")


def pair_caption(first: tuple[str, str, str], second: tuple[str, str, str], style: str, rng: random.Random) -> str:
    """(shape, colour, where) x 2 -> caption. "ordered": objects first, left/top one first ("a red circle on the left
    and a blue square on the right."). "shuffled": places first, in random order ("on the right is a blue square and
    on the left is a red circle."): the captioner must bind each named place to its object, which the position
    questions of the later stages (`mmfm data instruct`) build on. There the second object's colour and shape follow
    from the first's by elimination, so one colour a caption needs the binding. "one-place": one of the two places,
    picked at random, and its object ("on the right is a blue square."): colour and shape both need it."""
    if style == "ordered":
        return " and ".join(f"a {c} {s} {w}" for s, c, w in (first, second)) + "."
    phrases = [f"{w} is a {c} {s}" for s, c, w in (first, second)]
    if rng.random() < 0.5:
        phrases.reverse()
    return (phrases[0] if style == "one-place" else " and ".join(phrases)) + "."


def scene_sample(rng: random.Random, size: int, pair_fraction: float,
                 pair_captions: str = "ordered") -> tuple[Image.Image, str]:
    def pick():
        return rng.choice(SHAPES), rng.choice(list(COLOURS))

    def wobble(v):
        return v + rng.uniform(-0.06, 0.06)

    if rng.random() < 1 - pair_fraction:
        (shape, colour), where = pick(), rng.choice(list(SINGLE_POSITIONS))
        x, y = SINGLE_POSITIONS[where]
        return render_scene([(shape, colour, wobble(x), wobble(y))], size, rng), f"a {colour} {shape} {where}."
    (s1, c1), (s2, c2) = pick(), pick()
    if rng.random() < 0.5:
        objs = [(s1, c1, wobble(0.25), wobble(0.5)), (s2, c2, wobble(0.75), wobble(0.5))]
        places = ("on the left", "on the right")
    else:
        objs = [(s1, c1, wobble(0.5), wobble(0.25)), (s2, c2, wobble(0.5), wobble(0.75))]
        places = ("at the top", "at the bottom")
    image = render_scene(objs, size, rng)
    return image, pair_caption((s1, c1, places[0]), (s2, c2, places[1]), pair_captions, rng)


def load_digits_split(seed: int, val_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 digits (bundled with it, no download), split by image into train/val."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_val = int(len(order) * val_fraction)
    pick = lambda idx: (digits.images[idx], digits.target[idx])  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])


def digit_image(pixels: np.ndarray, size: int, rng: random.Random, augment: bool) -> Image.Image:
    arr = (pixels / 16.0 * 255).astype(np.uint8)
    inner = int(size * (rng.uniform(0.7, 0.9) if augment else 0.8))
    digit = Image.fromarray(arr, mode="L").resize((inner, inner), Image.BILINEAR)
    img = Image.new("L", (size, size), 0)
    slack = size - inner
    offset = (rng.randint(0, slack), rng.randint(0, slack)) if augment else (slack // 2, slack // 2)
    img.paste(digit, offset)
    return img.convert("RGB")


def generate_samples(split: str, count: int, seed: int, size: int, digit_fraction: float,
                     pair_fraction: float, digits, pair_captions: str = "ordered") -> Iterator[Sample]:
    rng = random.Random(f"{seed}-{split}")
    images, labels = digits
    for i in range(count):
        key = f"{split}-{i:07d}"
        if rng.random() < digit_fraction:
            j = rng.randrange(len(labels))
            img = digit_image(images[j], size, rng, augment=split == "train")
            yield Sample(key, img, f"the handwritten digit {DIGIT_WORDS[labels[j]]}.", "sklearn-digits")
        else:
            img, caption = scene_sample(rng, size, pair_fraction, pair_captions)
            yield Sample(key, img, caption, "synthetic-scenes")


def encode_sample(sample: Sample) -> dict:
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG", optimize=False)
    meta = {"caption": sample.caption, "source": sample.source}
    return {"__key__": sample.key, "png": buf.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()}


def all_caption_texts(prompt: str, pair_captions: str = "ordered") -> list[str]:
    """Every caption the generator can emit plus the prompt: the tokenizer's training text."""
    texts = [prompt]
    for colour in COLOURS:
        for shape in SHAPES:
            texts += [f"a {colour} {shape} {where}." for where in SINGLE_POSITIONS]
            texts += [f"a {colour} {shape} on the left and a {colour} {shape} at the top."]
            if pair_captions == "shuffled":
                texts += [f"{where} is a {colour} {shape} and {where} is a {colour} {shape}."
                          for where in SINGLE_POSITIONS]
            elif pair_captions == "one-place":
                texts += [f"{where} is a {colour} {shape}." for where in SINGLE_POSITIONS]
    texts += [f"the handwritten digit {w}." for w in DIGIT_WORDS]
    return texts


LICENCES = {"synthetic-scenes": "generated by mmfm, CC0-1.0",
            "sklearn-digits": "UCI ML hand-written digits (CC BY 4.0), as bundled with scikit-learn"}


def build_synth_dataset(out: str | Path, seed: int = 0, train_size: int = 20000, val_size: int = 1000,
                        image_size: int = 64, shard_size: int = 2000, digit_fraction: float = 0.2,
                        pair_fraction: float = 0.45,
                        vocab_size: int = 512, prompt: str = "describe the image.", num_examples: int = 8,
                        instruct_text: bool = False, pair_captions: str = "ordered", force: bool = False,
                        progress: bool = True, tokenizer: Optional[str | Path] = None) -> dict:
    """Write train/val shards, tokenizer.json, examples/ and manifest.json (last, atomically) under `out`.

    An existing data set built with the same parameters is reused; different parameters need force=True.
    instruct_text: train the tokenizer on the instruction data's text too (questions, answers, chat markers), for
    a model that goes on to the sft/dpo/grpo stages with `mmfm data instruct` data.
    pair_captions: "ordered", "shuffled" or "one-place" two-object captions (see pair_caption); the later stages need
    a place-first style.
    tokenizer: a pretrained tokenizer (a Hugging Face folder, or a tokenizer.json) to copy instead of training one
    (mmfm.data.tokenizer.install_tokenizer; vocab_size and instruct_text then do not apply).
    """
    from tqdm import tqdm

    from mmfm import __version__
    from mmfm.data import manifest as mf
    from mmfm.data.tokenizer import install_tokenizer, tokenizer_digest, train_tokenizer

    for name, value in (("train_size", train_size), ("val_size", val_size), ("image_size", image_size),
                        ("shard_size", shard_size)):
        if value <= 0:
            raise mf.DataError(f"{name}={value} must be > 0")
    for name, value in (("digit_fraction", digit_fraction), ("pair_fraction", pair_fraction)):
        if not 0 <= value <= 1:
            raise mf.DataError(f"{name}={value} must lie in [0, 1]")
    if pair_captions not in PAIR_CAPTIONS:
        raise mf.DataError(f"pair_captions={pair_captions!r} is unknown; use one of {PAIR_CAPTIONS}")
    out = Path(out)
    params = dict(seed=seed, train_size=train_size, val_size=val_size, image_size=image_size,
                  shard_size=shard_size, digit_fraction=digit_fraction, pair_fraction=pair_fraction,
                  vocab_size=vocab_size, prompt=prompt, **({"instruct_text": True} if instruct_text else {}),
                  **({"pair_captions": pair_captions} if pair_captions != "ordered" else {}),
                  **({"tokenizer": tokenizer_digest(Path(tokenizer))} if tokenizer else {}))
    existing = mf.existing_build(out, params, force)
    if existing is not None:
        return existing
    digits_train, digits_val = load_digits_split(seed)
    splits, sources = {}, {}
    for split, count, digits in (("train", train_size, digits_train), ("val", val_size, digits_val)):
        samples = list(tqdm(generate_samples(split, count, seed, image_size, digit_fraction, pair_fraction, digits,
                                             pair_captions), total=count, desc=f"rendering {split}", disable=not progress))
        sources[split] = {src: sum(s.source == src for s in samples) for src in LICENCES}
        shards = mf.write_shards((encode_sample(s) for s in samples), out, split, shard_size)
        splits[split] = {"samples": count, "shards": shards}
        if split == "val":
            _write_examples(out / "examples", samples[:num_examples])

    from mmfm.data.synth_instruct import tokenizer_texts

    if tokenizer:
        tokenizer_entry = install_tokenizer(tokenizer, out)
    else:
        texts = tokenizer_texts(prompt, pair_captions) if instruct_text else all_caption_texts(prompt, pair_captions)
        trained = train_tokenizer(texts, vocab_size)
        trained.save(str(out / mf.TOKENIZER))
        tokenizer_entry = {"file": mf.TOKENIZER, "vocab_size": trained.get_vocab_size(),
                           "sha256": mf.sha256_file(out / mf.TOKENIZER)}
    manifest = {
        "format": mf.FORMAT, "generator": "mmfm data synth", "mmfm_version": __version__, "params": params,
        "splits": splits, "sources": sources, "licences": LICENCES, "tokenizer": tokenizer_entry,
    }
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest


def _write_examples(folder: Path, samples: list[Sample]) -> None:
    """A few held-out images as plain PNG files, with their true captions, to try `mmfm generate` on."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for s in samples:
        s.image.save(folder / f"{s.key}.png")
        captions[f"{s.key}.png"] = s.caption
    (folder / "captions.json").write_text(json.dumps(captions, indent=2, sort_keys=True))
