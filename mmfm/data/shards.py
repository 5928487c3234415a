"""An epoch's order from the shards' sample counts alone, and tar shards read by sample: each data-parallel rank
opens only the shards that hold its samples, and a resume seeks to its position instead of replaying the epoch.

Order. Epoch e shuffles the shard list with a generator seeded by (seed, e) and lays the shards' samples end to
end; that sequence is cut into `partitions` contiguous spans of equal size (+-1). Each span is shuffled with
webdataset's buffer shuffle (`shuffle(buffer, initial=buffer)`), run on sample indices, so the order is known
without reading a byte, and where it stands (SpanOrder.state) is saved with the loader state. The epoch's global stream takes one sample from each span in turn: global index
g is sample g // P of span g % P (P = partitions; the last, short round only visits the longer spans).
With one partition this is exactly webdataset's shuffle over the shuffled shards (the generator goes on from
the shard shuffle); with P partitions a data-parallel rank r of W ranks (W dividing P) that serves the global
indices g % W == r reads only spans r, r + W, ...: P / W contiguous stretches of the shuffled shard list.

Reading. A local shard's members are indexed once (tar headers only, grouped into samples by key as webdataset
groups them); a sample is read by seeking to its members. What a reader read is counted (samples, bytes) and,
when `read_log` names a file, appended to it as one JSON line per sample.
"""

from __future__ import annotations

import array
import base64
import bisect
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Optional

import webdataset as wds

from mmfm.data.manifest import DataError

log = logging.getLogger(__name__)

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, suffix
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips
OPEN_FILES = 16  # shard files a reader keeps open
INDEXED_SAMPLES = 100_000  # samples whose tar offsets a reader keeps (the most recently used shards')


class ShardReadError(Exception):
    """A sample that cannot be read; args: (reason, detail), reason "read_error" or "truncated_shard"."""


def _pick(buf: list[int], rng: random.Random) -> int:
    k = rng.randint(0, len(buf) - 1)
    item = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return item


class SpanOrder:
    """A span's serving order, consumed forward: at(k) is the span's k-th sample (k never decreasing). Shuffled:
    webdataset's shuffle(buffer, initial=buffer, rng) over a stream of n samples, as a state machine (samples
    pulled, buffer, generator), so that state() / restore() resume it without replaying it."""

    def __init__(self, n: int, buffer: int, rng: Optional[random.Random]):
        self.n, self.buffer, self.rng = n, buffer, rng  # rng None: in order
        self.k, self.item, self.pulled, self.buf = -1, -1, 0, []

    def _next(self) -> int:
        if self.rng is None:
            return self.k + 1
        buf = self.buf
        while self.pulled < self.n:
            buf.append(self.pulled)
            self.pulled += 1
            if len(buf) < self.buffer and self.pulled < self.n:
                buf.append(self.pulled)
                self.pulled += 1
            if len(buf) >= self.buffer:
                return _pick(buf, self.rng)
        if not buf:
            raise IndexError(f"a span of {self.n} samples has no sample {self.k + 1}")
        return _pick(buf, self.rng)

    def at(self, k: int) -> int:
        if k < self.k:
            raise ValueError(f"span order at {self.k} cannot go back to {k}")
        while self.k < k:
            self.item, self.k = self._next(), self.k + 1
        return self.item

    def state(self) -> dict:
        packed = {}
        if self.rng is not None:
            version, words, gauss = self.rng.getstate()
            packed = {"pulled": self.pulled, "buf": _pack(self.buf), "rng": _pack(words), "rng_version": version}
        return {"k": self.k, "item": self.item, **packed}

    def restore(self, state: dict) -> None:
        self.k, self.item = int(state["k"]), int(state["item"])
        if self.rng is not None:
            self.pulled, self.buf = int(state["pulled"]), _unpack(state["buf"])
            self.rng.setstate((int(state["rng_version"]), tuple(_unpack(state["rng"])), None))


