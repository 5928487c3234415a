"""Checkpoints through torch.distributed.checkpoint: model, optimizer, RNG and a JSON trainer state.

Layout under the run directory:

    checkpoints/step_00000100/   .metadata + *.distcp (DCP) + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint

A checkpoint is written into a hidden `.step_N.partial` folder and renamed into place only once every
file is on disk; `latest` is switched (atomically) after that. A crash mid-save therefore leaves
`latest` on the previous checkpoint, and an unfinished folder is never mistaken for a checkpoint.

Reading trusts nothing in the folder: `checksums.json` (sha256 of every file) is verified first, the DCP
metadata is read by an allow-listed unpickler (mmfm.checkpoint.safe_read), the trainer state is checked
for its types, and the parameter names and shapes the checkpoint holds must equal the model's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

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

from mmfm.checkpoint import checksums
from mmfm.checkpoint.errors import CheckpointError
from mmfm.checkpoint.safe_read import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from mmfm.parallel.distributed import barrier, is_distributed, is_main_process

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


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


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which holds every rank's)."""
    while isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    return exc


def describe(exc: BaseException) -> str:
    exc = root_cause(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _parts(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


Select = Optional[Callable[[str], bool]]  # which model-state keys a checkpoint holds (None: all)


def model_state(parts: list[nn.Module], select: Select = None) -> list[dict]:
    """One state dict per model part (pipeline stages hold disjoint names, a tied copy aside); select: only the
    keys it accepts (e.g. LoRA adapters)."""
    states = [get_model_state_dict(p) for p in parts]
    return states if select is None else [{k: v for k, v in s.items() if select(k)} for s in states]


def optim_state(parts: list[nn.Module], optimizers: list) -> list[dict]:
    return [get_optimizer_state_dict(p, o, options=OPTIM_OPTIONS) for p, o in zip(parts, optimizers)]


def _merged(states: list[dict]) -> dict:
    merged: dict = {}
    for state in states:
        merged.update(state)
    return merged


TRAINER_STATE_TYPES = {"step": int, "scheduler": dict, "data": list}
_verified: set[tuple[str, int]] = set()  # (checkpoint, mtime of its checksums.json) verified by this process


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json, its fields checked for their types."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {TRAINER_STATE} ({exc}); resume from another step_* "
                              "folder") from None
    if not isinstance(state, dict):
        problem = "is not a JSON object"
    else:
        problem = next((f"has no {key!r} of type {kind.__name__}" for key, kind in TRAINER_STATE_TYPES.items()
                        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)), None)
        if problem is None and state["step"] < 0:
            problem = f"has a negative step {state['step']}"
    if problem:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_STATE} {problem}; it is damaged: resume from another "
                              "step_* folder")
    return state


def model_shapes(metadata) -> dict[str, Optional[tuple]]:
    """{parameter name: global shape} of the model a checkpoint holds (None for a non-tensor entry)."""
    return {key[len("model."):]: (tuple(md.size) if hasattr(md, "size") else None)
            for key, md in metadata.state_dict_metadata.items() if key.startswith("model.")}


def _first_difference(held: dict, wanted: dict) -> tuple[int, str]:
    extra, missing = sorted(held.keys() - wanted.keys()), sorted(wanted.keys() - held.keys())
    resized = sorted(k for k in held.keys() & wanted.keys() if held[k] != wanted[k])
    if resized:
        first = f"{resized[0]} is {held[resized[0]]} there, {wanted[resized[0]]} here"
    elif extra:
        first = f"{extra[0]} is in the checkpoint, not in this model"
    else:
        first = f"{missing[0]} is in this model, not in the checkpoint"
    return len(extra) + len(missing) + len(resized), first


def _config_difference(recorded: Optional[dict], current: Optional[dict], prefix: str = "model") -> list[str]:
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return []
    out = []
    for key in sorted(recorded.keys() | current.keys()):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_difference(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}={a} there, {b} here")
    return out


def check_model(path: Path, metadata, expected: dict, state: dict, model_config: Optional[dict]) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from the model's."""
    held, wanted = model_shapes(metadata), {k: tuple(v) for k, v in expected.items()}
    if held == wanted:
        return
    count, first = _first_difference(held, wanted)
    fields = _config_difference((state.get("record") or {}).get("model"), model_config)
    hint = f"; config: {', '.join(fields[:3])}" if fields else ""
    raise CheckpointError(f"checkpoint {path} was written for another model config ({count} parameter(s) differ, "
                          f"e.g. {first}{hint}); set the model config it was trained with (its run's config.yaml) "
                          "or use a new run_dir")


