"""Loader benchmark: `mmfm bench data`.

On the same shards: the raw tar-read ceiling (webdataset, no decoding), then the training stream —
decode + resize + tokenize (+ pack with --pack) — in the training process and with 1 and 2 loader
workers, in samples/s; and what training consumes: the samples/s of optimizer steps of the configured
model on batches already in memory. The ratio loader / training says whether the loader keeps training fed
(> 1: it does, with that margin).
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from typing import Optional

import webdataset as wds

from mmfm.config import load_config


def _rate(items, count: int, size=lambda item: 1) -> float:
    """Items per second over `count` items after the first (start-up: shard opening, worker launch)."""
    it = iter(items)
    next(it)
    start = time.perf_counter()
    done = sum(size(item) for item in itertools.islice(it, count))
    return done / (time.perf_counter() - start)


def _forever(shards: list[str]):
    while True:
        yield from wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())


def raw_read_rate(shards: list[str], samples: int) -> float:
    return _rate(_forever(shards), samples)


def loader_rate(cfg, workers: int, samples: int) -> float:
    """Samples/s of the training loader (packed rows when cfg.data.pack) with `workers` processes."""
    from mmfm.data.build import load_tokenizer, train_loader

    cfg.data.num_workers = workers
    loader = train_loader(cfg, load_tokenizer(cfg))
    return _rate(loader, max(1, samples // cfg.data.batch_size), size=lambda batch: len(batch.keys))


def training_rate(cfg, steps: int) -> float:
    """Samples/s the training loop consumes: optimizer steps on batches read beforehand."""
    from mmfm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        batches = [next(trainer.loader) for _ in range(steps + 1)]
        trainer.loader = iter(batches)
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        return sum(len(b.keys) for b in batches[1:]) / steps / statistics.median(times)


def run(data: Optional[str], overrides: list[str], samples: int, steps: int, workers: list[int]) -> str:
    from mmfm.data.manifest import shard_paths

    base = ["logger.wandb.enabled=false", "logger.progress_bar=false", "eval.num_samples=0", "train.val_every=0",
            "checkpoint.every=0", "experiment=demo"] + ([f"data.path={data}"] if data else []) + list(overrides)
    cfg = load_config(base)
    shards = shard_paths(cfg.data.path, "train")
    rows = [("raw tar read (ceiling)", raw_read_rate(shards, samples))]
    what = "decode+resize+tokenize" + ("+pack" if cfg.data.pack else "")
    for w in workers:
        label = f"{what}, {w} worker{'s' if w != 1 else ''}" if w else f"{what}, in the training process"
        rows.append((label, loader_rate(load_config(base), w, samples)))
    train = training_rate(load_config(base), steps)
    lines = [f"data {cfg.data.path} ({len(shards)} shards), batch {cfg.data.batch_size}, seq_len {cfg.data.seq_len}, "
             f"model {cfg.model.language.hidden_size}-wide x {cfg.model.language.num_layers} layers"]
    lines += [f"{label:45s} {rate:9.1f} samples/s" for label, rate in rows]
    lines.append(f"{'training consumes (demo model, fp32)':45s} {train:9.1f} samples/s")
    for label, rate in rows[1:]:
        lines.append(f"loader / training, {label}: {rate / train:.1f}x")
    return "\n".join(lines)

