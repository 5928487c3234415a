"""Communication accounting: which collectives a region of code issues and how many bytes they carry.

`CommCounter` is a dispatch mode that sees every collective reaching the dispatcher inside it, as
c10d ops (`torch.ops.c10d.*`: what FSDP2 and `torch.distributed.*` calls issue; send/recv for
pipeline P2P) or functional collectives (`torch.ops._c10d_functional*`: what DTensor / tensor
parallel issue). Dispatch modes are thread-local; on CPU autograd runs backward in the calling
thread, so collectives issued during backward (FSDP2's re-gathers and reduce-scatters) are counted.

Payload of one call, in bytes, as seen by the calling rank (numel x element size):
  all_gather      the gathered (full, world-sized) output
  reduce_scatter  the full (world-sized) input
  all_reduce      the tensor(s) reduced
  broadcast       the tensor(s) broadcast
  all_to_all      the input this rank sends (including its own chunk)
  send / recv     the tensor(s) sent / received
  reduce          the tensor(s) reduced;  gather: this rank's input;  scatter: this rank's output
These are buffer sizes, not bytes on the wire: a ring all-gather moves (world-1)/world of them.

`fsdp_expected_bytes` is the analytic count of what FSDP2 as applied by `apply_fsdp` should issue
per optimizer step, `tp_expected_bytes` that of the tensor + sequence parallel plan, `ep_expected_bytes`
a mixture-of-experts layer's all-to-alls under expert parallelism, and
`step_expected_bytes` all that `Trainer.train_step` issues (layout, gradient norm, the loop's sums);
`EXPECTATIONS` indexes them by parallel layout. `mmfm bench parallel` compares them with CommCounter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from mmfm.parallel.data_parallel import sharding_units

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "send", "recv",
         "reduce", "gather", "scatter")

# op schema name -> (kind, where the payload is: an argument index, or "out" for the op's result)
_FUNCOL = {
    "all_gather_into_tensor": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "out"),
    "all_gather_into_tensor_out": ("all_gather", "out"),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "reduce_scatter_tensor_out": ("reduce_scatter", 0),
    "all_reduce": ("all_reduce", 0),
    "all_reduce_": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "all_reduce_coalesced_": ("all_reduce", 0),
    "all_to_all_single": ("all_to_all", 0),
    "broadcast": ("broadcast", 0),
    "broadcast_": ("broadcast", 0),
    "isend": ("send", 0),
    "irecv": ("recv", 0),
}
_OPS: dict[str, tuple[str, Any]] = {
    **{f"_c10d_functional::{name}": spec for name, spec in _FUNCOL.items()},
    # Differentiable variants. On CPU eager they reach this mode as the plain functional op above
    # (seen with all_gather_single_autograd); listed in case another path surfaces them.
    "_c10d_functional_autograd::all_gather_into_tensor": ("all_gather", "out"),
    "_c10d_functional_autograd::reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional_autograd::all_to_all_single": ("all_to_all", 0),
    # c10d ops: outputs come first in their signatures, so the index picks output or input.
    "c10d::allgather_": ("all_gather", 0),
    "c10d::_allgather_base_": ("all_gather", 0),
    "c10d::allgather_coalesced_": ("all_gather", 0),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::alltoall_": ("all_to_all", 1),
    "c10d::alltoall_base_": ("all_to_all", 1),
    "c10d::broadcast_": ("broadcast", 0),
    "c10d::send": ("send", 0),
    "c10d::recv_": ("recv", 0),
    "c10d::recv_any_source_": ("recv", 0),
    "c10d::reduce_": ("reduce", 0),
    "c10d::gather_": ("gather", 1),
    "c10d::scatter_": ("scatter", 0),
}


def _nbytes(x: Any) -> int:
    """Bytes of a tensor or of every tensor in (nested) lists and tuples."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter(TorchDispatchMode):
    """Counts calls and payload bytes of the collectives issued inside `with CommCounter() as c:`.

    `events` lists (kind, op name, bytes) in issue order. Counters may nest: each sees the ops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int]] = []

    def reset(self) -> None:
        self.events.clear()

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for kind, _, nbytes in self.events:
            out[kind] += nbytes
        return dict(out)

    def calls_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for kind, _, _ in self.events:
            out[kind] += 1
        return dict(out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        # Let DTensor run first: it lowers to functional collectives on plain tensors, seen next.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        name = func._schema.name
        if name == "_c10d_functional::batch_p2p_ops":  # (op_list, peers, tags, tensors, group)
            for op, tensor in zip(args[0], args[3]):
                self.events.append(("send" if op == "isend" else "recv", name, _nbytes(tensor)))
        elif name in _OPS:
            kind, where = _OPS[name]
            payload = out if where == "out" else args[where]
            self.events.append((kind, name, _nbytes(payload)))
        return out


# -- analytic expectations ------------------------------------------------------------------------
def _tp_local_shape(p: torch.Tensor) -> torch.Size:
    """`p`'s shape on one tensor-parallel rank: its global shape unless a "tp" mesh dim shards it."""
    shape = list(p.shape)
    names = (p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()
    if "tp" in names:
        i = names.index("tp")
        placement = p.placements[i]
        if placement.is_shard():
            shape[placement.dim] = math.ceil(shape[placement.dim] / p.device_mesh.size(i))
    return torch.Size(shape)


def _padded_numel(p: torch.Tensor, shards: int) -> int:
    """Elements of `p` as FSDP2 communicates it: dim 0 (of its tensor-parallel shard, under FSDP x TP)
    padded up to a multiple of the shard count."""
    shape = _tp_local_shape(p) or torch.Size([1])
    return math.ceil(shape[0] / shards) * shards * math.prod(shape[1:])


def fsdp_expected_bytes(model: nn.Module, containers: tuple[str, ...], dp_size: int, micro_steps: int,
                        param_bytes: int = 4, reduce_bytes: int = 4,
                        reshard_after_forward: bool = True) -> dict[str, int]:
    """Bytes per rank and optimizer step of FSDP2 as `apply_fsdp` shards `model` (unsharded or meta).

    Units: every block of `containers` (reshard_after_forward as given, True by default) and the
    root (the remaining parameters, reshard_after_forward=False). With gradient accumulation the
    non-final micro-steps run under `set_requires_gradient_sync(False)`. Measured on gloo, torch 2.13:
      all_gather      per micro-step: each block twice (forward, and again in backward since it was
                      resharded after forward), the root once (kept gathered from forward through
                      backward, resharded after backward, so each micro-step gathers it again).
                      A block with reshard_after_forward=False is gathered once per micro-step.
      reduce_scatter  every parameter once, after the final micro-step's backward.
    Sizes are padded as FSDP2 pads: dim 0 of each parameter up to a multiple of dp_size. param_bytes
    is the all-gather dtype's size (MixedPrecisionPolicy.param_dtype), reduce_bytes reduce_dtype's.
    1-D data parallel only (HSDP's all-reduce over dp_replicate is not counted). dp_size=1: nothing.
    Under FSDP x TP pass the tensor-parallelized model: FSDP then shards each parameter's TP shard.
    """
    if dp_size == 1:
        return {}
    blocks = sharding_units(model, containers)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    block_numel = sum(_padded_numel(p, dp_size) for b in blocks for p in b.parameters())
    root_numel = sum(_padded_numel(p, dp_size) for p in model.parameters() if id(p) not in in_blocks)
    block_gathers = 2 if reshard_after_forward else 1
    return {
        "all_gather": micro_steps * (block_gathers * block_numel + root_numel) * param_bytes,
        "reduce_scatter": (block_numel + root_numel) * reduce_bytes,
    }


# -- tensor + sequence parallel -------------------------------------------------------------------
def sequence_parallel_norm_numel(model: nn.Module) -> int:
    """Elements of the norms' parameters, which SequenceParallel replicates (their gradients are Partial):
    every norm of the model is under the plan (ViT blocks and final norm, decoder layers and final norm)."""
    from mmfm.models.ops import RMSNorm

    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm)) for p in m.parameters())