def verify_checksums(path: Path, distributed: bool) -> None:
    """Verify checksums.json once per process and checkpoint (collective when distributed)."""
    record = path / checksums.CHECKSUMS
    key = (str(path.resolve()), record.stat().st_mtime_ns if record.is_file() else -1)
    if key in _verified:
        return
    if not checksums.verify(path, distributed):
        log.warning("checkpoint %s has no %s (written before checksums were recorded): not verified", path,
                    checksums.CHECKSUMS)
    _verified.add(key)


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
    def __init__(self, root: str | Path, keep_last: int = 2, select: Select = None):
        """select: the model-state keys saved (None: all; a LoRA run: its adapters)."""
        self.root, self.keep_last, self.select = Path(root), keep_last, select

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
        try:
            name = pointer.read_bytes().decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = None
        if name is None or not STEP_DIR.match(name):
            raise CheckpointError(f"{pointer} does not hold the name of a step_* folder; write the name of a complete "
                                  "checkpoint into it, or resume from one with checkpoint.resume=<path to a step_* "
                                  "folder>")
        target = self.root / name
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

    def save(self, step: int, model, optimizer, trainer_state: dict, states: Optional[tuple[dict, dict]] = None) -> Path:
        """Collective: every rank writes its shards; rank 0 writes the JSON state and publishes.

        model / optimizer: a module and its optimizer, or lists of them (one per pipeline stage held); states: the
        (model, optimizer) state dicts in their place, already in this format (the DeepSpeed engine's).
        """
        final = self.root / f"step_{step:08d}"
        partial = self.root / f".step_{step:08d}.partial"
        if is_main_process():
            if partial.exists():
                shutil.rmtree(partial)  # left by an interrupted save; never referenced by `latest`
            partial.mkdir(parents=True)
        barrier()
        if states is None:
            parts, optimizers = _parts(model), _parts(optimizer)
            states = _merged(model_state(parts, self.select)), _merged(optim_state(parts, optimizers))
        state = {"model": states[0], "optim": states[1], "rng": rng_state()}
        try:
            with _single_process_quietly():
                dcp.save(state, checkpoint_id=str(partial))
            digests = checksums.hash_shared(partial)
            if is_main_process():
                self._publish(partial, final, {"step": step, **trainer_state}, digests)
        except (OSError, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            if is_main_process():
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(self._save_failure(final, exc)) from None
        barrier()
        return final

    def _save_failure(self, final: Path, exc: BaseException) -> str:
        cause = root_cause(exc)
        disk_full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "no space left on the device" if disk_full else describe(cause)
        try:
            kept = self.latest()
        except CheckpointError:
            kept = None
        return (f"could not write checkpoint {final} ({reason}); the previous checkpoint ({kept or 'none yet'}) is "
                "intact: free space or fix the folder's permissions, then run again with the same run_dir to "
                "resume")

    def _publish(self, partial: Path, final: Path, trainer_state: dict, digests: dict[str, str]) -> None:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        checksums.write_record(partial, {**digests, TRAINER_STATE: checksums.sha256_file(partial / TRAINER_STATE)})
        _fsync_tree(partial)
        if final.exists():
            kept = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            final.rename(kept)
            log.warning("checkpoint %s already existed; moved it to %s", final, kept)
        partial.rename(final)
        self._point_latest(final.name)
        self._prune(final)

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{LATEST}.tmp"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)

    def _prune(self, saved: Path) -> None:
        """Keep the keep_last newest checkpoints up to the one just saved. Higher steps are never deleted: they
        were written before this run resumed from an older checkpoint, and are newer than it."""
        lineage = [p for p in self.step_dirs() if p.name <= saved.name and is_complete(p)]
        for old in lineage[: -self.keep_last]:
            shutil.rmtree(old)

    @staticmethod
    def inspect(path: Path, expected_shapes: Optional[dict] = None, model_config: Optional[dict] = None,
                no_dist: bool = False) -> dict:
        """Check a checkpoint before anything of it is loaded (collective unless no_dist): its trainer state,
        its checksums, its metadata (read without running code) and, given expected_shapes ({name: shape} of
        the whole model), the parameters it holds. Returns the trainer state."""
        path = Path(path)
        state = read_trainer_state(path)
        verify_checksums(path, distributed=is_distributed() and not no_dist)
        metadata = read_metadata(path)
        if expected_shapes is not None:
            check_model(path, metadata, expected_shapes, state, model_config)
        return state

    @staticmethod
    def load(path: Path, model, optimizer=None, no_dist: bool = False, select: Select = None) -> dict:
        """Load model (and optimizer, RNG) state in place; return the trainer state saved with them.

        Any layout loads a checkpoint of any other (resharded by torch.distributed.checkpoint).
        no_dist: load in this process alone (e.g. rank 0 evaluating an unsharded copy).
        select: load only these model-state keys, which must be exactly those the checkpoint holds (a LoRA run's
        adapters; or a full checkpoint's weights into a LoRA model, less its adapters); the others stay as they are.
        """
        parts = _parts(model)
        models = model_state(parts, select)
        whole = {k: v.shape for k, v in models[0].items()} if len(parts) == 1 else None  # a pipeline stage is a part
        trainer_state = CheckpointManager.inspect(path, whole, no_dist=no_dist)
        state: dict = {"model": _merged(models)}
        if optimizer is not None:
            optims = optim_state(parts, _parts(optimizer))
            state["optim"] = _merged(optims)
        CheckpointManager.load_states(path, state, no_dist)
        # DCP loads tensors in place and replaces other values: take both back into the per-part dicts
        for part_states, merged in ((models, state["model"]), (optims if optimizer is not None else [], state.get("optim"))):
            for part_state in part_states:
                part_state.update({k: merged[k] for k in part_state})
        options = StateDictOptions(strict=select is None)
        for part, part_state in zip(parts, models):
            set_model_state_dict(part, part_state, options=options)
        if optimizer is not None:
            for part, opt, part_state in zip(parts, _parts(optimizer), optims):
                set_optimizer_state_dict(part, opt, part_state, options=OPTIM_OPTIONS)
        return trainer_state

    @staticmethod
    def load_states(path: Path, state: dict, no_dist: bool = False) -> None:
        """Fill state ({"model": ..., and "optim": ... to restore the optimizer, with the RNG}) from the checkpoint
        in place (DCP replaces non-tensor values in the dict)."""
        if "optim" in state:
            state["rng"] = rng_state()
        try:
            with _single_process_quietly():
                dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                         no_dist=no_dist)
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {path} could not be loaded ({describe(exc)}); it is "
                                  "corrupt or was written for another model config; resume from another "
                                  "step_* folder or match the model config") from None
        if "rng" in state:
            set_rng_state(state["rng"])
