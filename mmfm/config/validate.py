"""Config validation: runs before any data, model or process group is touched.

Every failure is one line that names the field and the fix.
"""

from __future__ import annotations

import math

import torch

from mmfm.errors import MmfmError

from mmfm.config.schema import JobConfig

PRECISIONS = ("fp32", "bf16")

WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(MmfmError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: float) -> None:
    _require(value > 0, f"{name}={value} must be > 0")


def image_tokens(cfg: JobConfig) -> int:
    """Number of tokens one image occupies in the language model's sequence."""
    v = cfg.model.vision
    return (v.image_size // v.patch_size) ** 2


def _validate_model(cfg: JobConfig) -> None:
    from mmfm.models.registry import MODEL_REGISTRY

    m, v, lm = cfg.model, cfg.model.vision, cfg.model.language
    _require(m.name in MODEL_REGISTRY,
             f"model.name={m.name!r} is unknown; choose one of {sorted(MODEL_REGISTRY)}")
    for prefix, sub in (("model.vision", v), ("model.language", lm)):
        for key in ("hidden_size", "num_layers", "num_heads"):
            _positive(f"{prefix}.{key}", getattr(sub, key))
    _positive("model.vision.patch_size", v.patch_size)
    _positive("model.language.num_kv_heads", lm.num_kv_heads)
    _require(v.image_size % v.patch_size == 0,
             f"model.vision.image_size={v.image_size} is not divisible by model.vision.patch_size="
             f"{v.patch_size}; pick a patch size that divides the image size")
    _require(v.stem in ("patch", "conv"), f"model.vision.stem={v.stem!r} is unknown; use 'patch' or 'conv'")
    _require(v.stem != "conv" or v.patch_size & (v.patch_size - 1) == 0,
             f"model.vision.stem=conv needs a power-of-two model.vision.patch_size, not {v.patch_size}; "
             "use stem=patch or patch_size 2, 4, 8, 16")
    _require(v.hidden_size % v.num_heads == 0,
             f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_heads="
             f"{v.num_heads}; change one so that hidden_size % num_heads == 0")
    _require(lm.hidden_size % lm.num_heads == 0,
             f"model.language.hidden_size={lm.hidden_size} is not divisible by "
             f"model.language.num_heads={lm.num_heads}; change one so that hidden_size % num_heads == 0")
    _require(lm.num_heads % lm.num_kv_heads == 0,
             f"model.language.num_kv_heads={lm.num_kv_heads} does not divide model.language.num_heads="
             f"{lm.num_heads}; grouped-query attention needs num_heads % num_kv_heads == 0")
    _require((lm.hidden_size // lm.num_heads) % 2 == 0,
             f"model.language head size {lm.hidden_size // lm.num_heads} is odd; rotary embeddings need an "
             "even head size (hidden_size / num_heads)")
    _positive("model.language.intermediate_size", lm.intermediate_size)
    _require(lm.vocab_size > m.image_token_id >= 0,
             f"model.image_token_id={m.image_token_id} must lie inside model.language.vocab_size="
             f"{lm.vocab_size}")


def _validate_data(cfg: JobConfig) -> None:
    d, lm = cfg.data, cfg.model.language
    _positive("data.batch_size", d.batch_size)
    _positive("data.val_batch_size", d.val_batch_size)
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    needed = image_tokens(cfg) + 3
    _require(d.seq_len >= needed,
             f"data.seq_len={d.seq_len} is too short for one image ({image_tokens(cfg)} image tokens "
             f"+ BOS + at least one text token + EOS); set data.seq_len>={needed} or use a larger "
             "model.vision.patch_size")
    _require(d.seq_len <= lm.max_seq_len,
             f"data.seq_len={d.seq_len} exceeds model.language.max_seq_len={lm.max_seq_len}; raise "
             "model.language.max_seq_len or lower data.seq_len")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0 (0: decode in the training process)")
    for i, w in enumerate([d.weight] + [m.weight for m in d.mix]):
        name = "data.weight" if i == 0 else f"data.mix[{i - 1}].weight"
        _require(math.isfinite(w) and w > 0, f"{name}={w} must be a finite number > 0")
    p = cfg.parallel
    _require(not d.pack or (p.pp == 1 and p.cp == 1),
             f"data.pack=true is not supported with parallel.pp={p.pp} / parallel.cp={p.cp} (pipeline stages and "
             "context-parallel attention take no document boundaries); use data.pack=false or pp=cp=1")


def _validate_train(cfg: JobConfig) -> None:
    t = cfg.train
    _positive("train.max_steps", t.max_steps)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _require(t.precision in PRECISIONS, f"train.precision={t.precision!r} is unknown; use one of {PRECISIONS}")
    _positive("train.optim.lr", t.optim.lr)
    _require(0 <= t.optim.beta1 < 1 and 0 <= t.optim.beta2 < 1,
             f"train.optim.beta1={t.optim.beta1} and beta2={t.optim.beta2} must lie in [0, 1)")
    _require(0 <= t.schedule.warmup_steps <= t.max_steps,
             f"train.schedule.warmup_steps={t.schedule.warmup_steps} must lie in [0, train.max_steps="
             f"{t.max_steps}]")
    _require(0 <= t.schedule.min_lr_ratio <= 1,
             f"train.schedule.min_lr_ratio={t.schedule.min_lr_ratio} must lie in [0, 1]")
    _require(t.val_every >= 0, f"train.val_every={t.val_every} must be >= 0 (0 disables validation)")
    _require(t.val_batches >= 1, f"train.val_batches={t.val_batches} must be >= 1")
    from mmfm.parallel.activation_checkpoint import MODES

    _require(t.activation_checkpoint in MODES,
             f"train.activation_checkpoint={t.activation_checkpoint!r} is unknown; use one of {MODES}")
    _require(t.activation_checkpoint_every >= 1,
             f"train.activation_checkpoint_every={t.activation_checkpoint_every} must be >= 1")
    from mmfm.train.objectives import OBJECTIVES

    _require(cfg.stage.objective in OBJECTIVES,
             f"stage.objective={cfg.stage.objective!r} is unknown; use one of {sorted(OBJECTIVES)}")


def _validate_run(cfg: JobConfig) -> None:
    c, lg = cfg.checkpoint, cfg.logger
    _require(c.every >= 0, f"checkpoint.every={c.every} must be >= 0 (0 saves only at the end)")
    _require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")
    _require(bool(c.resume), "checkpoint.resume is empty; use 'auto', 'never' or a checkpoint path")
    _positive("logger.log_every", lg.log_every)
    _positive("logger.cpu_peak_tflops", lg.cpu_peak_tflops)
    _require(lg.peak_tflops is None or lg.peak_tflops > 0,
             f"logger.peak_tflops={lg.peak_tflops} must be > 0 or null (use the built-in table)")
    _require(lg.wandb.mode in WANDB_MODES,
             f"logger.wandb.mode={lg.wandb.mode!r} is unknown; use one of {WANDB_MODES}")
    _require(cfg.eval.num_samples >= 0, f"eval.num_samples={cfg.eval.num_samples} must be >= 0")
    _positive("eval.max_new_tokens", cfg.eval.max_new_tokens)


def _validate_parallel(cfg: JobConfig) -> None:
    from mmfm.parallel.dims import ParallelDims

    from mmfm.parallel.distributed import env_world_size

    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(cfg.model)
    dims.validate_run(cfg.data.seq_len, cfg.train.grad_accum_steps, cfg.data.batch_size)
    world = env_world_size()
    _require(dims.world_size == world,
             f"parallel dims {dims.sizes} ask for {dims.world_size} processes but this job has {world} "
             f"(WORLD_SIZE); launch with `torchrun --nproc_per_node={dims.world_size} -m mmfm.cli.main train ...` "
             "or change parallel.*")


def _validate_device(cfg: JobConfig) -> None:
    if cfg.device == "auto":
        return
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"device={cfg.device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        _require(torch.cuda.is_available(), f"device={cfg.device!r} but no CUDA device is visible; use device=cpu")


def _validate_kernels(cfg: JobConfig) -> None:
    from mmfm.kernels.apply import resolve_kernels

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    p = cfg.parallel
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    try:
        resolve_kernels(cfg.kernels, torch.device(device), p.tp, p.pp, p.cp, cfg.stage.objective, dtype)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: JobConfig) -> JobConfig:
    """Raise ConfigError on the first inconsistent value; return cfg unchanged otherwise."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_train(cfg)
    _validate_run(cfg)
    _validate_parallel(cfg)
    _validate_device(cfg)
    _validate_kernels(cfg)
    return cfg
