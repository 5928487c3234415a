"""Deduplication stages for offline data construction (`mmfm data build`).

Stateful, single-process and order-deterministic: the first occurrence is kept, later duplicates become
Dropped(stage="dedup", reason=..., detail=<key of the kept record>). Reasons:

    exact       exact_duplicate
    image_near  near_duplicate_image (corrupt_image if an image cannot be hashed)
    text_near   near_duplicate_text

Each keeps `counts` and has `state_dict()` / `load_state_dict()` (JSON-serializable) so a resumed build
continues with the same memory. `build_dedup(name, **params)` makes one from a recipe entry.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Optional, Union

import imagehash
from datasketch import MinHash, MinHashLSH
from PIL import Image

from mmfm.data.filters import record_text
from mmfm.data.records import Dropped, Outcome, Record
from mmfm.registry import lookup

STAGE = "dedup"
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, lower-cased, runs of whitespace collapsed to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _drop(record: Record, reason: str, detail: str = "") -> Dropped:
    return Dropped(key=record.key, source=record.source, stage=STAGE, reason=reason, detail=detail)


def _check_state(kind: str, state: dict, params: dict) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state is for {state.get('kind')!r}, not {kind!r}")
    saved = state.get("params", {})
    differ = {k: (saved.get(k), v) for k, v in params.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"{kind} state was saved with other parameters (saved, now): {differ}")


# ----------------------------------------------------------------------------------------------- exact


class ExactDedup:
    """Drop records whose content equals an earlier one's: sha256 over the images' bytes (each
    length-prefixed) and the normalized text (`record_text`, then `normalize_text`).
    Reason: "exact_duplicate"."""

    name = STAGE

    def __init__(self):
        self.seen: dict[str, str] = {}  # sha256 hex -> key of the first record
        self.counts: Counter = Counter()

    @staticmethod
    def digest(record: Record) -> str:
        h = hashlib.sha256()
        for data in record.images:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        h.update(b"\xfftext")
        h.update(normalize_text(record_text(record)).encode("utf-8"))
        return h.hexdigest()

    def __call__(self, record: Record) -> Outcome:
        self.counts["seen"] += 1
        digest = self.digest(record)
        if digest in self.seen:
            self.counts["exact_duplicate"] += 1
            return _drop(record, "exact_duplicate", self.seen[digest])
        self.seen[digest] = record.key
        self.counts["kept"] += 1
        return record

    def state_dict(self) -> dict:
        return {"kind": "exact", "params": {}, "seen": dict(self.seen), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        _check_state("exact", state, {})
        self.seen, self.counts = dict(state["seen"]), Counter(state["counts"])


# ------------------------------------------------------------------------------------------ image near


class BandIndex:
    """Hamming-radius search over `bits`-bit integer hashes, not O(n) per query in the common case.

    The bits are split into max_distance + 1 bands; by pigeonhole, two hashes within distance d agree
    exactly on at least one of d + 1 bands, so candidates come from per-band buckets and are verified.
    """

    def __init__(self, bits: int, max_distance: int):
        if not 0 <= max_distance < bits:
            raise ValueError(f"max_distance must be in [0, {bits}), got {max_distance}")
        self.max_distance = max_distance
        edges = [bits * i // (max_distance + 1) for i in range(max_distance + 2)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]  # (shift, mask)
        self.buckets = [defaultdict(list) for _ in self.bands]
        self.hashes: list[int] = []

    def add(self, h: int) -> int:
        """Index `h`; returns its id (insertion order)."""
        i = len(self.hashes)
        self.hashes.append(h)
        for (shift, mask), bucket in zip(self.bands, self.buckets):
            bucket[(h >> shift) & mask].append(i)
        return i

    def nearest(self, h: int) -> Optional[tuple[int, int]]:
        """(distance, id) of the closest indexed hash within max_distance (earliest on ties), or None."""
        ids = set()
        for (shift, mask), bucket in zip(self.bands, self.buckets):
            ids.update(bucket.get((h >> shift) & mask, ()))
        found = [(bin(h ^ self.hashes[i]).count("1"), i) for i in ids]
        found = [f for f in found if f[0] <= self.max_distance]
        return min(found) if found else None


class ImageNearDedup:
    """Drop records whose first image's perceptual hash (imagehash.phash, hash_size**2 bits) is within
    `max_distance` bits (Hamming) of a kept record's first image. Records without images pass.

    Parameters: max_distance (default 4 of 64 bits), hash_size (default 8).
    Reasons: "near_duplicate_image"; "corrupt_image" if the first image cannot be decoded.
    Note: phash ignores colour and treats all flat (single-colour) images as one.
    """

    name = STAGE

    def __init__(self, max_distance: int = 4, hash_size: int = 8):
        self.max_distance, self.hash_size = int(max_distance), int(hash_size)
        self.bits = self.hash_size ** 2
        self.index = BandIndex(self.bits, self.max_distance)
        self.keys: list[str] = []
        self.counts: Counter = Counter()

    def image_hash(self, data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as im:
            bits = imagehash.phash(im, hash_size=self.hash_size).hash.flatten()
        return int("".join("1" if b else "0" for b in bits), 2)

    def __call__(self, record: Record) -> Outcome:
        self.counts["seen"] += 1
        if not record.images:
            self.counts["no_image"] += 1
            return record
        try:
            h = self.image_hash(record.images[0])
        except Exception as e:
            self.counts["corrupt_image"] += 1
            return _drop(record, "corrupt_image", f"{type(e).__name__}: {e}")
        hit = self.index.nearest(h)
        if hit is not None:
            self.counts["near_duplicate_image"] += 1
            return _drop(record, "near_duplicate_image", self.keys[hit[1]])
        self.index.add(h)
        self.keys.append(record.key)
        self.counts["kept"] += 1
        return record

    def state_dict(self) -> dict:
        width = (self.bits + 3) // 4
        hashes = [format(h, f"0{width}x") for h in self.index.hashes]
        return {"kind": "image_near", "params": {"hash_size": self.hash_size}, "keys": list(self.keys),
                "hashes": hashes, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the kept hashes (the band index is rebuilt for this instance's max_distance)."""
        _check_state("image_near", state, {"hash_size": self.hash_size})
        self.index = BandIndex(self.bits, self.max_distance)
        for h in state["hashes"]:
            self.index.add(int(h, 16))
        self.keys, self.counts = list(state["keys"]), Counter(state["counts"])


