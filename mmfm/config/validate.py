"""Config validation: runs before any data, model or process group is touched.

Every failure is one line that names the field and the fix.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmfm.config.checks import positive as _positive
from mmfm.config.checks import require as _require
from mmfm.config.schema import JobConfig
from mmfm.config.world import Resolved, World, env_world, resolve_layout
from mmfm.errors import ConfigError

if TYPE_CHECKING:
    from mmfm.parallel.dims import ParallelDims

PRECISIONS = ("fp32", "bf16")

WANDB_MODES = ("offline", "online", "disabled")




def image_tokens(cfg: JobConfig) -> int:
    """Number of tokens one image occupies in the language model's sequence."""
    v = cfg.model.vision
    return (v.image_size // v.patch_size) ** 2


def _validate_model(cfg: JobConfig) -> None:
    from mmfm.models import MODEL_REGISTRY

    _require(cfg.model.name in MODEL_REGISTRY,
             f"model.name={cfg.model.name!r} is unknown; choose one of {sorted(MODEL_REGISTRY)}")
    MODEL_REGISTRY[cfg.model.name].validate(cfg.model)
    MODEL_REGISTRY[cfg.model.name].validate_training(cfg.model)
    _validate_pretrained(cfg)
    _validate_lora(cfg)
    head = cfg.model.action_head.kind
    _require(head in ("none", "flow"), f"model.action_head.kind={head!r} is unknown; use none or flow")
    _require(head == "none" or (cfg.stage.objective == "vla" and cfg.stage.vla.action == "flow"),
             f"model.action_head.kind={head} is trained by stage=vla with stage.vla.action=flow; set those, or "
             "model.action_head.kind=none")


def _validate_lora(cfg: JobConfig) -> None:
    """model.lora's numbers, and every target pattern matching at least one nn.Linear of the model (built on the
    meta device: no memory)."""
    from mmfm.models.lora import BASE_DTYPES

    lora = cfg.model.lora
    if not lora.enabled:
        return
    _require(lora.rank > 0, f"model.lora.rank={lora.rank} must be > 0 (e.g. 8); to train without adapters set "
             "model.lora.enabled=false")
    _require(lora.alpha > 0, f"model.lora.alpha={lora.alpha} must be > 0 (the adapter's scale is alpha / rank; "
             "e.g. alpha = 2 x rank)")
    _require(0 <= lora.dropout < 1, f"model.lora.dropout={lora.dropout} must lie in [0, 1)")
    _require(lora.base_dtype in BASE_DTYPES, f"model.lora.base_dtype={lora.base_dtype!r} is unknown; use one of "
             f"{sorted(BASE_DTYPES)}")
    _require(len(lora.targets) > 0, "model.lora.targets is empty; name the linears to adapt, e.g. "
             "[language.layers.*.attention.w[qkvo],language.layers.*.feed_forward.w[123]]")
    from mmfm.models import build_model
    from mmfm.models.lora import unmatched_patterns

    unmatched = unmatched_patterns(build_model(cfg.model, "meta"), list(lora.targets)) or [None]
    _require(unmatched == [None], f"model.lora.targets pattern {unmatched[0]!r} matches no nn.Linear of the model; "
             "patterns are fnmatch over module names such as language.layers.0.attention.wq (list them with "
             "[n for n, m in model.named_modules()])")


def _validate_pretrained(cfg: JobConfig) -> None:
    """model.pretrained's folders exist, hold config.json, and describe the model of model.*."""
    p = cfg.model.pretrained
    if not (p.vlm or p.vision or p.language):
        return
    from mmfm.checkpoint.hf import HFCheckpointError
    from mmfm.checkpoint.hf_vlm import check_pretrained

    try:
        check_pretrained(cfg.model)
    except HFCheckpointError as exc:
        raise ConfigError(f"model.pretrained: {exc}") from None


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
    _require(d.partitions >= 0, f"data.partitions={d.partitions} must be >= 0 (0: the data-parallel size)")
    _require(not d.shards_url or (d.shards_url.count("{shard}") == 1
                                  and (d.shards_url.startswith("pipe:") or "://" in d.shards_url)),
             f"data.shards_url={d.shards_url!r} must be a URL (scheme://...) or a pipe: command with {{shard}} once, "
             "e.g. s3://bucket/caps/{shard}")
    for i, w in enumerate([d.weight] + [m.weight for m in d.mix]):
        name = "data.weight" if i == 0 else f"data.mix[{i - 1}].weight"
        _require(math.isfinite(w) and w > 0, f"{name}={w} must be a finite number > 0")
    _validate_image(cfg)


def _validate_packing(cfg: JobConfig) -> None:
    p = cfg.parallel
    _require(not cfg.data.pack or (p.pp == 1 and p.cp == 1),
             f"data.pack=true is not supported with parallel.pp={p.pp} / parallel.cp={p.cp} (pipeline stages and "
             "context-parallel attention take no document boundaries); use data.pack=false or pp=cp=1")


def _validate_image(cfg: JobConfig) -> None:
    """data.image's fields, and its processor folder read and matched to model.vision.image_size."""
    from mmfm.checkpoint.errors import CheckpointError
    from mmfm.data.processor import image_processor

    try:
        image_processor(cfg.data.image, cfg.model.vision.image_size)
    except CheckpointError as exc:
        raise ConfigError(f"data.image.processor: {exc}") from None


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
    _require(t.global_batch >= 0, f"train.global_batch={t.global_batch} must be >= 0 (0: not fixed)")


MODEL_PARTS = ("vision", "projector", "language")
OBJECTIVES = ("pretrain", "sft", "dpo", "grpo", "vla")


def _validate_stage(cfg: JobConfig) -> None:
    st, p = cfg.stage, cfg.parallel
    _require(st.objective in OBJECTIVES, f"stage.objective={st.objective!r} is unknown; use one of {OBJECTIVES} "
             "(or stage=<name> to pick a preset)")
    unknown = [n for n in st.freeze if n not in MODEL_PARTS]
    _require(not unknown, f"stage.freeze names {unknown}; freeze any of {MODEL_PARTS}")
    _require(set(MODEL_PARTS) - set(st.freeze), f"stage.freeze={list(st.freeze)} leaves nothing to train")
    _require(not st.init_from or Path(st.init_from).exists(),
             f"stage.init_from={st.init_from}: no such run directory or checkpoint; give the earlier stage's run "
             "directory (or one of its checkpoints/step_* folders)")
    if st.objective in ("dpo", "grpo"):
        _require(p.pp == 1 and p.cp == 1, f"stage.objective={st.objective} takes whole sequences: use parallel.pp=1 "
                 f"and parallel.cp=1 (now pp={p.pp}, cp={p.cp}); tp and data parallelism are supported")
        _require(not cfg.data.pack, f"stage.objective={st.objective} scores whole answers: set data.pack=false")
    if st.objective == "dpo":
        _validate_preference(cfg)
    if st.objective == "grpo":
        _validate_grpo(cfg)
    if st.objective == "vla":
        _validate_vla(cfg)


def _validate_vla(cfg: JobConfig) -> None:
    v = cfg.stage.vla
    _require(v.action in ("tokens", "flow"), f"stage.vla.action={v.action!r} is unknown; use tokens or flow")
    if v.action == "flow":
        _validate_flow_head(cfg)
    _require(2 <= v.bins <= cfg.model.language.vocab_size // 2,
             f"stage.vla.bins={v.bins} must be between 2 and half the vocabulary ({cfg.model.language.vocab_size})")
    _require(v.horizon >= 1, f"stage.vla.horizon={v.horizon} must be at least 1")
    _require(v.bin_init in ("ordinal", "keep"), f"stage.vla.bin_init={v.bin_init!r} is unknown; use ordinal or keep")
    _require(v.label_sigma >= 0, f"stage.vla.label_sigma={v.label_sigma} must be >= 0 (0: one-hot targets)")
    _require(v.label_sigma == 0 or (cfg.parallel.pp == 1 and cfg.parallel.tp == 1),
             f"stage.vla.label_sigma={v.label_sigma} is not supported with parallel.tp={cfg.parallel.tp}, "
             f"pp={cfg.parallel.pp} (the soft targets need whole logits on one rank); set it to 0")
    _require(cfg.eval.num_samples == 0, "stage=vla is measured in closed loop, not by caption accuracy: set "
             "eval.num_samples=0")


def _validate_flow_head(cfg: JobConfig) -> None:
    v, head, p = cfg.stage.vla, cfg.model.action_head, cfg.parallel
    _require(head.kind == "flow", f"stage.vla.action=flow needs the model's flow head: set model.action_head.kind=flow "
             f"(it is {head.kind!r}) and model.action_head.dims to the data's action dimensions")
    _require(head.horizon == v.horizon, f"model.action_head.horizon={head.horizon} must equal "
             f"stage.vla.horizon={v.horizon}")
    _require(head.dims >= 1 and head.layers >= 0 and head.width >= 0, f"model.action_head dims={head.dims}, "
             f"layers={head.layers}, width={head.width}: dims must be >= 1, the others >= 0")
    _require(v.flow_steps >= 1, f"stage.vla.flow_steps={v.flow_steps} must be at least 1")
    _require(p.tp == 1 and p.pp == 1 and p.cp == 1, f"stage.vla.action=flow is not supported with parallel.tp={p.tp}, "
             f"pp={p.pp}, cp={p.cp} (the head reads whole hidden states on one rank); use data parallelism (fsdp2)")
    _require(cfg.engine.name == "native", f"stage.vla.action=flow runs on the native engine only (engine.name="
             f"{cfg.engine.name}); set engine.name=native")
    _require(not cfg.model.lora.enabled, "stage.vla.action=flow with model.lora.enabled=true is not supported (the "
             "new head would train in full beside frozen weights); set model.lora.enabled=false")


def _validate_preference(cfg: JobConfig) -> None:
    from mmfm.train.alignment_losses import PREFERENCE_LOSSES

    pref = cfg.stage.preference
    _require(pref.loss in PREFERENCE_LOSSES,
             f"stage.preference.loss={pref.loss!r} is unknown; use one of {sorted(PREFERENCE_LOSSES)}")
    _require(pref.reference in ("model", "precomputed"),
             f"stage.preference.reference={pref.reference!r} is unknown; use 'model' or 'precomputed'")
    _positive("stage.preference.beta", pref.beta)
    _require(0 <= pref.label_smoothing <= 0.5,
             f"stage.preference.label_smoothing={pref.label_smoothing} must lie in [0, 0.5]")
    needs_model = pref.loss in ("dpo", "cdpo", "ipo") and pref.reference == "model"
    _require(not needs_model or cfg.stage.init_from,
             f"stage.preference.loss={pref.loss} compares with a frozen reference model, loaded from stage.init_from: "
             "set stage.init_from=<the SFT run directory>, or use stage.preference.reference=precomputed with data "
             "made by `mmfm data reference-logps`")


def _validate_grpo(cfg: JobConfig) -> None:
    from mmfm.train.rewards import REWARDS

    g, p = cfg.stage.grpo, cfg.parallel
    _require(p.tp == 1, f"stage.objective=grpo samples with the KV-cache generator, which runs unsplit models: use "
             f"parallel.tp=1 (now {p.tp}) with data parallelism (fsdp/hsdp)")
    _require(g.group_size >= 2, f"stage.grpo.group_size={g.group_size} must be >= 2 (advantages compare the "
             "answers of one prompt)")
    _require(g.temperature > 0, f"stage.grpo.temperature={g.temperature} must be > 0: a group of greedy answers is "
             "identical and carries no signal")
    _positive("stage.grpo.clip_eps", g.clip_eps)
    _require(g.kl_coef >= 0, f"stage.grpo.kl_coef={g.kl_coef} must be >= 0")
    _require(g.kl_coef == 0 or cfg.stage.init_from, f"stage.grpo.kl_coef={g.kl_coef} needs a reference model, "
             "loaded from stage.init_from: set stage.init_from=<the SFT run directory> or stage.grpo.kl_coef=0")
    _positive("stage.grpo.max_new_tokens", g.max_new_tokens)
    _require(g.reward in REWARDS, f"stage.grpo.reward={g.reward!r} is unknown; use one of {sorted(REWARDS)}")


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
    _require(cfg.eval.every >= 0 and cfg.eval.limit >= 0,
             f"eval.every={cfg.eval.every} and eval.limit={cfg.eval.limit} must be >= 0 (0: at the end; all items)")


def _validate_parallel(cfg: JobConfig) -> ParallelDims:
    from mmfm.parallel.dims import ParallelDims
    from mmfm.parallel.distributed import env_world_size

    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(cfg.model)
    dims.validate_run(cfg.data.seq_len, cfg.train.grad_accum_steps, cfg.data.batch_size)
    split = [f"{name}={getattr(dims, name)}" for name in ("pp", "cp") if getattr(dims, name) > 1]
    _require(not (cfg.eval.tasks and split),
             f"eval.tasks runs on data- and tensor-parallel layouts, not at parallel.{', '.join(split)}; score the "
             "run's checkpoints with `mmfm eval RUN --all-checkpoints` instead")
    world = env_world_size()
    _require(dims.world_size == world,
             f"parallel dims {dims.sizes} ask for {dims.world_size} processes but this job has {world} "
             f"(WORLD_SIZE); launch with `torchrun --nproc_per_node={dims.world_size} -m mmfm.cli.main train ...` "
             "or change parallel.*")
    _validate_global_batch(cfg, dims)
    return dims


def _validate_engine(cfg: JobConfig) -> None:
    from mmfm.parallel.distributed import env_world_size
    from mmfm.train.deepspeed_engine import validate_engine

    validate_engine(cfg, env_world_size())


def _validate_global_batch(cfg: JobConfig, dims: ParallelDims) -> None:
    """train.global_batch, when set, is what the layout gives: data.batch_size x grad_accum_steps x dp."""
    want, b, a = cfg.train.global_batch, cfg.data.batch_size, cfg.train.grad_accum_steps
    got = b * a * dims.dp_size
    _require(not want or got == want,
             f"train.global_batch={want} but data.batch_size={b} x train.grad_accum_steps={a} x {dims.dp_size} "
             f"data-parallel ranks (parallel.dp_replicate x dp_shard) = {got}; change data.batch_size or "
             f"train.grad_accum_steps so that the product is {want}, or set train.global_batch=0")


def _validate_device(cfg: JobConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"device={cfg.device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        _require(torch.cuda.is_available(), f"device={cfg.device!r} but no CUDA device is visible; use device=cpu")
    return dev


def _validate_kernels(cfg: JobConfig, device: torch.device) -> dict[str, str]:
    from mmfm.kernels.apply import loss_objective, resolve_kernels

    p = cfg.parallel
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    try:
        return resolve_kernels(cfg.kernels, device, p.tp, p.pp, p.cp, loss_objective(cfg.stage), dtype)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


CLUSTER_KINDS = ("local", "slurm")


def slurm_time_s(value: str) -> float | None:
    """Seconds of a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, UNLIMITED);
    None when malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return math.inf
    days, sep, clock = value.rpartition("-")
    parts = clock.split(":")
    if len(parts) > 3 or not all(p.isdigit() for p in parts + ([days] if sep else [])):
        return None
    nums = [int(p) for p in parts]
    if sep:  # D-HH[:MM[:SS]]
        h, m, s = nums + [0] * (3 - len(nums))
    elif len(nums) == 3:  # HH:MM:SS
        h, m, s = nums
    else:  # minutes or MM:SS
        h, m, s = 0, nums[0], nums[1] if len(nums) == 2 else 0
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def procs_per_node(cfg: JobConfig) -> int:
    """Training processes per node: cluster.procs_per_node, else one per GPU, else the layout spread over the nodes."""
    from mmfm.parallel.dims import ParallelDims

    c = cfg.cluster
    return c.procs_per_node or c.gpus_per_node or ParallelDims.from_config(cfg.parallel).world_size // c.nodes


SBATCH_VALUE = re.compile(r"[A-Za-z0-9._:+@%,/=-]*")  # what an #SBATCH value may hold: no space, newline or quote
SBATCH_EXAMPLES = {"job_name": "mmfm", "partition": "gpu", "account": "myproject", "qos": "normal", "mem": "64G"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # newline, carriage return, tab, NUL, ...


def _one_line(name: str, value: str) -> None:
    _require(not _CONTROL.search(value),
             f"{name}={value!r} holds a newline or another control character, which would start a new line of the "
             "job script; write it on one line")


def _validate_cluster_text(c) -> None:
    """Values pasted into the sbatch script or the ranks' environment cannot add lines or commands to it:
    #SBATCH values (Slurm only) come from an allow-list, env names are identifiers, everything else is one line
    (and quoted where the script uses it). cluster.setup lines are shell by design and are not checked."""
    for key, example in SBATCH_EXAMPLES.items() if c.kind == "slurm" else ():
        value = getattr(c, key)
        _require(bool(SBATCH_VALUE.fullmatch(value)),
                 f"cluster.{key}={value!r} may hold only letters, digits and . _ : + @ % , / = - (it becomes an "
                 f"#SBATCH line); e.g. cluster.{key}={example}")
    for i, flag in enumerate(c.sbatch_flags):
        _one_line(f"cluster.sbatch_flags[{i}]", flag)
        _require(flag.startswith("-"), f"cluster.sbatch_flags[{i}]={flag!r} is not an sbatch option; write options "
                                       "such as --exclusive or --constraint=h100")
    for i, flag in enumerate(c.srun_flags):
        _one_line(f"cluster.srun_flags[{i}]", flag)
    for key in ("python", "container_image", "container_mounts"):
        _one_line(f"cluster.{key}", getattr(c, key))
    for name, value in c.env.items():
        _require(bool(ENV_NAME.fullmatch(name)),
                 f"cluster.env has the variable name {name!r}; environment variable names are letters, digits and _ "
                 "(not starting with a digit), e.g. NCCL_SOCKET_IFNAME")
        _one_line(f"cluster.env.{name}", value)


def _validate_cluster(cfg: JobConfig) -> None:
    from mmfm.parallel.dims import ParallelDims

    c = cfg.cluster
    _require(c.kind in CLUSTER_KINDS, f"cluster.kind={c.kind!r} is unknown; use one of {CLUSTER_KINDS}")
    _positive("cluster.nodes", c.nodes)
    _require(c.kind == "slurm" or c.nodes == 1,
             f"cluster.nodes={c.nodes} but cluster.kind=local runs on this machine only; use cluster=slurm")
    for key in ("gpus_per_node", "procs_per_node", "cpus_per_task", "signal_lead_s"):
        _require(getattr(c, key) >= 0, f"cluster.{key}={getattr(c, key)} must be >= 0")
    _require(1024 <= c.master_port <= 65535, f"cluster.master_port={c.master_port} must lie in [1024, 65535]")
    limit = slurm_time_s(c.time) if c.time else math.inf
    _require(limit is not None,
             f"cluster.time={c.time!r} is not a Slurm time limit; use minutes, HH:MM:SS or D-HH:MM:SS")
    _require(c.signal_lead_s < limit,
             f"cluster.signal_lead_s={c.signal_lead_s} is not shorter than cluster.time={c.time}; lower it or "
             "raise the time limit")
    _require(bool(c.job_name.strip()), "cluster.job_name is empty; name the job, e.g. cluster.job_name=mmfm")
    _validate_cluster_text(c)
    dims = ParallelDims.from_config(cfg.parallel)
    per_node = procs_per_node(cfg)
    key = "gpus_per_node" if c.gpus_per_node and not c.procs_per_node else "procs_per_node"
    _require(c.nodes * per_node == dims.world_size,
             f"cluster.nodes={c.nodes} x {per_node} processes per node (cluster.{key}) = {c.nodes * per_node}, but "
             f"parallel dims {dims.sizes} ask for {dims.world_size}; change cluster.nodes, cluster.{key} or parallel.*")


@dataclass(frozen=True)
class Preflight:
    """What validation resolved, handed to the trainer so that nothing is checked or resolved twice: the
    parallel dims, the device and the kernel of each op (mmfm.kernels.apply)."""

    cfg: JobConfig
    dims: ParallelDims
    device: torch.device
    kernels: dict[str, str]


def validate_before_layout(cfg: JobConfig) -> None:
    """What needs no parallel layout (model, data, training): checked before the layout is resolved or planned."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_train(cfg)


def resolve(cfg: JobConfig, world: World) -> Resolved:
    """cfg's layout on `world`: parallel=auto planned, a -1 dim resolved (mmfm.config.world); the chosen plan's line
    printed on stderr (once: by rank 0 under torchrun)."""
    resolved = resolve_layout(cfg, world)
    if resolved.note and os.environ.get("RANK", "0") == "0":
        print(f"mmfm: {resolved.note}", file=sys.stderr, flush=True)
    return resolved


def preflight(cfg: JobConfig) -> Preflight:
    """Raise ConfigError on the first inconsistent value; return what the run will use otherwise, its layout
    resolved (parallel=auto, a -1 dim) for the launcher's WORLD_SIZE. Needs no process group."""
    validate_before_layout(cfg)
    _validate_engine(cfg)
    cfg = resolve(cfg, env_world()).cfg
    _validate_packing(cfg)
    _validate_stage(cfg)
    _validate_run(cfg)
    dims = _validate_parallel(cfg)
    _validate_cluster(cfg)
    device = _validate_device(cfg)
    return Preflight(cfg, dims, device, _validate_kernels(cfg, device))


def validate(cfg: JobConfig) -> JobConfig:
    """Raise ConfigError on the first inconsistent value; return cfg otherwise (its layout resolved)."""
    return preflight(cfg).cfg
