"""Parallelism benchmark, as `mmfm bench parallel`: python benchmarks/parallel.py [--layout tp2] [--pipeline]."""

import sys

from mmfm.cli.bench import main

if __name__ == "__main__":  # spawned workers re-import this file: keep the run under the guard
    sys.exit(main(["parallel", *sys.argv[1:]]))
