"""Evaluate a layout (memory per rank, step time, MFU) and enumerate every layout of a job (docs/planning.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from mmfm.config.schema import JobConfig
from mmfm.errors import ConfigError
from mmfm.models.moe import is_moe_layer
from mmfm.plan import memory, steptime
from mmfm.plan.hardware import group_bandwidth
from mmfm.plan.shares import meta_model, param_table, rank_share, stage_layout, tp_shapes

RESERVE = 0.10  # share of device memory kept free (allocator fragmentation, NCCL buffers, CUDA context)
CHECKPOINTS = ("none", "full")
MAX_MICRO_BATCH = 16


@dataclass(frozen=True)
class Workload:
    devices: int
    global_batch: int  # samples per optimizer step
    seq_len: int
    images_per_sample: int = 1


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    schedule: str = "1f1b"
    virtual: int = 1  # pipeline stages per rank
    micro_batch: int = 1  # samples per micro-batch
    microbatches: int = 1  # micro-batches per optimizer step on each data-parallel rank
    checkpoint: str = "none"
    ep: int = 1  # expert parallelism, carved out of dp_shard

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shards(self) -> int:
        return self.dp_shard * self.cp

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual


def layout_of(cfg: JobConfig) -> Layout:
    """The Layout a config runs (its parallel dims, pipeline schedule, micro-batches and checkpointing)."""
    p = cfg.parallel
    per_batch = (p.pp_microbatches or p.pp) if p.pp > 1 else 1  # a pipeline splits each batch (ParallelDims)
    micro, steps = cfg.data.batch_size // per_batch, cfg.train.grad_accum_steps * per_batch
    return Layout(p.tp, p.pp, p.dp_replicate, p.dp_shard, p.cp, p.pp_schedule, p.pp_virtual_stages, micro, steps,
                  cfg.train.activation_checkpoint, p.ep)


@dataclass
class Plan:
    layout: Layout
    memory: dict  # bytes on the fullest rank, by term, and "total"
    time: dict  # seconds per step, by term, and "step"
    mfu: float
    tokens_per_s_per_device: float
    params: int  # the model's parameters
    rank_params: int  # parameter elements on the fullest rank
    fits: bool = True
    worst_pp_rank: int = 0

    def as_dict(self) -> dict:
        return {"layout": dataclasses.asdict(self.layout), "memory_bytes": self.memory, "time_s": self.time,
                "mfu": self.mfu, "tokens_per_s_per_device": self.tokens_per_s_per_device, "params": self.params,
                "rank_params": self.rank_params, "fits": self.fits}


def rank_stages(layout: Layout, layers: list[list[int]], pp_rank: int) -> list[tuple[list[int], bool, bool]]:
    """(layers, first, last) of each stage pipeline rank `pp_rank` holds (round-robin: r, r + pp, ...)."""
    n = layout.num_stages
    return [(layers[s], s == 0, s == n - 1) for s in range(pp_rank, n, layout.pp)]


def _encoder_bytes(cfg: JobConfig, layout: Layout, wl: Workload, residual: int) -> tuple[float, float]:
    """(the vision stem, tower and projector's activations per micro-batch in flight, one full tower block's) on the
    first stage; (0, 0) for a model without a vision part (model_spec(m).roles)."""
    from mmfm.models import model_spec

    m, v = cfg.model, cfg.model.vision
    if "vision" not in model_spec(m).roles:
        return 0.0, 0.0
    tp = layout.tp
    images = layout.micro_batch * wl.images_per_sample
    positions = images * (v.image_size // v.patch_size) ** 2
    full_block = memory.encoder_layer_bytes(v, positions, tp, sequence_split=v.kind == "vit")
    ckpt = layout.checkpoint == "full"
    block = memory.checkpointed_layer_bytes(v.hidden_size, positions, tp, 1, residual) if ckpt else full_block
    tower = v.num_layers * block + memory.projector_bytes(v.hidden_size, m.language.hidden_size, positions, tp)
    stem = _cached(("stem", repr(m)), lambda: memory.stem_bytes(meta_model(m), v.image_size, 1))  # per image
    return tower + images * stem, full_block


def _activation_bytes(cfg: JobConfig, layout: Layout, wl: Workload, stages, pp_rank: int) -> dict[str, float]:
    """The rank's activations at its peak: in-flight micro-batches x its layers (the language family's
    layer_activation_bytes; full checkpointing: block inputs, plus one block recomputed in backward, as far as it
    exceeds the loss it follows), the vision stem, tower and projector on the first stage (models with a vision
    part), the loss on the last."""
    from mmfm.models.spec import part_spec

    lm = cfg.model.language
    tokens, tp, cp = layout.micro_batch * wl.seq_len, layout.tp, layout.cp
    residual = memory.residual_bytes(layout.dp * cp > 1)
    norm = memory.fused_norm(cfg.kernels, tp)
    hook = part_spec(cfg.model, "language").layer_activation_bytes
    held = [i for s in stages for i in s[0]]
    experts = sum(is_moe_layer(lm, i) for i in held)  # mixture-of-experts layers among the rank's
    kinds = [(len(held) - experts, {})] + ([(experts, {"moe": True})] if experts else [])
    ckpt = layout.checkpoint == "full"
    saved = sum(n * (memory.checkpointed_layer_bytes(lm.hidden_size, tokens, tp, cp, residual) if ckpt else
                     hook(cfg.model, tokens, tp, cp, cfg.kernels, residual, norm, **kind)) for n, kind in kinds)
    encoders, full_block = _encoder_bytes(cfg, layout, wl, residual)
    flights = memory.in_flight(layout.schedule, layout.pp, layout.virtual, layout.microbatches, pp_rank)
    first, last = any(s[1] for s in stages), any(s[2] for s in stages)
    acts = flights * saved
    if first:
        acts += flights * encoders
    loss = 0.0
    if last:
        fused = memory.fused_loss(cfg.kernels, tp, layout.pp)
        loss = memory.loss_bytes(lm, tokens, tp, fused, residual, norm)
    if ckpt:  # one block recomputed in backward, after the loss's backward freed its buffers
        layer_peak = max(hook(cfg.model, tokens, tp, cp, cfg.kernels, residual, norm, backward=True, **kind)
                         for n, kind in kinds if n)
        recompute = max(layer_peak, full_block if first else 0.0)
        acts += max(0.0, recompute - loss)
    loss *= memory.in_flight(layout.schedule, layout.pp, layout.virtual, layout.microbatches, layout.pp - 1)
    return {"activations": acts, "logits": loss}


def _rank_flops(cfg: JobConfig, layout: Layout, wl: Workload, stages) -> float:
    """Training FLOPs of one rank per step: its stages' share of spec.stage_costs (per sample) x its samples,
    divided over tp x cp; blocks recomputed under full checkpointing."""
    from mmfm.models import model_spec

    costs, first_extra, last_extra = model_spec(cfg.model).stage_costs(cfg.model, wl.seq_len)
    recompute = steptime.recompute_factor(layout.checkpoint)
    per_sample = 0.0
    for layers, first, last in stages:
        per_sample += recompute * sum(costs[i] for i in layers)
        per_sample += recompute * first_extra * wl.images_per_sample if first else 0.0
        per_sample += last_extra if last else 0.0
    samples = wl.global_batch / layout.dp
    return per_sample * samples / (layout.tp * layout.cp)


_CACHE: dict[tuple, float] = {}


def _cached(key: tuple, compute) -> float:
    """A model-derived count, computed once per key (the search evaluates a thousand layouts of one model)."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


