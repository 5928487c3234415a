"""Parallelism benchmarks on CPU processes: what a layout communicates against the analytic count, and
how long each pipeline schedule leaves its ranks idle.

`comm_bench` spawns a layout's world of gloo processes, runs Trainer.train_step (one warm-up step, then
the measured ones) under CommCounter and compares each kind's bytes with `step_expected_bytes`.

`pipeline_bench` runs each schedule of SCHEDULES over synthetic stages whose compute is time.sleep (no
CPU used, so the figure holds on 2 loaded cores): forward t_f, backward 2 t_f, split so that the
zero-bubble schedule can separate it: the input-gradient path sleeps t_f, the weight-gradient path t_f.
A rank's idle fraction = 1 - (its sleeps) / (the step's span, from the first sleep on any rank to the
last: one clock, CLOCK_MONOTONIC, for all processes); reported as the mean over ranks of the median over
steps. What it adds to the textbook bubble is the cost of each dependency hop (gloo P2P, waking the
receiver: 1-8 ms each on this machine under load), so measured/analytic grows with m; on 2 busy cores
gpipe and 1f1b come out about 0.04 above (p-1)/(m+p-1). zero_bubble has no closed form here: its column
"torch table" is the idle share of torch's own action table (every F, I, W one slot). torch runs the
first stage's input-gradient step as a no-op and its whole backward (2 t_f) in the W step.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmfm.parallel.distributed import free_port, set_local_env

SMALL_MODEL = [  # the small model of the tests and benchmarks: one training step in well under a second per rank
    "model.vision.hidden_size=64", "model.vision.num_layers=1", "model.vision.patch_size=16",
    "model.language.hidden_size=64", "model.language.num_layers=2", "model.language.intermediate_size=176",
    "model.language.max_seq_len=64", "data.seq_len=48",
]
QUIET = ["logger.wandb.enabled=false", "logger.progress_bar=false", "eval.num_samples=0", "train.val_every=0",
         "checkpoint.every=0"]


def _init(rank: int, world: int, port: int) -> None:
    set_local_env(rank, world, port)
    torch.set_num_threads(1)


def _spawn(fn, world: int, args: tuple) -> list[dict]:
    """Run fn(rank, world, port, out_dir, *args) on `world` spawned processes; their rank{r}.json files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(fn, args=(world, free_port(), out, *args), nprocs=world, join=True, start_method="spawn")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def _table(header: Sequence[str], rows: list[Sequence]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(fmt(r) for r in cells)


# -- communication ----------------------------------------------------------------------------------
def _comm_worker(rank: int, world: int, port: int, out: str, overrides: list, steps: int) -> None:
    _init(rank, world, port)
    from mmfm.config import load_config
    from mmfm.parallel.comm import CommCounter, grad_norm_and_loop_bytes, step_expected_bytes
    from mmfm.train.trainer import Trainer

    trainer = Trainer(load_config(overrides), Path(out) / "run")
    shapes: list[tuple[int, int, int]] = []  # (B, T, images) of each micro-batch, as the layout runs it
    fit = trainer.fit_batch

    def recording_fit(batch):
        batch = fit(batch)
        shapes.append((*batch.input_ids.shape, sum(batch.images_per_sample)))
        return batch

    trainer.fit_batch = recording_fit
    trainer.parts.train(True)
    trainer.train_step()  # warm-up: pipeline shape inference, optimizer state
    results = []
    for _ in range(steps):
        shapes.clear()
        with CommCounter() as counter:
            trainer.train_step()
        want = step_expected_bytes(trainer.cfg, trainer.model, shapes)
        results.append({"measured": counter.bytes_by_kind(), "analytic": want, "micro_batches": list(shapes),
                        "grad_norm_and_loop": grad_norm_and_loop_bytes(trainer.parts.parts, trainer.parts.pipelined)})
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def comm_bench(layout: str, steps: int = 2, overrides: Sequence[str] = (), data: Optional[str] = None,
               batch_size: int = 4, grad_accum: int = 2) -> list[list[dict]]:
    """results[rank][step] = {"measured", "analytic" (None: not modelled), "micro_batches", "grad_norm_and_loop"
    (the bytes outside the layout's own collectives)} of `steps`
    measured optimizer steps of the named parallel preset. Without overrides: the small model,
    batch_size samples per data-parallel rank, grad_accum micro-batches per step."""
    from mmfm.config import load_config
    from mmfm.parallel.dims import ParallelDims

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from mmfm.data.synth import build_synth_dataset

            data = f"{tmp}/synth"
            build_synth_dataset(data, seed=0, train_size=96, val_size=8, shard_size=24, progress=False)
        base = [f"data.path={data}", *QUIET, f"parallel={layout}", f"data.batch_size={batch_size}",
                f"train.grad_accum_steps={grad_accum}"]
        full = base + (list(overrides) or SMALL_MODEL)
        world = ParallelDims.from_config(load_config(full).parallel).world_size
        return _spawn(_comm_worker, world, (full, steps))


def comm_table(results: list[list[dict]]) -> str:
    """Per kind: bytes per step per rank (mean over ranks and steps), measured, analytic and their ratio."""
    kinds = sorted({k for rank in results for step in rank for k in (step["measured"] | (step["analytic"] or {}))})
    modelled = all(step["analytic"] is not None for rank in results for step in rank)
    rows, n = [], sum(len(rank) for rank in results)
    for kind in kinds:
        got = sum(step["measured"].get(kind, 0) for rank in results for step in rank) / n
        want = sum(step["analytic"].get(kind, 0) for rank in results for step in rank) / n if modelled else None
        ratio = "-" if want is None else ("inf" if want == 0 else f"{got / want:.4f}")
        rows.append((kind, f"{got:,.0f}", "-" if want is None else f"{want:,.0f}", ratio))
    return _table(("collective", "measured B/step", "analytic B/step", "ratio"), rows)


# -- pipeline bubble --------------------------------------------------------------------------------
# This process's "compute" since the last reset: [seconds slept, first sleep's start, last sleep's end].
# perf_counter is CLOCK_MONOTONIC on Linux: one clock for all processes of the machine.
_BUSY = [0.0, float("inf"), 0.0]


def _nap(seconds: float) -> None:
    if seconds > 0:
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        _BUSY[0] += end - start
        _BUSY[1], _BUSY[2] = min(_BUSY[1], start), end


class _Sleep(torch.autograd.Function):
    """Identity that sleeps `fwd` seconds in forward and `bwd` in backward."""

    @staticmethod
    def forward(ctx, x, fwd: float, bwd: float):
        _nap(fwd)
        ctx.bwd = bwd
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _nap(ctx.bwd)
        return grad, None, None


class SleepStage(nn.Module):
    """A stage costing t_f forward, t_f on the input-gradient path and t_f on the weight-gradient path.

    The bias makes the activation require grad on the first stage too (its input is data); the weight's
    own sleep sits on a branch only the weight gradient needs, so torch's stage_backward_input skips it
    and stage_backward_weight runs it.
    """

    def __init__(self, t_f: float):
        super().__init__()
        self.t_f = t_f
        self.bias = nn.Parameter(torch.zeros(()))
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = _Sleep.apply(x + self.bias, self.t_f, self.t_f)
        return h * _Sleep.apply(self.weight, 0.0, self.t_f)


def analytic_idle(schedule: str, pp: int, m: int, virtual: int) -> Optional[float]:
    """The bubble fraction with uniform stages: (p-1)/(m+p-1), interleaved (p-1)/(v m+p-1)."""
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved_1f1b":
        return (pp - 1) / (virtual * m + pp - 1)
    return None


def _table_idle(schedule) -> Optional[float]:
    """Idle share of torch's own action table (pipeline_order: one time slot per F, I, B or W, None = idle),
    mean over ranks: torch's expectation when every action takes the same time."""
    order = getattr(schedule, "pipeline_order", None)
    if not order:
        return None
    length = max(len(actions) for actions in order.values())
    return statistics.mean(1 - sum(a is not None for a in actions) / length for actions in order.values())


def _pipeline_worker(rank: int, world: int, port: int, out: str, schedules: list, microbatches: list,
                     t_f: float, steps: int, virtual: int) -> None:
    _init(rank, world, port)
    from torch.distributed.pipelining import PipelineStage

    from mmfm.parallel.pipeline_parallel import MULTI_STAGE_SCHEDULES, build_schedule, stage_indices

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    cpu = torch.device("cpu")
    results = []
    for name in schedules:
        v = virtual if name in MULTI_STAGE_SCHEDULES else 1
        for m in microbatches:
            idx = stage_indices(rank, world, v)  # round-robin: rank r holds r, r + pp, ...
            stages = [PipelineStage(SleepStage(t_f), s, world * v, cpu) for s in idx]
            schedule = build_schedule(name, stages, m, lambda y, target: ((y - target) ** 2).mean())
            x, target = torch.ones(m, 4), torch.zeros(m, 4)
            busy = []
            for step in range(1 + steps):  # the first step (shape inference) is not measured
                dist.barrier()
                _BUSY[:] = [0.0, float("inf"), 0.0]
                schedule.step(*((x,) if 0 in idx else ()), target=target if world * v - 1 in idx else None,
                              losses=[])
                if step:
                    busy.append(list(_BUSY))
            table = _table_idle(schedule) if name == "zero_bubble" else None
            results.append({"schedule": name, "m": m, "v": v, "busy": busy, "table": table})
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def pipeline_bench(pp: int = 2, microbatches: Sequence[int] = (4, 8), schedules: Sequence[str] = ("all",),
                   t_f: float = 0.02, steps: int = 3, virtual: int = 2) -> list[dict]:
    """One row per (schedule, m): measured idle fraction (mean over ranks), analytic, torch's table."""
    from mmfm.errors import ConfigError
    from mmfm.parallel.pipeline_parallel import SCHEDULES

    names = list(SCHEDULES) if "all" in schedules else list(schedules)
    if set(names) - set(SCHEDULES):
        raise ConfigError(f"unknown schedules {sorted(set(names) - set(SCHEDULES))}; use {sorted(SCHEDULES)} or all")
    for m in microbatches:
        if m % pp:
            raise ConfigError(f"{m} micro-batches is not a multiple of pp={pp}; the schedules need one")
    ranks = _spawn(_pipeline_worker, pp, (names, list(microbatches), t_f, steps, virtual))
    rows = []
    for i, row in enumerate(ranks[0]):
        steps_of = [rank[i]["busy"] for rank in ranks]  # [rank][step] = (slept, first start, last end)
        per_rank = []
        for mine in steps_of:
            idle = []
            for step, (slept, _, _) in enumerate(mine):
                span = max(r[step][2] for r in steps_of) - min(r[step][1] for r in steps_of)
                idle.append(1 - slept / span)
            per_rank.append(statistics.median(idle))
        rows.append({**row, "pp": pp, "idle": statistics.mean(per_rank),
                     "analytic": analytic_idle(row["schedule"], pp, row["m"], row["v"])})
        del rows[-1]["busy"]
    return rows


def pipeline_table(rows: list[dict]) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    return _table(("schedule", "pp", "v", "m", "idle measured", "analytic", "ratio", "torch table"),
                  [(r["schedule"], r["pp"], r["v"], r["m"], fmt(r["idle"]), fmt(r["analytic"]),
                    fmt(r["idle"] / r["analytic"]) if r["analytic"] else "-", fmt(r["table"])) for r in rows])
