"""Data reading at cluster scale: `mmfm bench data-scale`.

Writes a synthetic data set of many small shards (--shards x --per-shard samples of --payload random bytes,
with the sha256 a manifest records), then, for each data-parallel size W of --ranks, reads one epoch as rank r of
W with data.partitions=W, for up to --measure ranks r spread over 0..W-1, and reports per rank the samples read,
the bytes the process read from files (/proc/self/io rchar: tar headers, members and the sha256 check of each
shard it opens) and the shards it opened, against total / W, total being what one rank reads for the whole epoch.
Then the time to the first sample of a fresh start and of a resume at 90% of the epoch (one rank: the longest
order to skip), median of 5: with the span order saved in the loader state, and without it (computed again up
to the position, as for states of older checkpoints or after resharding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from mmfm.data import manifest
from mmfm.data.loader import SampleStream
from mmfm.data.manifest import ShardChecksums, write_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64, 1024], help="data-parallel sizes W")
    p.add_argument("--shards", type=int, default=10000, help="shards in the synthetic data set (default 10000)")
    p.add_argument("--per-shard", type=int, default=4, help="samples per shard (default 4)")
    p.add_argument("--payload", type=int, default=1024, help="payload bytes per sample (default 1024)")
    p.add_argument("--measure", type=int, default=8, help="ranks measured per W, evenly spaced (default 8)")
    p.add_argument("--dir", default="", help="folder for the data set (kept; reused when it holds one)")


class _Key:
    """The encoder of the benchmark: a sample's key (reading is what is measured)."""

    def __call__(self, raw: dict) -> str:
        return raw["__key__"]


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def make_shards(folder: Path, shards: int, per_shard: int, payload: int) -> dict[str, str]:
    """shard path -> sha256; written once per folder."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "sha256.txt"
    if index.exists():
        return dict(line.split(" ", 1)[::-1] for line in index.read_text().splitlines())
    sums = {}
    for i in range(shards):
        samples = ({"__key__": f"s{i:06d}-{j}", "bin": os.urandom(payload), "json": b'{"caption": "x"}'}
                   for j in range(per_shard))
        entry = write_shard(samples, folder / f"shard-{i:06d}.tar")
        sums[str(folder / entry["file"])] = entry["sha256"]
    index.write_text("".join(f"{sha} {path}\n" for path, sha in sums.items()))
    return sums


def _stream(sums: dict[str, str], counts: dict[str, int], rank: int, world: int) -> SampleStream:
    return SampleStream(list(sums), _Key(), seed=0, shuffle_buffer=1000, loop=False, rank=rank, world=world,
                        partitions=world, expected_counts=counts, checksums=ShardChecksums("bench", sums))


def read_epoch(sums: dict[str, str], counts: dict[str, int], rank: int, world: int) -> dict:
    """One epoch of rank `rank` of `world`, read as a fresh process would (no shard verified yet)."""
    manifest._VERIFIED.clear()
    stream = _stream(sums, counts, rank, world)
    before = _rchar()
    served = sum(1 for _ in stream)
    r = stream.reader
    return {"served": served, "samples": sum(r.samples_read.values()), "payload": sum(r.bytes_read.values()),
            "rchar": _rchar() - before, "shards": len(r.samples_read)}


def state_at(sums: dict[str, str], counts: dict[str, int], position: int) -> dict:
    """The loader state of one rank that has served `position` samples of epoch 0 (its order advanced unread)."""
    stream = _stream(sums, counts, 0, 1)
    layout = stream._layout(0)
    for g in range(position):
        layout.sample(g)
    return {"epoch": 0, "position": position, "skipped": {}, "partitions": 1, "orders": layout.state()}


def first_sample_s(sums: dict[str, str], counts: dict[str, int], state: dict) -> float:
    """Seconds from a new stream at `state` to its first sample."""
    manifest._VERIFIED.clear()
    stream = _stream(sums, counts, 0, 1)
    stream.load_state_dict(state)
    start = time.perf_counter()
    next(stream)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        sums = make_shards(folder, args.shards, args.per_shard, args.payload)
        counts = {path: args.per_shard for path in sums}
        total_samples = len(sums) * args.per_shard
        total_bytes = read_epoch(sums, counts, 0, 1)["rchar"]
        lines = [f"{len(sums)} shards, {total_samples} samples, "
                 f"{sum(os.path.getsize(p) for p in sums) / 2**20:.1f} MiB of files ({args.payload} B payload a "
                 f"sample); one rank reads {total_bytes / 2**20:.1f} MiB an epoch (sha256 check included)",
                 f"{'W':>5} {'ranks':>5} {'samples/rank':>13} {'file MiB/rank':>14} {'x total/W':>10} "
                 f"{'worst':>7} {'shards/rank':>12}"]
        for world in args.ranks:
            ranks = sorted({round(i * (world - 1) / max(args.measure - 1, 1)) for i in range(min(args.measure, world))})
            rows = [read_epoch(sums, counts, r, world) for r in ranks]
            ratios = [row["rchar"] / (total_bytes / world) for row in rows]
            assert all(row["served"] == row["samples"] for row in rows)
            lines.append(f"{world:5d} {len(ranks):5d} {statistics.mean(r['samples'] for r in rows):13.1f} "
                         f"{statistics.mean(r['rchar'] for r in rows) / 2**20:14.3f} {statistics.mean(ratios):10.3f} "
                         f"{max(ratios, key=lambda x: abs(x - 1)):7.3f} "
                         f"{statistics.mean(r['shards'] for r in rows):12.1f}")
        late = state_at(sums, counts, int(0.9 * total_samples))
        replayed = {k: v for k, v in late.items() if k != "orders"}
        times = {name: statistics.median(first_sample_s(sums, counts, state) for _ in range(5))
                 for name, state in (("fresh", state_at(sums, counts, 0)), ("resumed", late), ("replayed", replayed))}
        lines.append(f"first sample, one rank: fresh start {times['fresh'] * 1e3:.1f} ms; resumed at 90% of the epoch "
                     f"{times['resumed'] * 1e3:.1f} ms ({times['resumed'] / times['fresh']:.2f}x); from a state "
                     f"without the saved span order (replayed) {times['replayed'] * 1e3:.1f} ms")
        return "\n".join(lines)
