"""The one training loop. A stage differs by its objective and data, never by a copy of this loop."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from mmfm.checkpoint import CheckpointError, CheckpointManager
from mmfm.config import JobConfig, validate
from mmfm.data.build import load_tokenizer, sample_encoder, train_loader, val_loader, val_stream
from mmfm.data.manifest import TOKENIZER
from mmfm.models import MODEL_REGISTRY, build_model
from mmfm.parallel import ParallelDims
from mmfm.parallel.activation_checkpoint import apply_activation_checkpointing
from mmfm.parallel.data_parallel import apply_fsdp
from mmfm.parallel.distributed import all_reduce_sums, gather_objects, init_distributed
from mmfm.train import evaluate
from mmfm.train.metrics import MetricsLogger, peak_flops, peak_memory_gib, plot_loss
from mmfm.train.objectives import OBJECTIVES
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


def write_resolved_config(cfg: JobConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: str | Path):
        self.cfg = validate(cfg)
        self.device = pick_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        # One run directory for all ranks: rank 0's (a timestamped default may differ across ranks).
        self.run_dir = Path(gather_objects(str(run_dir))[0])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dims = ParallelDims.from_config(cfg.parallel)  # validated against the world size above
        self.main = self.rank == 0
        self.tokenizer = load_tokenizer(cfg)
        self.spec = MODEL_REGISTRY[cfg.model.name]
        seed_everything(cfg.seed)
        self.model = self.build_parallel_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = train_loader(cfg, self.tokenizer, self.rank, self.world)
        self.objective = OBJECTIVES[cfg.stage.objective]
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.step = 0
        self.peak = peak_flops(self.device, cfg.logger)

    def build_parallel_model(self) -> torch.nn.Module:
        """Every rank builds the same seeded model; activation checkpointing wraps its blocks, then data
        parallelism shards it (FSDP2 / HSDP)."""
        model = build_model(self.cfg.model, self.device)
        t = self.cfg.train
        apply_activation_checkpointing(model, self.spec.block_containers, t.activation_checkpoint,
                                       t.activation_checkpoint_every)
        if self.world > 1:
            mesh = self.dims.build_mesh(self.device.type)
            apply_fsdp(model, mesh[self.dims.dp_mesh_names()], self.spec.block_containers)
        return model

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints ------------------------------------------------------------------------------
    def resume(self) -> None:
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return
        state = CheckpointManager.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        data_states = state["data"]
        if len(data_states) != self.world:
            raise CheckpointError(f"checkpoint {path} holds data-loader positions for {len(data_states)} data-"
                                  f"parallel ranks, this job has {self.world}; resume at the same data-parallel "
                                  "size (the model and optimizer themselves reshard)")
        self.loader.load_state_dict(data_states[self.rank])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "data": gather_objects(self.loader.state_dict())}
        path = self.checkpoints.save(self.step, self.model, self.optimizer, state)
        if self.main:
            log.info("saved checkpoint %s", path)

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> dict:
        """Forward/backward over grad_accum_steps micro-batches, loss averaged over all their tokens."""
        micro = [b.to(self.device) for b in itertools.islice(self.loader, self.cfg.train.grad_accum_steps)]
        (total_tokens,) = all_reduce_sums([sum(b.num_loss_tokens for b in micro)], self.device)
        # Data-parallel gradients are averaged over ranks, so scale by the world size to get the mean
        # over every loss token of the global step.
        scale = self.world / max(total_tokens, 1)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            if self.world > 1:  # reduce gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            with self.autocast():
                logits = self.model(batch.input_ids, batch.pixel_values)
            loss, _ = self.objective(logits, batch.targets)
            (loss * scale).backward()
            loss_sum += loss.item()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seq_len = max(b.input_ids.shape[1] for b in micro)
        loss_sum, positions, samples, images = all_reduce_sums(
            [loss_sum, sum(b.input_ids.numel() for b in micro), sum(b.input_ids.shape[0] for b in micro),
             sum(sum(b.images_per_sample) for b in micro)], self.device)
        return {"loss": loss_sum / total_tokens, "lr": lr, "grad_norm": grad_norm, "positions": positions,
                "samples": samples, "images": images, "seq_len": seq_len}

    def step_metrics(self, raw: dict, seconds: float) -> dict:
        flops = self.spec.training_flops(self.cfg.model, raw["positions"], raw["seq_len"], raw["images"])
        mfu = flops / seconds / (self.peak * self.world) if self.peak else None
        data_state = self.loader.state_dict()
        skipped = data_state["skipped"]
        return {"loss": raw["loss"], "lr": raw["lr"], "grad_norm": raw["grad_norm"],
                "tokens_per_s": raw["positions"] / seconds, "samples_per_s": raw["samples"] / seconds,
                "mfu": mfu, "peak_mem_gib": peak_memory_gib(self.device), "epoch": data_state["epoch"],
                "skipped_samples": sum(skipped.values()), **{f"skipped_{k}": v for k, v in skipped.items()}}

    def validate_now(self) -> float:
        batches = itertools.islice(val_loader(self.cfg, self.tokenizer), self.cfg.train.val_batches)
        return evaluate.validation_loss(self.model, batches, self.device, self.autocast)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.main:
            write_resolved_config(self.cfg, self.run_dir)
            shutil.copyfile(Path(self.cfg.data.path) / TOKENIZER, self.run_dir / TOKENIZER)
        self.resume()
        self.model.train()
        metrics = MetricsLogger(self.cfg, self.run_dir, self.step, enabled=self.main)
        t = self.cfg.train
        losses, grad_norms = {}, {}
        try:
            while self.step < t.max_steps:
                start = time.perf_counter()
                raw = self.train_step()
                self.step += 1
                step_metrics = self.step_metrics(raw, time.perf_counter() - start)
                losses[self.step], grad_norms[self.step] = raw["loss"], raw["grad_norm"]
                if self.step % self.cfg.logger.log_every == 0 or self.step == t.max_steps:
                    metrics.log(self.step, step_metrics)
                metrics.advance()
                if t.val_every and self.step % t.val_every == 0:
                    metrics.log(self.step, {"loss": self.validate_now()}, kind="val")
                if (self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0) \
                        or self.step == t.max_steps:
                    self.save()
            summary = self.final_eval(metrics)
        finally:
            metrics.close()
        if self.main:
            plot_loss(self.run_dir)
        summary["losses"], summary["grad_norms"] = losses, grad_norms
        return summary

    def final_eval(self, metrics: MetricsLogger) -> dict:
        e = self.cfg.eval
        summary = {"step": self.step, "val_loss": self.validate_now()}
        if e.num_samples:
            samples = itertools.islice(val_stream(self.cfg, self.tokenizer), e.num_samples)
            results = evaluate.caption_samples(self.model, self.tokenizer, sample_encoder(self.cfg, self.tokenizer),
                                               samples, self.cfg.data.val_batch_size, e.max_new_tokens, self.device)
            summary["caption_accuracy"] = evaluate.accuracy(results)
            summary["caption_samples"] = len(results)
            summary["examples"] = [{**dataclasses.asdict(r), "correct": r.correct}
                                   for r in results[: e.show_examples]]
        metrics.log(self.step, {k: v for k, v in summary.items() if k != "examples"}, kind="eval")
        if self.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
