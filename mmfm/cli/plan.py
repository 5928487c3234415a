"""`mmfm plan model=vlm_7b hardware=h100 devices=64 global_batch=512 seq_len=4096 [--explain] [--format json]
[--top N]`: every parallel layout of the job ranked by predicted step time, with memory per rank, MFU and tokens/s
per device, and the overrides that run the best one (mmfm.plan, docs/planning.md)."""

from __future__ import annotations

import argparse
import json
import sys

from mmfm.cli.errors import one_line_errors
from mmfm.errors import ConfigError
from mmfm.plan.report import GIB, NothingFits, describe, layout_overrides, nothing_fits

WORKLOAD_KEYS = {"devices": int, "global_batch": int, "seq_len": int, "images_per_sample": int, "reserve": float}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmfm plan",
        description="Predict memory per rank, step time and MFU for every parallel layout of a job (tp, pp, "
                    "dp_replicate x dp_shard, micro-batch size, activation checkpointing none|full), keep those that "
                    "fit the device memory less a reserve, rank them by step time and print the Hydra overrides that "
                    "run the best. Job: devices=N global_batch=SAMPLES [seq_len=T, default data.seq_len] "
                    "[images_per_sample=1] [reserve=0.1]; the rest are Hydra overrides (model=..., hardware=h100|h200|"
                    "a100_80gb|ascend_910b, hardware.achievable=0.45, kernels.*, train.precision=bf16). Formulas: "
                    "docs/planning.md.",
        epilog="example: mmfm plan model=vlm_7b hardware=h100 devices=64 global_batch=512 seq_len=4096 --top 5")
    p.add_argument("--explain", action="store_true", help="break the top plan's memory and step time into terms")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--top", type=int, default=10, help="how many plans to print (default 10)")
    p.add_argument("overrides", nargs="*", help="job sizes (devices=, global_batch=, seq_len=, ...) and Hydra overrides")
    return p


def split_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """The job sizes (devices=..., one-line ConfigError on a bad value) and the Hydra overrides."""
    job, hydra = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in WORKLOAD_KEYS:
            try:
                job[key] = WORKLOAD_KEYS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number; e.g. devices=64 global_batch=512") from None
        else:
            hydra.append(item)
    for key in ("devices", "global_batch"):
        if key not in job:
            raise ConfigError(f"{key}= is missing; e.g. mmfm plan model=vlm_7b devices=64 global_batch=512 seq_len=4096")
    return job, hydra


