"""The files in `launch/` and the `{{ name }}` placeholders of its templates."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmfm.launch.job import LaunchError

PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


def launch_dir() -> Path:
    """The `launch/` folder (sbatch template, rank wrapper): $MMFM_LAUNCH_DIR, else the one beside the package."""
    env = os.environ.get("MMFM_LAUNCH_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "launch"
    if not (path / "sbatch.sh").is_file():
        raise LaunchError(f"no launch templates at {path}; install mmfm from its repository with `pip install -e .` "
                          "or set MMFM_LAUNCH_DIR to the launch/ folder")
    return path


def render(template: str, values: dict[str, str]) -> str:
    """Fill each `{{ name }}`. A line whose placeholder is empty is left out when it is an #SBATCH directive or
    holds nothing else (a block such as the setup lines, or a `\\` continuation)."""
    lines = []
    for line in template.splitlines():
        names = PLACEHOLDER.findall(line)
        bare = PLACEHOLDER.sub("", line).strip() in ("", "\\")
        if any(values[n] == "" for n in names) and (line.startswith("#SBATCH") or bare):
            continue
        lines.append(PLACEHOLDER.sub(lambda m: values[m[1]], line))
    return "\n".join(lines) + "\n"