def tp_expected_bytes(model_cfg, micro_batches: Sequence[tuple[int, int, int]],
                      act_bytes: int = 4) -> Optional[dict[str, int]]:
    """Bytes per rank and optimizer step of the TP + sequence-parallel plan of `apply_tensor_parallel`, or None
    when a part does not model its own (its spec's tp_comm_bytes; clip / siglip towers, whose sequence stays
    whole when tp does not divide it, do not).

    model_cfg: a ModelConfig; micro_batches: (B, T, images) of each micro-batch this rank runs, T padded
    to a multiple of tp (images=0 runs one blank image). Activations of act_bytes (fp32: 4). Each part's
    tp_comm_bytes gives one micro-batch's collectives, as measured on gloo, torch 2.13 (the payloads are
    full-size whatever tp is). Per step, the norms' weights and biases (replicated by SequenceParallel,
    gradients Partial(sum)) are all-reduced once (under tp alone clip_grad_norm lays them out like their
    weights; under FSDP x TP FSDP does, in backward, before its reduce-scatter).
    Not here: the gradient-norm all-reduce and the loop's sums (see `step_expected_bytes`).
    """
    from mmfm.models import build_model
    from mmfm.models.spec import part_spec

    hooks = [part_spec(model_cfg, role).tp_comm_bytes for role in ("vision", "projector", "language")]
    if any(hook is None for hook in hooks):
        return None
    out = defaultdict(int)
    for b, t, images in micro_batches:
        for hook in hooks:
            for kind, n in hook(model_cfg, b, t, images, act_bytes).items():
                out[kind] += n
    out["all_reduce"] += sequence_parallel_norm_numel(build_model(model_cfg, "meta")) * 4
    return dict(out)


