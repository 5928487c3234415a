"""`mmfm eval`: score a run's checkpoint (or a Hugging Face LLaVA folder) on evaluation tasks: the synthetic suite
(`synth/caption`, `synth/vqa`, `synth/vqa_cloze`, `synth/mc`, `synth/perplexity`) or task files of your own
(docs/evaluation.md). Writes eval/<step>/results.json, results.md and each task's predictions in the run directory;
--all-checkpoints scores every saved checkpoint and plots each metric against the step (eval/curves.png). Under
torchrun with parallel.* overrides (data and tensor parallel), the model is evaluated sharded over the ranks."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from mmfm.cli.errors import one_line_errors
from mmfm.errors import MmfmError

from mmfm.eval.synth_suite import DEFAULT_TASKS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm eval", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint), one of its checkpoints/step_* "
                                      "folders, or a Hugging Face LLaVA folder")
    p.add_argument("overrides", nargs="*", metavar="tasks=[...]",
                   help=f"the tasks: names of the synthetic suite, task YAML files or folders holding task.yaml "
                        f"(default for a captioner: tasks=[{','.join(DEFAULT_TASKS['pretrain'])}]; for a chat "
                        f"model: tasks=[{','.join(DEFAULT_TASKS['chat'])}])")
    p.add_argument("--all-checkpoints", action="store_true", help="score every checkpoint of the run, plot the curves")
    p.add_argument("--limit", type=int, default=0, help="the first N items of each task (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="the folder for eval/ (default: the run directory; for a Hugging "
                                               "Face folder, ./eval-<folder name>)")
    p.add_argument("--baseline", action="store_true",
                   help="also score the constant-answer baseline (each task's most common answer) beside the model")
    return p.parse_args(argv)


def task_names(overrides: list[str]) -> Optional[list[str]]:
    """tasks=[a,b] (or tasks=a,b) -> ["a", "b"]; parallel.* overrides are the layout; any other is refused. None: no
    tasks= given."""
    names = None
    for override in overrides:
        key, sep, value = override.partition("=")
        if key.startswith("parallel.") and sep:
            continue
        if key != "tasks" or not sep:
            raise MmfmError(f"unknown argument {override!r}; give the tasks as tasks=[name,...] and a sharded "
                            "layout as parallel.<dim>=N")
        names = [n.strip() for n in value.strip().removeprefix("[").removesuffix("]").split(",") if n.strip()]
        if not names:
            raise MmfmError("tasks=[] names no task")
    return names


def checkpoints_to_score(path: Path, every: bool) -> tuple[Path, list[Path]]:
    from mmfm.checkpoint import find_checkpoint
    from mmfm.checkpoint.manager import CheckpointManager, is_complete

    run_dir, latest = find_checkpoint(path)
    if not every:
        return run_dir, [latest]
    return run_dir, [p for p in CheckpointManager(run_dir / "checkpoints").step_dirs() if is_complete(p)]


def step_of(checkpoint: Path) -> str:
    match = re.fullmatch(r"step_0*(\d+)", checkpoint.name)
    return match.group(1) if match else checkpoint.name


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm eval"):
        run(args)
    return 0


def run(args: argparse.Namespace) -> dict:
    from mmfm.checkpoint.hf_vlm import is_hf_folder
    from mmfm.eval.report import evaluate_checkpoint, is_main, plot_curves, print_table

    if args.limit < 0 or args.batch_size < 1:
        raise MmfmError(f"--limit={args.limit} must be >= 0 (0: every item) and --batch-size={args.batch_size} >= 1")
    names = task_names(args.overrides)
    layout = [o for o in args.overrides if o.startswith("parallel.")]
    path = Path(args.checkpoint)
    if is_hf_folder(path):
        if args.all_checkpoints or layout:
            raise MmfmError(f"{path} is a Hugging Face folder: --all-checkpoints and parallel.* need a run directory")
        out = Path(args.out or f"eval-{path.resolve().name}")
        results = {"hf": evaluate_checkpoint(path, None, names, args, out / "eval" / "hf")}
    else:
        run_dir, checkpoints = checkpoints_to_score(path, args.all_checkpoints)
        out = Path(args.out) if args.out else run_dir
        results = {step_of(c): evaluate_checkpoint(run_dir, c, names, args, out / "eval" / step_of(c), layout)
                   for c in checkpoints}
        if args.all_checkpoints and results and is_main():
            print(f"curves: {plot_curves(results, out / 'eval')}")
    if is_main():
        for step, result in results.items():
            print_table(step, result)
        print(json.dumps({"results": str(out / "eval")}))
    return results