MicroBatches = list[tuple[int, int, int]]  # (samples, sequence, images) of each micro-batch of a step


def planned_micro_batches(layout: Layout, wl: Workload) -> MicroBatches:
    return [(layout.micro_batch, wl.seq_len, layout.micro_batch * wl.images_per_sample)] * layout.microbatches


def _add(total: dict, part: dict, weight: float = 1.0) -> None:
    for kind, n in part.items():
        total[kind] = total.get(kind, 0.0) + weight * n


def tp_step_bytes(cfg: JobConfig, stages, micro_batches: MicroBatches, act_bytes: int = memory.ACT) -> dict:
    """Payloads (full buffers, CommCounter's convention) of the tensor-parallel collectives a rank holding `stages`
    issues per step: each part's tp_comm_bytes per micro-batch (the language part's scaled to the rank's share of
    the layers; a tower without the hook counted as the vit family's plan) in act_bytes activations (bf16: exact
    under FSDP x TP, whose residual stream is bf16), and once per step the all-reduce of the sequence-parallel
    norms' fp32 weight gradients (the whole model's)."""
    from mmfm.models import model_spec
    from mmfm.models.spec import VISION, part_spec
    from mmfm.parallel.comm import sequence_parallel_norm_numel

    m = cfg.model
    roles = model_spec(m).roles
    first = any(s[1] for s in stages)
    share = sum(len(s[0]) for s in stages) / max(1, m.language.num_layers)
    out: dict[str, float] = {"all_reduce": 4.0 * _cached(("norms", repr(m)), lambda: sequence_parallel_norm_numel(
        meta_model(m)))}
    for role, weight in (("vision", 1.0 if first else 0.0), ("projector", 1.0 if first else 0.0), ("language", share)):
        if role not in roles:
            continue
        hook = part_spec(m, role).tp_comm_bytes or (VISION["vit"].tp_comm_bytes if role == "vision" else None)
        if weight and hook is not None:
            for b, t, images in micro_batches:
                _add(out, hook(m, b, t, images, act_bytes), weight)
    return out


