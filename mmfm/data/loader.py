"""Runtime loading: webdataset shards -> decoded, tokenized, padded batches, with a resumable position.

A sample is a tar group with one JSON member ({"caption": ...}) and zero or more images. It becomes

    <bos> [<image> x tokens_per_image] per image, prompt tokens, caption tokens, <eos>

(text-only samples have no images and no prompt). Only the caption and <eos> carry loss. Samples that
cannot be used (corrupt image, unreadable tar member, no caption, too long) are skipped and counted.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import logging
import pickle
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from PIL import Image

from mmfm.data.manifest import DataError, ShardChecksums
from mmfm.data.processor import ImageProcessor
from mmfm.data.shards import EpochLayout, ShardReader, ShardReadError
from mmfm.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
IGNORE_INDEX = -100


class SkipSample(Exception):
    """Raised by the encoder for a sample that is counted and dropped; args[0] is the reason."""


@dataclass
class EncodedSample:
    key: str
    input_ids: list[int]
    targets: list[int]
    images: list[torch.Tensor]
    caption: str  # the reference answer: what generation from the first prompt_len tokens should produce
    prompt_len: int = 0  # input_ids[:prompt_len] prompt the answer (0: unknown)
    # Preference pairs: this sample is the chosen answer, `rejected` the other one (same prompt and images), and
    # reference_logps the reference model's summed log-probs of both (chosen, rejected), when precomputed.
    rejected: Optional["EncodedSample"] = None
    reference_logps: Optional[tuple[float, float]] = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample tensors of the objective (Batch.extras)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]: the next token where it carries loss, else IGNORE_INDEX
    pixel_values: Optional[torch.Tensor]  # [N, C, H, W], images in reading order, or None
    images_per_sample: list[int]
    captions: list[str]
    keys: list[str]
    # Packed rows (several samples per row): the document of each position (contiguous runs; padding is a
    # document of its own) and each position's index within its document. None: one sample per row.
    document_ids: Optional[torch.Tensor] = None  # [B, T]
    positions: Optional[torch.Tensor] = None  # [B, T]
    prompt_lengths: list[int] = field(default_factory=list)  # per sample, EncodedSample.prompt_len
    # Preference pairs: rows 0..P-1 are the chosen answers of P pairs, rows P..2P-1 the rejected ones (pairs > 0).
    pairs: int = 0
    # Tensors of a stage's objective, one row per sample or pair (e.g. precomputed reference log-probs [P, 2]).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(self, input_ids=self.input_ids.to(device), targets=self.targets.to(device),
                                   pixel_values=move(self.pixel_values), document_ids=move(self.document_ids),
                                   positions=move(self.positions),
                                   extras={k: v.to(device) for k, v in self.extras.items()})


def load_image(data: bytes, processor: ImageProcessor) -> torch.Tensor:
    """Decode and fully verify an image; the processor's pixels (data.image), [C, H, W]."""
    img = Image.open(io.BytesIO(data))
    img.load()  # raises on truncated or corrupt data
    return processor(img)


