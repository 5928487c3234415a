"""Kernel benchmark, as `mmfm bench kernels`: python benchmarks/kernels.py [--time | --memory [--full]] ..."""

import sys

from mmfm.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["kernels", *sys.argv[1:]]))
