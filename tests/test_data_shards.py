"""Shard-level assignment (mmfm.data.shards): a data-parallel rank reads only the shards of its own partitions,
every sample is served once per epoch over ranks x loader workers, a resume reads only what is left, resharding
4 -> 2 ranks stays exactly once, and one partition keeps webdataset's order (so one-process runs are unchanged).
Shards read through data.shards_url (a pipe: command, an fsspec URL) serve what the folder serves."""

import json
import random
import shutil
from collections import Counter

import pytest
import webdataset as wds

from conftest import SMALL_MODEL, STEPS
from mmfm.config import ConfigError, load_config, validate
from mmfm.data.build import load_tokenizer, sample_encoder, train_loader, val_stream
from mmfm.data.loader import SampleStream, reshard_stream_states
from mmfm.data.manifest import DataError, shard_counts, shard_paths
from mmfm.data.synth import build_synth_dataset
from parallel_runs import run_layout

SAMPLES, SHARD = 160, 20  # 8 shards: 4 partitions of 2 whole shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synth"
    build_synth_dataset(out, seed=0, train_size=SAMPLES, val_size=10, shard_size=SHARD, progress=False)
    return out


@pytest.fixture
def stream(data, make_cfg):
    cfg = make_cfg(data=data)
    encoder = sample_encoder(cfg, load_tokenizer(cfg))

    def make(rank=0, world=1, partitions=1, workers=0, state=None, log=""):
        s = SampleStream(shard_paths(data, "train"), encoder, seed=5, shuffle_buffer=16, loop=False, rank=rank,
                         world=world, workers=workers, partitions=partitions,
                         expected_counts=shard_counts(data, "train"), read_log=str(log))
        if state is not None:
            s.load_state_dict(state)
        return s

    return make


def reads(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def keys_of(stream) -> list[str]:
    return [s.key for s in stream]


def test_one_partition_serves_webdatasets_shuffle_of_the_seeded_shard_order(stream, data):
    shards = shard_paths(data, "train")
    rng = random.Random("5-0")
    rng.shuffle(shards)
    raw = iter(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))
    want = [s["__key__"] for s in wds.shuffle(16, initial=16, rng=rng)(raw)]
    assert len(want) == SAMPLES and keys_of(stream()) == want


def test_four_ranks_of_two_workers_serve_every_sample_once_from_disjoint_shards(stream, data, tmp_path):
    logs = [tmp_path / f"rank{r}.jsonl" for r in range(4)]
    served = {r: keys_of(stream(rank=r, world=4, partitions=4, workers=2, log=logs[r])) for r in range(4)}
    every = [k for keys in served.values() for k in keys]
    assert len(every) == len(set(every)) == SAMPLES and set(every) == set(keys_of(stream()))
    shards_of = {r: {x["shard"] for x in reads(logs[r])} for r in range(4)}
    assert all(len(s) == 2 for s in shards_of.values())  # 40 samples a rank: 2 whole shards, no other
    assert set().union(*shards_of.values()) == set(shard_paths(data, "train"))  # so the 4 sets are disjoint
    read = Counter((x["shard"], x["sample"]) for log in logs for x in reads(log))
    assert len(read) == SAMPLES and set(read.values()) == {1}  # each sample read once, by one worker
    assert all(len({x["pid"] for x in reads(log)}) == 2 for log in logs)
    assert served[1] == keys_of(stream(rank=1, world=4, partitions=4))  # the order of workers=0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_reads_only_the_samples_not_yet_served(stream, workers, tmp_path):
    full = keys_of(stream(rank=1, world=2, partitions=2))
    first = stream(rank=1, world=2, partitions=2)
    head = [next(first).key for _ in range(30)]
    log = tmp_path / "resumed.jsonl"
    rest = keys_of(stream(rank=1, world=2, workers=workers, state=first.state_dict(), log=log))
    assert head + rest == full and len(full) == SAMPLES // 2
    assert len(reads(log)) == len(rest) == SAMPLES // 2 - 30  # nothing served before the state is read again


