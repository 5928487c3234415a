"""Loaders for a job: tokenizer, encoder, train and validation streams, checked against the model config."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

from mmfm.config import JobConfig, image_tokens
from mmfm.errors import ConfigError, MmfmError
from mmfm.data.chat import TEMPLATES, ChatTemplate, ConversationEncoder
from mmfm.data.chat_template import template_segments
from mmfm.data.loader import BatchLoader, SampleEncoder, SampleStream, reshard_stream_states
from mmfm.data.mixing import MixedStream, reshard_mixed_states
from mmfm.data.packing import PackedBatchLoader
from mmfm.data.processor import image_processor
from mmfm.data.manifest import TOKENIZER, ShardChecksums, read_manifest, split_locations
from mmfm.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def load_tokenizer(cfg: JobConfig) -> TextTokenizer:
    read_manifest(cfg.data.path)
    tok = TextTokenizer.load(Path(cfg.data.path) / TOKENIZER)
    if tok.vocab_size > cfg.model.language.vocab_size:
        raise ConfigError(f"model.language.vocab_size={cfg.model.language.vocab_size} is smaller than the "
                          f"tokenizer's {tok.vocab_size} tokens; set model.language.vocab_size>={tok.vocab_size}")
    if tok.image_id != cfg.model.image_token_id:
        raise ConfigError(f"model.image_token_id={cfg.model.image_token_id} but the tokenizer's <image> id is "
                          f"{tok.image_id}; set model.image_token_id={tok.image_id}")
    _check_chat_template(cfg, tok)
    return tok


def _check_chat_template(cfg: JobConfig, tok: TextTokenizer) -> None:
    """A conversation stage on a pretrained tokenizer needs its chat template (or data.chat.template=markers)."""
    choice = cfg.data.chat.template
    if choice not in TEMPLATES:
        raise ConfigError(f"data.chat.template={choice!r} is unknown; use one of {list(TEMPLATES)}")
    if cfg.stage.objective == "pretrain":
        return
    uses_template = choice == "tokenizer" or (choice == "auto" and tok.pretrained)
    if uses_template and tok.chat_template:
        _probe_template(tok)
    elif uses_template:
        raise ConfigError(f"stage={cfg.stage.objective} formats conversations with the tokenizer's chat template, but "
                          f"{tok.source} has none (no chat_template.jinja or tokenizer_config.json chat_template); "
                          "use the instruct model's tokenizer, or set data.chat.template=markers for mmfm's role "
                          "markers")


def _probe_template(tok: TextTokenizer) -> None:
    """The chat template renders a two-round conversation and only appends turns (else: one line, before the run)."""
    probe = [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
             {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    try:
        template_segments(tok.chat_template, probe, tok.special_token_strings())
    except (ValueError, MmfmError) as exc:
        raise ConfigError(f"the chat template of {tok.source} is unusable: {exc}") from None


def sample_encoder(cfg: JobConfig, tokenizer: TextTokenizer) -> SampleEncoder | ConversationEncoder:
    """Raw samples -> encoded samples for the stage: captions (pretrain) or conversations (sft, dpo, grpo); images
    as data.image says (its processor folder when set)."""
    processor = image_processor(cfg.data.image, cfg.model.vision.image_size)
    if cfg.stage.objective == "pretrain":
        return SampleEncoder(tokenizer, cfg.data.prompt, image_tokens(cfg), processor, cfg.data.seq_len)
    if cfg.stage.objective == "vla":
        return vla_encoder(cfg, tokenizer, processor)
    return ConversationEncoder(tokenizer, ChatTemplate(**dataclasses.asdict(cfg.data.chat)), image_tokens(cfg),
                               processor, cfg.data.seq_len, cfg.stage.objective, cfg.data.prompt)


def vla_encoder(cfg: JobConfig, tokenizer: TextTokenizer, processor=None, robot: Optional[dict] = None):
    """stage=vla's encoder: the robot statistics (default: the data set manifest's), the action tokens at the
    vocabulary's end."""
    from mmfm.embodied.actions import VLAEncoder, action_tokens, robot_entry

    v, vocab = cfg.stage.vla, cfg.model.language.vocab_size
    robot = robot if robot is not None else robot_entry(read_manifest(cfg.data.path))
    processor = processor or image_processor(cfg.data.image, cfg.model.vision.image_size)
    if robot is None:
        raise ConfigError(f"stage=vla needs robot data: {cfg.data.path} has no (single) lerobot source with "
                          "statistics in its manifest; build it with `mmfm data build` from a lerobot source")
    if robot.get("horizon", 0) < v.horizon:
        raise ConfigError(f"stage.vla.horizon={v.horizon} but {cfg.data.path} holds chunks of {robot.get('horizon')} "
                          "actions; lower the horizon or rebuild the data with a larger lerobot horizon")
    if tokenizer.vocab_size > vocab - v.bins:
        raise ConfigError(f"stage.vla.bins={v.bins} action tokens take the vocabulary's last ids, but the tokenizer "
                          f"uses {tokenizer.vocab_size} of model.language.vocab_size={vocab}; lower the bins to at most "
                          f"{vocab - tokenizer.vocab_size} or enlarge the vocabulary")
    conversation = ConversationEncoder(tokenizer, ChatTemplate(**dataclasses.asdict(cfg.data.chat)), image_tokens(cfg),
                                       processor, cfg.data.seq_len, "sft")
    tokens = action_tokens(robot, vocab, v.bins)
    head = cfg.model.action_head
    if v.action == "flow" and head.dims != len(tokens.action.low):
        raise ConfigError(f"model.action_head.dims={head.dims} but {cfg.data.path} holds {len(tokens.action.low)}-number "
                          f"actions; set model.action_head.dims={len(tokens.action.low)}")
    return VLAEncoder(conversation, tokens, v.horizon, v.state, v.pad_loss, flow=v.action == "flow")