def p2p_hop_bytes(cfg: JobConfig, layout: Layout, micro_batch: int, seq_len: int) -> float:
    """One micro-batch's hidden states between two stages (the residual stream's dtype, split by tp and cp)."""
    residual = memory.residual_bytes(layout.dp * layout.cp > 1)
    return residual * micro_batch * seq_len * cfg.model.language.hidden_size / (layout.tp * layout.cp)


def tied_embedding_numel(cfg: JobConfig, tp: int) -> int:
    """Elements (tp-local) of the parameters both the first and the last pipeline stage keep (the tied embedding,
    whose gradient the two all-reduce once per step), 0 when there are none."""
    return _cached(("tied", repr(cfg.model), tp), lambda: _tied_numel(cfg, tp))


def _tied_numel(cfg: JobConfig, tp: int) -> int:
    shapes = tp_shapes(cfg.model, tp)
    return sum(math.prod(shapes[r.name]) for r in param_table(cfg.model).records
               if {(True, False), (False, True)} <= r.kept_by)


def pp_step_bytes(cfg: JobConfig, layout: Layout, stages, micro_batches: MicroBatches) -> dict:
    """Payloads of a pipeline rank holding `stages` (stage index order) per step: each micro-batch's hidden states
    sent forward by every stage but the last and their gradients sent back by every stage but the first (as many
    received), and on the ranks of the first and last stage the tied embedding's fp32 gradient all-reduce."""
    if layout.pp == 1:
        return {}
    hops = sum((not last) + (not first) for _, first, last in stages)
    hop = sum(p2p_hop_bytes(cfg, layout, b, t) for b, t, _ in micro_batches)
    out = {"send": hops * hop, "recv": hops * hop}
    if any(first or last for _, first, last in stages) and tied_embedding_numel(cfg, layout.tp):
        out["all_reduce"] = 4.0 * tied_embedding_numel(cfg, layout.tp)
    return out


def step_comm_bytes(cfg: JobConfig, layout: Layout, wl: Workload, pp_rank: int = 0,
                    micro_batches: Optional[MicroBatches] = None, tp_act_bytes: int = memory.ACT) -> dict[str, float]:
    """Payload bytes per kind (CommCounter's convention) that the planner counts for pipeline rank `pp_rank` (FSDP
    shard 0) per step: tensor parallel (activations of tp_act_bytes), FSDP / HSDP and pipeline; micro_batches: the
    step's shapes (default: the layout's). The gradient norm's and the loop's few bytes are not modelled."""
    from mmfm.models import model_spec

    micro_batches = micro_batches or planned_micro_batches(layout, wl)
    layers = _stage_layout(cfg.model, wl.seq_len, layout.num_stages) if layout.pp > 1 else [
        list(range(model_spec(cfg.model).pipeline_layers(cfg.model)))]
    stages = rank_stages(layout, layers, pp_rank)
    share = rank_share(cfg.model, layout.tp, layout.fsdp_shards, stages, ep=layout.ep)
    out: dict[str, float] = {}
    if layout.tp > 1:
        _add(out, tp_step_bytes(cfg, stages, micro_batches, tp_act_bytes))
    if layout.fsdp_shards > 1:
        _add(out, steptime.fsdp_step_bytes(share.block_total, share.root, len(micro_batches),
                                           cfg.parallel.reshard_after_forward))
    if layout.dp_replicate > 1:
        _add(out, {"all_reduce": 4 * share.padded})
    _add(out, pp_step_bytes(cfg, layout, stages, micro_batches))
    _add(out, ep_step_bytes(cfg, layout, stages, micro_batches))
    return out