# ------------------------------------------------------------------------------------------- text near


def shingles(text: str, ngram: int) -> list[str]:
    """Distinct character n-grams of `text` in first-seen order; a text shorter than `ngram` is one shingle."""
    if len(text) <= ngram:
        return [text]
    return list(dict.fromkeys(text[i:i + ngram] for i in range(len(text) - ngram + 1)))


class TextNearDedup:
    """Drop records whose normalized text (`record_text`, `normalize_text`) has a MinHash Jaccard
    estimate >= `threshold` with a kept record's, over character `ngram` shingles. Candidates come from
    datasketch MinHashLSH(threshold, num_perm) and are verified with MinHash.jaccard. Blank texts pass.

    Parameters: threshold (0.8), num_perm (128), ngram (5), seed (1). Reason: "near_duplicate_text".
    """

    name = STAGE

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.threshold, self.num_perm = float(threshold), int(num_perm)
        self.ngram, self.seed = int(ngram), int(seed)
        self._template = MinHash(num_perm=self.num_perm, seed=self.seed)  # permutations made once
        self.scheme = getattr(self._template, "scheme", None)  # datasketch >= 2.0
        self._reset()

    def _reset(self) -> None:
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.minhashes: list[MinHash] = []
        self.keys: list[str] = []
        self.counts: Counter = Counter()

    def _new_minhash(self, hashvalues=None) -> MinHash:
        kwargs = {"scheme": self.scheme} if self.scheme is not None else {}
        return MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues,
                       permutations=self._template.permutations, **kwargs)

    def minhash(self, text: str) -> MinHash:
        m = self._new_minhash()
        m.update_batch([s.encode("utf-8") for s in shingles(text, self.ngram)])
        return m

    def _add(self, key: str, m: MinHash) -> None:
        self.lsh.insert(len(self.minhashes), m)  # LSH keys are ids: record keys may repeat across sources
        self.minhashes.append(m)
        self.keys.append(key)

    def __call__(self, record: Record) -> Outcome:
        self.counts["seen"] += 1
        text = normalize_text(record_text(record))
        if not text:
            self.counts["empty_text"] += 1
            return record
        m = self.minhash(text)
        scored = [(-m.jaccard(self.minhashes[i]), i) for i in self.lsh.query(m)]
        best = min((s for s in scored if -s[0] >= self.threshold), default=None)
        if best is not None:
            self.counts["near_duplicate_text"] += 1
            return _drop(record, "near_duplicate_text", f"{self.keys[best[1]]} (jaccard~{-best[0]:.2f})")
        self._add(record.key, m)
        self.counts["kept"] += 1
        return record

    def _params(self) -> dict:
        return {"num_perm": self.num_perm, "seed": self.seed, "ngram": self.ngram, "scheme": self.scheme}

    def state_dict(self) -> dict:
        return {"kind": "text_near", "params": self._params(), "keys": list(self.keys),
                "hashvalues": [m.hashvalues.tolist() for m in self.minhashes], "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the kept MinHashes and rebuild the LSH index (for this instance's threshold)."""
        _check_state("text_near", state, self._params())
        self._reset()
        for key, values in zip(state["keys"], state["hashvalues"]):
            self._add(key, self._new_minhash(values))
        self.counts = Counter(state["counts"])


# -------------------------------------------------------------------------------------------- registry

Dedup = Union[ExactDedup, ImageNearDedup, TextNearDedup]

DEDUPS = {"exact": ExactDedup, "image_near": ImageNearDedup, "text_near": TextNearDedup}


def build_dedup(name: str, **params) -> Dedup:
    """The dedup stage registered as `name`, built from `params`; ValueError for an unknown name."""
    return lookup(DEDUPS, name, "dedup")(**params)