def _stream(cfg: JobConfig, path: str, split: str, encoder, **kw) -> SampleStream:
    """The split's shards of the data set in `path` (read from data.shards_url for data.path when set), with their
    manifest counts and (data.verify_shards) sha256."""
    url = cfg.data.shards_url if path == cfg.data.path else ""
    shards = split_locations(path, split, url)
    checksums = ShardChecksums.of(path, split, url) if cfg.data.verify_shards else None
    return SampleStream(list(shards), encoder, cfg.seed, cfg.data.shuffle_buffer, checksums=checksums,
                        expected_counts={p: s["samples"] for p, s in shards.items() if "samples" in s}, **kw)


def _train_stream(cfg: JobConfig, path: str, encoder: SampleEncoder, dp_rank: int, dp_size: int) -> SampleStream:
    partitions = cfg.data.partitions or dp_size
    if partitions % dp_size and dp_rank == 0:
        log.warning("data.partitions=%d is not a multiple of the %d data-parallel ranks: each rank reads from more "
                    "shards than its share", partitions, dp_size)
    return _stream(cfg, path, "train", encoder, rank=dp_rank, world=dp_size, workers=cfg.data.num_workers,
                   partitions=partitions, read_log=cfg.data.read_log)


def _same_tokenizer(main: str, other: str) -> None:
    a, b = (read_manifest(p).get("tokenizer", {}).get("sha256") for p in (main, other))
    if a != b:
        raise ConfigError(f"data.mix data set {other} has another tokenizer than data.path={main}; build it with "
                          f"`tokenizer: {{file: {Path(main) / TOKENIZER}}}` in its recipe")


def train_loader(cfg: JobConfig, tokenizer: TextTokenizer, dp_rank: int = 0, dp_size: int = 1):
    """data.batch_size rows per data-parallel rank and micro-step, each rank its own share of every data set:
    one stream, or data.path mixed with data.mix by weight; rows of one sample each, or packed."""
    d, encoder = cfg.data, sample_encoder(cfg, tokenizer)
    stream = _train_stream(cfg, d.path, encoder, dp_rank, dp_size)
    if d.mix:
        for m in d.mix:
            _same_tokenizer(d.path, m.path)
        streams = [stream] + [_train_stream(cfg, m.path, encoder, dp_rank, dp_size) for m in d.mix]
        stream = MixedStream(streams, [d.weight] + [m.weight for m in d.mix], cfg.seed,
                             names=[d.path] + [m.path for m in d.mix])
    if d.pack:
        return PackedBatchLoader(stream, d.batch_size, d.seq_len, tokenizer.pad_id)
    return BatchLoader(stream, d.batch_size, tokenizer.pad_id)


def reshard_loader_states(states: list[dict], new_world: int) -> list[dict]:
    """Loader states of `new_world` data-parallel ranks that continue those saved by len(states) ranks."""
    if "streams" in states[0]:
        return reshard_mixed_states(states, new_world)
    return reshard_stream_states(states, new_world)


def loader_summary(state: dict) -> tuple[int, Counter]:
    """(epoch of the first data set, skipped samples by reason over every data set) of a loader state."""
    streams = state["streams"] if "streams" in state else [state]
    return int(streams[0]["epoch"]), sum((Counter(s.get("skipped", {})) for s in streams), Counter())


def check_val_split(cfg: JobConfig, validates: bool) -> bool:
    """Whether data.path has a val split. Validation (train.val_every, for objectives with a held-out loss) and the
    end-of-training evaluation (eval.num_samples) need one: a data set without one trains without any validation
    (no final validation either) when both are 0, and is a ConfigError otherwise, raised before anything is
    written. validates: the objective has a held-out loss. The val shards are checked now too (present, and their
    sha256 with data.verify_shards; each is hashed once per process), so that reading them after training fails
    for no reason known before it."""
    splits = read_manifest(cfg.data.path)["splits"]
    if splits.get("val", {}).get("shards") and cfg.data.shards_url:
        split_locations(cfg.data.path, "val", cfg.data.shards_url)  # names it can carry; checked when read
        return True
    if splits.get("val", {}).get("shards"):
        checksums = ShardChecksums.of(cfg.data.path, "val")  # DataError for a missing shard file
        for shard in checksums.sha256 if cfg.data.verify_shards else ():
            checksums.check(shard)
        return True
    t, e = cfg.train, cfg.eval
    readers = ([f"train.val_every={t.val_every}"] if t.val_every and validates else []) + \
        ([f"eval.num_samples={e.num_samples}"] if e.num_samples else [])
    if readers:
        raise ConfigError(f"data.path={cfg.data.path} has no val split, which {' and '.join(readers)} read; build "
                          "it with output.val_fraction (or output.val_count) in the recipe, or set train.val_every=0 "
                          "and eval.num_samples=0 to train without validation")
    return False


def val_stream(cfg: JobConfig, tokenizer: TextTokenizer) -> SampleStream:
    """The validation split in file order, once through."""
    return _stream(cfg, cfg.data.path, "val", sample_encoder(cfg, tokenizer), shuffle=False, loop=False)
