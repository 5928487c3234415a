"""Each rank's exact share of the parameters, from one meta-device build of the model.

The model is built once on the meta device (no memory). Every parameter is recorded with its shape, the decoder
layer the pipeline assigns it to (or which pipeline stages keep it: found by splitting meta copies with the
spec's `split_stage`, so the tied embedding's copy on the last stage is counted) and its FSDP unit (a block of
`spec.block_containers`, or the root). Its tensor-parallel shape is read off the spec's own plan: the plan is
applied once per tp size to a meta copy on a fake process group of tp ranks (cached), so no rule is restated
here. FSDP2 then splits dim 0 of that shape into `dp_shard x cp` chunks of ceil(rows / shards) rows (torch.chunk;
the allocation pads every rank to the full chunk). Nothing else is built per layout.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

from mmfm.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamRecord:
    name: str
    shape: tuple[int, ...]
    layer: Optional[int]  # the pipelined decoder layer holding it, None for the rest
    kept_by: frozenset  # layer None: the (first, last) stage kinds that keep it
    unit: Optional[str]  # its FSDP unit ("<container>.<k>"), None: the root unit


@dataclass(frozen=True)
class ParamTable:
    records: tuple[ParamRecord, ...]
    num_layers: int
    by_layer: dict  # decoder layer -> its records
    extras: dict  # (first, last) -> the records outside the decoder layers that such a stage keeps

    @property
    def total(self) -> int:
        return sum(math.prod(r.shape) for r in self.records)


STAGE_KINDS = ((True, True), (True, False), (False, True), (False, False))  # (first, last)


def _config_key(cfg: ModelConfig) -> str:
    return repr(cfg)


_MODELS: dict[str, nn.Module] = {}


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The model on the meta device, built once per config (treat as read-only; copy before changing it)."""
    key = _config_key(cfg)
    if key not in _MODELS:
        from mmfm.models import build_model

        _MODELS[key] = build_model(cfg, "meta")
    return _MODELS[key]


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _unit_of(name: str, containers: tuple[str, ...]) -> Optional[str]:
    for container in containers:
        if name.startswith(container + "."):
            return ".".join(name.split(".")[: container.count(".") + 2])
    return None


_TABLES: dict[str, ParamTable] = {}
_SHAPES: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}


def _build_table(cfg: ModelConfig) -> ParamTable:
    from mmfm.models import model_spec

    spec, model = model_spec(cfg), meta_model(cfg)
    decoder = _prefix_of(model, spec.decoder_layers(model)) + "."
    kept: dict[str, set] = {name: {(True, True)} for name, _ in model.named_parameters()}
    # Two copies: a middle stage keeps a subset of what a first stage keeps, so one copy is split twice.
    for kinds in (((True, False), (False, False)), ((False, True),)):
        part = copy.deepcopy(model)
        for first, last in kinds:
            spec.split_stage(part, first, last, [])
            for name, _ in part.named_parameters():
                kept[name].add((first, last))
    containers = spec.block_containers(cfg)
    records = []
    for name, p in model.named_parameters():
        layer = int(name[len(decoder):].split(".")[0]) if name.startswith(decoder) else None
        records.append(ParamRecord(name, tuple(p.shape), layer, frozenset(kept.get(name, ())),
                                   _unit_of(name, containers)))
    by_layer: dict[int, list] = {}
    for r in records:
        if r.layer is not None:
            by_layer.setdefault(r.layer, []).append(r)
    extras = {kind: tuple(r for r in records if r.layer is None and kind in r.kept_by) for kind in STAGE_KINDS}
    return ParamTable(tuple(records), spec.pipeline_layers(cfg), {k: tuple(v) for k, v in by_layer.items()}, extras)


def param_table(cfg: ModelConfig) -> ParamTable:
    """Every parameter of the model (cached per config)."""
    key = _config_key(cfg)
    if key not in _TABLES:
        _TABLES[key] = _build_table(cfg)
    return _TABLES[key]


