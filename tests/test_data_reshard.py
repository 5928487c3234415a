"""Resuming the sample stream at another data-parallel size: every sample of the epoch served exactly once."""

import itertools
import json
from collections import Counter

import pytest
from bad_shards import shard_with_corrupt_images

from mmfm.data.build import load_tokenizer, sample_encoder
from mmfm.data.loader import SampleStream, reshard_stream_states
from mmfm.data.manifest import DataError, shard_paths
from mmfm.data.synth import build_synth_dataset

NUM_BAD = 7  # corrupt images in the extra shard


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A 200-sample synthetic train split (4 shards) plus a shard of 21 samples, every third one corrupt."""
    root = tmp_path_factory.mktemp("reshard")
    build_synth_dataset(root / "synth", seed=0, train_size=200, val_size=10, shard_size=50, progress=False)
    return root / "synth", shard_with_corrupt_images(root / "extra.tar", 3 * NUM_BAD)


@pytest.fixture
def setup(small_data, make_cfg):
    """(stream factory, shards without bad samples, shards with NUM_BAD bad samples)."""
    data, extra = small_data
    cfg = make_cfg(data=data)
    encoder = sample_encoder(cfg, load_tokenizer(cfg))
    clean = shard_paths(data, "train")

    def stream(shards, state=None, rank=0, world=1, loop=False):
        s = SampleStream(shards, encoder, seed=0, shuffle_buffer=4, loop=loop, rank=rank, world=world)
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
        return s

    return stream, clean, clean + [extra]


def read(streams, n=None):
    """n samples from each stream (all that is left when None); their keys, rank after rank."""
    return [s.key for st in streams for s in itertools.islice(st, n)]


def ranks(stream, shards, states):
    return [stream(shards, st, rank=r, world=len(states)) for r, st in enumerate(states)]


def skips(states):
    return sum(sum(st["skipped"].values()) for st in states)


@pytest.mark.parametrize("new_world", [3, 1])
def test_reshard_serves_every_remaining_sample_exactly_once(setup, new_world):
    stream, _, shards = setup
    reference = read([stream(shards)])
    assert len(reference) == 200 + 2 * NUM_BAD and len(set(reference)) == len(reference)
    old = ranks(stream, shards, [None, None])
    before = read(old, 28)
    states = [s.state_dict() for s in old]
    assert 0 < skips(states) < NUM_BAD  # bad samples on both sides of the change
    assert [st["position"] for st in states] == [57, 60]  # a rank that skipped read further


    new_states = reshard_stream_states(states, new_world)
    assert len(new_states) == new_world and skips(new_states) == skips(states)
    assert all(not st["skipped"] for st in new_states[1:])
    assert [(st["base"], st["consumed"]) for st in new_states] == [(57, [57, 59])] * new_world
    new = ranks(stream, shards, new_states)
    after = read(new)
    assert Counter(before + after) == Counter(reference)  # every usable sample, each once
    assert skips([s.state_dict() for s in new]) == NUM_BAD  # no bad sample counted twice


def test_resharded_steps_read_what_one_process_with_a_larger_batch_reads(setup):
    stream, shards, _ = setup
    reference = read([stream(shards)])
    b, steps = 3, 5
    old = ranks(stream, shards, [None, None])
    served = [set(read(old, b)) for _ in range(steps)]
    new = ranks(stream, shards, reshard_stream_states([s.state_dict() for s in old], 4))
    served += [set(read(new, b)) for _ in range(steps)]
    sizes = [2 * b] * steps + [4 * b] * steps
    starts = list(itertools.accumulate([0] + sizes))
    assert served == [set(reference[i:i + n]) for i, n in zip(starts, sizes)]


def test_chain_one_to_four_to_one_is_exact_into_the_next_epoch(setup):
    stream, _, shards = setup
    reference = read([stream(shards)])
    fresh = stream(shards, {"epoch": 1, "position": 0})
    next_epoch = read([fresh], 10)
    one = stream(shards)
    served = read([one], 50)
    assert served == reference[:50]
    four = ranks(stream, shards, reshard_stream_states([one.state_dict()], 4))
    served += read(four, 23)
    states = [s.state_dict() for s in four]
    assert len(set(st["position"] for st in states)) > 1

    again = stream(shards, reshard_stream_states(states, 1)[0], loop=True)
    left = [k for k in reference if k not in set(served)]
    tail = read([again], len(left) + 10)
    assert tail[:len(left)] == left  # the rest of the epoch, in the global order
    assert Counter(served + tail[:len(left)]) == Counter(reference)
    assert tail[len(left):] == next_epoch  # a new epoch starts afresh
    state = again.state_dict()
    assert (state["epoch"], state["base"], state["consumed"]) == (1, 0, [])
    assert skips([state]) == NUM_BAD + skips([fresh.state_dict()])  # each bad sample counted once per epoch


def test_ranks_in_different_epochs_cannot_be_resharded():
    states = [{"epoch": 3, "position": 210, "skipped": {}}, {"epoch": 4, "position": 1, "skipped": {}}]
    with pytest.raises(DataError, match=r"different epochs \[3, 4\].*same data-parallel size \(2\) or from "
                                        r"another checkpoint"):
        reshard_stream_states(states, 4)


def test_same_size_is_unchanged_and_old_states_still_load(setup):
    stream, _, shards = setup
    old = ranks(stream, shards, [None, None])
    read(old, 20)
    states = [s.state_dict() for s in old]
    assert reshard_stream_states(states, 2) == states
    legacy = [{"epoch": st["epoch"], "position": st["position"], "skipped": st["skipped"]} for st in states]
    resumed = ranks(stream, shards, legacy)
    without_orders = [{k: v for k, v in st.items() if k != "orders"} for st in states]
    # defaults: base 0, nothing consumed, one partition; no saved span orders (they are replayed)
    assert [s.state_dict() for s in resumed] == [{**st, "orders": {}} for st in without_orders]
    assert read(resumed, 5) == read(old, 5)
