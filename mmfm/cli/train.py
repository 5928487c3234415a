"""`mmfm train [overrides]`: a Hydra app over configs/ (so --cfg job, --help, --multirun all work)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmfm.cli.errors import one_line_errors
from mmfm.config import config_dir, to_job_config, validate
from mmfm.config.load import register_schema


def report(summary: dict, run_dir: str) -> None:
    print(f"\nrun directory: {run_dir}")
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}: checkpoint saved; running again with this run_dir resumes")
        return
    for key, value in summary.items():
        if key.startswith("val_"):
            print(f"final validation {key[4:].replace('_', ' ')}: {value:.4f}")
    for kind in ("caption", "answer"):
        if f"{kind}_accuracy" in summary:
            for ex in summary["examples"]:
                mark = "ok " if ex["correct"] else "BAD"
                print(f"  [{mark}] {ex['key']}: {ex['prediction']!r}  (reference: {ex['truth']!r})")
            n = summary[f"{kind}_samples"]
            acc = summary[f"{kind}_accuracy"]
            print(f"held-out exact-match {kind} accuracy: {acc:.1%} ({round(acc * n)}/{n})")


def task(cfg: DictConfig) -> None:
    with one_line_errors("mmfm train"):
        job = validate(to_job_config(cfg))
        from mmfm.train.trainer import Trainer  # heavy imports only once the config is known to be good

        trainer = Trainer(job, HydraConfig.get().runtime.output_dir)
        summary = trainer.fit()
        if trainer.main:
            report(summary, str(trainer.run_dir))


def main(argv: list[str]) -> int:
    with one_line_errors("mmfm train"):
        path = str(config_dir())
    register_schema()
    app = hydra.main(version_base="1.3", config_path=path, config_name="config")(task)
    sys.argv = ["mmfm train", *argv]
    app()
    return 0
