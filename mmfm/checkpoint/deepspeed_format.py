"""`mmfm convert`: a checkpoint between mmfm's format (DCP, what both engines save) and DeepSpeed's ZeRO format
(what DeepSpeed's `save_checkpoint` writes and `load_checkpoint` reads), both ways, the AdamW moments, step, learning
rate schedule, data position and RNG included (docs/engines.md, "Checkpoints").

The conversion runs a ZeRO engine around the run's model, on as many ranks as the DeepSpeed checkpoint has (or is to
have) partitions: mmfm's checkpoint is loaded into it and DeepSpeed saves, or DeepSpeed loads and mmfm saves. mmfm's
own state rides in DeepSpeed's client state under "mmfm", and the run's config.yaml and tokenizer beside it.

DeepSpeed's files are pickles. Before DeepSpeed reads one, every global it names must be tensor data (torch's
weights-only set) or one of DeepSpeed's own plain state classes below, and torch.load runs weights-only while DeepSpeed
loads: a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from mmfm.checkpoint.errors import CheckpointError
from mmfm.checkpoint.manager import CheckpointManager, find_checkpoint, rng_state, set_rng_state
from mmfm.config.load import load_run_config
from mmfm.config.schema import JobConfig
from mmfm.data.tokenizer import copy_tokenizer
from mmfm.parallel.distributed import barrier, env_world_size, is_main_process

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LATEST = "latest"
CLIENT_KEY = "mmfm"  # DeepSpeed client state: {"trainer_state": ..., "rng": ...}
# DeepSpeed's optimizer state pickles these (an enum, a named tuple and the loss scaler's attributes) besides tensors
DEEPSPEED_STATE_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                           "deepspeed.utils.tensor_fragment.fragment_address",
                           "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                           "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


# -- reading DeepSpeed's files without running code -------------------------------------------------------------


def _state_classes() -> list[type]:
    classes = []
    for dotted in DEEPSPEED_STATE_CLASSES:
        module, name = dotted.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def check_pickles(folder: Path) -> None:
    """Refuse (one line) a file of a DeepSpeed checkpoint folder whose pickle names a global that is neither tensor
    data nor DeepSpeed's state (such a global is how a pickle runs code)."""
    allowed = set(DEEPSPEED_STATE_CLASSES)
    for path in sorted(folder.glob("*.pt")):
        if not zipfile.is_zipfile(path):
            continue  # the legacy format: the weights-only load below refuses what is not allowed
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure to parse: not a torch checkpoint
            raise CheckpointError(f"{path} is not a readable torch checkpoint file ({type(exc).__name__}: {exc}); "
                                  "point at a complete DeepSpeed checkpoint") from None
        refused = [name for name in unsafe if name not in allowed]
        if refused:
            raise CheckpointError(f"{path} pickles {refused[0]}, which is neither tensor data nor DeepSpeed "
                                  "checkpoint state, so mmfm does not unpickle it (a pickle can run code that way); "
                                  "convert a checkpoint that DeepSpeed's save_checkpoint wrote")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """torch.load reads weights-only (DeepSpeed's state classes allowed) for as long as DeepSpeed loads."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            what = args[0] if args else kwargs.get("f")
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{what} holds more than tensors and DeepSpeed's state, which mmfm does not "
                                  f"unpickle ({first})") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_state_classes()):
            yield
    finally:
        torch.load = original


def deepspeed_checkpoint(path: Path) -> tuple[Path, str]:
    """(the folder DeepSpeed saved into, the tag) of a DeepSpeed checkpoint: that folder (its `latest`) or one tag
    folder in it."""
    path = Path(path)
    if (path / LATEST).is_file():
        root, tag = path, (path / LATEST).read_text().strip()
    elif any(path.glob("*_model_states.pt")):
        root, tag = path.parent, path.name
    else:
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint (no `{LATEST}` file, no *_model_states.pt); "
                              "point at the folder DeepSpeed's save_checkpoint wrote, or one tag folder in it")
    folder = root / tag
    inside = folder.resolve().parent == root.resolve() if tag not in ("", ".", "..") else False
    if not inside or not folder.is_dir():
        raise CheckpointError(f"{root / LATEST} names {tag!r}, which is not a checkpoint folder inside {root}; "
                              "write the name of one of its tag folders into it")
    return root, tag


def read_layout(folder: Path) -> tuple[int, int]:
    """(ZeRO stage, data-parallel ranks) a DeepSpeed checkpoint folder was written with."""
    check_pickles(folder)
    files = sorted(folder.glob("*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder} holds no *_model_states.pt; it is not a complete DeepSpeed checkpoint")
    with weights_only_loads():
        state = torch.load(files[0], map_location="cpu")
    try:
        stage = int(state["ds_config"]["zero_optimization"]["stage"])
        world = int(state["dp_world_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{files[0]} names no ZeRO stage or data-parallel size (ds_config, dp_world_size); it "
                              "is not a DeepSpeed ZeRO checkpoint") from None
    optim = list(folder.glob("*_optim_states.pt"))
    if len(optim) != world:
        raise CheckpointError(f"{folder} holds {len(optim)} *_optim_states.pt files for {world} ranks; the checkpoint "
                              "is incomplete (a save was cut off): convert another one")
    return stage, world


# -- the engine the conversion runs -----------------------------------------------------------------------------


def engine_config(cfg: JobConfig, zero_stage: int) -> JobConfig:
    """The run's config under a plain ZeRO engine of this stage, every rank data parallel."""
    from mmfm.train.deepspeed_engine import validate_engine

    cfg.engine.name = "deepspeed"
    d = cfg.engine.deepspeed
    d.zero_stage, d.offload_optimizer, d.offload_param, d.config = zero_stage, "none", "none", ""
    p = cfg.parallel
    p.auto, p.tp, p.pp, p.cp, p.ep, p.dp_replicate, p.dp_shard = False, 1, 1, 1, 1, 1, -1
    validate_engine(cfg, world_size())
    return cfg


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else env_world_size()


