"""Per-record filter stages for offline data construction (`mmfm data build`).

Each stage is a small class built from its parameters (so a recipe can configure it) and called as
`stage(record) -> Record | Dropped`. Its `name` is the Dropped.stage; reasons are short and countable:

    decode          corrupt_image, too_many_pixels, missing_image
    min_image_size  image_too_small (and corrupt_image when sizes must be decoded here)
    aspect_ratio    aspect_ratio    (and corrupt_image when sizes must be decoded here)
    text_length     empty_text, text_too_short, text_too_long
    language        language

`build_filter(name, **params)` makes one from a recipe entry.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import replace
from functools import lru_cache
from typing import Optional, Sequence, Union

from PIL import Image

from mmfm.data.records import Dropped, Outcome, Record
from mmfm.registry import lookup

IMAGE_TOKEN = "<image>"

# Scripts written without spaces between words: each character counts as one word.
_NO_SPACE = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")


def record_text(record: Record, field: str = "text") -> str:
    """The text a stage measures: for LLaVA records (conversations not None) the turn values joined by
    newlines with `<image>` placeholders removed; otherwise the Record attribute `field`, or
    `record.meta[field]` when Record has no such attribute."""
    if field == "text" and record.conversations is not None:
        values = (str(turn.get("value", "")) for turn in record.conversations)
        return "\n".join(v.replace(IMAGE_TOKEN, "").strip() for v in values)
    value = getattr(record, field) if hasattr(record, field) else record.meta.get(field, "")
    return value if isinstance(value, str) else ""


def count_words(text: str) -> int:
    """Whitespace-separated words; in scripts without spaces (CJK, kana, Thai, Lao, Khmer, Myanmar)
    each character counts as a word."""
    return len(_WORD.findall(text))


def _drop(record: Record, stage: str, reason: str, detail: str = "") -> Dropped:
    return Dropped(key=record.key, source=record.source, stage=stage, reason=reason, detail=detail)


def _declares_image(record: Record) -> bool:
    return record.conversations is not None and any(
        IMAGE_TOKEN in str(turn.get("value", "")) for turn in record.conversations)


# ---------------------------------------------------------------------------------------------- images


class _ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, max_pixels: Optional[int] = None, convert: Optional[str] = "RGB") -> tuple[int, int]:
    """Fully decode one encoded image and return (width, height).

    Raises _ImageError("too_many_pixels") when width*height > max_pixels (checked on the header, before
    decoding) or PIL raises DecompressionBombError (above 2 * Image.MAX_IMAGE_PIXELS), and
    _ImageError("corrupt_image") for empty, unidentifiable, truncated or zero-size files, or ones that
    fail to convert to `convert` (None: no conversion).
    """
    if not data:
        raise _ImageError("corrupt_image", "empty file")
    try:
        with warnings.catch_warnings():  # max_pixels is our limit; PIL's warning would be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
                _check_size(size, max_pixels)
                im.verify()  # structure and checksums; the object is unusable afterwards
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # full decode: truncated data fails here
                if convert:
                    im.convert(convert)
    except _ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise _ImageError("too_many_pixels", str(e)) from e
    except Exception as e:  # corrupt files raise OSError, SyntaxError, ValueError, struct.error, ...
        raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from e
    return size


def _check_size(size: tuple[int, int], max_pixels: Optional[int]) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise _ImageError("corrupt_image", f"zero-size image {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise _ImageError("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")


def _image_sizes(record: Record) -> list[list[int]]:
    """meta["image_sizes"] if present, else the sizes read from the image headers (raises _ImageError)."""
    sizes = record.meta.get("image_sizes")
    if sizes is not None:
        return sizes
    out = []
    for data in record.images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
        except Exception as e:
            raise _ImageError("corrupt_image", f"{type(e).__name__}: {e}") from e
        _check_size(size, None)
        out.append(list(size))
    return out


class DecodeImages:
    """Decode every image of a record with PIL (verify, then a full load and conversion to `convert`).

    Parameters: max_pixels (None: PIL's Image.MAX_IMAGE_PIXELS at construction; PIL itself refuses
    above 2 * Image.MAX_IMAGE_PIXELS), convert (mode the loader will convert to; None skips the check).
    Reasons: "corrupt_image" (any image unreadable: empty, garbage, truncated, zero-size),
    "too_many_pixels", "missing_image" (conversation has an `<image>` placeholder but no images).
    On success the bytes are kept unchanged and meta["image_sizes"] = [[w, h], ...]. Text-only records pass.
    """

    name = "decode"

    def __init__(self, max_pixels: Optional[int] = None, convert: Optional[str] = "RGB"):
        self.max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        self.convert = convert

    def __call__(self, record: Record) -> Outcome:
        if not record.images:
            if _declares_image(record):
                return _drop(record, self.name, "missing_image", "conversation has <image> but no images")
            return record
        sizes = []
        for i, data in enumerate(record.images):
            try:
                sizes.append(list(decode_image(data, self.max_pixels, self.convert)))
            except _ImageError as e:
                return _drop(record, self.name, e.reason, f"image {i}: {e.detail}")
        return replace(record, meta={**record.meta, "image_sizes": sizes})


class _PerImageFilter:
    """Drop a record when any of its images fails `rejects(w, h)` (a detail string, or None to keep)."""

    name = reason = ""

    def rejects(self, w: int, h: int) -> Optional[str]:
        raise NotImplementedError

    def __call__(self, record: Record) -> Outcome:
        try:
            sizes = _image_sizes(record)
        except _ImageError as e:
            return _drop(record, self.name, e.reason, e.detail)
        for i, (w, h) in enumerate(sizes):
            detail = self.rejects(w, h)
            if detail:
                return _drop(record, self.name, self.reason, f"image {i}: {detail}")
        return record


class MinImageSize(_PerImageFilter):
    """Drop records with an image whose shorter side is below `min_side` pixels. Reason: "image_too_small"."""

    name, reason = "min_image_size", "image_too_small"

    def __init__(self, min_side: int):
        self.min_side = int(min_side)

    def rejects(self, w: int, h: int) -> Optional[str]:
        return f"{w}x{h} < {self.min_side}" if min(w, h) < self.min_side else None


class AspectRatio(_PerImageFilter):
    """Drop records with an image whose long/short side ratio exceeds `max_ratio`. Reason: "aspect_ratio"."""

    name, reason = "aspect_ratio", "aspect_ratio"

    def __init__(self, max_ratio: float):
        if max_ratio < 1:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio = float(max_ratio)

    def rejects(self, w: int, h: int) -> Optional[str]:
        ratio = max(w, h) / max(min(w, h), 1)
        return f"{w}x{h} ratio {ratio:.2f}" if ratio > self.max_ratio else None


# ------------------------------------------------------------------------------------------------ text


class TextLength:
    """Bound the length of the stripped text (see `record_text`: conversations are measured joined).

    Parameters: min_chars, max_chars (None: no bound), min_words (see `count_words`), field.
    Reasons: "empty_text" (blank), "text_too_short" (< min_chars or < min_words), "text_too_long".
    """

    name = "text_length"

    def __init__(self, min_chars: int = 1, max_chars: Optional[int] = None, min_words: int = 0,
                 field: str = "text"):
        self.min_chars, self.max_chars, self.min_words, self.field = min_chars, max_chars, min_words, field

    def __call__(self, record: Record) -> Outcome:
        text = record_text(record, self.field).strip()
        if not text:
            return _drop(record, self.name, "empty_text")
        if len(text) < self.min_chars:
            return _drop(record, self.name, "text_too_short", f"{len(text)} chars < {self.min_chars}")
        if self.min_words and count_words(text) < self.min_words:
            return _drop(record, self.name, "text_too_short", f"{count_words(text)} words < {self.min_words}")
        if self.max_chars is not None and len(text) > self.max_chars:
            return _drop(record, self.name, "text_too_long", f"{len(text)} chars > {self.max_chars}")
        return record


@lru_cache(maxsize=1)
def _language_identifier():
    """py3langid's identifier with probabilities normalized to sum to 1 (loaded once per process)."""
    from py3langid import langid

    cls = langid.LanguageIdentifier
    load = getattr(cls, "from_model_file", None) or cls.from_pickled_model  # 0.4 / 0.2-0.3
    return load(langid.MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability in [0, 1]) from py3langid."""
    lang, prob = _language_identifier().classify(text)
    return lang, float(prob)


class Language:
    """Keep records whose text is in one of `allowed` languages with probability >= min_confidence.

    Texts of fewer than `min_words` (default 3, see `count_words`) words pass unchanged: language ID
    is unreliable there (py3langid calls "Hello world" Fulah). Reason: "language" (detail "zh:0.85").
    """

    name = "language"

    def __init__(self, allowed: Sequence[str] = ("en",), min_confidence: float = 0.0, min_words: int = 3,
                 field: str = "text"):
        self.allowed = frozenset(allowed)
        self.min_confidence, self.min_words, self.field = float(min_confidence), int(min_words), field

    def __call__(self, record: Record) -> Outcome:
        text = record_text(record, self.field).strip()
        if count_words(text) < self.min_words:
            return record
        lang, prob = identify_language(text)
        if lang not in self.allowed or prob < self.min_confidence:
            return _drop(record, self.name, "language", f"{lang}:{prob:.2f}")
        return record


# -------------------------------------------------------------------------------------------- registry

Filter = Union[DecodeImages, MinImageSize, AspectRatio, TextLength, Language]

FILTERS = {
    "decode": DecodeImages,
    "min_image_size": MinImageSize,
    "aspect_ratio": AspectRatio,
    "text_length": TextLength,
    "language": Language,
}


def build_filter(name: str, **params) -> Filter:
    """The filter stage registered as `name`, built from `params`; ValueError for an unknown name."""
    return lookup(FILTERS, name, "filter")(**params)
