"""Loader worker processes (data.num_workers): over an epoch every sample reaches exactly one of 2 ranks x 2
workers, in the order and with the state of one process, and a resumed loader continues exactly."""

import itertools
import json

import pytest
from bad_shards import shard_with_corrupt_images

from mmfm.data.build import load_tokenizer, sample_encoder
from mmfm.data.loader import SampleStream
from mmfm.data.manifest import shard_paths
from mmfm.data.synth import build_synth_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 synthetic samples in 3 shards, plus a shard of 9 whose every third image is corrupt."""
    root = tmp_path_factory.mktemp("workers")
    build_synth_dataset(root / "synth", seed=0, train_size=120, val_size=10, shard_size=40, progress=False)
    extra = shard_with_corrupt_images(root / "extra.tar", 9, (20, 200, 30), "a green square on the right.")
    return root / "synth", shard_paths(root / "synth", "train") + [extra]


@pytest.fixture
def stream(data, make_cfg):
    cfg = make_cfg(data=data[0])
    encoder = sample_encoder(cfg, load_tokenizer(cfg))

    def make(rank=0, world=1, workers=0, state=None, loop=False):
        s = SampleStream(data[1], encoder, seed=3, shuffle_buffer=16, loop=loop, rank=rank, world=world,
                         workers=workers)
        if state is not None:
            s.load_state_dict(state)
        return s

    return make


def test_every_sample_once_over_two_ranks_and_two_workers(stream):
    everything = [s.key for s in stream()]
    assert len(everything) == 120 + 6 and len(set(everything)) == len(everything)
    per_rank = []
    for rank in range(2):
        inline, parallel = stream(rank, 2), stream(rank, 2, workers=2)
        keys = [s.key for s in parallel]
        assert keys == [s.key for s in inline]  # same samples, same order
        assert parallel.state_dict() == inline.state_dict()  # same position and skip counts
        assert sum(parallel.state_dict()["skipped"].values()) > 0
        per_rank.append(keys)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert not set(per_rank[0]) & set(per_rank[1])


def test_resumed_worker_stream_continues_exactly(stream):
    reference = [s.key for s in itertools.islice(stream(loop=True), 200)]  # into the second epoch
    first = stream(loop=True, workers=2)
    head = [s.key for s in itertools.islice(first, 70)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    rest = [s.key for s in itertools.islice(stream(loop=True, workers=2, state=state), 130)]
    assert head + rest == reference


def test_a_silently_truncated_shard_is_counted(data, make_cfg, tmp_path):
    """A zeroed header mid-shard ends Python's tar reading without an error; the stream compares what it read
    with the manifest's count and counts the missing samples as skipped "truncated_shard"."""
    import shutil
    import tarfile

    shard = tmp_path / "cut.tar"
    shutil.copy(data[1][0], shard)
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    blob = bytearray(shard.read_bytes())
    cut = members[len(members) // 2].offset  # a header half-way: 20 of 40 samples before it
    blob[cut:cut + 512] = bytes(512)
    shard.write_bytes(bytes(blob))
    cfg = make_cfg(data=data[0])
    encoder = sample_encoder(cfg, load_tokenizer(cfg))
    s = SampleStream([str(shard)], encoder, seed=0, shuffle_buffer=8, loop=False, expected_counts={str(shard): 40})
    keys = [x.key for x in s]
    assert len(keys) == 20 and s.state_dict()["skipped"] == {"truncated_shard": 20}
