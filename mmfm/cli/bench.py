"""`mmfm bench <name>`: benchmarks. `parallel`: communication per layout and pipeline bubbles; `kernels`:
time and memory of each fused kernel against its references; `data`: data loading throughput; `data-scale`: what each of W data-parallel ranks reads; `hf-load`: each
rank's memory while importing a Hugging Face checkpoint sharded; `lora`: memory of LoRA vs full fine-tuning."""

from __future__ import annotations

import argparse

from mmfm.cli.commands import COMMANDS, add_tool
from mmfm.cli.errors import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfm bench", description=COMMANDS["bench"][1])
    sub = p.add_subparsers(dest="bench", required=True)
    s = add_tool(
        sub, "bench", "parallel",
        description="--layout: spawn the preset's world, run a warm-up and --steps measured Trainer steps under "
                    "CommCounter and print, per collective kind, bytes/step per rank (mean over ranks) measured "
                    "and analytic. --pipeline: each schedule on sleeping synthetic stages (forward t_f, backward "
                    "2 t_f), printing the measured idle fraction (median over steps, mean over ranks) against "
                    "the analytic bubble. Without either: --layout tp2.")
    s.add_argument("--layout", help="parallel preset (config group parallel): fsdp2, tp2, fsdp2_tp2, pp2, ...")
    s.add_argument("--steps", type=int, default=2, help="measured optimizer steps (default: 2)")
    s.add_argument("--data", help="data set folder (default: a small synthetic one in a temp folder)")
    s.add_argument("--batch-size", type=int, default=4, help="samples per data-parallel rank (default: 4)")
    s.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default: 2)")
    s.add_argument("overrides", nargs="*", help="Hydra overrides (default: the small test model)")
    s.add_argument("--pipeline", action="store_true", help="measure pipeline bubbles")
    s.add_argument("--pp", type=int, default=2, help="pipeline ranks (default: 2)")
    s.add_argument("--microbatches", type=int, nargs="+", default=[4, 8], help="multiples of --pp (default: 4 8)")
    s.add_argument("--schedules", nargs="+", default=["all"], help="names in SCHEDULES, or all (default)")
    s.add_argument("--virtual", type=int, default=2, help="stages per rank of multi-stage schedules (default: 2)")
    s.add_argument("--t-f", type=float, default=0.02, help="forward seconds per stage (default: 0.02)")
    s.add_argument("--pipeline-steps", type=int, default=3, help="measured steps per schedule (default: 3)")
    from mmfm.kernels.bench import __doc__ as kernels_doc, add_arguments

    k = add_tool(sub, "bench", "kernels", description=kernels_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(k)
    from mmfm.data.bench import __doc__ as data_doc

    d = add_tool(sub, "bench", "data", description=data_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--data", help="data set folder (default: the config's data.path)")
    d.add_argument("--samples", type=int, default=2000, help="samples timed per reader (default 2000)")
    d.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    d.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader processes (default 0 1 2)")
    d.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=demo, e.g. data.pack=true")
    from mmfm.data.scale_bench import __doc__ as scale_doc, add_arguments as scale_arguments

    scale_arguments(add_tool(sub, "bench", "data-scale", description=scale_doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter))
    from mmfm.checkpoint.hf_bench import __doc__ as hf_load_doc, add_arguments as hf_load_arguments

    h = add_tool(sub, "bench", "hf-load", description=hf_load_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf_load_arguments(h)
    from mmfm.models.lora_bench import __doc__ as lora_doc, add_arguments as lora_arguments

    lora_arguments(add_tool(sub, "bench", "lora", description=lora_doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.bench == "data":
        from mmfm.data.bench import run as data_bench

        with one_line_errors("mmfm bench data"):
            print(data_bench(args.data, args.overrides, args.samples, args.steps, args.workers))
        return 0
    if args.bench == "data-scale":
        from mmfm.data.scale_bench import run as scale_bench

        with one_line_errors("mmfm bench data-scale"):
            print(scale_bench(args))
        return 0
    if args.bench == "hf-load":
        from mmfm.checkpoint.hf_bench import run as hf_load_bench

        with one_line_errors("mmfm bench hf-load"):
            return hf_load_bench(args)
    if args.bench == "lora":
        from mmfm.models.lora_bench import run as lora_bench

        with one_line_errors("mmfm bench lora"):
            return lora_bench(args)
    if args.bench == "kernels":
        from mmfm.kernels.bench import run

        with one_line_errors("mmfm bench kernels"):
            return run(args)
    from mmfm.parallel import bench

    with one_line_errors(f"mmfm bench {args.bench}"):
        if args.layout or not args.pipeline:
            layout = args.layout or "tp2"
            results = bench.comm_bench(layout, args.steps, args.overrides, args.data, args.batch_size, args.grad_accum)
            print(f"layout {layout}: {len(results)} ranks, {args.steps} measured steps, bytes per step per rank")
            print(bench.comm_table(results))
        if args.pipeline:
            rows = bench.pipeline_bench(args.pp, args.microbatches, args.schedules, args.t_f, args.pipeline_steps,
                                        args.virtual)
            print(f"\npipeline idle fraction, t_f={args.t_f * 1000:g} ms per stage forward, 2 t_f backward")
            print(bench.pipeline_table(rows))
    return 0
