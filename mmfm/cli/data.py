"""`mmfm data <tool>`: data set construction commands."""

from __future__ import annotations

import argparse

from mmfm.cli.commands import COMMANDS, add_tool
from mmfm.cli.errors import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfm data", description=COMMANDS["data"][1])
    sub = p.add_subparsers(dest="tool", required=True)
    s = add_tool(sub, "data", "synth",
                 description="Render shape scenes and upscaled scikit-learn digits with captions into "
                             "webdataset shards (train/val), train a tokenizer on the caption text and "
                             "write manifest.json. Deterministic from --seed; reuses an identical build.")
    s.add_argument("--out", default="data/synth", help="output folder (default: data/synth)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-size", type=int, default=20000)
    s.add_argument("--val-size", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--shard-size", type=int, default=2000, help="samples per tar shard")
    s.add_argument("--digit-fraction", type=float, default=0.2, help="share of handwritten-digit samples")
    s.add_argument("--pair-fraction", type=float, default=0.45, help="share of two-object scenes among scenes")
    s.add_argument("--instruct-text", action="store_true",
                   help="tokenizer also trained on the instruction data's text (for later sft/dpo/grpo stages)")
    s.add_argument("--pair-captions", choices=("ordered", "shuffled", "one-place"), default="ordered",
                   help="two-object captions: objects first, left/top one first ('a red circle on the left and ...'), "
                        "places first in random order ('on the right is a blue square and ...'), or one place, picked at "
                        "random, and its object ('on the right is a blue square.'); the place-first styles teach the "
                        "place-to-object binding that the later stages' questions need (docs/alignment.md)")
    s.add_argument("--tokenizer", help="a pretrained model's Hugging Face folder (or a tokenizer.json) whose tokenizer to "
                   "copy instead of training one (<image> added if it lacks one)")
    s.add_argument("--force", action="store_true", help="rebuild a folder built with other parameters")
    i = add_tool(sub, "data", "instruct",
                 description="Render shape scenes with questions on colour, count, position and shape: "
                             "LLaVA-format conversations with their answers (--kind sft; some with a second, "
                             "text-only turn), or a question with the right answer (chosen) and a plausible "
                             "wrong one (rejected) (--kind preference). Deterministic from --seed.")
    i.add_argument("--kind", choices=("sft", "preference"), default="sft")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--tokenizer", help="tokenizer.json of the pretraining data set, or a pretrained model's Hugging Face "
                   "folder (its tokenizer, special tokens and chat template; <image> added if it lacks one) "
                   "(default: train the same one as `mmfm data synth --instruct-text`)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--train-size", type=int, default=8000)
    i.add_argument("--val-size", type=int, default=500)
    i.add_argument("--image-size", type=int, default=64)
    i.add_argument("--shard-size", type=int, default=2000, help="samples per tar shard")
    i.add_argument("--max-turns", type=int, default=3, help="questions per sft conversation: 1 to this many")
    i.add_argument("--pair-fraction", type=float, default=0.5, help="share of two-object scenes")
    i.add_argument("--force", action="store_true", help="rebuild a folder built with other parameters")
    r = add_tool(sub, "data", "reference-logps",
                 description="Copy a preference data set, adding to every pair the reference model's summed "
                             "log-probs of its chosen and rejected answers (\"reference_logps\"), for "
                             "stage.preference.reference=precomputed (no reference model in memory).")
    r.add_argument("data", help="preference data set folder")
    r.add_argument("--checkpoint", required=True, help="reference model: a run directory or a step_* folder")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    r.add_argument("--device", default="auto")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = add_tool(sub, "data", "robot-demos",
                 description="Record the scripted expert of the simulated pick-up task (mmfm.embodied.reach) as a "
                             "LeRobot data set (codebase v3.0, 64x64 images in the parquet files or, with --video, one "
                             "MP4; the instruction as the task): the input of a `lerobot` source in `mmfm data "
                             "build`. Deterministic from --seed.")
    d.add_argument("--out", required=True, help="a new folder")
    d.add_argument("--episodes", type=int, default=1000, help="episodes to record (the expert's failures are left out)")
    d.add_argument("--seed", type=int, default=0, help="episode seeds are seed, seed + 1, ...")
    d.add_argument("--each-object", action="store_true", help="each table once per object, each named in turn "
                   "(4 episodes per seed)")
    d.add_argument("--video", action="store_true", help="the camera as one MP4 (AV1, lossy; lerobot's default "
                   "layout) instead of PNG in the parquet; needs PyAV (pip install av)")
    b = add_tool(sub, "data", "build",
                 description="Read the recipe's sources, run its stages (decode, filters, PII "
                             "de-identification, dedup) and write webdataset shards or a Megatron indexed "
                             "dataset with manifest.json. Deterministic; an interrupted build resumes; a "
                             "finished one is not redone. See mmfm/data/pipeline.py for the recipe format.")
    b.add_argument("recipe", help="recipe YAML file (examples: data_pipeline/*.yaml in the repository)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--workers", type=int, default=1, help="processes for the per-record stages (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.tool == "build":
        return build_main(args)
    if args.tool == "instruct":
        return instruct_main(args)
    if args.tool == "reference-logps":
        return reference_logps_main(args)
    if args.tool == "robot-demos":
        return robot_demos_main(args)
    from mmfm.data.synth import build_synth_dataset

    with one_line_errors("mmfm data synth"):
        m = build_synth_dataset(args.out, seed=args.seed, train_size=args.train_size, val_size=args.val_size,
                                image_size=args.image_size, shard_size=args.shard_size,
                                digit_fraction=args.digit_fraction, pair_fraction=args.pair_fraction,
                                instruct_text=args.instruct_text, pair_captions=args.pair_captions, force=args.force,
                                tokenizer=args.tokenizer)
    report(args.out, m)
    return 0


def report(out: str, m: dict) -> None:
    counts = ", ".join(f"{k}: {v['samples']} samples in {len(v['shards'])} shards" for k, v in m["splits"].items())
    print(f"data set in {out} ({counts}; tokenizer of {m['tokenizer']['vocab_size']} tokens)")


def reference_logps_main(args: argparse.Namespace) -> int:
    from mmfm.data.reference_logps import write_reference_logps

    with one_line_errors("mmfm data reference-logps"):
        m = write_reference_logps(args.data, args.checkpoint, args.out, args.batch_size, args.device,
                                  progress=not args.no_progress)
    report(args.out, m)
    return 0


def instruct_main(args: argparse.Namespace) -> int:
    from mmfm.data.synth_instruct import build_instruct_dataset

    with one_line_errors("mmfm data instruct"):
        m = build_instruct_dataset(args.out, args.kind, args.tokenizer, seed=args.seed, train_size=args.train_size,
                                   val_size=args.val_size, image_size=args.image_size, shard_size=args.shard_size,
                                   max_turns=args.max_turns, pair_fraction=args.pair_fraction, force=args.force)
    report(args.out, m)
    return 0


def robot_demos_main(args: argparse.Namespace) -> int:
    from mmfm.embodied.reach import write_demonstrations

    with one_line_errors("mmfm data robot-demos"):
        info = write_demonstrations(args.out, args.episodes, args.seed, each_object=args.each_object,
                                    video=args.video)
    print(f"{args.out}: LeRobot data set of {info['total_episodes']} episodes, {info['total_frames']} frames")
    return 0


def build_main(args: argparse.Namespace) -> int:
    from mmfm.data.pipeline import build

    with one_line_errors("mmfm data build"):
        m = build(args.recipe, args.out, workers=args.workers, progress=not args.no_progress)
    dropped = {f"{stage}/{reason}": n for stage, report in m["stages"].items() if isinstance(report, dict)
               for reason, n in report["dropped"].items()}
    print(f"{args.out}: {m['stages']['written']} samples ({_build_outputs(m)}) from {m['records_read']} records "
          f"read; dropped: {dropped or 'none'}; PII: {m['pii'] or 'none'}")
    return 0


def _build_outputs(m: dict) -> str:
    """What a build wrote: per split its samples and shards, or per indexed output its files."""
    if "splits" in m:
        return ", ".join(f"{split}: {v['samples']} in {len(v['shards'])} shards" for split, v in m["splits"].items())
    return ", ".join(f"{i['prefix']}.bin/.idx: {i['documents']} documents, {i['tokens']} tokens"
                     for i in (m["indexed"], m.get("indexed_val")) if i)
