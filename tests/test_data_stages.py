"""Filter and dedup stages of offline data construction: mmfm/data/filters.py and mmfm/data/dedup.py."""

import io
import json
import random

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageEnhance

from mmfm.data.dedup import (BandIndex, ExactDedup, ImageNearDedup, TextNearDedup, build_dedup,
                             normalize_text, shingles)
from mmfm.data.filters import (AspectRatio, DecodeImages, Language, MinImageSize, TextLength, build_filter,
                               count_words)
from mmfm.data.records import Dropped, Record

PARAGRAPH = (
    "The harbour town wakes slowly in winter. Fishing boats come back before dawn, their decks covered "
    "in ice, and the men carry crates of cod up the stone steps to the market hall. By eight the bakery "
    "has opened, the school bus has left, and the gulls have taken over the empty pier."
)
UNRELATED = (
    "Photosynthesis converts light energy into chemical energy stored in glucose. In the chloroplasts, "
    "chlorophyll absorbs mostly red and blue light, water is split to release oxygen, and carbon dioxide "
    "is fixed by the Calvin cycle into three-carbon sugars that the plant uses to grow."
)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(kind: int, size: int = 128) -> Image.Image:
    """A gradient background with shapes; `kind` picks the shapes and colours."""
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):
        d.line([(0, y), (size, y)], fill=(y * 2 % 256, 80, 255 - y * 2 % 256))
    if kind == 0:
        d.ellipse([20, 20, 70, 70], fill=(250, 220, 0))
        d.rectangle([70, 80, 120, 120], fill=(20, 20, 20))
    elif kind == 1:
        d.polygon([(10, 120), (64, 10), (118, 120)], fill=(0, 200, 50))
        d.ellipse([80, 10, 120, 50], fill=(255, 255, 255))
    else:
        for x in range(0, size, 16):
            d.rectangle([x, 0, x + 8, size], fill=(200, 0, 0))
    return im


def rec(key="k0", text="a photo", images=(), conversations=None, meta=None) -> Record:
    return Record(key=key, source="src", text=text, images=list(images), conversations=conversations,
                  meta=dict(meta or {}))


def assert_dropped(out, stage, reason):
    assert isinstance(out, Dropped), out
    assert (out.stage, out.reason) == (stage, reason), out
    assert out.key and out.source == "src"


# ------------------------------------------------------------------------------------------------ decode


def test_decode_keeps_bytes_and_records_sizes():
    png, jpg = encode(scene(0, 96)), encode(Image.new("RGB", (40, 30), "red"), "JPEG")
    out = DecodeImages()(rec(images=[png, jpg], meta={"url": "x"}))
    assert isinstance(out, Record)
    assert out.images == [png, jpg]
    assert out.meta == {"url": "x", "image_sizes": [[96, 96], [40, 30]]}


def test_decode_passes_text_only_and_drops_declared_but_missing_image():
    assert isinstance(DecodeImages()(rec(text="just text")), Record)
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
    assert_dropped(DecodeImages()(rec(conversations=turns)), "decode", "missing_image")