def read_images(raw: dict, processor: ImageProcessor) -> list[torch.Tensor]:
    """A sample's images in member-name order, decoded (SkipSample "bad_image" if one is unreadable)."""
    names = sorted(k for k in raw if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    try:
        return [load_image(raw[name], processor) for name in names]
    except Exception as exc:
        raise SkipSample("bad_image", f"{type(exc).__name__}: {exc}") from None


def read_meta(raw: dict) -> dict:
    """A sample's JSON member ({} when it has none; SkipSample "bad_json" when it is not a JSON object)."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SkipSample("bad_json", str(exc)) from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"the JSON member is a {type(meta).__name__}, not an object")
    return meta


@dataclass
class SampleEncoder:
    tokenizer: TextTokenizer
    prompt: str
    tokens_per_image: int
    processor: ImageProcessor
    seq_len: int
    prompt_ids: list[int] = field(init=False)

    def __post_init__(self):
        self.prompt_ids = self.tokenizer.encode(self.prompt)

    def prefix(self, num_images: int) -> list[int]:
        """The tokens before the caption: what generation is prompted with."""
        t = self.tokenizer
        if num_images == 0:
            return t.bos()
        return t.bos() + [t.image_id] * (self.tokens_per_image * num_images) + self.prompt_ids

    def images_of(self, raw: dict) -> list[torch.Tensor]:
        return read_images(raw, self.processor)

    def caption_of(self, raw: dict) -> str:
        caption = read_meta(raw).get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise SkipSample("no_caption", "missing or empty caption")
        return caption.strip()

    def __call__(self, raw: dict) -> EncodedSample:
        caption = self.caption_of(raw)
        images = self.images_of(raw)
        prefix = self.prefix(len(images))
        caption_ids = self.tokenizer.encode(caption) + [self.tokenizer.eos_id]
        ids = prefix + caption_ids
        if len(ids) > self.seq_len:
            raise SkipSample("too_long", f"{len(ids)} tokens > data.seq_len={self.seq_len}")
        targets = [IGNORE_INDEX] * (len(prefix) - 1) + caption_ids + [IGNORE_INDEX]
        return EncodedSample(raw["__key__"], ids, targets, images, caption, prompt_len=len(prefix))


def collate(samples: list[EncodedSample], pad_id: int) -> Batch:
    """One row per sample, right-padded; preference pairs (samples with `rejected`) give their chosen answers
    first, then their rejected ones."""
    pairs = [s for s in samples if s.rejected is not None]
    if pairs and len(pairs) != len(samples):
        raise ValueError("a batch mixes preference pairs with single samples")
    rows = samples + [s.rejected for s in pairs]
    length = max(len(s.input_ids) for s in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(rows):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        targets[row, : len(s.targets)] = torch.tensor(s.targets)
    images = [img for s in rows for img in s.images]
    extras = {}
    if pairs and all(s.reference_logps is not None for s in pairs):
        extras["reference_logps"] = torch.tensor([s.reference_logps for s in pairs], dtype=torch.float64)
    for name in samples[0].extras if not pairs else ():
        extras[name] = torch.stack([s.extras[name] for s in samples])
    return Batch(ids, targets, torch.stack(images) if images else None, [len(s.images) for s in rows],
                 [s.caption for s in samples], [s.key for s in samples],
                 prompt_lengths=[s.prompt_len for s in samples], pairs=len(pairs), extras=extras)


class SampleStream:
    """Encoded samples from shards, epoch after epoch; resumable through state_dict().

    The epoch's global order comes from the shards' sample counts and (seed, epoch, partitions) alone
    (mmfm.data.shards): one partition gives webdataset's buffer shuffle over the seeded shard order; P partitions
    cut the shuffled shards into P spans shuffled apart and taken in turn. Data-parallel rank `rank` of `world`
    serves global index `i` iff `i >= base`, `(i - base) % world == rank` and `i` is not in `consumed`, and reads
    only those samples: with `world` dividing `partitions` (and base 0), only the shards of its own spans.
    Samples before `base` and those in `consumed` were served before a change of data-parallel size (see
    reshard_stream_states). Over an epoch every sample goes to exactly one rank, and one step of `world` ranks
    reads the same samples as one process with the same partitions and a `world` times larger batch. A resume
    seeks to its position: nothing before it is read again. A new epoch starts with base 0, nothing consumed.

    counts: samples per shard (the manifest's); a shard without one is counted from its tar headers. A shard
    that holds fewer readable samples has the missing ones skipped as "truncated_shard".

    State: {"epoch", "position" (global indices passed: the next one), "skipped" (counts by reason), "base",
    "consumed" (sorted indices >= base), "partitions", "orders" (where each span order this rank sampled
    stands, EpochLayout.state)}; the last four default to 0, [], 1 and {} (orders then computed again).

    workers > 0: reading, decoding and tokenization run in that many loader processes, the rank's samples dealt
    to them in chunks (`_WorkerShare`); each worker reads only its own samples; the samples, their order and the
    state are those of workers=0.

    checksums: each shard is checked against the manifest's sha256 when this process (or a loader worker)
    first opens it, and again if it was replaced since (ShardChecksums); None reads shards unverified.
    read_log: a file each reading process appends its reads to (mmfm.data.shards.ShardReader).
    """

    def __init__(self, shards: list[str], encoder: SampleEncoder, seed: int, shuffle_buffer: int,
                 shuffle: bool = True, loop: bool = True, rank: int = 0, world: int = 1, workers: int = 0,
                 expected_counts: Optional[dict[str, int]] = None, checksums: Optional[ShardChecksums] = None,
                 partitions: int = 1, read_log: str = ""):
        if not shards:
            raise ValueError("no shards to read")
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.rank, self.world, self.workers, self.partitions = rank, world, workers, partitions
        self.expected_counts = expected_counts or {}  # shard -> samples, from the manifest
        self.reader = ShardReader(checksums, read_log, rank)
        self.shards, self.encoder, self.seed = list(shards), encoder, seed
        self.shuffle_buffer, self.shuffle, self.loop = shuffle_buffer, shuffle, loop
        self.epoch, self.position, self.base = 0, 0, 0
        self.consumed: list[int] = []
        self.skipped: Counter = Counter()
        self._counts: Optional[dict[str, int]] = None
        self._orders: dict = {}  # the span orders' state at `position` (EpochLayout.state), loaded to resume
        self._served: Optional[EpochLayout] = None  # the current epoch's order as far as it was consumed
        self._it: Optional[Iterator] = None

    def state_dict(self) -> dict:
        orders = self._served.state() if self._served is not None else self._orders
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped),
                "base": self.base, "consumed": list(self.consumed), "partitions": self.partitions, "orders": orders}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.base = int(state.get("base", 0))  # states from before resharding have neither key
        self.consumed = sorted(int(i) for i in state.get("consumed", []))
        self.partitions = int(state.get("partitions", 1))  # states from before partitions: one global stream
        self._orders = dict(state.get("orders", {}))  # none: the orders are replayed up to the position
        self.skipped = Counter(state.get("skipped", {}))
        self._served, self._it = None, None

    def _skip(self, reason: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipped sample %s (%s): %s", key or "?", reason, detail)

    def _layout(self, epoch: int) -> EpochLayout:
        """Epoch `epoch`'s order; the loaded state's epoch continues from its saved span orders."""
        if self._counts is None:
            self._counts = {s: self.expected_counts[s] if s in self.expected_counts else self.reader.count(s)
                            for s in self.shards}
        layout = EpochLayout(self.shards, self._counts, self.seed, epoch, self.partitions, self.shuffle,
                             self.shuffle_buffer)
        if self.partitions > max(layout.total, 1):
            raise DataError(f"the data set holds {layout.total} samples in {len(self.shards)} shard(s), fewer than "
                            f"its {self.partitions} partitions (data.partitions, by default the data-parallel size); "
                            "use fewer partitions or more data")
        if epoch == self.epoch and self._orders:
            layout.restore(self._orders)
        return layout

    def _indices(self, total: int, position: int, base: int, consumed: set) -> Iterator[int]:
        """The global indices g from `position` on that this rank serves: g >= base, (g - base) % world == rank,
        g not in consumed."""
        start = max(position, base)
        for g in range(start + (self.rank - (start - base)) % self.world, total, self.world):
            if g not in consumed:
                yield g

    def _owned(self) -> Iterator[tuple[int, int, tuple[str, int]]]:
        """(epoch, global index, (shard, sample ordinal)) of every sample this rank serves, from the state on."""
        epoch, position, base, consumed = self.epoch, self.position, self.base, set(self.consumed)
        while True:
            layout = self._layout(epoch)
            if position > layout.total:
                raise DataError(f"loader state says epoch {epoch} consumed {position} samples, but the "
                                f"shards hold only {layout.total}: the data set changed since the checkpoint")
            served = 0
            for index in self._indices(layout.total, position, base, consumed):
                served += 1
                yield epoch, index, layout.sample(index)
            if not self.loop:
                return
            if served == 0 and position == 0:
                raise DataError(f"a whole epoch of {len(self.shards)} shard(s) held no sample for this "
                                f"rank; check the data set, e.g. {self.shards[0]}")
            epoch, position, base, consumed = epoch + 1, 0, 0, set()

    def _encode(self, where: tuple[str, int]):
        """Sample `ordinal` of `shard`, read and encoded, or (reason, key, detail) for one to skip."""
        shard, ordinal = where
        try:
            raw = self.reader.read(shard, ordinal)
        except ShardReadError as exc:
            return exc.args[0], f"{shard}#{ordinal}", exc.args[1]
        try:
            return self.encoder(raw)
        except SkipSample as skip:
            return skip.args[0], raw.get("__key__", "?"), skip.args[1]

    def _consume(self, epoch: int, index: int, payload) -> Optional[EncodedSample]:
        """Advance the state past raw sample `index` of `epoch`; the sample, or None when it is skipped."""
        if epoch != self.epoch:
            self.epoch, self.base, self.consumed, self._orders, self._served = epoch, 0, [], {}, None
        if self._served is None:
            self._served = self._layout(epoch)
        self._served.sample(index)  # this process's copy of the order, for state_dict (workers run their own)
        self.position = index + 1
        if isinstance(payload, tuple):
            self._skip(*payload)
            if self.epoch - self._usable_epoch >= 2:
                raise DataError(f"a whole epoch of {len(self.shards)} shard(s) gave no usable sample (skipped so "
                                f"far: {dict(self.skipped)}); check the data set, e.g. {self.shards[0]}")
            return None
        self._usable_epoch = self.epoch
        return payload

    def _items(self) -> Iterator[tuple[int, int, object]]:
        """(epoch, index, sample or skip) in stream order: encoded here, or by `workers` loader processes."""
        if self.workers == 0:
            return ((epoch, index, self._encode(where)) for epoch, index, where in self._owned())
        loader = torch.utils.data.DataLoader(_WorkerShare(self), batch_size=None, num_workers=self.workers,
                                             collate_fn=_as_is, multiprocessing_context="spawn", prefetch_factor=4)
        return (item for blob in loader for item in _unpickle_chunk(blob))

    def _samples(self) -> Iterator[EncodedSample]:
        self._usable_epoch = self.epoch
        for epoch, index, payload in self._items():
            sample = self._consume(epoch, index, payload)
            if sample is not None:
                yield sample

    def __getstate__(self):
        return {**self.__dict__, "_it": None}  # sent to loader workers without the running iterator

    def __iter__(self) -> Iterator[EncodedSample]:
        return self

    def __next__(self) -> EncodedSample:
        if self._it is None:
            self._it = self._samples()
        return next(self._it)


def _as_is(item):
    return item


def _unpickle_chunk(blob: bytes) -> list:
    """A worker's chunk of items; a DataError the worker met is raised here, as the one-line error it is (the
    DataLoader would re-raise it with the worker's traceback in its message)."""
    chunk = pickle.loads(blob)
    if isinstance(chunk, DataError):
        raise chunk
    return chunk


class _WorkerShare(torch.utils.data.IterableDataset):
    """Loader worker w of W: walks the rank's sample order from its state and reads and encodes the rank's
    samples k with (k // CHUNK) % W == w, handing them over CHUNK at a time (one pickled message: cheaper than a
    shared-memory tensor per sample). The DataLoader takes one chunk from each worker in turn, so the rank
    gets its samples in stream order, each encoded by exactly one worker, and its state advances as in one
    process."""

    CHUNK = 32

    def __init__(self, stream: "SampleStream"):
        self.stream = stream

    def __iter__(self):
        try:
            yield from self._chunks()
        except DataError as exc:  # handed over as a chunk: see _unpickle_chunk
            yield pickle.dumps(exc)

    def _chunks(self):
        info = torch.utils.data.get_worker_info()
        s, chunk = self.stream, []
        for k, (epoch, index, where) in enumerate(s._owned()):
            if (k // self.CHUNK) % info.num_workers == info.id:
                chunk.append((epoch, index, s._encode(where)))
                if len(chunk) == self.CHUNK:
                    yield pickle.dumps(chunk)
                    chunk = []
        if chunk:
            yield pickle.dumps(chunk)


def reshard_stream_states(states: list[dict], new_world: int) -> list[dict]:
    """The SampleStream states of `new_world` ranks that continue those of len(states) ranks (in rank order).

    Continuing from them, the new ranks serve exactly the samples of the epoch that no old rank served
    yet, each once, rank r' taking index i when (i - base) % new_world == r'. New base: the lowest old
    position; consumed: the indices from there to the highest old position that an old rank served (or
    skipped). Skip counts are summed onto the new rank 0.
    """
    if not states or new_world < 1:
        raise ValueError(f"need at least one state and one new rank, got {len(states)} and {new_world}")
    world = len(states)
    if new_world == world:
        return [copy.deepcopy(s) for s in states]
    epochs = {int(s["epoch"]) for s in states}
    bases = {int(s.get("base", 0)) for s in states}
    if len(epochs) > 1 or len(bases) > 1:
        where = f"epochs {sorted(epochs)}" if len(epochs) > 1 else f"bases {sorted(bases)}"
        raise DataError(f"the {world} data-loader states are at different {where}, so they cannot be resharded "
                        f"to {new_world} data-parallel ranks; resume at the same data-parallel size ({world}) "
                        "or from another checkpoint")
    partitions = {int(s.get("partitions", 1)) for s in states}
    if len(partitions) > 1:
        raise DataError(f"the {world} data-loader states have different data.partitions {sorted(partitions)}; they "
                        "come from different runs")
    (epoch,), (base,), (parts,) = epochs, bases, partitions
    old_consumed = {int(i) for s in states for i in s.get("consumed", [])}
    positions = [int(s["position"]) for s in states]
    new_base = min(positions)
    # an index below its old owner's position was served (or skipped) by that rank
    consumed = [i for i in range(new_base, max(positions))
                if i in old_consumed or i < positions[(i - base) % world]]
    skipped = sum((Counter(s.get("skipped", {})) for s in states), Counter())
    return [{"epoch": epoch, "position": new_base, "skipped": dict(skipped) if r == 0 else {},
             "base": new_base, "consumed": list(consumed), "partitions": parts} for r in range(new_world)]


def pad_sequence(batch: Batch, length: int, pad_id: int) -> Batch:
    """Right-pad a batch to `length` positions (padding carries no loss and, causally, changes nothing)."""
    extra = length - batch.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"batch of {batch.input_ids.shape[1]} positions does not fit in {length}")
    if extra == 0:
        return batch
    pad = torch.nn.functional.pad
    packed = {}
    if batch.document_ids is not None:  # padding: a document of its own (id -1)
        packed = dict(document_ids=pad(batch.document_ids, (0, extra), value=-1),
                      positions=pad(batch.positions, (0, extra), value=0))
    return dataclasses.replace(batch, input_ids=pad(batch.input_ids, (0, extra), value=pad_id),
                               targets=pad(batch.targets, (0, extra), value=IGNORE_INDEX), **packed)


def blank_sample(pad_id: int) -> EncodedSample:
    """A one-token row with no loss and no image: fills the last batch up to a fixed size."""
    return EncodedSample("<blank>", [pad_id], [IGNORE_INDEX], [], "")


class BatchLoader:
    """Batches of `batch_size` samples from a SampleStream; resumable through state_dict().

    pad_rows: fill the last, short batch with blank rows (for layouts that need fixed batch shapes).
    """

    def __init__(self, stream: SampleStream, batch_size: int, pad_id: int, pad_rows: bool = False):
        self.stream, self.batch_size, self.pad_id, self.pad_rows = stream, batch_size, pad_id, pad_rows

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        samples = list(itertools.islice(self.stream, self.batch_size))
        if not samples:
            raise StopIteration
        if self.pad_rows:
            samples += [blank_sample(self.pad_id)] * (self.batch_size - len(samples))
        return collate(samples, self.pad_id)