def ep_step_bytes(cfg: JobConfig, layout: Layout, stages, micro_batches: MicroBatches,
                  act_bytes: int = memory.ACT) -> dict:
    """The all-to-alls of the rank's mixture-of-experts layers per step under expert parallelism (mmfm.parallel.comm.
    ep_expected_bytes: its routed rows out and back, forward and backward, and the counts), the experts' load taken
    as balanced (a rank receives as many rows as it routes). Activations of act_bytes (bf16 under FSDP)."""
    from mmfm.parallel.comm import ep_expected_bytes

    lm = cfg.model.language
    if layout.ep == 1:
        return {}
    layers = sum(is_moe_layer(lm, i) for s in stages for i in s[0])
    rows = [b * t * lm.moe.top_k for b, t, _ in micro_batches]
    return {"all_to_all": layers * sum(ep_expected_bytes(lm.moe.num_experts, lm.hidden_size, n, n, act_bytes)
                                       ["all_to_all"] for n in rows)}


def _tp_seconds(cfg: JobConfig, layout: Layout, wl: Workload, stages, hw) -> float:
    """Tensor-parallel collectives of the rank per step (tp_step_bytes), fully exposed (each sits between dependent
    matmuls; no asynchronous TP)."""
    if layout.tp == 1:
        return 0.0
    payloads = tp_step_bytes(cfg, stages, planned_micro_batches(layout, wl))
    wire = sum(steptime.ring_bytes(kind, n, layout.tp) for kind, n in payloads.items())
    return wire / group_bandwidth(hw, layout.tp, 1)


def _fsdp_seconds(layout: Layout, share, hw, reshard: bool) -> tuple[float, float]:
    """(all FSDP / HSDP communication of the rank per step, the part that cannot overlap: the first block's gather
    and the last block's reduce-scatter)."""
    n, seconds, edge = layout.fsdp_shards, 0.0, 0.0
    if n > 1:
        bw = group_bandwidth(hw, n, layout.tp)
        for kind, payload in steptime.fsdp_step_bytes(share.block_total, share.root, layout.microbatches,
                                                      reshard).items():
            seconds += steptime.ring_bytes(kind, payload, n) / bw
        edge = (steptime.ring_bytes("all_gather", 2 * share.largest_block, n)
                + steptime.ring_bytes("reduce_scatter", 4 * share.largest_block, n)) / bw
    if layout.dp_replicate > 1:  # HSDP: the fp32 gradient shards all-reduced across the replicas
        bw = group_bandwidth(hw, layout.dp_replicate, n * layout.tp)
        seconds += steptime.ring_bytes("all_reduce", 4 * share.padded, layout.dp_replicate) / bw
    return seconds, edge


def _p2p_seconds(cfg: JobConfig, layout: Layout, wl: Workload, hw) -> float:
    """Pipeline sends: one micro-batch's hidden states per stage boundary (p2p_hop_bytes), forward and backward.
    Steady-state transfers overlap with other micro-batches' compute; the fill and drain's 2 (stages - 1) hops are
    exposed, and so is the tied embedding's gradient all-reduce after the last backward."""
    if layout.pp == 1:
        return 0.0
    hop = p2p_hop_bytes(cfg, layout, layout.micro_batch, wl.seq_len)
    stride = layout.world // layout.pp
    tied = steptime.ring_bytes("all_reduce", 4 * tied_embedding_numel(cfg, layout.tp), 2)
    return (2 * (layout.num_stages - 1) * hop + tied) / group_bandwidth(hw, 2, stride)