def start_group() -> torch.device:
    """The device, and under torchrun (WORLD_SIZE > 1) the process group, before any rank writes."""
    from mmfm.parallel.distributed import init_distributed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    return device


def build_runner(cfg: JobConfig, device: torch.device):
    """The run's model (as training builds it) in a ZeRO engine."""
    from mmfm.parallel.dims import ParallelDims
    from mmfm.parallel.parallelize import parallelize
    from mmfm.train.deepspeed_engine import DeepSpeedRunner
    from mmfm.train.trainer import freeze, seed_everything

    seed_everything(cfg.seed)
    parts = parallelize(cfg, ParallelDims(), device)
    freeze(parts.parts, cfg.stage.freeze)
    return DeepSpeedRunner(cfg, parts.parts[0], device)


def model_shapes(cfg: JobConfig) -> dict:
    from mmfm.models import build_model

    return {k: v.shape for k, v in build_model(cfg.model, "meta").state_dict().items()}


def check_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not empty; give a new folder")
    return out


def _new_folder(out: Path) -> Path:
    """A hidden sibling of `out` to write into, renamed onto it once complete."""
    partial = out.with_name(f".{out.name}.partial")
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    return partial


def _publish(partial: Path, out: Path) -> None:
    barrier()
    if is_main_process():
        if out.exists():
            out.rmdir()
        partial.rename(out)
    barrier()


def _discard(partial: Path) -> None:
    """A conversion that failed leaves nothing behind (its source is only read)."""
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def conversion(cfg: JobConfig, device: torch.device, out: Path):
    """(the ZeRO engine, the hidden folder to write into) of a conversion: the folder published onto `out` when the
    body completes, removed when it fails."""
    runner = build_runner(cfg, device)
    partial = _new_folder(out)
    try:
        yield runner, partial
        _publish(partial, out)
    except BaseException:
        _discard(partial)
        raise
    finally:
        runner.close()