@contextlib.contextmanager
def _fake_group(world_size: int):
    """A process group of `world_size` ranks that moves nothing (torch's fake backend), as this rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("mmfm.plan reads tensor-parallel shapes on a fake process group; call it outside a "
                           "process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _read_tp_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    if tp == 1:
        return {r.name: r.shape for r in param_table(cfg).records}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mmfm.models import model_spec

    model = copy.deepcopy(meta_model(cfg))
    with _fake_group(tp):
        model_spec(cfg).apply_tensor_parallel(model, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",)))
        return {name: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
                for name, p in model.named_parameters()}


def _derive_tp_shapes(cfg: ModelConfig, probed: dict[str, tuple[int, ...]], probed_tp: int,
                      tp: int) -> dict[str, tuple[int, ...]]:
    """The shapes at `tp` from those read at a multiple of it: each dim the plan split (local != global) is the
    global size / tp (exact: tp divides every size the plan splits whenever a multiple of it does)."""
    whole = {r.name: r.shape for r in param_table(cfg).records}
    return {name: tuple(g // tp if l != g else g for g, l in zip(whole[name], shape))
            for name, shape in probed.items()}


def tp_shapes(cfg: ModelConfig, tp: int, probe: bool = False) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one tensor-parallel rank of `tp` (the spec's plan; tp must divide what it splits):
    read off the plan applied on the meta device, or derived from shapes read at a multiple of tp (probe=True: read
    it anyway). Cached per config and tp."""
    key = (_config_key(cfg), tp)
    if key not in _SHAPES:
        larger = [t for (k, t) in _SHAPES if k == key[0] and t > 1 and t % tp == 0 and t != tp]
        if larger and not probe and tp > 1:
            _SHAPES[key] = _derive_tp_shapes(cfg, _SHAPES[(key[0], max(larger))], max(larger), tp)
        else:
            _SHAPES[key] = _read_tp_shapes(cfg, tp)
    return _SHAPES[key]


def stage_records(table: ParamTable, layers: list[int], first: bool, last: bool) -> list[ParamRecord]:
    """The parameters of the pipeline stage holding decoder `layers`, first and/or last."""
    return [r for layer in layers for r in table.by_layer.get(layer, ())] + list(table.extras[(first, last)])


def fsdp_chunk_numel(shape: tuple[int, ...], shards: int, index: int = 0) -> int:
    """Elements FSDP2 gives shard `index` of `shards` of a tensor of `shape`: dim 0 in chunks of ceil(rows /
    shards) rows (the last chunks shorter or empty)."""
    rows, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    chunk = math.ceil(rows / shards)
    return max(0, min(chunk, rows - index * chunk)) * rest


def fsdp_padded_numel(shape: tuple[int, ...], shards: int) -> int:
    """Elements each shard allocates (dim 0 padded to a multiple of the shard count)."""
    rows, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    return math.ceil(rows / shards) * rest


def stage_layout(cfg: ModelConfig, seq_len: int, num_stages: int, override: Optional[list[int]] = None) -> list[list[int]]:
    """Decoder layers of each pipeline stage, as the trainer assigns them (balanced by cost unless overridden)."""
    from mmfm.parallel.pipeline_parallel import layer_assignment

    return layer_assignment(cfg, seq_len, num_stages, override)


@dataclass(frozen=True)
class RankShare:
    """What one rank holds: elements (its FSDP chunk), padded elements (its allocation), its tp-local elements, and
    the sizes FSDP all-gathers (every unit of its stages, tp-local, dim 0 of each tensor padded to a multiple of the
    shards: the largest block, the root and all blocks)."""
    numel: int
    padded: int
    tp_local: int
    largest_block: int
    root: int
    block_total: int


_SHARES: dict[tuple, RankShare] = {}


def rank_share(cfg: ModelConfig, tp: int, shards: int, stages: list[tuple[list[int], bool, bool]],
               shard_index: int = 0, ep: int = 1) -> RankShare:
    """The parameters a rank holds: its pipeline stages (layers, first, last), each parameter's tp-local shape,
    FSDP chunk `shard_index` of `shards` (dp_shard x cp). Under expert parallelism (ep > 1, carved out of dp_shard)
    each expert weight [E, ...] is first cut to the rank's E / ep experts, which FSDP splits over the shards / ep
    ranks left (their own unit). Cached per layout."""
    key = (_config_key(cfg), tp, shards, shard_index, ep, tuple((tuple(l), f, la) for l, f, la in stages))
    if key not in _SHARES:
        _SHARES[key] = _rank_share(cfg, tp, shards, stages, shard_index, ep)
    return _SHARES[key]


def is_expert_weight(name: str) -> bool:
    return ".feed_forward.experts.w" in name


def _rank_share(cfg: ModelConfig, tp: int, shards: int, stages: list[tuple[list[int], bool, bool]],
                shard_index: int, ep: int) -> RankShare:
    table, shapes = param_table(cfg), tp_shapes(cfg, tp)
    numel = padded = local = root = 0
    blocks: dict[str, int] = {}
    for layers, first, last in stages:
        for r in stage_records(table, layers, first, last):
            shape, n, index, unit = shapes[r.name], shards, shard_index, r.unit
            if ep > 1 and is_expert_weight(r.name):
                shape, n, index, unit = (shape[0] // ep, *shape[1:]), shards // ep, shard_index // ep, f"{unit}.experts"
            numel += fsdp_chunk_numel(shape, n, index)
            padded += fsdp_padded_numel(shape, n)
            local += math.prod(shape)
            gathered = fsdp_padded_numel(shape, n) * n  # what FSDP2 all-gathers, dim 0 padded
            if unit is None:
                root += gathered
            else:
                blocks[unit] = blocks.get(unit, 0) + gathered
    return RankShare(numel, padded, local, max(blocks.values(), default=0), root, sum(blocks.values()))
