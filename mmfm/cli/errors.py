"""Report the project's own errors as one line on stderr, exit code 2, instead of a traceback."""

from __future__ import annotations

import contextlib
import sys

from mmfm.errors import MmfmError


@contextlib.contextmanager
def one_line_errors(prog: str):
    try:
        yield
    except MmfmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
