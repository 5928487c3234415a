"""The launch templates (`mmfm/launch/templates/`: sbatch script, rank wrapper) and their `{{ name }}` placeholders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmfm.launch.job import LaunchError

PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data (pyproject.toml)


def launch_dir() -> Path:
    """The folder of sbatch.sh and torchrun_rank.sh: $MMFM_LAUNCH_DIR when set, else `mmfm/launch/templates/`."""
    env = os.environ.get("MMFM_LAUNCH_DIR")
    path = Path(env) if env else TEMPLATES
    if not (path / "sbatch.sh").is_file():
        fix = ("point MMFM_LAUNCH_DIR at a folder with sbatch.sh and torchrun_rank.sh (a copy of "
               "mmfm/launch/templates/) or unset it" if env else "the mmfm installation is incomplete; reinstall mmfm")
        raise LaunchError(f"no sbatch.sh in {path}: {fix}")
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
