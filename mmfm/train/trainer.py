"""The one training loop. A stage differs by its objective and data, never by a copy of this loop."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import random
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from torch.distributed.pipelining import PipelineStage

from mmfm.checkpoint import CheckpointError, CheckpointManager, find_checkpoint
from mmfm.checkpoint.manager import read_trainer_state
from mmfm.checkpoint.run_model import is_base, load_run_model
from mmfm.config import JobConfig, Preflight, image_tokens, preflight
from mmfm.errors import ConfigError
from mmfm.data.build import (check_val_split, load_tokenizer, loader_summary, reshard_loader_states, sample_encoder,
                             train_loader, val_stream)
from mmfm.data.loader import Batch, BatchLoader, EncodedSample, pad_sequence
from mmfm.data.manifest import TOKENIZER, sha256_file
from mmfm.data.tokenizer import copy_tokenizer
from mmfm.eval.tasks import load_items, resolve_task
from mmfm.models import build_model, model_spec
from mmfm.models.generate import generate
from mmfm.models.lora import adapters_disabled, apply_lora, is_adapter
from mmfm.parallel.comm import CommCounter
from mmfm.parallel.dims import ParallelDims
from mmfm.parallel.distributed import all_reduce_sums, barrier, gather_objects, init_distributed
from mmfm.parallel.grad_norm import clip_grad_norm
from mmfm.parallel.parallelize import parallelize
from mmfm.parallel.pipeline_parallel import build_schedule, pixel_rows, sync_tied_embedding
from mmfm.parallel.tensor_parallel import loss_context
from mmfm.train import evaluate
from mmfm.train.deepspeed_engine import DeepSpeedRunner
from mmfm.train.experts import LoadWindow, expert_step, scale_aux_losses
from mmfm.train.metrics import MetricsLogger, peak_flops, peak_memory_gib, plot_loss
from mmfm.train.loss_guard import LossGuard, TrainingDiverged
from mmfm.train.objectives import build_objective, next_token_loss
from mmfm.train.preemption import PreemptionMonitor
from mmfm.train.watchdog import Watchdog
from mmfm.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ensure_writable(run_dir: Path) -> None:
    """Create the run directory and try a write in it, so that a read-only or full folder fails now, in one line."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"run_dir={run_dir} is not writable ({exc.strerror or exc}); choose a run_dir on a "
                          "writable file system with free space") from None