def _copy_run_files(config: Path, tokenizer_dir: Path, dst: Path) -> None:
    """The run's config and tokenizer files, which export, eval and resume read beside the checkpoint."""
    if is_main_process():
        shutil.copyfile(config, dst / CONFIG_FILE)
        copy_tokenizer(tokenizer_dir, dst)


# -- the two directions -----------------------------------------------------------------------------------------


def run_zero_stage(source: Path) -> int:
    """The ZeRO stage a run's config asks for (2 when it names none)."""
    run_dir, _ = find_checkpoint(Path(source))
    return load_run_config(run_dir / CONFIG_FILE).engine.deepspeed.zero_stage or 2


def to_deepspeed(source: Path, out: Path, zero_stage: int) -> Path:
    """An mmfm checkpoint (run directory or step_* folder) as a DeepSpeed ZeRO checkpoint of `zero_stage` for this
    process group's ranks, in the new folder `out`. Collective."""
    device = start_group()
    run_dir, ckpt = find_checkpoint(Path(source))
    cfg = engine_config(load_run_config(run_dir / CONFIG_FILE), zero_stage)
    with conversion(cfg, device, check_out(out)) as (runner, partial):
        trainer_state = CheckpointManager.inspect(ckpt, model_shapes(cfg))
        model, optim = runner.state_dicts()
        state = {"model": model, "optim": optim}
        CheckpointManager.load_states(ckpt, state)  # the RNG too, into this process
        runner.load_state_dicts(state["model"], state["optim"])
        runner.scheduler.load_state_dict(trainer_state["scheduler"])
        step = int(trainer_state["step"])
        runner.engine.global_steps = step
        runner.engine.global_samples = step * runner.engine.train_batch_size()
        client = {CLIENT_KEY: {"trainer_state": trainer_state, "rng": rng_state()}}
        runner.engine.save_checkpoint(str(partial), tag=ckpt.name, client_state=client)
        _copy_run_files(run_dir / CONFIG_FILE, run_dir, partial)
    return Path(out)


def to_dcp(source: Path, out: Path, config: Optional[Path] = None) -> Path:
    """A DeepSpeed ZeRO checkpoint that mmfm wrote (`to_deepspeed`) as an mmfm run directory `out` (new) holding one
    checkpoint, on as many ranks as it was written by. config: the run's config.yaml when the folder has none.
    Collective."""
    device = start_group()
    root, tag = deepspeed_checkpoint(Path(source))
    stage, world = read_layout(root / tag)
    if world_size() != world:
        raise CheckpointError(f"{root / tag} was written by {world} DeepSpeed ranks, and DeepSpeed loads it on as "
                              f"many: run the conversion on {world} processes (torchrun --nproc-per-node {world} "
                              f"-m mmfm.cli.main convert ...), here {world_size()}")
    config_path = Path(config) if config else root / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{root} holds no {CONFIG_FILE} of the run (mmfm convert writes one): give the run's "
                              "config with --config RUN_DIR/config.yaml")
    cfg = engine_config(load_run_config(config_path), stage)
    with conversion(cfg, device, check_out(out)) as (runner, partial):
        with weights_only_loads():
            loaded, client = runner.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {root / tag}; it is incomplete or not a ZeRO checkpoint")
        ours = (client or {}).get(CLIENT_KEY)
        if not isinstance(ours, dict) or "trainer_state" not in ours:
            raise CheckpointError(f"{root / tag} carries no mmfm state (written by a program other than `mmfm "
                                  "convert`): its data position and schedule are unknown, and converting it is not "
                                  "built yet")
        trainer_state = dict(ours["trainer_state"])
        step = int(trainer_state.pop("step"))
        set_rng_state(ours["rng"])
        _copy_run_files(config_path, root, partial)
        CheckpointManager(partial / "checkpoints").save(step, None, None, trainer_state, runner.state_dicts())
    return Path(out)
