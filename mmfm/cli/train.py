"""`mmfm train [overrides]`: a Hydra app over mmfm/configs/ (so --cfg job, --help, --multirun all work)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mmfm.cli.errors import one_line_errors
from mmfm.config import config_dir, preflight, to_job_config
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


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


def write_hydra_record(cfg: DictConfig, run_dir) -> None:
    """Hydra's own record of the run (.hydra/config.yaml, overrides.yaml, hydra.yaml), as Hydra writes it."""
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(exist_ok=True)
    hydra_cfg = HydraConfig.get()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_cfg}))


@contextlib.contextmanager
def log_held_until_accepted():
    """Log lines are held in memory until the run is accepted, then go to <run_dir>/train.log (with the held
    ones first); a refused run leaves no log there. Yields a function that takes the run directory."""
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    root = logging.getLogger()
    root.addHandler(held)

    def accept(run_dir: Path) -> None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter(LOG_FORMAT))
        held.setTarget(file)
        held.flush()
        root.removeHandler(held)
        root.addHandler(file)

    try:
        yield accept
    finally:
        root.removeHandler(held)
        held.close()


def task(cfg: DictConfig) -> None:
    with one_line_errors("mmfm train"), log_held_until_accepted() as accept:
        checked = preflight(to_job_config(cfg))
        from mmfm.train.trainer import Trainer  # heavy imports only once the config is known to be good

        # refuses a bad resume before writing
        trainer = Trainer(checked.cfg, HydraConfig.get().runtime.output_dir, checked)
        accept(trainer.run_dir)
        if trainer.main:
            write_hydra_record(cfg, trainer.run_dir)
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