def write_resolved_config(cfg: JobConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def write_robot_card(cfg: JobConfig, run_dir: Path) -> None:
    """stage=vla: the data's robot statistics beside the checkpoints, for the policy to decode actions with."""
    from mmfm.data.manifest import read_manifest
    from mmfm.embodied.actions import ROBOT_CARD, robot_entry

    (run_dir / ROBOT_CARD).write_text(json.dumps(robot_entry(read_manifest(cfg.data.path)), indent=2))


def scalar(t) -> float:
    if isinstance(t, (int, float)):
        return float(t)
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


@torch.no_grad()
def set_last_rows(param, make_rows, count: int) -> None:
    """A (possibly sharded) [vocab, dim] weight's last `count` rows <- make_rows(the other rows), on every rank."""
    full = param.full_tensor() if isinstance(param, DTensor) else param.detach().clone()
    full[-count:] = make_rows(full[:-count].float()).to(full.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def is_action_head(name: str) -> bool:
    return name.startswith("action_head.")


def is_not_action_head(name: str) -> bool:
    return not is_action_head(name)


def logits_of(model, batch: Batch, **inputs) -> torch.Tensor:
    """The model's logits for the batch (or, with a head's inputs such as `actions`, that head's outputs)."""
    return model(batch.input_ids, batch.pixel_values, positions=batch.positions, document_ids=batch.document_ids,
                 **inputs)


def freeze(parts, names: list[str]) -> None:
    """Leave the named top-level parts of the model (stage.freeze) out of training."""
    for part in parts:
        for name in names:
            module = getattr(part, name, None)
            if module is not None:
                module.requires_grad_(False)


def run_record(cfg: JobConfig) -> dict:
    """What a checkpoint records of its run, for a resume to check: model config, stage and tokenizer."""
    return {"model": OmegaConf.to_container(OmegaConf.structured(cfg.model)), "stage": cfg.stage.objective,
            "tokenizer_sha256": sha256_file(Path(cfg.data.path) / TOKENIZER)}


def tokenizer_of(checkpoint: Path, state: dict) -> Optional[str]:
    """sha256 of the tokenizer a checkpoint was trained with: recorded, or its run directory's copy."""
    recorded = (state.get("record") or {}).get("tokenizer_sha256")
    if recorded:
        return recorded
    copy = checkpoint.parents[1] / TOKENIZER
    return sha256_file(copy) if copy.is_file() else None


def check_resume_record(path: Path, state: dict, record: dict, data_path: str) -> None:
    """Refuse to resume a checkpoint of another stage or tokenizer (the model is checked on its shapes)."""
    stage = (state.get("record") or {}).get("stage", record["stage"])
    if stage != record["stage"]:
        raise CheckpointError(f"checkpoint {path} was written by stage={stage}, this run is stage={record['stage']}; "
                              f"to start {record['stage']} from it use stage.init_from={path} with a new run_dir")
    held = tokenizer_of(path, state)
    if held is not None and held != record["tokenizer_sha256"]:
        raise CheckpointError(f"checkpoint {path} was trained with another tokenizer than data.path={data_path}; "
                              "resume with the data set it was trained on, or start a new run_dir")


def stage_checkpoint(spec: str) -> Path:
    """stage.init_from (a run directory, its checkpoints/ folder or a step_* folder) -> the checkpoint folder."""
    try:
        return find_checkpoint(Path(spec))[1]
    except CheckpointError as exc:
        raise CheckpointError(f"stage.init_from: {exc}; point it at the earlier stage's run directory") from None


def refuse_adapter_only(checkpoint: Path, spec: str) -> None:
    """stage.init_from needs model weights: a LoRA run's checkpoint holds its adapters alone."""
    record = (read_trainer_state(checkpoint).get("record") or {}).get("model") or {}
    if (record.get("lora") or {}).get("enabled"):
        raise CheckpointError(f"stage.init_from={spec} is a LoRA run (its checkpoints hold the adapters alone); start "
                              f"from a full checkpoint, or merge its adapters first (`mmfm export {spec} --format hf "
                              "--merge-lora --out DIR`, then model.pretrained.* = DIR)")


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: str | Path, checked: Optional[Preflight] = None):
        """checked: the config's preflight when the caller ran it (validation runs once)."""
        checked = checked if checked is not None and checked.cfg is cfg else preflight(cfg)
        self.cfg = cfg = checked.cfg  # its layout resolved (parallel=auto, a -1 dim)
        self.device = checked.device
        self.rank, self.world = init_distributed(self.device, cfg.faults.collective_timeout_s)
        self.tokenizer = load_tokenizer(cfg)  # before the run directory is made: a bad tokenizer writes nothing
        self.objective = build_objective(cfg.stage)
        # likewise a data set without the val split that validation and evaluation need (False: runs without them)
        self.has_val = check_val_split(cfg, self.objective.validates)
        self.eval_tasks = [load_items(resolve_task(name), cfg.eval.limit) for name in cfg.eval.tasks]
        # One run directory for all ranks: rank 0's (a timestamped default may differ across ranks).
        self.run_dir = Path(gather_objects(str(run_dir))[0])
        ensure_writable(self.run_dir)
        self.dims = dims = checked.dims  # validated against the world size
        self.mesh = dims.build_mesh(self.device.type) if self.world > 1 else None
        self.main = self.rank == 0
        # LoRA (model.lora): only the adapters train, and the checkpoints hold them alone (the base is rebuilt)
        self.lora = cfg.model.lora.enabled
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                             select=is_adapter if self.lora else None)
        self.record = run_record(cfg)
        self.resume_path = self.preflight_resume()  # refuses a bad resume before anything is written or built
        self.spec = model_spec(cfg.model)
        seed_everything(cfg.seed)
        layout_dims, layout_mesh = self.model_layout()
        self.parts = parallelize(cfg, layout_dims, self.device, layout_mesh, kernels=checked.kernels)
        self.model = self.parts.parts[0]  # the whole model unless pipelined
        freeze(self.parts.parts, cfg.stage.freeze)
        self.engine = None
        if cfg.engine.name == "deepspeed":
            self.engine = DeepSpeedRunner(cfg, self.model, self.device)
            self.model = self.engine.engine  # forwards through the engine (ZeRO-3 gathers each layer's weights)
            self.optimizers, self.schedulers = [self.engine.optimizer], [self.engine.scheduler]
        else:
            self.optimizers = [build_optimizer(part, cfg.train) for part in self.parts.parts]
            self.schedulers = [build_scheduler(opt, cfg.train) for opt in self.optimizers]
        self.dp_rank = dims.dp_rank(self.mesh) if self.mesh is not None else 0
        self.loader = train_loader(cfg, self.tokenizer, self.dp_rank, dims.dp_size)
        # A frozen copy of stage.init_from, sharded like the policy, for objectives that compare with it (LoRA:
        # none, the policy with its adapters disabled is the reference).
        self.reference = self.build_reference() if self.objective.needs_reference else None
        self.step = 0
        self.peak = peak_flops(self.device, cfg.logger)
        # Every data-parallel rank's batch is also read by its tp x pp x cp peers.
        self.replicas = self.world // dims.dp_size
        # FSDP averages gradients over its ranks (DeepSpeed over all data-parallel ones); the loss is scaled back up
        # by as much.
        self.grad_divisor = dims.fsdp_size if self.engine is None else dims.dp_size
        tp0 = dims.coordinate(self.mesh, "tp") == 0 if self.mesh is not None else True
        self.loss_owner = tp0 and self.parts.has_last_stage  # counts the loss in global sums
        self.first_replica = self.loss_owner and self.dp_rank == 0  # ... of data every replica reads
        self.schedule = self.build_schedule() if self.parts.pipelined else None
        self._loss_scale = 1.0
        f = cfg.faults
        self.guard = LossGuard(f.spike_factor, f.spike_window, f.max_bad_steps)
        self.expert_load = LoadWindow()  # the experts' load since the last logged step
        # The fused loss kernel takes the targets inside the model: the logits never exist.
        self.loss_in_model = self.parts.kernels.get("linear_cross_entropy", "torch") != "torch"

    def model_layout(self) -> tuple[ParallelDims, Optional[object]]:
        """(dims, mesh) the model parts are built with: the run's, or under engine=deepspeed one whole model per rank
        (the ZeRO engine partitions it)."""
        if self.cfg.engine.name == "native":
            return self.dims, self.mesh
        return ParallelDims(), None

    def build_reference(self):
        if self.lora:
            return None
        dims, mesh = self.model_layout()  # under DeepSpeed a whole frozen copy on each rank
        parts = parallelize(self.cfg, dims, self.device, mesh)
        CheckpointManager.load(stage_checkpoint(self.cfg.stage.init_from), parts.parts,
                               no_dist=self.engine is not None)
        parts.train(False)
        for p in parts.parameters():
            p.requires_grad_(False)
        return parts.parts[0]

    def build_schedule(self):
        stages = [PipelineStage(part, stage, self.parts.num_stages, self.device, group=self.parts.group("pp"))
                  for stage, part in zip(self.parts.stages, self.parts.parts)]
        m = self.dims.pipeline_microbatches(self.cfg.train.grad_accum_steps)
        return build_schedule(self.dims.pp_schedule, stages, m, self.pipeline_loss)

    def pipeline_loss(self, logits, targets):
        return next_token_loss(logits, targets)[0] * self._loss_scale

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints ------------------------------------------------------------------------------
    def model_shapes(self, adapters: bool = False) -> dict:
        """{name: shape} of the model's checkpoint entries; adapters: of a LoRA run's (its adapters alone)."""
        model = build_model(self.cfg.model, "meta")
        if not adapters:
            return {k: v.shape for k, v in model.state_dict().items()}
        apply_lora(model, self.cfg.model.lora)
        return {k: v.shape for k, v in model.state_dict().items() if is_adapter(k)}

    def preflight_resume(self) -> Optional[Path]:
        """The checkpoint to resume from (None: start afresh), its files verified and its model, stage and
        tokenizer checked against this run's; stage.init_from's model and tokenizer likewise."""
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume)
        source = path or (stage_checkpoint(self.cfg.stage.init_from) if self.cfg.stage.init_from else None)
        if source is None:
            return None
        if path is None:
            refuse_adapter_only(source, self.cfg.stage.init_from)
        shapes = self.model_shapes(adapters=self.lora and path is not None)
        select = self.init_select(source) if path is None else None
        if select is not None:
            shapes = {k: v for k, v in shapes.items() if select(k)}
        state = CheckpointManager.inspect(source, shapes, self.record["model"])
        if path is not None:
            check_resume_record(path, state, self.record, self.cfg.data.path)
        elif tokenizer_of(source, state) not in (None, self.record["tokenizer_sha256"]):
            raise CheckpointError(f"stage.init_from={self.cfg.stage.init_from} was trained with another tokenizer than "
                                  f"data.path={self.cfg.data.path}; make the data with `mmfm data instruct "
                                  f"--tokenizer {source.parents[1] / TOKENIZER}`")
        return path

    def resume(self) -> None:
        path = self.resume_path
        if self.cfg.stage.init_from and (path is None or self.lora):  # a LoRA checkpoint holds no base weights
            self.init_from(stage_checkpoint(self.cfg.stage.init_from))
        if path is None:
            self.init_action_bins()
            return
        state = self.load_checkpoint(path, optimizer=True)
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state["scheduler"])
        data_states = state["data"]
        if len(data_states) != self.dims.dp_size:
            log.info("resharding data-loader positions from %d to %d data-parallel ranks", len(data_states),
                     self.dims.dp_size)
            data_states = reshard_loader_states(data_states, self.dims.dp_size)
        self.loader.load_state_dict(data_states[self.dp_rank])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    def init_action_bins(self) -> None:
        """stage=vla with stage.vla.bin_init=ordinal, on a fresh start: the action bins' token embeddings (and output
        rows, when untied) become smooth functions of the bin (mmfm.embodied.actions.ordinal_bin_embeddings), as long
        as the vocabulary's other rows on average."""
        from mmfm.checkpoint.hf import VOCAB_ROWS
        from mmfm.embodied.actions import ordinal_bin_embeddings

        v = self.cfg.stage.vla
        if self.cfg.stage.objective != "vla" or v.bin_init != "ordinal":
            return

        def rows(rest: torch.Tensor) -> torch.Tensor:
            return ordinal_bin_embeddings(v.bins, rest.shape[1], float(rest.norm(dim=1).mean()), self.cfg.seed)

        vocabulary = tuple(VOCAB_ROWS)
        if self.engine is not None:  # DeepSpeed: through its full-weight state, as a checkpoint loads
            model, _ = self.engine.state_dicts()
            for name in (n for n in model if n.endswith(vocabulary)):
                set_last_rows(model[name], rows, v.bins)
            self.engine.load_state_dicts(model, None)
            return
        for part in self.parts.parts:
            for name, param in part.named_parameters():
                if name.endswith(vocabulary):
                    set_last_rows(param, rows, v.bins)

    def init_from(self, path: Path) -> None:
        """The earlier stage's model weights (any layout; under LoRA into the base, the adapters fresh; an action head
        the earlier stage had not, fresh); optimizer, step and data start afresh."""
        select = self.init_select(path)
        self.load_checkpoint(path, optimizer=False, select=select)
        log.info("initialized the model from %s (stage.init_from)%s", path,
                 "; the action head starts fresh" if select is not None else "")

    def init_select(self, source: Path):
        """The model-state keys stage.init_from's checkpoint gives: None (all), or all but an action head it has not
        (that head starts fresh)."""
        from mmfm.checkpoint.manager import model_shapes
        from mmfm.checkpoint.safe_read import read_metadata

        if self.cfg.model.action_head.kind == "none" or any(map(is_action_head, model_shapes(read_metadata(source)))):
            return None
        return is_not_action_head

    def load_checkpoint(self, path: Path, optimizer: bool, select=None) -> dict:
        """Load the model (and optimizer, RNG) from a checkpoint of any layout and engine; its trainer state.
        select: the model-state keys to load (default: all the run saves; under LoRA without the optimizer, the base)."""
        if self.engine is None:
            select = select or (self.checkpoints.select if optimizer else (is_base if self.lora else None))
            return CheckpointManager.load(path, self.parts.parts, self.optimizers if optimizer else None, select=select)
        trainer_state = CheckpointManager.inspect(path, self.model_shapes())
        model, optim = self.engine.state_dicts()
        state = {"model": model, **({"optim": optim} if optimizer else {})}
        CheckpointManager.load_states(path, state)
        self.engine.load_state_dicts(state["model"], state.get("optim"))
        return trainer_state

    def data_states(self) -> list[dict]:
        """One loader state per data-parallel rank, in rank order (tp/pp/cp peers hold the same)."""
        by_rank = dict(gather_objects((self.dp_rank, self.loader.state_dict())))
        return [by_rank[r] for r in range(self.dims.dp_size)]

    def save(self) -> None:
        state = {"scheduler": self.schedulers[0].state_dict(), "data": self.data_states(), "record": self.record}
        states = self.engine.state_dicts(self.checkpoints.select) if self.engine is not None else None
        path = self.checkpoints.save(self.step, self.parts.parts, self.optimizers, state, states)
        if self.main:
            log.info("saved checkpoint %s", path)

    # -- one optimizer step -----------------------------------------------------------------------
    def fit_batch(self, batch: Batch) -> Batch:
        """Pad the sequence for the layout: to data.seq_len for pipeline stages (fixed shapes), else to a
        multiple of tp x cp (the sequence is split over them)."""
        length = batch.input_ids.shape[1]
        if self.parts.pipelined:
            target = self.cfg.data.seq_len
        else:
            multiple = self.dims.tp * self.dims.cp
            target = -(-length // multiple) * multiple
        return pad_sequence(batch, target, self.tokenizer.pad_id)

    def train_step(self) -> dict:
        """Forward/backward over grad_accum_steps micro-batches, loss averaged over all their units (tokens, pairs
        or sampled answers: the objective's), on every data-parallel rank."""
        micro = [self.fit_batch(b.to(self.device))
                 for b in itertools.islice(self.loader, self.cfg.train.grad_accum_steps)]
        micro = self.objective.prepare(self, micro)
        (total_units,) = all_reduce_sums([sum(self.objective.units(b) for b in micro) / self.replicas], self.device)
        scale = self.grad_divisor / max(total_units, 1)
        scale_aux_losses(self.parts.parts, self.dims.pipeline_microbatches(len(micro)) if self.parts.pipelined
                         else len(micro))
        if self.parts.pipelined:
            loss_sum, stats = self.pipeline_step(micro, scale), {}
        else:
            loss_sum, stats = self.local_steps(micro, scale)
        sync_tied_embedding(self.parts.parts, self.parts.tied_group)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        # DeepSpeed clips inside its step, and knows the norm after it: its guard sees the loss alone
        grad_norm = clip_grad_norm(self.parts.parameters(), clip, self.parts.group("pp"), self.parts.tied_copies()) \
            if self.engine is None else 0.0
        seq_len = max(b.input_ids.shape[1] for b in micro)
        counts = [sum(b.input_ids.numel() for b in micro), sum(len(b.keys) for b in micro),
                  sum(sum(b.images_per_sample) for b in micro)]
        owned = 1.0 if self.loss_owner else 0.0
        loss_sum, positions, samples, images, *stat_sums = all_reduce_sums(
            [loss_sum * owned] + [c / self.replicas for c in counts] + [v * owned for v in stats.values()],
            self.device)
        loss = loss_sum / max(total_units, 1)
        skipped = self.guard.check(loss, grad_norm)  # the same global values, so the same decision, on every rank
        lr = self.schedulers[0].get_last_lr()[0]
        if self.engine is not None:
            grad_norm = self.engine.step() if skipped is None else self.engine.skip()
        for optimizer, scheduler in zip(self.optimizers, self.schedulers) if self.engine is None else ():
            if skipped is None:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        per_unit = {k: v / max(total_units, 1) for k, v in zip(stats, stat_sums)}
        experts = expert_step(self.parts.parts, self.cfg.model.language, skipped is None, self.world // self.dims.pp,
                              self.dims.tp, self.expert_load, self.logs(self.step + 1))
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "positions": positions, "samples": samples,
                "images": images, "seq_len": seq_len, "stats": {**per_unit, **experts}, "skipped": skipped}

    def targets_of(self, batch: Batch) -> torch.Tensor:
        if self.dims.cp > 1:
            from mmfm.parallel.context_parallel import shard_sequence

            return shard_sequence(batch.targets, self.mesh["cp"])
        return batch.targets

    def forward_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The objective's summed loss of one micro-batch through the whole (unpipelined) model, and its summed
        statistics (e.g. preference rewards)."""
        if self.loss_in_model:
            packed = dict(positions=batch.positions, document_ids=batch.document_ids)  # None unless data.pack
            return self.model(batch.input_ids, batch.pixel_values, targets=self.targets_of(batch), **packed), {}
        batch = dataclasses.replace(batch, targets=self.targets_of(batch))
        return self.objective(partial(logits_of, self.model), batch, self.reference_logits())

    def reference_logits(self):
        """The reference model's logits for objectives that use one: the frozen copy, or under LoRA the policy with
        its adapters disabled (no second model)."""
        if self.reference is not None:
            return partial(logits_of, self.reference)
        if self.lora and self.objective.needs_reference:
            return self.base_logits
        return None

    def base_logits(self, batch: Batch) -> torch.Tensor:
        with adapters_disabled(self.model):
            return logits_of(self.model, batch)

    def local_steps(self, micro: list[Batch], scale: float) -> tuple[float, dict]:
        """Every micro-batch through the whole model; gradients synchronized after the last."""
        loss_sum, stats = 0.0, {}
        for i, batch in enumerate(micro):
            if self.grad_divisor > 1 and self.engine is None:  # reduce gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            with self.autocast(), loss_context(self.dims.tp):
                loss, batch_stats = self.forward_loss(batch)
                if self.engine is None:
                    (loss * scale).backward()
                else:
                    self.engine.backward(loss * scale)
            loss_sum += scalar(loss)
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + scalar(v)
        return loss_sum, stats

    def sample_answers(self, samples: list[EncodedSample], grpo) -> list[list[int]]:
        """Sampled answers to the samples' prompts by the current policy (KV-cached; every data-parallel rank
        decodes the same number of steps, so that sharded parameters are gathered in step)."""
        images = [img for s in samples for img in s.images]
        pixels = torch.stack(images).to(self.device) if images else None
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + self.dp_rank)
        self.parts.train(False)
        if isinstance(self.model, FSDPModule):
            self.model.unshard()
        with self.autocast():
            answers = generate(self.model, [s.input_ids for s in samples], pixels, grpo.max_new_tokens,
                               self.tokenizer.eos_id, self.tokenizer.pad_id, grpo.temperature, grpo.top_k,
                               generator, stop_early=self.world == 1)
        self.parts.reshard()
        self.parts.train(True)
        return answers

    def pipeline_inputs(self, micro: list[Batch]) -> tuple[tuple, torch.Tensor]:
        """The step's micro-batches as one batch the schedule splits back along dim 0."""
        v = self.cfg.model.vision
        max_images = self.cfg.data.seq_len // image_tokens(self.cfg)
        rows = [pixel_rows(b.pixel_values, b.images_per_sample, max_images,
                           (v.num_channels, v.image_size, v.image_size)).to(self.device) for b in micro]
        args = (torch.cat([b.input_ids for b in micro]), torch.cat(rows))
        return (args if self.parts.has_first_stage else ()), torch.cat([b.targets for b in micro])

    def pipeline_step(self, micro: list[Batch], scale: float, train: bool = True) -> float:
        """The micro-batches through the schedule (forward only unless train); the summed loss on the last
        stage, 0 elsewhere."""
        args, targets = self.pipeline_inputs(micro)
        self._loss_scale = scale
        losses: list = []
        run = self.schedule.step if train else self.schedule.eval
        with self.autocast(), loss_context(self.dims.tp):
            run(*args, target=targets if self.parts.has_last_stage else None, losses=losses)
        return sum(scalar(loss) for loss in losses) / scale

    def step_metrics(self, raw: dict, seconds: float) -> dict:
        flops = self.spec.training_flops(self.cfg.model, raw["positions"], raw["seq_len"], raw["images"])
        mfu = flops / seconds / (self.peak * self.world) if self.peak else None
        epoch, skipped = loader_summary(self.loader.state_dict())
        return {"loss": raw["loss"], **raw["stats"], "update_skipped": float(raw["skipped"] is not None),
                "lr": raw["lr"], "grad_norm": raw["grad_norm"],
                "tokens_per_s": raw["positions"] / seconds, "samples_per_s": raw["samples"] / seconds,
                "mfu": mfu, "peak_mem_gib": peak_memory_gib(self.device), "epoch": epoch,
                "skipped_samples": sum(skipped.values()), **{f"skipped_{k}": v for k, v in skipped.items()}}

    def validate_now(self) -> dict:
        """The objective's mean loss (and statistics) over the first val_batches x val_batch_size held-out samples,
        the same at any layout; {} for objectives without one (grpo: see the final answer accuracy)."""
        if not self.objective.validates:
            return {}
        metrics = self._validation_loss()
        self.parts.reshard()
        return metrics

    @torch.no_grad()
    def _validation_loss(self) -> dict:
        self.parts.train(False)
        d, t = self.cfg.data, self.cfg.train
        samples = itertools.islice(val_stream(self.cfg, self.tokenizer), t.val_batches * d.val_batch_size)
        if self.parts.pipelined:  # fixed shapes: a training step's rows, the last batch filled with blanks
            batches = BatchLoader(iter(samples), d.batch_size * t.grad_accum_steps, self.tokenizer.pad_id, pad_rows=True)
        else:
            batches = BatchLoader(iter(samples), d.val_batch_size, self.tokenizer.pad_id)
        sums: dict[str, float] = {"loss": 0.0}
        units = 0
        for batch in batches:
            batch = self.fit_batch(batch.to(self.device))
            units += self.objective.units(batch)
            if self.parts.pipelined:
                loss, stats = self.pipeline_step([batch], 1.0, train=False), {}
            else:
                with self.autocast(), loss_context(self.dims.tp):
                    loss, stats = self.forward_loss(batch)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + (scalar(v) if self.first_replica else 0.0)
        self.parts.train(True)
        totals = all_reduce_sums(list(sums.values()), self.device)
        return {k: v / max(units, 1) for k, v in zip(sums, totals)}

    @property
    def model_parallel(self) -> bool:
        """The model itself is split (tensor, pipeline or sequence), not only replicated or sharded."""
        return self.dims.tp > 1 or self.dims.pp > 1 or self.dims.cp > 1

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        self.resume()  # first: a checkpoint that does not load leaves the run directory as it was
        if self.main:
            write_resolved_config(self.cfg, self.run_dir)
            copy_tokenizer(Path(self.cfg.data.path), self.run_dir)
            if self.cfg.stage.objective == "vla":
                write_robot_card(self.cfg, self.run_dir)
        self.model.train()
        metrics = MetricsLogger(self.cfg, self.run_dir, self.step, enabled=self.main)
        t = self.cfg.train
        losses, grad_norms = {}, {}
        preemption = PreemptionMonitor(self.run_dir, enabled=self.cfg.faults.preemption)
        watchdog = Watchdog(self.run_dir, self.rank, self.cfg.faults.hang_timeout_s)
        watchdog.start()
        first_step = self.step
        try:
            while self.step < t.max_steps:
                logged = self.logs(self.step + 1)
                # collectives are counted on logged steps only (the counter intercepts every op)
                counter = CommCounter() if logged and self.world > 1 else contextlib.nullcontext()
                start = time.perf_counter()
                # the first step (compilation, cold caches) is left to the collective timeout
                warming_up = watchdog.paused() if self.step == first_step else contextlib.nullcontext()
                with counter, warming_up:
                    raw = self.guarded_step()
                self.step += 1
                watchdog.beat(self.step)
                if raw["skipped"]:
                    log.warning("step %d: update skipped (%s)", self.step, raw["skipped"])
                step_metrics = self.step_metrics(raw, time.perf_counter() - start)
                if isinstance(counter, CommCounter):
                    step_metrics.update({f"comm_{kind}_bytes": n for kind, n in counter.bytes_by_kind().items()})
                losses[self.step], grad_norms[self.step] = raw["loss"], raw["grad_norm"]
                if logged:
                    metrics.log(self.step, step_metrics)
                metrics.advance()
                saved = (self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0) \
                    or self.step == t.max_steps
                if saved:
                    with watchdog.paused():
                        self.save()
                if preemption.requested(self.device):  # a collective: every rank asks every step
                    return self.stop_for_requeue(preemption, watchdog, saved, losses, grad_norms)
                if t.val_every and self.step % t.val_every == 0 and self.objective.validates and self.has_val:
                    with watchdog.paused():
                        metrics.log(self.step, self.validate_now(), kind="val")
                if self.eval_tasks and self.cfg.eval.every and self.step % self.cfg.eval.every == 0 \
                        and self.step < t.max_steps:
                    with watchdog.paused():
                        metrics.log(self.step, self.task_scores(), kind="tasks")
            with watchdog.paused():
                summary = self.final_eval(metrics)
        finally:
            watchdog.stop()
            preemption.close()
            metrics.close()
            if self.engine is not None:
                self.engine.close()
        if self.main:
            plot_loss(self.run_dir)
        summary["losses"], summary["grad_norms"] = losses, grad_norms
        return summary

    def logs(self, step: int) -> bool:
        """Step `step` is written to metrics.jsonl (every logger.log_every steps, and the last)."""
        return step % self.cfg.logger.log_every == 0 or step == self.cfg.train.max_steps

    def guarded_step(self) -> dict:
        """train_step; when the loss guard stops the run, say which checkpoint is the last good one."""
        try:
            return self.train_step()
        except TrainingDiverged as exc:
            latest = self.checkpoints.latest()
            where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
            raise TrainingDiverged(f"training stopped at step {self.step + 1}: {exc}; {where} (faults.max_bad_steps="
                                   f"{self.cfg.faults.max_bad_steps}); lower train.optim.lr or check the data read "
                                   "around this step") from None

    def stop_for_requeue(self, preemption, watchdog, saved: bool, losses: dict, grad_norms: dict) -> dict:
        """Preemption: checkpoint this step (unless just done), mark it saved for the batch script, stop."""
        if not saved:
            with watchdog.paused():
                self.save()
        if self.main:
            preemption.mark_saved(self.step)
        log.warning("preempted at step %d: checkpoint saved; the same run_dir resumes from it", self.step)
        return {"step": self.step, "preempted": True, "losses": losses, "grad_norms": grad_norms}

    def caption_results(self) -> Optional[list]:
        """Greedy captions of the first eval.num_samples held-out samples.

        Data-parallel layouts decode on every rank with the sharded model. When the model itself is split
        (tp, pp, cp), rank 0 loads the final checkpoint into one unsharded copy and decodes alone: the
        model must then fit one device (others return None).
        """
        e = self.cfg.eval
        samples = itertools.islice(val_stream(self.cfg, self.tokenizer), e.num_samples)
        if not self.model_parallel:
            if isinstance(self.model, FSDPModule):
                self.model.unshard()
            results = evaluate.caption_samples(self.model, self.tokenizer, samples, self.cfg.data.val_batch_size,
                                               e.max_new_tokens, self.device, stop_early=self.world == 1)
            self.parts.reshard()
            return results
        results = None
        if self.main:
            whole = load_run_model(self.cfg, self.checkpoints.latest(), self.device, no_dist=True)
            results = evaluate.caption_samples(whole, self.tokenizer, samples, self.cfg.data.val_batch_size,
                                               e.max_new_tokens, self.device)
        barrier()
        return results

    def task_scores(self) -> dict:
        """eval.tasks scored by the training ranks' model, {"<task>/<metric>": value}. Every rank answers every item
        with the same batches (its forwards and collectives in step with its peers'); under FSDP each block's
        parameters are gathered as its forward runs, as in training, never the whole model at once; under tp every
        forward's length is a multiple of tp (sequence parallelism). Each item's answer: self.task_predictions."""
        from mmfm.eval.runner import ModelAnswerer, run_tasks

        was_training = self.model.training
        answerer = ModelAnswerer(self.model.eval(), self.tokenizer, sample_encoder(self.cfg, self.tokenizer),
                                 self.device, self.cfg.data.val_batch_size, stop_early=self.world == 1,
                                 multiple=self.dims.tp)
        scores, self.task_predictions = {}, {}
        for result in run_tasks(answerer, self.eval_tasks):
            scores.update({f"{result.name}/{k}": v for k, v in result.scores.items()})
            self.task_predictions[result.name] = result.predictions
        self.parts.reshard()
        self.model.train(was_training)
        return scores

    def final_eval(self, metrics: MetricsLogger) -> dict:
        """The final validation and evaluation on the val split (none when the data set has none: then
        train.val_every=0 and eval.num_samples=0, checked at init), and summary.json."""
        e = self.cfg.eval
        validation = self.validate_now() if self.has_val else {}
        summary = {"step": self.step, **{f"val_{k}": v for k, v in validation.items()}}
        results = self.caption_results() if e.num_samples and self.has_val else None
        if results is not None:
            kind = "caption" if self.cfg.stage.objective == "pretrain" else "answer"
            summary[f"{kind}_accuracy"] = evaluate.accuracy(results)
            summary[f"{kind}_samples"] = len(results)
            summary["examples"] = [{**dataclasses.asdict(r), "correct": r.correct}
                                   for r in results[: e.show_examples]]
        if self.eval_tasks:
            summary["tasks"] = self.task_scores()
            metrics.log(self.step, summary["tasks"], kind="tasks")
        metrics.log(self.step, {k: v for k, v in summary.items() if k not in ("examples", "tasks")}, kind="eval")
        if self.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
