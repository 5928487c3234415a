"""Data set folders: shards plus `manifest.json` (counts, sizes, sha256, sources, licences, parameters)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import webdataset as wds

from mmfm.errors import MmfmError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "mmfm-webdataset/1"


class DataError(MmfmError):
    """A data set folder that cannot be used; the message says how to fix it."""


class UnsafePath(DataError):
    """A file name read from a data file that names a URL or command, or leads outside its folder."""


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http:, file:, s3:, C: ...
_SHA256 = re.compile(r"[0-9a-f]{64}")


def contained(folder: str | Path, name: object, root: str | Path | None = None) -> Path:
    """folder / name for a file name read from a data file (a manifest, a JSONL or LLaVA file); UnsafePath
    saying why unless it is a relative path (no URL or command such as pipe:) that stays inside root (default:
    folder) once '..' and symbolic links are resolved."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a file name")
    if _SCHEME.match(name):
        raise UnsafePath(f"{name!r} is a URL or command, not a file name")
    if PurePosixPath(name).is_absolute():
        raise UnsafePath(f"{name!r} is an absolute path, not one relative to {folder}")
    path, root = Path(folder) / name, Path(folder if root is None else root)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePath(f"{name!r} leads outside {root}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, payload: dict, sort_keys: bool = True) -> None:
    """payload as JSON in `path`, written to a temporary file first (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=sort_keys)
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
    """The data set's manifest, its structure checked: every split's shards are entries whose file names stay
    inside data_dir (a manifest cannot name a URL, a command or a file elsewhere)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {data_dir}; make the data set with `mmfm data synth --out {data_dir}` "
                        "or set data.path to a folder that holds one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rebuild the data set") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not an object; rebuild the data set")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the data set")
    _check_splits(path, manifest)
    return manifest


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; rebuild the data set or restore its {MANIFEST}")


def _check_splits(path: Path, manifest: dict) -> None:
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise _bad(path, "'splits' is missing or not an object")
    if not isinstance(manifest.get("tokenizer", {}), dict):
        raise _bad(path, "'tokenizer' is not an object")
    for split, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise _bad(path, f"split {split!r} has no list of shards")
        for i, shard in enumerate(info["shards"]):
            _check_shard(path, f"split {split!r} shard {i}", shard)


def _check_shard(path: Path, where: str, shard) -> None:
    if not isinstance(shard, dict):
        raise _bad(path, f"{where} is a {type(shard).__name__}, expected an object")
    try:
        contained(path.parent, shard.get("file"))
    except UnsafePath as exc:
        raise DataError(f"{path}: {where} file {exc}; shard files must be plain names inside the data folder "
                        "(rebuild the data set, do not edit its manifest by hand)") from None
    for key in ("samples", "bytes"):
        value = shard.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad(path, f"{where} {key}={value!r} is not a count")
    if "sha256" in shard and not (isinstance(shard["sha256"], str) and _SHA256.fullmatch(shard["sha256"])):
        raise _bad(path, f"{where} sha256={shard['sha256']!r} is not a sha256 hex digest")


def split_shards(data_dir: str | Path, split: str, local: bool = True) -> dict[str, dict]:
    """{shard path: its manifest entry} of `split`, in manifest order; DataError when the split is unknown, lists
    no shards or (local) a shard file is missing."""
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"data set {data_dir} has no split {split!r} (it has {sorted(manifest['splits'])}); "
                        f"rebuild it with a {split!r} split or set data.path to another data set")
    shards = {str(Path(data_dir) / s["file"]): s for s in manifest["splits"][split]["shards"]}
    if not shards:
        raise DataError(f"split {split!r} of {data_dir}/{MANIFEST} lists no shards; rebuild the data set")
    missing = [p for p in shards if local and not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in {data_dir}/{MANIFEST} are missing, e.g. {missing[0]}; "
                        "rebuild the data set")
    return shards


def shard_paths(data_dir: str | Path, split: str) -> list[str]:
    return list(split_shards(data_dir, split))


def shard_counts(data_dir: str | Path, split: str) -> dict[str, int]:
    """Samples per shard path of `split`, as the manifest lists them."""
    return {p: s["samples"] for p, s in split_shards(data_dir, split).items() if "samples" in s}


_URL_SAFE_NAME = re.compile(r"[A-Za-z0-9._/-]+")


def shard_url(template: str, name: str) -> str:
    """Where a shard of the manifest is read from with data.shards_url: the template with {shard} replaced by the
    shard's file name (quoted for the shell in a pipe: command). Names with other characters than letters,
    digits and ._/- are refused: they come from a file."""
    if not _URL_SAFE_NAME.fullmatch(name):
        raise UnsafePath(f"shard file name {name!r} has characters that data.shards_url cannot carry safely "
                         "(letters, digits and ._/- only); rename the shards or read them from data.path")
    return template.replace("{shard}", shlex.quote(name) if template.startswith("pipe:") else name)


def split_locations(data_dir: str | Path, split: str, url_template: str = "") -> dict[str, dict]:
    """{where the shard is read from: its manifest entry} of `split`: its path in data_dir, or (url_template) its
    URL, the local files then not required."""
    shards = split_shards(data_dir, split, local=not url_template)
    if not url_template:
        return shards
    return {shard_url(url_template, s["file"]): s for s in shards.values()}


_VERIFIED: set[tuple] = set()  # (path, size, mtime, ctime, inode) of every shard this process has verified


@dataclass(frozen=True)
class ShardChecksums:
    """The sha256 a manifest records for each shard. check(shard) hashes a shard the first time this process
    opens it, and again when its size, times or inode changed (replaced), so the check costs one hash per shard
    per process."""

    manifest: str
    sha256: dict[str, Optional[str]]

    @classmethod
    def of(cls, data_dir: str | Path, split: str, url_template: str = "") -> "ShardChecksums":
        shards = split_locations(data_dir, split, url_template)
        return cls(str(Path(data_dir) / MANIFEST), {p: s.get("sha256") for p, s in shards.items()})

    def check(self, shard: str) -> None:
        st = os.stat(shard)
        key = (os.path.abspath(shard), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key in _VERIFIED:
            return
        self.check_digest(shard, self._expected(shard) and sha256_file(Path(shard)))
        _VERIFIED.add(key)

    def _expected(self, shard: str) -> str:
        expected = self.sha256.get(shard)
        if expected is None:
            raise DataError(f"{self.manifest} records no sha256 for shard {shard}; rebuild the data set, or set "
                            "data.verify_shards=false to read it unverified")
        return expected

    def check_digest(self, shard: str, digest: str) -> None:
        """DataError unless `digest` is the sha256 the manifest records for the shard."""
        if digest != self._expected(shard):
            raise DataError(f"shard {shard} does not match the sha256 that {self.manifest} records for it (it was "
                            "replaced or changed); rebuild the data set or restore the shard")


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