@pytest.mark.parametrize("bad", ["truncated", "garbage", "empty", "truncated_png"])
def test_decode_drops_corrupt_images(bad):
    jpg = encode(scene(0, 256), "JPEG", quality=90)
    data = {
        "truncated": jpg[: len(jpg) // 2],
        "garbage": random.Random(0).randbytes(2000),
        "empty": b"",
        "truncated_png": encode(scene(1, 256))[:-200],
    }[bad]
    good = encode(scene(1))
    out = DecodeImages()(rec(images=[good, data]))  # one bad image drops the whole record
    assert_dropped(out, "decode", "corrupt_image")
    assert out.detail.startswith("image 1:")


def test_decode_too_many_pixels():
    out = DecodeImages(max_pixels=100 * 100 - 1)(rec(images=[encode(scene(0, 100))]))
    assert_dropped(out, "decode", "too_many_pixels")
    assert isinstance(DecodeImages(max_pixels=100 * 100)(rec(images=[encode(scene(0, 100))])), Record)


def test_decode_pil_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2x this, whatever max_pixels says
    out = DecodeImages(max_pixels=10**9)(rec(images=[encode(scene(0, 100))]))
    assert_dropped(out, "decode", "too_many_pixels")
    assert "DecompressionBomb" not in out.reason


# ------------------------------------------------------------------------------------- image geometry


def test_min_image_size_and_aspect_ratio():
    small, wide, ok = Image.new("RGB", (20, 64)), Image.new("RGB", (300, 50)), Image.new("RGB", (64, 48))
    r_small, r_wide, r_ok = (rec(images=[encode(im)]) for im in (small, wide, ok))
    assert_dropped(MinImageSize(32)(r_small), "min_image_size", "image_too_small")
    assert isinstance(MinImageSize(32)(r_wide), Record)
    assert isinstance(MinImageSize(32)(r_ok), Record)
    assert_dropped(AspectRatio(3.0)(r_wide), "aspect_ratio", "aspect_ratio")  # 6:1
    assert_dropped(AspectRatio(3.0)(r_small), "aspect_ratio", "aspect_ratio")  # 3.2:1
    assert isinstance(AspectRatio(3.2)(r_small), Record)  # the bound is inclusive
    assert isinstance(AspectRatio(3.0)(r_ok), Record)


def test_geometry_uses_recorded_sizes_then_decodes():
    # meta["image_sizes"] is trusted when present (set by DecodeImages) ...
    liar = rec(images=[encode(Image.new("RGB", (64, 64)))], meta={"image_sizes": [[10, 10]]})
    assert_dropped(MinImageSize(32)(liar), "min_image_size", "image_too_small")
    # ... and read from the file otherwise; a file without a header is corrupt.
    assert_dropped(MinImageSize(32)(rec(images=[b"not an image"])), "min_image_size", "corrupt_image")
    decoded = DecodeImages()(rec(images=[encode(Image.new("RGB", (64, 16)))]))
    assert_dropped(AspectRatio(2)(decoded), "aspect_ratio", "aspect_ratio")


# ------------------------------------------------------------------------------------------------- text


def test_text_length():
    stage = TextLength(min_chars=5, max_chars=40, min_words=2)
    assert_dropped(stage(rec(text="  \n\t ")), "text_length", "empty_text")
    assert_dropped(stage(rec(text="cat")), "text_length", "text_too_short")  # 3 chars
    assert_dropped(stage(rec(text="catamaran")), "text_length", "text_too_short")  # 1 word
    assert_dropped(stage(rec(text="a " * 30)), "text_length", "text_too_long")  # 59 chars stripped
    assert isinstance(stage(rec(text="  a red car  ")), Record)
    assert isinstance(TextLength()(rec(text="x")), Record)


def test_text_length_measures_conversations():
    turns = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": " "}]
    assert_dropped(TextLength()(rec(text="ignored", conversations=turns)), "text_length", "empty_text")
    turns[1]["value"] = "A dog on a beach."
    assert isinstance(TextLength(min_chars=10)(rec(text="", conversations=turns)), Record)


def test_count_words_handles_scripts_without_spaces():
    assert count_words("a red  car") == 3
    assert count_words("一只狗") == 3
    assert count_words("photo: 一只狗") == 4


def test_language():
    stage = Language(allowed=["en"])
    assert isinstance(stage(rec(text="A dog runs across a grassy field with a red ball in its mouth.")), Record)
    zh = stage(rec(text="一只狗叼着红色的球在草地上奔跑。"))
    de = stage(rec(text="Ein Hund läuft mit einem roten Ball im Maul über eine Wiese."))
    assert_dropped(zh, "language", "language")
    assert_dropped(de, "language", "language")
    assert zh.detail.startswith("zh:") and de.detail.startswith("de:")
    # Fewer than 3 words pass unchanged: py3langid is unreliable there.
    assert isinstance(stage(rec(text="Hello world")), Record)
    assert isinstance(Language(allowed=["de", "en"])(rec(text="Ein Hund läuft über eine Wiese.")), Record)
    # min_confidence is a probability (normalized identifier).
    en = "A dog runs across a grassy field with a red ball in its mouth."
    assert_dropped(Language(allowed=["en"], min_confidence=1.01)(rec(text=en)), "language", "language")


# ---------------------------------------------------------------------------------------------- exact


def test_exact_dedup():
    img = encode(scene(0))
    d = ExactDedup()
    assert isinstance(d(rec("a", "A red  Car\n", [img])), Record)
    out = d(rec("b", "a red car", [img]))
    assert_dropped(out, "dedup", "exact_duplicate")
    assert out.detail == "a"
    assert isinstance(d(rec("c", "a blue car", [img])), Record)
    assert isinstance(d(rec("d", "a red car", [encode(scene(1))])), Record)
    assert isinstance(d(rec("e", "a red car")), Record)  # same text, no image
    assert dict(d.counts) == {"seen": 5, "kept": 4, "exact_duplicate": 1}


def test_normalize_text():
    assert normalize_text("  Ｆｕｌｌ\u00a0WIDTH\n\tText ") == "full width text"


# ----------------------------------------------------------------------------------------- image near


def variants(im):
    return {
        "brightened": encode(ImageEnhance.Brightness(im).enhance(1.1)),
        "jpeg": encode(im, "JPEG", quality=70),
        "shifted": encode(ImageChops.offset(im, 1, 0)),
        "cropped_1px": encode(im.crop((1, 0, im.width, im.height)).resize(im.size)),
    }


@pytest.mark.parametrize("variant", ["brightened", "jpeg", "shifted", "cropped_1px"])
def test_image_near_dedup_variants(variant):
    d = ImageNearDedup(max_distance=4)
    assert isinstance(d(rec("orig", images=[encode(scene(0))])), Record)
    out = d(rec("copy", images=[variants(scene(0))[variant]]))
    assert_dropped(out, "dedup", "near_duplicate_image")
    assert out.detail == "orig"


def test_image_near_dedup_keeps_different_scenes():
    d = ImageNearDedup(max_distance=4)
    outs = [d(rec(f"s{k}", images=[encode(scene(k))])) for k in range(3)]
    assert all(isinstance(o, Record) for o in outs)
    assert isinstance(d(rec("text-only", text="no image")), Record)
    assert_dropped(d(rec("bad", images=[b"junk"])), "dedup", "corrupt_image")
    assert dict(d.counts) == {"seen": 5, "kept": 3, "no_image": 1, "corrupt_image": 1}
    assert d.image_hash(encode(scene(0))) != d.image_hash(encode(scene(1)))


@pytest.mark.parametrize("max_distance", [0, 4, 10])
def test_band_index_matches_brute_force(max_distance):
    rng = random.Random(max_distance)
    index, kept_bf = BandIndex(64, max_distance), []
    base = [rng.getrandbits(64) for _ in range(20)]
    for _ in range(200):  # mostly perturbed copies of a few bases, so there are many near hits
        h = rng.choice(base)
        for _ in range(rng.randint(0, 2 * max_distance + 2)):
            h ^= 1 << rng.randrange(64)
        hits = [(bin(h ^ k).count("1"), i) for i, k in enumerate(kept_bf)]
        brute = min((x for x in hits if x[0] <= max_distance), default=None)
        assert index.nearest(h) == brute
        if brute is None:
            index.add(h)
            kept_bf.append(h)
    assert 20 <= len(kept_bf) < 200  # both outcomes were exercised


def test_band_index_rejects_bad_distance():
    with pytest.raises(ValueError):
        BandIndex(64, 64)


# ------------------------------------------------------------------------------------------ text near


def test_text_near_dedup():
    d = TextNearDedup(threshold=0.8)
    assert isinstance(d(rec("p", PARAGRAPH)), Record)
    out = d(rec("p2", PARAGRAPH.replace("bakery", "pharmacy")))
    assert_dropped(out, "dedup", "near_duplicate_text")
    assert out.detail.startswith("p ")
    assert isinstance(d(rec("u", UNRELATED)), Record)
    assert isinstance(d(rec("short", "hi")), Record)  # shorter than the n-gram: one shingle
    assert_dropped(d(rec("short2", "  HI ")), "dedup", "near_duplicate_text")
    assert isinstance(d(rec("blank", "   ")), Record)
    assert dict(d.counts) == {"seen": 6, "kept": 3, "near_duplicate_text": 2, "empty_text": 1}


def test_text_near_dedup_conversations():
    d = TextNearDedup()
    turns = [{"from": "human", "value": "<image>\nDescribe the town."}, {"from": "gpt", "value": PARAGRAPH}]
    assert isinstance(d(rec("c1", "", conversations=turns)), Record)
    turns2 = [dict(t) for t in turns]
    turns2[1]["value"] = PARAGRAPH.replace("gulls", "pigeons")
    assert_dropped(d(rec("c2", "", conversations=turns2)), "dedup", "near_duplicate_text")


def test_shingles():
    assert shingles("abc", 5) == ["abc"]
    assert shingles("abcabc", 3) == ["abc", "bca", "cab"]


# ----------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("cls, reason", [(ExactDedup, "exact_duplicate"),
                                         (ImageNearDedup, "near_duplicate_image"),
                                         (TextNearDedup, "near_duplicate_text")])
