"""LoRA vs full fine-tuning memory, as `mmfm bench lora`: python benchmarks/lora_memory.py [--hidden 512] [--layers 8]."""

import sys

from mmfm.cli.bench import main

if __name__ == "__main__":  # spawned workers re-import this file: keep the run under the guard
    sys.exit(main(["lora", *sys.argv[1:]]))