def test_one_process_with_n_partitions_reads_each_step_what_n_ranks_read(stream):
    one = stream(partitions=4)
    ranks = [stream(rank=r, world=4, partitions=4) for r in range(4)]
    for _ in range(SAMPLES // 8):
        assert sorted(next(one).key for _ in range(8)) == sorted(next(s).key for s in ranks for _ in range(2))


def test_resharding_four_ranks_to_two_serves_the_rest_once_each_rank_in_its_own_shards(stream, tmp_path):
    old = [stream(rank=r, world=4, partitions=4) for r in range(4)]
    served = [next(s).key for r, s in enumerate(old) for _ in range(5 + 3 * r)]  # uneven positions
    states = reshard_stream_states([s.state_dict() for s in old], 2)
    assert {s["partitions"] for s in states} == {4}
    logs = [tmp_path / f"new{r}.jsonl" for r in range(2)]
    rest = [k for r in range(2) for k in keys_of(stream(rank=r, world=2, state=states[r], log=logs[r]))]
    assert len(served + rest) == len(set(served + rest)) == SAMPLES
    shards_of = [{x["shard"] for x in reads(log)} for log in logs]
    assert shards_of[0] and shards_of[1] and not shards_of[0] & shards_of[1]


def test_more_partitions_than_samples_is_one_line(stream):
    with pytest.raises(DataError, match=f"holds {SAMPLES} samples in 8 shard.*fewer than its 200 partitions"):
        next(stream(partitions=200))


def test_negative_partitions_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"data.partitions=-1 must be >= 0"):
        validate(load_config(["data.partitions=-1"]))


def test_eight_data_parallel_processes_read_disjoint_shards(tmp_path):
    """8 gloo ranks (FSDP over 8) train 3 steps on 16 shards: each rank's read log names only its 2 shards."""
    data = tmp_path / "synth"
    build_synth_dataset(data, seed=0, train_size=64, val_size=8, shard_size=4, progress=False)
    log = tmp_path / "reads.jsonl"
    run_layout(8, [f"data.path={data}", *SMALL_MODEL, *STEPS, "parallel.dp_shard=8", "data.batch_size=1",
                   f"data.read_log={log}"], tmp_path)
    shards_of = {r: {x["shard"] for x in reads(log) if x["rank"] == r} for r in range(8)}
    assert all(1 <= len(s) <= 2 for s in shards_of.values())  # 6 of a rank's 8 samples: in its 2 shards
    assert sum(len(s) for s in shards_of.values()) == len(set().union(*shards_of.values()))  # disjoint
    assert Counter(x["rank"] for x in reads(log)) == {r: 6 for r in range(8)}  # 3 steps x 2 micro-batches x 1


@pytest.fixture
def remote(data, tmp_path):
    """data's manifest and tokenizer in a folder of their own; its shards stay where data is, read by URL."""
    here = tmp_path / "here"
    shutil.copytree(data, here, ignore=shutil.ignore_patterns("*.tar"))
    return here


@pytest.mark.parametrize("template", ["pipe:cat {folder}/{{shard}}", "file://{folder}/{{shard}}"])
def test_shards_read_through_a_url_serve_what_the_folder_serves(data, remote, make_cfg, template):
    cfg = make_cfg(f"data.shards_url='{template.format(folder=data)}'", data=remote)
    assert cfg.data.shards_url.endswith("/{shard}")
    local = make_cfg(data=data)
    got, want = train_loader(cfg, load_tokenizer(cfg)), train_loader(local, load_tokenizer(local))
    for _ in range(3):
        assert next(got).keys == next(want).keys
    assert keys_of(val_stream(cfg, load_tokenizer(cfg))) == keys_of(val_stream(local, load_tokenizer(local)))


def test_a_shard_changed_behind_its_url_is_refused(data, remote, make_cfg, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data, elsewhere)
    first = sorted(elsewhere.glob("*.tar"))
    first[0].write_bytes(first[1].read_bytes())  # same counts, other samples
    cfg = make_cfg(f"data.shards_url='file://{elsewhere}/{{shard}}'", "data.partitions=1", data=remote)
    loader = train_loader(cfg, load_tokenizer(cfg))
    with pytest.raises(DataError, match=f"shard file://{elsewhere}/{first[0].name} does not match the sha256"):
        for _ in range(SAMPLES):
            next(loader)


@pytest.mark.parametrize("url", ["s3://bucket/caps", "/data/caps/{shard}", "pipe:cat {shard} {shard}"])
def test_a_shards_url_needs_a_scheme_and_one_placeholder(url):
    with pytest.raises(ConfigError, match=r"data.shards_url=.* must be a URL \(scheme://...\) or a pipe: command"):
        validate(load_config([f"data.shards_url='{url}'"]))
