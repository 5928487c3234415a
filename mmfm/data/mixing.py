"""Weighted mixing of several sample streams, deterministic and resumable.

Draw n picks source i with probability weights[i] / sum(weights). The random number of draw n comes from
a generator seeded by (seed, n // 1024), so it depends only on (seed, n): resuming needs the draw count,
each source's own state and the set of sources that ran out, never RNG internals. Restored that way, the
next draws are exactly those the uninterrupted run would have made.

A source that runs out (StopIteration, a loop=False stream) is dropped and the remaining weights
renormalize: draw n then maps the same random number onto the remaining sources, so the choices from
there on differ from those with every source live, but stay a function of (seed, n, exhausted sources).
The mix ends when every source has run out.

Data parallelism: each source stream splits its samples by rank itself, and every rank mixes its own
share of every source with the same seed. All ranks therefore make the same sequence of source choices
and serve the same proportions (exactly, until a source runs out on some rank; the shares of a source
differ by at most one sample per epoch plus skipped samples). The mixer never skips or repeats a sample
of a source: it only calls next() on it, so over the run each sample of a source is seen at most once per
epoch of that source, exactly once within each source epoch as its stream guarantees across ranks (a
heavily weighted small source simply cycles through more epochs). Note that the ranks of one step draw
from the same source at the same draw number, so a global batch's mix is no less variable than one rank's.
"""

from __future__ import annotations

import bisect
import math
import random
from itertools import accumulate
from typing import Any, Iterator, Optional

from mmfm.data.loader import reshard_stream_states

BLOCK = 1024  # random numbers made per seeded generator


def check_weights(streams: list, weights: list[float]) -> list[float]:
    if not streams:
        raise ValueError("MixedStream needs at least one stream")
    if len(weights) != len(streams):
        raise ValueError(f"got {len(weights)} mixing weight(s) for {len(streams)} stream(s); give one per stream")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float))
           or not math.isfinite(w) or w <= 0]
    if bad:
        raise ValueError(f"mixing weights must be finite numbers > 0, got {list(weights)} (bad: {bad})")
    return [float(w) for w in weights]


class MixedStream:
    """Samples from `streams`, source i drawn with probability weights[i] / sum(weights).

    State: {"draws": samples served, "streams": each stream's state_dict(), "counts": samples served per
    source, "exhausted": indices of sources that ran out}. `last_source` is the source of the last sample.
    """

    def __init__(self, streams: list, weights: list[float], seed: int, names: Optional[list[str]] = None):
        self.weights = check_weights(streams, weights)
        names = [f"source{i}" for i in range(len(streams))] if names is None else list(names)
        if len(names) != len(streams) or len(set(names)) != len(names):
            raise ValueError(f"need {len(streams)} distinct source names, got {names}")
        self.streams, self.seed, self.names = list(streams), seed, names
        self.draws = 0
        self.counts = [0] * len(streams)
        self.exhausted: set[int] = set()
        self.last_source: Optional[int] = None
        self._block: tuple[int, list[float]] = (-1, [])

    def state_dict(self) -> dict:
        return {"draws": self.draws, "streams": [s.state_dict() for s in self.streams],
                "counts": list(self.counts), "exhausted": sorted(self.exhausted)}

    def load_state_dict(self, state: dict) -> None:
        n = len(state["streams"])
        if n != len(self.streams):
            raise ValueError(f"the mixed-stream state holds {n} source(s) but this MixedStream has "
                             f"{len(self.streams)}; resume with the same data sources, in the same order, "
                             "as the run that saved it")
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)
        self.draws = int(state["draws"])
        self.counts = [int(c) for c in state.get("counts", [0] * n)]
        self.exhausted = {int(i) for i in state.get("exhausted", [])}
        self.last_source = None

    def measured_proportions(self) -> dict[str, float]:
        total = sum(self.counts)
        return {name: (c / total if total else 0.0) for name, c in zip(self.names, self.counts)}

    def _uniform(self, n: int) -> float:
        block = n // BLOCK
        if self._block[0] != block:
            rng = random.Random(f"{self.seed}-mix-{block}")
            self._block = (block, [rng.random() for _ in range(BLOCK)])
        return self._block[1][n % BLOCK]

    def _choose(self, u: float) -> int:
        live = [i for i in range(len(self.streams)) if i not in self.exhausted]
        cum = list(accumulate(self.weights[i] for i in live))
        return live[min(bisect.bisect_right(cum, u * cum[-1]), len(live) - 1)]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        u = self._uniform(self.draws)
        while len(self.exhausted) < len(self.streams):
            i = self._choose(u)
            try:
                sample = next(self.streams[i])
            except StopIteration:
                self.exhausted.add(i)
                continue
            self.draws += 1
            self.counts[i] += 1
            self.last_source = i
            return sample
        raise StopIteration


def reshard_mixed_states(states: list[dict], new_world: int) -> list[dict]:
    """MixedStream states of `new_world` ranks continuing those of len(states) ranks: each source's stream
    states resharded (reshard_stream_states); the draw count and the per-source counts, which every rank
    shares (same seed, same choices), taken from rank 0."""
    per_source = zip(*(s["streams"] for s in states))
    resharded = [reshard_stream_states(list(source_states), new_world) for source_states in per_source]
    head = states[0]
    return [{"draws": head["draws"], "counts": list(head.get("counts", [])), "exhausted": list(head.get("exhausted", [])),
             "streams": [source[r] for source in resharded]} for r in range(new_world)]
