"""`mmfm` entry point: dispatches to the subcommands listed in mmfm.cli.commands."""

from __future__ import annotations

import importlib
import sys

from mmfm.cli.commands import COMMANDS, usage


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmfm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run = importlib.import_module(COMMANDS[command][0]).main
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
