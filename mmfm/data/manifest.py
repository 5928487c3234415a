"""Data set folders: shards plus `manifest.json` (counts, sizes, sha256, sources, licences, parameters)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable

import webdataset as wds

from mmfm.errors import MmfmError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "mmfm-webdataset/1"


class DataError(MmfmError):
    """A data set folder that cannot be used; the message says how to fix it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(samples: Iterable[dict], path: Path) -> dict:
    """Write encoded samples into one tar file; its manifest entry (file, samples, bytes, sha256).

    Tar headers carry a fixed mtime and owner, so the same samples give byte-identical shards.
    """
    count = 0
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return {"file": path.name, "samples": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_shards(samples: Iterable[dict], out_dir: Path, prefix: str, shard_size: int) -> list[dict]:
    """Write encoded samples into `{prefix}-NNNNNN.tar` files of `shard_size` samples each (see write_shard)."""
    shards, remaining = [], iter(samples)
    while (first := next(remaining, None)) is not None:
        chunk = itertools.chain([first], itertools.islice(remaining, shard_size - 1))
        shards.append(write_shard(chunk, out_dir / f"{prefix}-{len(shards):06d}.tar"))
    return shards


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {data_dir}; make the data set with `mmfm data synth --out {data_dir}` "
                        "or set data.path to a folder that holds one")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rebuild the data set") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the data set")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[str]:
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"data set {data_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    paths = [str(Path(data_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in {data_dir}/{MANIFEST} are missing, e.g. {missing[0]}; "
                        "rebuild the data set")
    return paths


def shard_counts(data_dir: str | Path, split: str) -> dict[str, int]:
    """Samples per shard path of `split`, as the manifest lists them."""
    shards = read_manifest(data_dir)["splits"][split]["shards"]
    return {str(Path(data_dir) / s["file"]): int(s["samples"]) for s in shards if "samples" in s}


def existing_build(out: Path, params: dict, force: bool):
    """The manifest of a data set already in `out` built with the same params (to reuse), else None with `out`
    ready to build into: another build there is an error unless force (its manifest is then removed)."""
    if (out / MANIFEST).is_file():
        existing = read_manifest(out)
        if existing.get("params") == params:
            return existing
        if not force:
            raise DataError(f"{out} already holds a data set built with other parameters "
                            f"({existing.get('params')}); pass --force to rebuild it or choose another --out")
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None
