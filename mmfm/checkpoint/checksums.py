"""sha256 of every file a checkpoint holds, recorded at save and verified at load.

The ranks share the hashing: rank r hashes every world-th file (sorted by name), so a checkpoint of
thousands of shards costs each rank about one shard's read. The record is `checksums.json` in the
checkpoint folder: {"algorithm": "sha256", "files": {name: hex digest}}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from mmfm.data.manifest import sha256_file
from mmfm.checkpoint.errors import CheckpointError
from mmfm.checkpoint.safe_read import plain_file_name
from mmfm.parallel.distributed import gather_objects, is_distributed

CHECKSUMS = "checksums.json"


class ChecksumError(CheckpointError):
    pass


def data_files(folder: Path) -> list[str]:
    """The files DCP wrote: its metadata and shards."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and (p.name == ".metadata" or p.suffix == ".distcp"))


def _my_share(names: list[str], distributed: bool) -> list[str]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    return names[rank::world]


def hash_shared(folder: Path) -> dict[str, str]:
    """Collective: {file: sha256} of the folder's DCP files, each hashed by one rank, on every rank."""
    names = data_files(folder)
    mine = {name: sha256_file(folder / name) for name in _my_share(names, is_distributed())}
    merged: dict[str, str] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged


def write_record(folder: Path, digests: dict[str, str]) -> None:
    (folder / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": dict(sorted(digests.items()))},
                                               indent=1))


def read_record(folder: Path) -> dict[str, str] | None:
    """{file: sha256}, or None for a checkpoint written before checksums were recorded."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        ok = record.get("algorithm") == "sha256" and isinstance(files, dict) and all(
            plain_file_name(k) and isinstance(v, str) for k, v in files.items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ChecksumError(f"checkpoint {folder}: {CHECKSUMS} is unreadable or malformed; resume from another "
                            "step_* folder")
    return files


def verify(folder: Path, distributed: bool) -> bool:
    """Check every recorded file (collective when distributed: each rank checks its share). False when the
    checkpoint has no record; raises ChecksumError naming the first file that is missing or differs."""
    record = read_record(folder)
    if record is None:
        return False
    bad = []
    for name in _my_share(sorted(record), distributed):
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} is missing")
        elif sha256_file(path) != record[name]:
            bad.append(f"{name} does not match its recorded sha256")
    if distributed:
        bad = [b for part in gather_objects(bad) for b in part]
    if bad:
        raise ChecksumError(f"checkpoint {folder}: {sorted(bad)[0]} ({len(bad)} file(s) bad); the checkpoint is "
                            "corrupt: resume from another step_* folder")
    return True
