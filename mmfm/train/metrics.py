"""Metrics: MFU from a peak-FLOPs table, peak memory, and one logger that feeds the progress bar,
`metrics.jsonl` in the run directory and wandb (offline unless logger.wandb.mode=online)."""

from __future__ import annotations

import json
import logging
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from mmfm.config.schema import JobConfig, LoggerConfig

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "B200": 2250.0, "H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0,
    "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0, "4090": 165.0, "V100": 125.0,
}


def peak_flops(device: torch.device, cfg: LoggerConfig) -> Optional[float]:
    """Per-device peak FLOP/s for MFU: logger.peak_tflops if set, else the table, else None."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type == "cpu":
        return cfg.cpu_peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        log.warning("no peak FLOPs known for %s; set logger.peak_tflops to report MFU", name)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsLogger:
    """Writes on the main process only; on other ranks (enabled=False) every call does nothing."""

    def __init__(self, cfg: JobConfig, run_dir: Path, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        # A live bar on a terminal; in a log file (batch jobs, CI) one plain line per logged step instead.
        live = cfg.logger.progress_bar and sys.stderr.isatty()
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not live)
        self.max_steps = cfg.train.max_steps
        self.wandb = self._init_wandb(cfg, run_dir) if cfg.logger.wandb.enabled else None

    @staticmethod
    def _init_wandb(cfg: JobConfig, run_dir: Path):
        import dataclasses

        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        id_file.write_text(run_id)
        w = cfg.logger.wandb
        return wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(run_dir), id=run_id,
                          resume="allow", name=cfg.experiment_name, config=dataclasses.asdict(cfg))

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if kind == "train" and not self.bar.disable:
            shown = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if metrics.get(k) is not None}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            return
        text = f"step {step}/{self.max_steps} {kind}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if v is not None)
        if self.bar.disable:
            log.info(text)
        else:
            self.bar.write(text)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path, kind: str = "train") -> list[dict]:
    """Records of one kind from metrics.jsonl; after a resume, the last record per step wins."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(run_dir: Path) -> Path:
    """loss.png in the run directory: training loss per step and validation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(run_dir / "metrics.jsonl", "train")
    val = read_metrics(run_dir / "metrics.jsonl", "val")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", yscale="log", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
