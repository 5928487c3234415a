"""engine.name=deepspeed: the trainer's steps run by a DeepSpeed ZeRO engine (stage 1-3, optimizer and parameter
offload), the model, data, objectives, metrics, fault handling and loop unchanged (docs/engines.md).

mmfm stays the one source of truth: the DeepSpeed config is built from mmfm's (micro-batch, accumulation, clipping,
precision; the optimizer and schedule are mmfm's own AdamW and LambdaLR, handed to DeepSpeed), and a user's JSON
(engine.deepspeed.config) is merged in, a key that contradicts mmfm's config refused in one line.

Checkpoints are mmfm's (DCP, the same keys as the native engine's), not DeepSpeed's pickles: each parameter's fp32
master weights and AdamW moments are read from ZeRO's partitions (deepspeed.utils.safe_get_full_*) and saved as
row shards, one per rank, so that a run moves between engines (and layouts) by resuming, and `mmfm export` and
`mmfm eval` read it as any other.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from mmfm.config.schema import JobConfig
from mmfm.errors import ConfigError
from mmfm.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


MIN_DEEPSPEED = (0, 19, 4)  # managed_gradient_accumulation=false: mmfm calls step() once per optimizer step


def deepspeed_problem() -> Optional[str]:
    """Why DeepSpeed cannot run here (None: it can)."""
    install = "`pip install --no-build-isolation \"deepspeed>=0.19.4\"` (after torch; `make install` does it)"
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - any import failure means the engine cannot run
        return f"DeepSpeed does not import ({type(exc).__name__}: {exc}); {install}"
    version = tuple(int(x) for x in re.findall(r"\d+", deepspeed.__version__)[:3])
    if version < MIN_DEEPSPEED:
        return f"DeepSpeed {deepspeed.__version__} is installed, older than 0.19.4; {install}"
    return None


def read_user_config(path: str) -> dict:
    """engine.deepspeed.config's JSON object (plain JSON: no code, no includes)."""
    where = f"engine.deepspeed.config={path}"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc}); give the path of a DeepSpeed JSON file")
    try:
        user = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{where} holds a JSON {type(user).__name__}, not an object of DeepSpeed settings")
    return user


def _unset(value: Any) -> bool:
    return value is None or value == "auto"


def _agree(path: str, key: str, theirs: Any, ours: Any, field: str) -> None:
    if not _unset(theirs) and theirs != ours:
        raise ConfigError(f"engine.deepspeed.config={path} sets {key}={json.dumps(theirs)} but {field} gives "
                          f"{json.dumps(ours)}; remove the key from the JSON (or set it to \"auto\"), or change {field}")


def _pick(path: str, key: str, theirs: Any, ours: Any, field: str, default: Any) -> Any:
    """A setting both mmfm's config (None: unset) and the JSON may give: they must agree; else the default."""
    if ours is not None:
        _agree(path, key, theirs, ours, field)
        return ours
    return default if _unset(theirs) else theirs


def _offload(zero: dict, name: str, ours: Optional[str], nvme_path: str, path: str) -> Optional[dict]:
    block = zero.get(name) if isinstance(zero.get(name), dict) else {}
    device = _pick(path, f"zero_optimization.{name}.device", block.get("device"), ours,
                   f"engine.deepspeed.{name}", "none")
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"engine.deepspeed.{name}={device!r} is unknown; use one of {OFFLOAD_DEVICES}")
    if device == "none":
        return None
    out = {**block, "device": device}
    if device == "nvme":
        folder = nvme_path or block.get("nvme_path") or ""
        if not folder:
            raise ConfigError(f"engine.deepspeed.{name}=nvme needs engine.deepspeed.nvme_path (a folder on a fast "
                              "local disk)")
        out["nvme_path"] = folder
    return out


