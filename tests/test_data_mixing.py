import itertools
import math
import tarfile

import pytest

from mmfm.data.build import load_tokenizer, sample_encoder
from mmfm.data.loader import SampleStream
from mmfm.data.manifest import shard_paths
from mmfm.data.mixing import MixedStream


class FakeStream:
    """(source, i) for i = 0, 1, ... (up to `size`, or forever); resumable by position."""

    def __init__(self, source: str, size: int | None = None):
        self.source, self.size, self.position = source, size, 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def __iter__(self):
        return self

    def __next__(self):
        if self.size is not None and self.position >= self.size:
            raise StopIteration
        self.position += 1
        return self.source, self.position - 1


def fake_mix(seed=0, weights=(5, 3, 2), sizes=(None, None, None)):
    names = ["a", "b", "c"][: len(weights)]
    return MixedStream([FakeStream(n, s) for n, s in zip(names, sizes)], list(weights), seed, names)


def take(stream, n):
    return list(itertools.islice(stream, n))


def test_measured_proportions_match_weights():
    # Binomial: the std of a measured fraction is sqrt(p(1-p)/n) <= sqrt(0.25/20000) = 0.0036,
    # so a tolerance of 0.015 is more than 4 std for every source.
    mix = fake_mix()
    out = take(mix, 20_000)
    assert len(out) == 20_000 and mix.draws == 20_000
    measured = mix.measured_proportions()
    assert set(measured) == {"a", "b", "c"}
    for name, target in zip("abc", (0.5, 0.3, 0.2)):
        assert abs(measured[name] - target) < 0.015, (name, measured)
        served = [i for src, i in out if src == name]
        assert served == list(range(len(served)))  # each source in its own order, nothing skipped
        assert mix.counts["abc".index(name)] == len(served)
    assert math.isclose(sum(measured.values()), 1.0)


def test_same_seed_same_sequence_other_seed_differs():
    first = take(fake_mix(seed=7), 3000)
    assert take(fake_mix(seed=7), 3000) == first
    other = take(fake_mix(seed=8), 3000)
    assert other != first
    assert sum(x != y for x, y in zip(first, other)) > 500  # not just a few draws apart


def test_resume_continues_exactly():
    whole = take(fake_mix(seed=3), 4500)
    mix = fake_mix(seed=3)
    assert take(mix, 1500) == whole[:1500]
    state = mix.state_dict()
    assert state["draws"] == 1500 and sum(state["counts"]) == 1500
    assert [s["position"] for s in state["streams"]] == state["counts"]

    resumed = fake_mix(seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 3000) == whole[1500:]
    assert resumed.draws == 4500


def test_resume_state_counts_continue():
    mix = fake_mix(seed=3)
    take(mix, 1500)
    resumed = fake_mix(seed=3)
    resumed.load_state_dict(mix.state_dict())
    take(mix, 100)
    take(resumed, 100)
    assert resumed.counts == mix.counts and resumed.measured_proportions() == mix.measured_proportions()


def test_exhausted_source_drops_out_and_mix_ends():
    mix = fake_mix(weights=(1, 1), sizes=(10, 1000))
    out = list(mix)
    assert len(out) == 1010
    assert sorted(out) == [("a", i) for i in range(10)] + [("b", i) for i in range(1000)]
    last_short = max(k for k, (src, _) in enumerate(out) if src == "a")
    assert last_short < 60  # 10 of ~1:1 draws: the short source ends early
    assert all(src == "b" for src, _ in out[last_short + 1:])
    assert mix.exhausted == {0, 1}
    with pytest.raises(StopIteration):
        next(mix)
    assert mix.counts == [10, 1000]


def test_exhaustion_is_deterministic_and_resumable():
    whole = take(fake_mix(seed=5, sizes=(50, 200, None)), 1000)
    assert take(fake_mix(seed=5, sizes=(50, 200, None)), 1000) == whole
    assert sum(src == "a" for src, _ in whole) == 50 and sum(src == "b" for src, _ in whole) == 200

    for cut in (40, 400):  # before and after the sources run out
        mix = fake_mix(seed=5, sizes=(50, 200, None))
        take(mix, cut)
        resumed = fake_mix(seed=5, sizes=(50, 200, None))
        resumed.load_state_dict(mix.state_dict())
        assert take(resumed, 1000 - cut) == whole[cut:], cut


