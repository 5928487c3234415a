"""Train / val splits of `mmfm data build` (`output.val_fraction` or `output.val_count`).

A kept sample's split is chosen by a hash of its identity, never by chance or by its position in the stream:
h = the first 8 bytes of sha256("<source name>/<key>") as an integer in [0, 2**64), i.e. a number in [0, 1).

- val_fraction f: the sample goes to val when h < f * 2**64. Its split depends on its source name, its key and f
  alone: adding, removing or reordering other samples (or changing the stages, the workers) never moves it, and
  raising f only moves samples from train to val.
- val_count n: val holds the n kept samples with the smallest h. Adding samples moves a val sample to train only
  when a new sample's h is smaller (the new one takes its place; each new sample displaces at most one, and a train
  sample never moves to val); removing a val sample (or a stage dropping it) brings in the train sample with the
  next smallest h.

Val samples are spooled in an append-only file (`ValSpool`) while the build streams and written as val shards at
the end: the spool's length is part of the saved build state, so an interrupted build resumes with it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from mmfm.data.manifest import DataError

VAL = "val"
SPOOL = ".val_spool"
SCALE = 1 << 64
_HEADER = struct.Struct("<I")


def split_hash(source: str, key: str) -> int:
    """The sample's hash in [0, 2**64): sha256 of "source/key", first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha256(f"{source}/{key}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class SplitRule:
    """output.val_fraction (0 < f < 1) or output.val_count (n >= 1); exactly one is set."""

    fraction: Optional[float] = None
    count: Optional[int] = None

    def is_val(self, h: int) -> bool:
        """val_fraction: whether a sample of hash h goes to val (val_count decides over all samples: `pick_val`)."""
        return h < self.fraction * SCALE

    def describe(self) -> str:
        return f"output.val_fraction={self.fraction}" if self.fraction is not None else f"output.val_count={self.count}"


def pick_val(hashes: list[int], rule: SplitRule) -> set[int]:
    """The indices of the val samples among samples of these hashes (all kept samples of a build)."""
    if rule.fraction is not None:
        return {i for i, h in enumerate(hashes) if rule.is_val(h)}
    return set(heapq.nsmallest(rule.count, range(len(hashes)), key=lambda i: (hashes[i], i)))


def _encode(h: int, sample: dict) -> bytes:
    names = sorted(k for k in sample if not k.startswith("__"))
    header = json.dumps({"hash": h, "names": names, "sizes": [len(sample[k]) for k in names]}).encode()
    return _HEADER.pack(len(header)) + header + b"".join(sample[k] for k in names)


class ValSpool:
    """The val candidates of a webdataset build, in an append-only file: every val sample (val_fraction), or the
    `capacity` samples of the smallest hashes so far (val_count; one pushed out by a smaller hash goes back to
    train). Offsets in the file are stream order. `size` is the length that belongs to the build's saved state."""

    def __init__(self, path: Path, capacity: Optional[int] = None, size: int = 0):
        self.path, self.capacity = path, capacity
        if size and (not path.is_file() or path.stat().st_size < size):
            raise DataError(f"{path} is missing or shorter ({path.stat().st_size if path.is_file() else 0} bytes) "
                            f"than the saved build state records ({size}); delete the output folder and build again")
        if size:
            os.truncate(path, size)  # what was appended after the saved state is redone
        else:
            path.unlink(missing_ok=True)
        self.size, self.count = size, 0  # count: samples spooled
        self.heap: list[tuple[int, int, int]] = []  # (-hash, offset, length): the largest hash on top
        for h, offset, length in self._scan():
            self._admit(h, offset, length)
            self.count += 1
        self.file = open(path, "ab")

    def add(self, h: int, sample: dict) -> Optional[dict]:
        """Spool the sample unless val_count's candidates all have smaller hashes; returns the sample that goes to
        train instead (this one, or the candidate it pushed out), or None."""
        if self.capacity is not None and len(self.heap) >= self.capacity and h >= -self.heap[0][0]:
            return sample
        data = _encode(h, sample)
        self.file.write(data)
        offset, self.size = self.size, self.size + len(data)
        self.count += 1
        out = self._admit(h, offset, len(data))
        return None if out is None else self._read(out[1], out[2])[1]

    def _admit(self, h: int, offset: int, length: int) -> Optional[tuple[int, int, int]]:
        entry = (-h, offset, length)
        if self.capacity is None:
            return None  # val_fraction: every spooled sample is val; nothing held in memory
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, entry)
            return None
        return heapq.heappushpop(self.heap, entry)

    def flush(self) -> None:
        """Make the spool durable up to `size` (before the build state that records it is saved)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def samples(self) -> Iterator[dict]:
        """The val samples, in stream order."""
        self.file.flush()  # _scan reads the file
        if self.capacity is None:
            entries = [(offset, length) for _, offset, length in self._scan()]
        else:
            entries = sorted((offset, length) for _, offset, length in self.heap)
        for offset, length in entries:
            yield self._read(offset, length)[1]

    def __len__(self) -> int:
        """The val samples held now."""
        return len(self.heap) if self.capacity is not None else self.count

    def close(self, remove: bool = False) -> None:
        self.file.close()
        if remove:
            self.path.unlink(missing_ok=True)

    def _scan(self) -> Iterator[tuple[int, int, int]]:
        """(hash, offset, length) of every entry in the first `size` bytes of the file."""
        if not self.size:
            return
        with open(self.path, "rb") as f:
            offset = 0
            while offset < self.size:
                f.seek(offset)
                (n,) = _HEADER.unpack(f.read(_HEADER.size))
                header = json.loads(f.read(n))
                length = _HEADER.size + n + sum(header["sizes"])
                yield header["hash"], offset, length
                offset += length

    def _read(self, offset: int, length: int) -> tuple[int, dict]:
        self.file.flush()
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        (n,) = _HEADER.unpack_from(data)
        header = json.loads(data[_HEADER.size:_HEADER.size + n])
        sample, at = {}, _HEADER.size + n
        for name, size in zip(header["names"], header["sizes"]):
            sample[name] = data[at:at + size]
            at += size
        return header["hash"], sample