def deepspeed_config(cfg: JobConfig, world: int) -> dict:
    """The DeepSpeed config of this run: mmfm's settings merged with engine.deepspeed.config's JSON. Raises
    ConfigError naming the key when the two disagree."""
    d, t = cfg.engine.deepspeed, cfg.train
    path = d.config
    user = read_user_config(path) if path else {}
    for block, field in (("optimizer", "train.optim"), ("scheduler", "train.schedule")):
        if block in user:
            raise ConfigError(f"engine.deepspeed.config={path} has a \"{block}\" block, but the optimizer and its "
                              f"schedule are mmfm's ({field}.*): remove the block and set {field}.* instead")
    if (user.get("fp16") or {}).get("enabled") is True:
        raise ConfigError(f"engine.deepspeed.config={path} enables fp16, which mmfm does not train in; remove the "
                          "fp16 block and set train.precision=bf16")
    batch, accum = cfg.data.batch_size, t.grad_accum_steps
    owned = {"train_micro_batch_size_per_gpu": (batch, "data.batch_size"),
             "gradient_accumulation_steps": (accum, "train.grad_accum_steps"),
             "train_batch_size": (batch * accum * world,
                                  f"data.batch_size x train.grad_accum_steps x {world} ranks"),
             "gradient_clipping": (t.grad_clip, "train.grad_clip")}
    for key, (ours, field) in owned.items():
        _agree(path, key, user.get(key), ours, field)
    bf16 = t.precision == "bf16"
    _agree(path, "bf16.enabled", (user.get("bf16") or {}).get("enabled"), bf16, "train.precision")
    zero = dict(user.get("zero_optimization") or {})
    stage = _pick(path, "zero_optimization.stage", zero.get("stage"), d.zero_stage, "engine.deepspeed.zero_stage", 2)
    if stage not in (1, 2, 3):
        raise ConfigError(f"engine.deepspeed.zero_stage={stage} is not a ZeRO stage mmfm runs; use 1, 2 or 3 (for no "
                          "sharding at all, engine.name=native)")
    zero["stage"] = stage
    for name, ours in (("offload_optimizer", d.offload_optimizer), ("offload_param", d.offload_param)):
        block = _offload(zero, name, ours, d.nvme_path, path)
        zero.pop(name, None)
        if block is not None:
            zero[name] = block
    if d.cpu_adam and "offload_optimizer" not in zero:
        raise ConfigError("engine.deepspeed.cpu_adam=true steps optimizer state offloaded to the host; set "
                          "engine.deepspeed.offload_optimizer=cpu (or nvme), or cpu_adam=false")
    if "offload_param" in zero and stage != 3:
        raise ConfigError(f"engine.deepspeed.offload_param={zero['offload_param']['device']} needs ZeRO stage 3 "
                          f"(zero_stage={stage}); set engine.deepspeed.zero_stage=3")
    merged = {**user, **{key: ours for key, (ours, _) in owned.items()}}
    merged.update({
        "bf16": {**(user.get("bf16") or {}), "enabled": bf16},
        "zero_optimization": zero,
        # mmfm calls backward per micro-batch and step() once per optimizer step
        "managed_gradient_accumulation": False,
        # offloaded AdamW: DeepSpeed's CPUAdam (cpu_adam), else torch's on the host copy (no C++ op to build)
        "zero_force_ds_cpu_optimizer": d.cpu_adam,
        "steps_per_print": merged_steps_per_print(user),
    })
    merged.pop("fp16", None)
    return merged


def merged_steps_per_print(user: dict) -> int:
    """DeepSpeed's own progress lines: off unless the JSON asks (mmfm logs every logger.log_every steps)."""
    return int(user.get("steps_per_print") or 2**31 - 1)


def validate_engine(cfg: JobConfig, world: int) -> None:
    """Raise ConfigError (one line) when engine.* cannot run this config, before any work."""
    name = cfg.engine.name
    if name not in ("native", "deepspeed"):
        raise ConfigError(f"engine.name={name!r} is unknown; use native or deepspeed")
    if name == "native":
        return
    p = cfg.parallel
    if p.auto:
        raise ConfigError("parallel=auto plans the native engine's layouts; with engine.name=deepspeed every rank is "
                          "data parallel: use parallel.dp_shard=-1")
    split = [f"parallel.{k}={getattr(p, k)}" for k in ("tp", "pp", "cp", "ep") if getattr(p, k) > 1]
    if split:
        raise ConfigError(f"engine.name=deepspeed runs data parallelism (ZeRO) only, not {', '.join(split)}; set them "
                          "to 1, or use engine.name=native for tensor, pipeline, context or expert parallelism")
    refused = [(cfg.model.lora.enabled, "model.lora.enabled=true"), (cfg.stage.objective == "grpo", "stage=grpo"),
               (bool(cfg.eval.tasks), "eval.tasks"), (cfg.train.compile, "train.compile=true")]
    for bad, what in refused:
        if bad:
            raise ConfigError(f"engine.name=deepspeed does not run {what} yet; use engine.name=native for it")
    problem = deepspeed_problem()
    if problem is not None:
        raise ConfigError(f"engine.name=deepspeed: {problem}; or use engine.name=native")
    deepspeed_config(cfg, world)


# -- the runner ------------------------------------------------------------------------------------------------