def _ep_seconds(cfg: JobConfig, layout: Layout, wl: Workload, stages, hw) -> float:
    """The expert-parallel all-to-alls of the rank per step (ep_step_bytes), of which (ep - 1) / ep leaves the rank,
    fully exposed (each sits between the router and the experts, or the experts and the combine)."""
    if layout.ep == 1:
        return 0.0
    payload = ep_step_bytes(cfg, layout, stages, planned_micro_batches(layout, wl))["all_to_all"]
    return payload * (layout.ep - 1) / layout.ep / group_bandwidth(hw, layout.ep, layout.tp)


_LAYOUTS: dict[tuple, list[list[int]]] = {}


def _stage_layout(model_cfg, seq_len: int, num_stages: int) -> list[list[int]]:
    key = (repr(model_cfg), seq_len, num_stages)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = stage_layout(model_cfg, seq_len, num_stages)
    return _LAYOUTS[key]


def evaluate(cfg: JobConfig, layout: Layout, wl: Workload, reserve: float = RESERVE) -> Plan:
    """Memory of the fullest pipeline rank (FSDP shard 0, the largest chunk) and the step time of the slowest one."""
    from mmfm.models import model_spec

    hw, spec = cfg.hardware, model_spec(cfg.model)
    layers = _stage_layout(cfg.model, wl.seq_len, layout.num_stages) if layout.pp > 1 else [
        list(range(spec.pipeline_layers(cfg.model)))]
    worst, worst_rank, slowest, slowest_stages, rank_params = None, 0, -1.0, None, 0
    for r in range(layout.pp):
        stages = rank_stages(layout, layers, r)
        share = rank_share(cfg.model, layout.tp, layout.fsdp_shards, stages, ep=layout.ep)
        mem = memory.model_state_bytes(share.padded)
        mem["buffers"] = memory.buffer_bytes(share.tp_local, share.largest_block, share.root, layout.fsdp_shards)
        mem.update(_activation_bytes(cfg, layout, wl, stages, r))
        mem["total"] = sum(mem.values())
        if worst is None or mem["total"] > worst["total"]:
            worst, worst_rank, rank_params = mem, r, share.padded
        flops = _rank_flops(cfg, layout, wl, stages)
        if flops > slowest:
            slowest, slowest_stages, slowest_share = flops, stages, share
    compute = steptime.compute_seconds(slowest, hw)
    bubble = steptime.bubble_fraction(layout.pp, layout.microbatches, layout.virtual)
    fsdp, edge = _fsdp_seconds(layout, slowest_share, hw, cfg.parallel.reshard_after_forward)
    time = {"compute": compute, "bubble": compute * bubble / (1 - bubble),
            "tp_comm": _tp_seconds(cfg, layout, wl, slowest_stages, hw),
            "fsdp_comm_exposed": steptime.exposed_overlapped(fsdp, compute, edge),
            "pp_p2p": _p2p_seconds(cfg, layout, wl, hw), "ep_comm": _ep_seconds(cfg, layout, wl, slowest_stages, hw)}
    time["step"] = sum(time.values())
    model_flops = spec.training_flops(cfg.model, wl.global_batch * wl.seq_len, wl.seq_len,
                                      wl.global_batch * wl.images_per_sample)
    mfu = model_flops / (time["step"] * wl.devices * hw.peak_bf16_flops)
    tokens = wl.global_batch * wl.seq_len / time["step"] / wl.devices
    fits = worst["total"] <= (1 - reserve) * hw.hbm_bytes
    return Plan(layout, worst, time, mfu, tokens, spec.num_params(cfg.model), rank_params, fits, worst_rank)