def run_overrides(plan, user: list[str], wl, devices_per_node: int) -> list[str]:
    """The Hydra overrides of `mmfm train` / `mmfm launch` that run `plan` (the user's model and kernel choices kept)."""
    kept = [o for o in user if not o.startswith(("hardware", "parallel.", "parallel=", "data.seq_len",
                                                  "data.batch_size", "train.grad_accum_steps",
                                                  "train.activation_checkpoint", "train.global_batch"))]
    out = kept + [o for o in layout_overrides(plan.layout) if not o.startswith("train.activation_checkpoint")]
    nodes = max(1, wl.devices // devices_per_node)
    out += [f"data.seq_len={wl.seq_len}", f"train.activation_checkpoint={plan.layout.checkpoint}"]
    if not any(o.startswith("train.precision=") for o in kept):
        out.append("train.precision=bf16")
    cluster = ["cluster=slurm"] if nodes > 1 and not any(o.startswith("cluster=") for o in kept) else []
    return out + cluster + [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={min(wl.devices, devices_per_node)}"]


HEADER = (f"{'#':>3} {'tp':>2} {'pp':>2} {'dp_rep':>6} {'dp_shard':>8} {'ep':>3} {'schedule':>16} {'mb':>3} {'m':>4} {'ckpt':>4} | "
          f"{'params':>6} {'grads':>6} {'optim':>6} {'buffers':>7} {'acts':>6} {'logits':>6} {'total':>6} GiB | "
          f"{'step s':>7} {'MFU':>6} {'tok/s/dev':>9}")


def table_row(i: int, plan) -> str:
    lay, mem = plan.layout, plan.memory
    schedule = "-" if lay.pp == 1 else (lay.schedule if lay.virtual == 1 else f"{lay.schedule} v{lay.virtual}")
    gib = " ".join(f"{mem[t] / GIB:>{w}.1f}" for t, w in (("params", 6), ("grads", 6), ("optimizer", 6),
                                                          ("buffers", 7), ("activations", 6), ("logits", 6),
                                                          ("total", 6)))
    return (f"{i:>3} {lay.tp:>2} {lay.pp:>2} {lay.dp_replicate:>6} {lay.dp_shard:>8} {lay.ep:>3} {schedule:>16} "
            f"{lay.micro_batch:>3} {lay.microbatches:>4} {lay.checkpoint:>4} | {gib}     | "
            f"{plan.time['step']:>7.3f} {plan.mfu:>6.1%} {plan.tokens_per_s_per_device:>9.0f}")


def explain(plan, wl, hw) -> str:
    lay, mem, t = plan.layout, plan.memory, plan.time
    from mmfm.plan.memory import in_flight
    from mmfm.plan.steptime import bubble_fraction

    lines = [f"top plan, {describe(lay)} ({lay.microbatches} micro-batches per step and data-parallel rank):",
             f"  memory of the fullest rank (pipeline rank {plan.worst_pp_rank}), {plan.rank_params:,} parameter "
             "elements:",
             f"    params       {mem['params'] / GIB:8.2f} GiB  fp32 weights (the master copy), 4 B x elements",
             f"    grads        {mem['grads'] / GIB:8.2f} GiB  fp32 gradients, 4 B x elements",
             f"    optimizer    {mem['optimizer'] / GIB:8.2f} GiB  AdamW's two fp32 moments, 8 B x elements",
             f"    buffers      {mem['buffers'] / GIB:8.2f} GiB  FSDP's gathered bf16 blocks and one fp32 block gradient "
             "(without FSDP: autocast's bf16 weight copies)",
             f"    activations  {mem['activations'] / GIB:8.2f} GiB  "
             f"{in_flight(lay.schedule, lay.pp, lay.virtual, lay.microbatches, plan.worst_pp_rank):g} micro-batch(es) "
             "in flight x the rank's layers (+ vision tower and projector on the first stage)",
             f"    logits       {mem['logits'] / GIB:8.2f} GiB  output projection and loss (fused and chunked when "
             "tp = pp = 1)",
             f"    total        {mem['total'] / GIB:8.2f} GiB  of {hw.hbm_bytes / GIB:.0f} GiB",
             f"  step time {t['step']:.3f} s ({plan.params:,} parameters, MFU {plan.mfu:.1%}, "
             f"{plan.tokens_per_s_per_device:,.0f} tokens/s/device):",
             f"    compute            {t['compute']:.3f} s  the slowest rank's training FLOPs at {hw.achievable:g} x "
             f"{hw.peak_bf16_flops / 1e12:g} TFLOP/s" + (" (blocks recomputed: x4/3)" if lay.checkpoint == "full" else ""),
             f"    bubble             {t['bubble']:.3f} s  (pp - 1) / (v m + pp - 1) = "
             f"{bubble_fraction(lay.pp, lay.microbatches, lay.virtual):.3f} of the step",
             f"    tp_comm            {t['tp_comm']:.3f} s  sequence-parallel all-gathers / reduce-scatters, not "
             "overlapped",
             f"    fsdp_comm_exposed  {t['fsdp_comm_exposed']:.3f} s  FSDP beyond the compute it overlaps + the first "
             "gather and last reduce-scatter",
             f"    pp_p2p             {t['pp_p2p']:.3f} s  pipeline fill and drain sends",
             f"    ep_comm            {t['ep_comm']:.3f} s  expert-parallel all-to-alls (balanced load), not "
             "overlapped"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    with one_line_errors("mmfm plan"):
        from mmfm.config import load_config
        from mmfm.plan.search import RESERVE, Workload, search

        job, hydra = split_overrides(args.overrides)
        precision = [] if any(o.startswith("train.precision=") for o in hydra) else ["train.precision=bf16"]
        cfg = load_config(precision + hydra)
        wl = Workload(job["devices"], job["global_batch"], job.get("seq_len", cfg.data.seq_len),
                      job.get("images_per_sample", 1))
        reserve = job.get("reserve", RESERVE)
        result = search(cfg, wl, reserve)
        hw = cfg.hardware
        model = next((o.split("=", 1)[1] for o in hydra if o.startswith("model=")), cfg.model.name)
        if args.format == "json":
            print(json.dumps({
                "model": model, "params": (result.plans or [result.closest])[0].params, "hardware": hw.name,
                "workload": vars(wl) | {"reserve": reserve}, "considered": result.considered,
                "fitting": len(result.plans), "usable_bytes": result.usable_bytes,
                "plans": [p.as_dict() | {"overrides": run_overrides(p, hydra, wl, hw.devices_per_node)}
                          for p in result.plans[:args.top]],
                "nothing_fits": None if result.plans else nothing_fits(result, hw)}, indent=1))
            return 0 if result.plans else 1
        if not result.plans:
            raise NothingFits(nothing_fits(result, hw))
        best = result.plans[0]
        print(f"mmfm plan: {model} ({best.params / 1e9:.2f}B parameters) on {wl.devices} x {hw.name} "
              f"({hw.hbm_bytes / GIB:.0f} GiB, {result.usable_bytes / GIB:.1f} usable), global batch "
              f"{wl.global_batch} x {wl.seq_len} tokens: {len(result.plans)} of {result.considered} layouts fit, "
              "fastest first")
        print(HEADER)
        for i, plan in enumerate(result.plans[:args.top], 1):
            print(table_row(i, plan))
        if args.explain:
            print()
            print(explain(best, wl, hw))
        print("\n" + run_line(cfg, best, hydra, wl, hw))
    return 0


def run_line(cfg, plan, hydra: list[str], wl, hw) -> str:
    """The launch command of the top plan, or why mmfm train cannot run this model (a planning-only preset)."""
    from mmfm.models import model_spec

    try:
        model_spec(cfg.model).validate_training(cfg.model)
    except ConfigError as exc:
        return f"planning only: {exc}"
    return "run the top plan:\n  mmfm launch " + " ".join(run_overrides(plan, hydra, wl, hw.devices_per_node))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
