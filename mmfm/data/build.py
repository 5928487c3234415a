"""Loaders for a job: tokenizer, encoder, train and validation streams, checked against the model config."""

from __future__ import annotations

from mmfm.config import JobConfig, image_tokens
from mmfm.config.validate import ConfigError
from mmfm.data.loader import BatchLoader, SampleEncoder, SampleStream
from mmfm.data.manifest import TOKENIZER, read_manifest, shard_paths
from mmfm.data.tokenizer import TextTokenizer
from pathlib import Path


def load_tokenizer(cfg: JobConfig) -> TextTokenizer:
    read_manifest(cfg.data.path)
    tok = TextTokenizer.load(Path(cfg.data.path) / TOKENIZER)
    if tok.vocab_size > cfg.model.language.vocab_size:
        raise ConfigError(f"model.language.vocab_size={cfg.model.language.vocab_size} is smaller than the "
                          f"tokenizer's {tok.vocab_size} tokens; set model.language.vocab_size>={tok.vocab_size}")
    if tok.image_id != cfg.model.image_token_id:
        raise ConfigError(f"model.image_token_id={cfg.model.image_token_id} but the tokenizer's <image> id is "
                          f"{tok.image_id}; set model.image_token_id={tok.image_id}")
    return tok


def sample_encoder(cfg: JobConfig, tokenizer: TextTokenizer) -> SampleEncoder:
    return SampleEncoder(tokenizer, cfg.data.prompt, image_tokens(cfg), cfg.model.vision.image_size,
                         cfg.data.seq_len)


def train_loader(cfg: JobConfig, tokenizer: TextTokenizer, dp_rank: int = 0, dp_size: int = 1) -> BatchLoader:
    """data.batch_size samples per data-parallel rank and micro-step, each rank its own share of the stream."""
    stream = SampleStream(shard_paths(cfg.data.path, "train"), sample_encoder(cfg, tokenizer), cfg.seed,
                          cfg.data.shuffle_buffer, rank=dp_rank, world=dp_size)
    return BatchLoader(stream, cfg.data.batch_size, tokenizer.pad_id)


def val_stream(cfg: JobConfig, tokenizer: TextTokenizer) -> SampleStream:
    """The validation split in file order, once through."""
    return SampleStream(shard_paths(cfg.data.path, "val"), sample_encoder(cfg, tokenizer), cfg.seed,
                        cfg.data.shuffle_buffer, shuffle=False, loop=False)