def fsdp_tp_expected_bytes(model: nn.Module, model_cfg, containers: tuple[str, ...], dp_size: int,
                           micro_batches: Sequence[tuple[int, int, int]], **fsdp_kwargs) -> Optional[dict[str, int]]:
    """FSDP2 on the dp mesh over the TP shards of the tensor-parallelized `model`, plus TP."""
    tp = tp_expected_bytes(model_cfg, micro_batches)
    if tp is None:
        return None
    out = defaultdict(int, fsdp_expected_bytes(model, containers, dp_size, len(micro_batches), **fsdp_kwargs))
    for kind, n in tp.items():
        out[kind] += n
    return dict(out)


def ep_expected_bytes(num_experts: int, hidden: int, rows_sent: int, rows_received: int, act_bytes: int = 4,
                      backward: bool = True) -> dict[str, int]:
    """One mixture-of-experts layer's forward (and backward) on one rank under expert parallelism
    (mmfm.parallel.expert_parallel): the per-expert counts (E int64), the rows this rank routed (N x k when
    dropless) out and the rows its experts received back as results; backward sends the gradients of both
    the other way. Each all-to-all counts its input, this rank's own chunk included."""
    rows = (rows_sent + rows_received) * hidden * act_bytes
    return {"all_to_all": num_experts * 8 + rows * (2 if backward else 1)}


def grad_norm_bytes(model: nn.Module) -> dict[str, int]:
    """`clip_grad_norm` over `model`'s parameters: per device mesh its DTensor parameters live on, one
    all-reduce per mesh dimension of the stacked per-parameter norms (fp32); plain tensors: none."""
    meshes: dict = defaultdict(int)
    for p in model.parameters():
        if isinstance(p, DTensor):
            meshes[p.device_mesh] += 1
    return {"all_reduce": sum(mesh.ndim * n * 4 for mesh, n in meshes.items())} if meshes else {}


# The loop's own all-reduces each step (float64): the step's token count, then loss/positions/samples/images.
LOOP_BYTES = {"all_reduce": (1 + 4) * 8}


def grad_norm_and_loop_bytes(parts: Sequence[nn.Module], pipelined: bool = False) -> dict[str, int]:
    """What Trainer.train_step issues besides the layout's own collectives: `clip_grad_norm` over each part
    (grad_norm_bytes), under a pipeline one float64 all-reduce of the squared norm over pp, and LOOP_BYTES."""
    out = defaultdict(int, LOOP_BYTES)
    for part in parts:
        for kind, n in grad_norm_bytes(part).items():
            out[kind] += n
    out["all_reduce"] += 8 if pipelined else 0
    return dict(out)


def step_expected_bytes(cfg, model: nn.Module, micro_batches: Sequence[tuple[int, int, int]]) -> Optional[dict]:
    """All that `Trainer.train_step` issues on one rank: layout + gradient norm + the loop's sums.

    cfg: the JobConfig; model: this rank's parallelized model; micro_batches as for tp_expected_bytes.
    None for layouts not modelled (pipeline, context parallel, HSDP, bf16 under TP, a part without tp_comm_bytes).
    """
    from mmfm.models import model_spec

    p, world = cfg.parallel, cfg.parallel.dp_replicate * cfg.parallel.dp_shard * cfg.parallel.tp
    if p.pp > 1 or p.cp > 1 or p.dp_replicate > 1 or (p.tp > 1 and cfg.train.precision != "fp32"):
        return None
    if world == 1:
        return {}
    containers = model_spec(cfg.model).block_containers(cfg.model)
    fsdp_kwargs = {"param_bytes": 2 if cfg.train.precision == "bf16" else 4,
                   "reshard_after_forward": p.reshard_after_forward}
    if p.dp_shard > 1 and p.tp > 1:
        parts = [fsdp_tp_expected_bytes(model, cfg.model, containers, p.dp_shard, micro_batches, **fsdp_kwargs)]
    elif p.tp > 1:
        parts = [tp_expected_bytes(cfg.model, micro_batches)]
    else:
        parts = [fsdp_expected_bytes(model, containers, p.dp_shard, len(micro_batches), **fsdp_kwargs)]
    if parts[0] is None:
        return None
    out = defaultdict(int)
    for part in (*parts, grad_norm_and_loop_bytes([model])):
        for kind, n in part.items():
            out[kind] += n
    return dict(out)


# Analytic communication per optimizer step, by parallel layout: a dict kind -> bytes per rank, with
# CommCounter's convention. "step" is everything Trainer.train_step issues (layout + loop).
EXPECTATIONS: dict[str, Callable[..., dict[str, int]]] = {
    "fsdp": fsdp_expected_bytes,
    "tp": tp_expected_bytes,
    "fsdp+tp": fsdp_tp_expected_bytes,
    "step": step_expected_bytes,
    "ep": ep_expected_bytes,
}