def _pack(values: list[int]) -> str:
    return base64.b64encode(array.array("q", values).tobytes()).decode()


def _unpack(text: str) -> list[int]:
    return array.array("q", base64.b64decode(text)).tolist()


class EpochLayout:
    """Epoch `epoch`'s global order over `partitions` spans (module docstring), from shard -> sample count."""

    def __init__(self, shards: list[str], counts: dict[str, int], seed: int, epoch: int, partitions: int,
                 shuffle: bool, buffer: int):
        self.seed, self.epoch, self.partitions, self.shuffle, self.buffer = seed, epoch, partitions, shuffle, buffer
        self._rng = random.Random(f"{seed}-{epoch}")
        self.shards = list(shards)
        if shuffle:
            self._rng.shuffle(self.shards)
        self.starts = [0, *accumulate(counts[s] for s in self.shards)]
        self.total = self.starts[-1]
        self.rounds, longer = divmod(self.total, partitions)
        sizes = [self.rounds + (s < longer) for s in range(partitions)]
        self.span_starts = [0, *accumulate(sizes)]
        self._cursors: dict[int, SpanOrder] = {}

    def span_size(self, span: int) -> int:
        return self.span_starts[span + 1] - self.span_starts[span]

    def locate(self, g: int) -> tuple[int, int]:
        """(span, index within the span's order) of global index g."""
        full = self.partitions * self.rounds
        return (g % self.partitions, g // self.partitions) if g < full else (g - full, self.rounds)

    def _cursor(self, span: int) -> SpanOrder:
        if span not in self._cursors:
            rng = None
            if self.shuffle:  # one partition: webdataset's order, the generator going on from the shard shuffle
                rng = self._rng if self.partitions == 1 else random.Random(f"{self.seed}-{self.epoch}-{span}")
            self._cursors[span] = SpanOrder(self.span_size(span), self.buffer, rng)
        return self._cursors[span]

    def state(self) -> dict:
        """Where each span's order stands (the spans sampled so far)."""
        return {str(span): order.state() for span, order in self._cursors.items()}

    def restore(self, state: dict) -> None:
        """Continue each span's order from state(), instead of replaying it."""
        for span, order_state in state.items():
            self._cursor(int(span)).restore(order_state)

    def sample(self, g: int) -> tuple[str, int]:
        """(shard, sample ordinal within the shard) of global index g. Calls must come in increasing g per span."""
        span, k = self.locate(g)
        c = self.span_starts[span] + self._cursor(span).at(k)
        i = bisect.bisect_right(self.starts, c) - 1
        return self.shards[i], c - self.starts[i]


@dataclass
class _Member:
    suffix: str
    offset: int
    size: int


@dataclass
class _Sample:
    key: str
    members: list[_Member] = field(default_factory=list)
    error: str = ""


def index_shard(f) -> list[_Sample]:
    """A tar's samples from its headers: regular members grouped by key in order, as webdataset groups them.
    Reading stops at the first damaged header (as Python's tarfile does): the samples before it are kept, the
    one it interrupted is marked unreadable."""
    samples: list[_Sample] = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                if not info.isreg() or _META.match(info.name):
                    continue
                m = _KEY.match(info.name)
                if m is None:
                    continue
                key, suffix = m.group(1), m.group(2).lower()
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(key))
                sample = samples[-1]
                if any(x.suffix == suffix for x in sample.members):
                    sample.error = f"{info.name}: duplicate file name in the tar file"
                sample.members.append(_Member(suffix, info.offset_data, info.size))
    except (tarfile.TarError, OSError) as exc:
        if not samples:
            raise ShardReadError("read_error", f"{type(exc).__name__}: {exc}") from None
        # the last sample may have lost members after the damage: not served
        samples[-1].error = f"the tar is damaged after member {samples[-1].key} ({type(exc).__name__}: {exc})"
    return samples


def is_url(shard: str) -> bool:
    return shard.startswith("pipe:") or "://" in shard


