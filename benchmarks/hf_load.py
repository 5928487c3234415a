"""Hugging Face import memory, as `mmfm bench hf-load`: python benchmarks/hf_load.py [--world 4] [--layout both]."""

import sys

from mmfm.cli.bench import main

if __name__ == "__main__":  # spawned workers re-import this file: keep the run under the guard
    sys.exit(main(["hf-load", *sys.argv[1:]]))