def ensure_process_group(device: torch.device) -> bool:
    """DeepSpeed needs a process group, also for one process: start a one-rank one (True: and set LOCAL_RANK, which
    DeepSpeed reads, for as long as it runs; torchrun sets it) unless one runs."""
    if dist.is_initialized():
        return False
    os.environ["LOCAL_RANK"] = "0"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


class DeepSpeedRunner:
    """The ZeRO engine around the model: backward, the optimizer step with its clipping, the gradient norm, and the
    checkpoint state in mmfm's format. The module's forward runs through the engine (ZeRO-3 gathers each layer's
    parameters as it runs)."""

    def __init__(self, cfg: JobConfig, module: nn.Module, device: torch.device):
        import deepspeed

        self.owns_group = ensure_process_group(device)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.config = deepspeed_config(cfg, self.world)
        client = build_optimizer(module, cfg.train)
        self.group_of = {id(p): i for i, g in enumerate(client.param_groups) for p in g["params"]}
        self.cpu_adam = cfg.engine.deepspeed.cpu_adam
        if self.cpu_adam:
            client = cpu_adam_of(client)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=client, lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
            config=self.config, dist_init_required=False)
        self.module = module
        log.info("DeepSpeed engine: %s", self.describe())

    def describe(self) -> str:
        """What the live engine runs, e.g. "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3), optimizer offload cpu"."""
        parts = [f"ZeRO-{self.engine.zero_optimization_stage()} ({type(self.optimizer).__name__})"]
        for what, block in (("optimizer", self.engine.zero_offload_optimizer()),
                            ("parameter", self.engine.zero_offload_param())):
            device = getattr(getattr(block, "device", None), "value", getattr(block, "device", None))
            if device not in (None, "none"):
                parts.append(f"{what} offload {device}")
        if self.cpu_adam:
            parts.append(type(self._inner()).__name__)
        return ", ".join(parts)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # mmfm's loss scale already averages over the step

    def step(self) -> float:
        """The optimizer step (clipping to train.grad_clip inside); the gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def skip(self) -> float:
        """Drop this step's gradients: parameters and optimizer state stay as they are (the loss guard). Their norm
        is not computed (nan)."""
        self.engine.zero_grad()
        return math.nan

    # -- checkpoint state (mmfm's DCP keys; row shards per rank) --------------------------------------------------
    def _rows(self, full: torch.Tensor):
        """This rank's rows of a full tensor as a DTensor sharded on dim 0 over all ranks (0-d: the tensor)."""
        if full.dim() == 0:
            return full.detach().clone()
        size = -(-full.shape[0] // self.world)
        start = min(self.rank * size, full.shape[0])
        local = full[start:min(start + size, full.shape[0])].detach().clone()
        return DTensor.from_local(local, self._mesh, [Shard(0)], run_check=False, shape=full.shape,
                                  stride=full.stride())

    @functools.cached_property
    def _mesh(self):
        """All ranks in one mesh dimension: the rows of the checkpoint's tensors are split over it."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(torch.device(self.engine.device).type, (self.world,), mesh_dim_names=("world",))

    def full_weight(self, param: nn.Parameter) -> torch.Tensor:
        """The parameter's full fp32 value (ZeRO's master copy for a trained one; gathered under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            if full is not None:
                return full.reshape(self._shape(param))
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                return param.data.detach().float().clone()
        return param.data.detach().float().clone()

    @staticmethod
    def _shape(param: nn.Parameter) -> torch.Size:
        return param.ds_shape if hasattr(param, "ds_shape") else param.shape

    def _inner(self) -> torch.optim.Optimizer:
        """The client AdamW that ZeRO steps on its flat partitions."""
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def _moment(self, param: nn.Parameter, key: str) -> torch.Tensor:
        """AdamW's full `key` state of a parameter (gathered from ZeRO's partitions)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key).reshape(self._shape(param))

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 tensors AdamW steps on (ZeRO-3 hands them to it one sub-group at a time)."""
        if hasattr(self.optimizer, "fp32_partitioned_groups_flat"):
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return [p for group in self._inner().param_groups for p in group["params"]]

    def _step_count(self) -> Optional[torch.Tensor]:
        for state in self._inner().state.values():
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().clone()
        return None

    def state_dicts(self, select=None) -> tuple[dict, dict]:
        """(model, optimizer) state in the native engine's flattened keys, as this rank's row shards. Collective."""
        model, optim = {}, {}
        if self._step_count() is None:  # before the first step (a template to load into): AdamW's initial state
            self._init_optimizer_state()
        step = self._step_count()
        self._link_optimizer_state()
        groups = self._inner().param_groups
        for name, param in self.module.named_parameters():
            model[name] = self._rows(self.full_weight(param))  # fp32, as the native engine saves (also under bf16)
            if not param.requires_grad:
                continue
            optim[f"state.{name}.step"] = step.clone()
            for key in ADAM_MOMENTS:
                optim[f"state.{name}.{key}"] = self._rows(self._moment(param, key))
            group = groups[self.group_of[id(param)]]
            optim.update({f"param_groups.{name}.{k}": v for k, v in adamw_group(group).items()})
        for name, buffer in self.module.named_buffers():
            if name in self.module.state_dict():
                model[name] = buffer.detach().clone()
        if select is not None:
            model = {k: v for k, v in model.items() if select(k)}
        return model, optim

    def load_state_dicts(self, model: dict, optim: Optional[dict]) -> None:
        """Set the engine's parameters (master and module copies) and, given optim, the AdamW moments and step from
        state_dicts()-shaped dicts filled by a checkpoint load. Collective."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if optim is not None:
            self._init_optimizer_state()
        for name, param in self.module.named_parameters():
            if name not in model:
                continue
            full = _full(model[name]).to(torch.float32)
            if param.requires_grad:
                safe_set_full_fp32_param(param, full)
            gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if hasattr(param, "ds_id") else None
            if gathered is not None:
                with gathered:
                    param.data.copy_(full.reshape(param.data.shape))
            else:
                param.data.copy_(full)
            if optim is None or not param.requires_grad:
                continue
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, _full(optim[f"state.{name}.{key}"]).to(torch.float32), key)
        for name, buffer in self.module.named_buffers():
            if name in model:
                buffer.copy_(_full(model[name]))
        if optim is not None:
            self._load_step_and_groups(optim)

    def _load_step_and_groups(self, optim: dict) -> None:
        """AdamW's step count and each group's hyperparameters (its current lr among them) from the checkpoint."""
        step = next((v for k, v in optim.items() if k.endswith(".step")), None)
        for state in self._inner().state.values():
            if step is not None and "step" in state:
                state["step"] = self._step_value(step)
        names = {id(p): n for n, p in self.module.named_parameters()}
        for i, group in enumerate(self._inner().param_groups):
            name = next((names[pid] for pid, g in self.group_of.items() if g == i and pid in names), None)
            for key in [k for k in group if k != "params"] if name is not None else ():
                saved = optim.get(f"param_groups.{name}.{key}")
                if saved is not None:
                    group[key] = saved

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 map each parameter onto AdamW's flat state when it first steps, before the state exists: map
        again, so that the moments can be read and written per parameter."""
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _step_value(self, step):
        """AdamW's step count as the optimizer keeps it: torch's a tensor, CPUAdam's an int (its C++ op takes one)."""
        if self.cpu_adam:
            return int(torch.as_tensor(step).item())
        return torch.as_tensor(step, dtype=torch.float32).clone()

    def _init_optimizer_state(self) -> None:
        """AdamW's state before its first step, as torch would create it, so that it can be overwritten."""
        inner = self._inner()
        for flat in self._flat_partitions():
            if not inner.state.get(flat):
                inner.state[flat] = {"step": self._step_value(0),
                                     **{k: torch.zeros_like(flat, memory_format=torch.preserve_format)
                                        for k in ADAM_MOMENTS}}
        self._link_optimizer_state()

    def close(self) -> None:
        """Leave the process as it was: the one-rank group and its LOCAL_RANK gone (else later code, e.g. accelerate,
        takes the process for a torchrun rank)."""
        if self.owns_group:
            os.environ.pop("LOCAL_RANK", None)
            if dist.is_initialized():
                dist.destroy_process_group()


@functools.cache
def _adamw_defaults() -> dict:
    return dict(torch.optim.AdamW([torch.zeros(1)]).defaults)


def adamw_group(live: dict) -> dict:
    """A parameter group's hyperparameters under torch AdamW's keys, as the native engine saves them, whichever AdamW
    steps it (CPUAdam keeps others), so that a checkpoint resumes under either."""
    defaults = _adamw_defaults()
    return {**defaults, **{k: v for k, v in live.items() if k in defaults or k == "initial_lr"}}


def cpu_adam_of(client: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPUAdam in AdamW mode over the client's parameter groups and hyperparameters."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    keys = ("params", "lr", "betas", "eps", "weight_decay")
    return DeepSpeedCPUAdam([{k: g[k] for k in keys} for g in client.param_groups], adamw_mode=True)


def _full(value) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value