def test_validation_errors():
    s = [FakeStream("a"), FakeStream("b")]
    with pytest.raises(ValueError, match="at least one stream"):
        MixedStream([], [], 0)
    with pytest.raises(ValueError, match="one per stream"):
        MixedStream(s, [1.0], 0)
    for bad in ([1, 0], [1, -2], [1, float("nan")], [1, float("inf")], [1, "2"]):
        with pytest.raises(ValueError, match="finite numbers > 0"):
            MixedStream(s, bad, 0)
    with pytest.raises(ValueError, match="distinct source names"):
        MixedStream(s, [1, 1], 0, names=["x", "x"])
    with pytest.raises(ValueError, match="distinct source names"):
        MixedStream(s, [1, 1], 0, names=["x"])

    state = MixedStream(s, [1, 1], 0).state_dict()
    three = MixedStream([FakeStream(n) for n in "abc"], [1, 1, 1], 0)
    with pytest.raises(ValueError, match="holds 2 source.*has 3.*same data sources"):
        three.load_state_dict(state)


def shard_keys(shards):
    keys = set()
    for path in shards:
        with tarfile.open(path) as tar:
            keys |= {name.split("/")[-1].split(".")[0] for name in tar.getnames()}
    return keys


def test_mixes_real_sample_streams(synth_dir, make_cfg):
    cfg = make_cfg()
    tok = load_tokenizer(cfg)
    enc = sample_encoder(cfg, tok)
    shards = shard_paths(synth_dir, "train")

    def stream(seed):
        return SampleStream(shards, enc, seed, cfg.data.shuffle_buffer)

    mix = MixedStream([stream(0), stream(1)], [3, 1], seed=0, names=["seed0", "seed1"])
    served = {0: [], 1: []}
    for _ in range(400):
        key = next(mix).key
        served[mix.last_source].append(key)
    # p = 0.75, n = 400: std = sqrt(0.75 * 0.25 / 400) = 0.022; 0.09 is > 4 std
    assert abs(mix.measured_proportions()["seed0"] - 0.75) < 0.09
    assert len(served[0]) + len(served[1]) == 400 and mix.counts == [len(served[0]), len(served[1])]

    keys = shard_keys(shards)
    assert len(keys) == 3000
    assert set(served[0]) | set(served[1]) <= keys
    assert len(set(served[0])) == len(served[0]) and len(set(served[1])) == len(served[1])  # within an epoch
    # each source is its own stream, in its own seeded order (seeds 0 and 1 give different orders)
    assert served[0] == [s.key for s in take(stream(0), len(served[0]))]
    assert served[1] == [s.key for s in take(stream(1), len(served[1]))]
    assert served[0][:len(served[1])] != served[1]


def test_mixed_states_reshard_to_another_data_parallel_size(synth_dir, make_cfg):
    """Two ranks mix two sources (one epoch each, loop=False) for a while; their states resharded to one
    rank continue so that every sample of each source is served exactly once over the epoch."""
    from mmfm.data.build import reshard_loader_states

    cfg = make_cfg()
    enc = sample_encoder(cfg, load_tokenizer(cfg))
    shards = shard_paths(synth_dir, "train")[:2]  # 1000 samples per source

    def mix(rank, world, state=None):
        streams = [SampleStream(shards, enc, seed, 64, loop=False, rank=rank, world=world) for seed in (0, 1)]
        m = MixedStream(streams, [3, 1], seed=0)
        if state is not None:
            m.load_state_dict(state)
        return m

    old = [mix(r, 2) for r in range(2)]
    served = {0: [], 1: []}
    for m in old:
        for _ in range(150):
            key = next(m).key
            served[m.last_source].append(key)
    (state,) = reshard_loader_states([m.state_dict() for m in old], 1)
    resumed = mix(0, 1, state)
    for sample in resumed:
        served[resumed.last_source].append(sample.key)
    for source in (0, 1):
        assert len(served[source]) == len(set(served[source])) == 1000
