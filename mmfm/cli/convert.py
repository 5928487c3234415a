"""`mmfm convert`: a checkpoint between mmfm's format and DeepSpeed's ZeRO format, both ways (docs/engines.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmfm.cli.errors import one_line_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmfm convert", description="Convert a checkpoint between mmfm's format (DCP) and DeepSpeed's ZeRO "
        "format, with its optimizer state, step, schedule and data position. Runs a ZeRO engine on this process "
        "group's ranks (torchrun --nproc-per-node N -m mmfm.cli.main convert ... for N partitions).")
    p.add_argument("source", help="--to deepspeed: a run directory (its latest checkpoint) or a step_* folder; "
                   "--to dcp: the folder DeepSpeed saved into (its `latest`) or one tag folder in it")
    p.add_argument("--to", choices=["deepspeed", "dcp"], required=True)
    p.add_argument("--out", required=True, help="a new (or empty) folder: DeepSpeed's checkpoint folder, or a run "
                   "directory that `mmfm train checkpoint.resume=...`, export and eval read")
    p.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=None,
                   help="--to deepspeed: the ZeRO stage to partition for (default: the run's engine.deepspeed."
                   "zero_stage)")
    p.add_argument("--config", default=None, help="--to dcp: the run's config.yaml, when the DeepSpeed folder has none")
    args = p.parse_args(argv)
    if args.to == "deepspeed" and args.config:
        p.error("--config is for --to dcp (a run directory holds its config)")
    if args.to == "dcp" and args.zero_stage is not None:
        p.error("--zero-stage is for --to deepspeed (a DeepSpeed checkpoint has its own)")
    return args


def run(args: argparse.Namespace) -> Path:
    from mmfm.checkpoint.deepspeed_format import to_dcp, to_deepspeed, run_zero_stage

    if args.to == "deepspeed":
        return to_deepspeed(Path(args.source), Path(args.out), args.zero_stage or run_zero_stage(Path(args.source)))
    return to_dcp(Path(args.source), Path(args.out), Path(args.config) if args.config else None)


def main(argv: list[str]) -> int:
    from mmfm.parallel.distributed import is_main_process

    args = parse_args(argv)
    with one_line_errors("mmfm convert"):
        out = run(args)
        if is_main_process():
            print(out)
    return 0
