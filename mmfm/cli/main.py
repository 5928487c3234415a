"""`mmfm` entry point: dispatches to the subcommands."""

from __future__ import annotations

import sys

USAGE = """usage: mmfm <command> [args]

commands:
  train      train a model: `mmfm train [hydra overrides]` (e.g. experiment=demo train.max_steps=200);
             `mmfm train --cfg job` prints the resolved config, `mmfm train --help` lists config groups
  launch     run a training job with torchrun here or through Slurm: `mmfm launch [--dry-run] [-m] [overrides]`
             (e.g. cluster=slurm cluster.nodes=16 parallel=...; -m sweeps, one run directory each)
  generate   caption or answer for image files from a checkpoint (greedy or sampled, KV-cached)
  data       data set tools: `mmfm data synth` makes the synthetic image-caption data set
  bench      benchmarks: `mmfm bench parallel` (collective bytes per layout, pipeline bubbles)

`mmfm <command> --help` describes each command.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from mmfm.cli.train import main as run
    elif command == "launch":
        from mmfm.cli.launch import main as run
    elif command == "generate":
        from mmfm.cli.generate import main as run
    elif command == "data":
        from mmfm.cli.data import main as run
    elif command == "bench":
        from mmfm.cli.bench import main as run
    else:
        print(f"mmfm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
