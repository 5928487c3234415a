"""Checkpoints through torch.distributed.checkpoint: model, optimizer, RNG and a JSON trainer state.

Layout under the run directory:

    checkpoints/step_00000100/   .metadata + *.distcp (DCP) + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint

A checkpoint is written into a hidden `.step_N.partial` folder and renamed into place only once every
file is on disk; `latest` is switched (atomically) after that. A crash mid-save therefore leaves
`latest` on the previous checkpoint, and an unfinished folder is never mistaken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmfm.errors import MmfmError
from mmfm.parallel.distributed import barrier, is_main_process

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(MmfmError):
    pass


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every call that it runs without a process group; that is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# Optimizer state keyed by parameter name, so that it loads at any layout (other sharding, other stages).
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _parts(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def model_state(parts: list[nn.Module]) -> list[dict]:
    """One state dict per model part (pipeline stages hold disjoint names, a tied copy aside)."""
    return [get_model_state_dict(p) for p in parts]


def optim_state(parts: list[nn.Module], optimizers: list) -> list[dict]:
    return [get_optimizer_state_dict(p, o, options=OPTIM_OPTIONS) for p, o in zip(parts, optimizers)]


def _merged(states: list[dict]) -> dict:
    merged: dict = {}
    for state in states:
        merged.update(state)
    return merged


def is_complete(folder: Path) -> bool:
    return (STEP_DIR.match(folder.name) is not None and (folder / ".metadata").is_file()
            and (folder / TRAINER_STATE).is_file())


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) from a run directory (its latest checkpoint), its checkpoints/ folder or
    one complete step_* folder."""
    path = Path(path)
    for run_dir, root in ((path, path / "checkpoints"), (path.parent, path)):
        if (root / LATEST).is_file() or (root.is_dir() and root.name == "checkpoints"):
            latest = CheckpointManager(root).latest()
            if latest is None:
                raise CheckpointError(f"{path} has no checkpoint yet")
            return run_dir, latest
    if is_complete(path):
        return path.parents[1], path
    raise CheckpointError(f"{path} is neither a run directory with checkpoints nor a complete step_* checkpoint "
                          "folder")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root, self.keep_last = Path(root), keep_last

    def step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if STEP_DIR.match(p.name))

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None when this folder has none.

        Raises when checkpoints exist but `latest` is missing or points at an incomplete one, rather
        than letting training start over and write on top of them.
        """
        pointer = self.root / LATEST
        if not pointer.is_file():
            if self.step_dirs():
                raise CheckpointError(f"{self.root} holds checkpoints but no '{LATEST}' file; resume from one "
                                      f"explicitly with checkpoint.resume=<path to a step_* folder>")
            return None
        target = self.root / pointer.read_text().strip()
        if not is_complete(target):
            raise CheckpointError(f"{pointer} points at {target}, which is missing or incomplete; resume from "
                                  "an earlier one with checkpoint.resume=<path to a step_* folder>")
        return target

    def resolve(self, spec: str) -> Optional[Path]:
        """checkpoint.resume -> the folder to load: 'auto' = latest here (or none), 'never', or a path."""
        if spec == "never":
            if self.step_dirs():
                raise CheckpointError(f"checkpoint.resume=never but {self.root} already holds checkpoints; use a "
                                      "new run_dir or checkpoint.resume=auto")
            return None
        if spec == "auto":
            return self.latest()
        path = Path(spec)
        if path.is_dir() and (path / LATEST).is_file():
            return CheckpointManager(path).latest()
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={spec}: no such folder; give a step_* folder or a "
                                  "checkpoints/ folder with a 'latest' file")
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.resume={spec} is not a complete checkpoint (needs .metadata and "
                                  f"{TRAINER_STATE}); pick another step_* folder")
        return path

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        """Collective: every rank writes its shards; rank 0 writes the JSON state and publishes.

        model / optimizer: a module and its optimizer, or lists of them (one per pipeline stage held).
        """
        final = self.root / f"step_{step:08d}"
        partial = self.root / f".step_{step:08d}.partial"
        if is_main_process():
            if partial.exists():
                shutil.rmtree(partial)  # left by an interrupted save; never referenced by `latest`
            partial.mkdir(parents=True)
        barrier()
        parts, optimizers = _parts(model), _parts(optimizer)
        state = {"model": _merged(model_state(parts)), "optim": _merged(optim_state(parts, optimizers)),
                 "rng": rng_state()}
        with _single_process_quietly():
            dcp.save(state, checkpoint_id=str(partial))
        if is_main_process():
            self._publish(partial, final, {"step": step, **trainer_state})
        barrier()
        return final

    def _publish(self, partial: Path, final: Path, trainer_state: dict) -> None:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(partial)
        if final.exists():
            kept = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            final.rename(kept)
            log.warning("checkpoint %s already existed; moved it to %s", final, kept)
        partial.rename(final)
        self._point_latest(final.name)
        self._prune()

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{LATEST}.tmp"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)

    def _prune(self) -> None:
        complete = [p for p in self.step_dirs() if is_complete(p)]
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old)

    @staticmethod
    def load(path: Path, model, optimizer=None, no_dist: bool = False) -> dict:
        """Load model (and optimizer, RNG) state in place; return the trainer state saved with them.

        Any layout loads a checkpoint of any other (resharded by torch.distributed.checkpoint).
        no_dist: load in this process alone (e.g. rank 0 evaluating an unsharded copy).
        """
        try:
            trainer_state = json.loads((path / TRAINER_STATE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable {TRAINER_STATE} ({exc}); resume from another "
                                  "step_* folder") from None
        parts = _parts(model)
        models = model_state(parts)
        state: dict = {"model": _merged(models)}
        if optimizer is not None:
            optims = optim_state(parts, _parts(optimizer))
            state["optim"] = _merged(optims)
            state["rng"] = rng_state()
        try:
            with _single_process_quietly():
                dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {detail}); it is "
                                  "corrupt or was written for another model config; resume from another "
                                  "step_* folder or match the model config") from None
        # DCP loads tensors in place and replaces other values: take both back into the per-part dicts
        for part_states, merged in ((models, state["model"]), (optims if optimizer is not None else [], state.get("optim"))):
            for part_state in part_states:
                part_state.update({k: merged[k] for k in part_state})
        for part, part_state in zip(parts, models):
            set_model_state_dict(part, part_state)
        if optimizer is not None:
            for part, opt, part_state in zip(parts, _parts(optimizer), optims):
                set_optimizer_state_dict(part, opt, part_state, options=OPTIM_OPTIONS)
            set_rng_state(state["rng"])
        return trainer_state