def test_state_dict_round_trip(cls, reason):
    img = encode(scene(0))
    dup = {ExactDedup: rec("B", PARAGRAPH.upper(), [img]),
           ImageNearDedup: rec("B", "other", [variants(scene(0))["jpeg"]]),
           TextNearDedup: rec("B", PARAGRAPH.replace("winter", "summer"))}[cls]
    seen_a = cls()
    assert isinstance(seen_a(rec("A", PARAGRAPH, [img])), Record)
    assert isinstance(cls()(dup), Record)  # without the state, B is new
    resumed = cls()
    resumed.load_state_dict(json.loads(json.dumps(seen_a.state_dict())))  # survives JSON
    out = resumed(dup)
    assert_dropped(out, "dedup", reason)
    assert out.detail.split(" ")[0] == "A"
    assert (resumed.counts["seen"], resumed.counts["kept"], resumed.counts[reason]) == (2, 1, 1)


def test_load_state_dict_rejects_other_parameters():
    d = TextNearDedup(num_perm=128)
    d(rec("A", PARAGRAPH))
    with pytest.raises(ValueError, match="num_perm"):
        TextNearDedup(num_perm=64).load_state_dict(d.state_dict())
    with pytest.raises(ValueError, match="hash_size"):
        ImageNearDedup(hash_size=16).load_state_dict(ImageNearDedup().state_dict())
    with pytest.raises(ValueError):
        ExactDedup().load_state_dict(d.state_dict())


# -------------------------------------------------------------------------------------------- registry


def test_registries():
    assert isinstance(build_filter("min_image_size", min_side=8), MinImageSize)
    assert build_filter("text_length", max_chars=10).max_chars == 10
    assert build_filter("language", allowed=["de"]).allowed == {"de"}
    assert isinstance(build_dedup("text_near", threshold=0.9), TextNearDedup)
    assert build_dedup("image_near", max_distance=2).max_distance == 2
    with pytest.raises(ValueError, match="aspect_ratio, decode, language, min_image_size, text_length"):
        build_filter("blur")
    with pytest.raises(ValueError, match="exact, image_near, text_near"):
        build_dedup("fuzzy")