def _open_url(url: str):
    if url.startswith("pipe:"):  # webdataset runs the command and raises if it fails
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def spool(url: str) -> tuple:
    """A shard at a URL (data.shards_url) copied into an anonymous temporary file, which a seek can read (deleted
    when closed); with its sha256. DataError naming the URL when it cannot be read."""
    digest, out = hashlib.sha256(), tempfile.TemporaryFile()
    try:
        with _open_url(url) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except Exception as exc:
        out.close()
        raise DataError(f"cannot read shard {url} (data.shards_url): {type(exc).__name__}: {exc}") from None
    out.seek(0)
    return out, digest.hexdigest()


class ShardReader:
    """Samples of tar shards by ordinal: local files, or URLs (is_url) copied to a temporary file when first read
    (spool). A shard is checked (checksums, e.g. ShardChecksums) and indexed the first time this reader opens it. samples_read / bytes_read count what it read, per shard; read_log: a file
    each read is appended to as {"rank", "pid", "shard", "sample", "bytes"}."""

    def __init__(self, checksums=None, read_log: str = "", rank: int = 0):
        self.checksums, self.read_log, self.rank = checksums, read_log, rank
        self.samples_read: Counter = Counter()
        self.bytes_read: Counter = Counter()
        self._index: OrderedDict = OrderedDict()  # shard -> list[_Sample]
        self._indexed = 0
        self._files: OrderedDict = OrderedDict()

    def __getstate__(self):  # sent to loader workers: no open files
        return {**self.__dict__, "_files": OrderedDict()}

    def _file(self, shard: str):
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if is_url(shard):
            f, digest = spool(shard)
            if self.checksums is not None:
                self.checksums.check_digest(shard, digest)
        else:
            if self.checksums is not None:
                self.checksums.check(shard)
            f = open(shard, "rb", buffering=0)  # reads exactly the headers and members asked for
        self._files[shard] = f
        if len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def samples(self, shard: str) -> list[_Sample]:
        if shard in self._index:
            self._index.move_to_end(shard)
            return self._index[shard]
        f = self._file(shard)
        f.seek(0)
        samples = self._index[shard] = index_shard(f)
        self._indexed += len(samples)
        while self._indexed > INDEXED_SAMPLES and len(self._index) > 1:
            self._indexed -= len(self._index.popitem(last=False)[1])
        return samples

    def count(self, shard: str) -> int:
        """Samples the shard holds (from its headers)."""
        return len(self.samples(shard))

    def read(self, shard: str, ordinal: int) -> dict:
        """Sample `ordinal` of the shard as webdataset gives it ({"__key__", "__url__", suffix: bytes})."""
        try:
            samples = self.samples(shard)
        except OSError as exc:
            raise ShardReadError("read_error", f"{shard}: {type(exc).__name__}: {exc}") from None
        if ordinal >= len(samples):
            raise ShardReadError("truncated_shard", f"{shard} ends after {len(samples)} readable samples "
                                 f"(truncated or damaged), before sample {ordinal}")
        sample = samples[ordinal]
        if sample.error:
            raise ShardReadError("read_error", sample.error)
        f, raw, size = self._file(shard), {"__key__": sample.key, "__url__": shard}, 0
        for m in sample.members:
            f.seek(m.offset)
            data = f.read(m.size)
            size += len(data)
            if len(data) < m.size:
                raise ShardReadError("read_error", f"{shard}: member {sample.key}.{m.suffix} ends after "
                                     f"{len(data)} of its {m.size} bytes")
            raw[m.suffix] = data
        self.samples_read[shard] += 1
        self.bytes_read[shard] += size
        if self.read_log:
            with open(self.read_log, "a") as out:
                out.write(json.dumps({"rank": self.rank, "pid": os.getpid(), "shard": shard, "sample": ordinal,
                                      "bytes": size}) + "\n")
        return raw

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