def powers_of_two(limit: int) -> list[int]:
    return [2 ** i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_sizes(cfg: JobConfig, wl: Workload) -> list[int]:
    """Powers of two up to a node's devices that divide every size the model's plan splits, the devices and the
    sequence."""
    from mmfm.models import model_spec

    sizes = model_spec(cfg.model).tp_divisible(cfg.model).values()
    return [tp for tp in powers_of_two(min(cfg.hardware.devices_per_node, wl.devices))
            if wl.devices % tp == 0 and wl.seq_len % tp == 0 and all(s % tp == 0 for s in sizes)]


def candidate_layouts(cfg: JobConfig, wl: Workload) -> list[Layout]:
    """tp (tensor_parallel_sizes) x pp (divides the pipelined layers; 1f1b, and interleaved with 2 stages per rank
    when the layers allow) x dp_replicate x dp_shard (the rest; each divides the global batch) x micro-batch size
    (powers of two up to 16 dividing the samples per data-parallel rank) x activation checkpointing none | full."""
    from mmfm.models import model_spec

    num_layers = model_spec(cfg.model).pipeline_layers(cfg.model)
    out = []
    for tp in tensor_parallel_sizes(cfg, wl):
        for pp in divisors(num_layers):
            if (wl.devices // tp) % pp:
                continue
            dp = wl.devices // (tp * pp)
            if wl.global_batch % dp:
                continue
            per_rank = wl.global_batch // dp
            schedules = [("1f1b", 1)] if pp > 1 else [("1f1b", 1)]
            if pp > 1 and num_layers >= 2 * pp:
                schedules.append(("interleaved_1f1b", 2))
            for schedule, virtual in schedules:
                for replicate in divisors(dp):
                    for b in powers_of_two(min(MAX_MICRO_BATCH, per_rank)):
                        m = per_rank // b
                        if per_rank % b or (pp > 1 and m < pp) or (virtual > 1 and m % pp):
                            continue
                        for ckpt in CHECKPOINTS:
                            for ep in expert_parallel_sizes(cfg, dp // replicate):
                                out.append(Layout(tp, pp, replicate, dp // replicate, 1, schedule, virtual, b, m,
                                                  ckpt, ep))
    return out


def expert_parallel_sizes(cfg: JobConfig, dp_shard: int) -> list[int]:
    """ep sizes for a mixture of experts: powers of two dividing dp_shard and the expert count; [1] for a dense
    model."""
    experts = cfg.model.language.moe.num_experts
    return [ep for ep in powers_of_two(dp_shard) if dp_shard % ep == 0 and experts % ep == 0] if experts else [1]


@dataclass
class Search:
    plans: list[Plan]  # those that fit, fastest first
    closest: Optional[Plan]  # when none fits: the layout needing the least memory
    considered: int = 0
    workload: Optional[Workload] = None
    usable_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_workload(cfg: JobConfig, wl: Workload) -> None:
    for key in ("devices", "global_batch", "seq_len", "images_per_sample"):
        if getattr(wl, key) < (0 if key == "images_per_sample" else 1):
            raise ConfigError(f"{key}={getattr(wl, key)} must be >= 1")
    if cfg.train.precision != "bf16":
        raise ConfigError(f"train.precision={cfg.train.precision} is not modelled: mmfm plan assumes bf16 mixed "
                          "precision; pass train.precision=bf16")


def rank_key(plan: Plan) -> tuple:
    """Fastest first; step times within 0.5% of each other count as equal, and then the smaller memory wins."""
    return round(math.log(plan.time["step"]) / math.log(1.005)), plan.memory["total"]


def search(cfg: JobConfig, wl: Workload, reserve: float = RESERVE) -> Search:
    """Every candidate layout evaluated; those that fit (total <= (1 - reserve) x HBM) ranked by step time."""
    from mmfm.models import model_spec
    from mmfm.plan.hardware import validate_hardware

    validate_hardware(cfg.hardware)
    check_workload(cfg, wl)
    model_spec(cfg.model).validate(cfg.model)
    layouts = candidate_layouts(cfg, wl)
    for tp in sorted({layout.tp for layout in layouts}, reverse=True):
        tp_shapes(cfg.model, tp)  # read the plan once, at the largest tp; the smaller ones derive from it
    if not layouts:
        raise ConfigError(f"no layout of devices={wl.devices} splits global_batch={wl.global_batch} and the model; "
                          "use a power-of-two device count and a global batch it divides")
    plans = [evaluate(cfg, layout, wl, reserve) for layout in layouts]
    fitting = sorted((p for p in plans if p.fits), key=rank_key)
    closest = None if fitting else min(plans, key=lambda p: p.memory["total"])
    return Search(fitting, closest, len(plans), wl, (1 - reserve) * cfg.hardware.hbm_bytes)
