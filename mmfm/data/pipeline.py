"""Offline data construction: `mmfm data build <recipe.yaml>` (example recipes: `data_pipeline/` in the repository).

A recipe (YAML) names its sources, an ordered list of stages and the output:

    name: my-set
    sources:                       # mmfm.data.sources: image_folder | jsonl | llava | tar | text
      - {type: jsonl, path: captions.jsonl, name: web, license: CC-BY-4.0}
    stages:                        # run in this order
      - {filter: decode}           # mmfm.data.filters: decode, min_image_size, aspect_ratio, text_length, language
      - {pii: mask}                # mmfm.data.pii: keep | mask | drop
      - {dedup: exact}             # mmfm.data.dedup: exact, image_near, text_near
    output:
      format: webdataset           # or `indexed`: Megatron .bin/.idx of token ids (text-only corpora)
      split: train
      shard_bytes: 100000000       # target tar size
      tokenizer: {vocab_size: 512} # train one on the kept texts, or {file: tokenizer.json}

Paths are relative to the recipe file. `output.split` and `output.prefix` (default: the split) are plain
file-name stems: the output stays inside `--out`. Values may refer to other keys of the recipe
(`${output.split}`) but call no resolver (`${oc.env:...}` is refused: recipe values go into the manifest).

Records stream from the sources in order; the per-record stages before the first dedup run in `workers`
processes (order kept), the rest in the main process, so a build is deterministic: the same recipe and
inputs give byte-identical shards. Every record dropped anywhere is counted by stage and reason in
`manifest.json`, which also holds per-shard counts, bytes and sha256, the samples and licence of each
source, the PII counts, the recipe and the tool version.

Resumable: after each finished shard the position in the input stream, the dedup state and the counts are
saved (`.build_state.json`); an interrupted build restarts from there. A finished build with the same
recipe and inputs is not redone.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import webdataset as wds
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from mmfm.data import manifest as mf
from mmfm.data.dedup import build_dedup
from mmfm.data.filters import build_filter
from mmfm.data.pii import LEVELS, deidentify_record_texts
from mmfm.data.records import Dropped, Outcome, Record
from mmfm.data.sources import build_source

log = logging.getLogger(__name__)

STATE = ".build_state.json"
CHUNK = 64  # records per task sent to a worker


class RecipeError(mf.DataError, ValueError):
    """A recipe that cannot be built; the message names the field and the fix."""


# -- stages ----------------------------------------------------------------------------------------------


class PiiStage:
    """De-identify the caption / document and every conversation turn at `level` (keep, mask, drop)."""

    name = "pii"

    def __init__(self, level: str):
        if level not in LEVELS:
            raise RecipeError(f"pii level {level!r} is unknown; use one of {LEVELS}")
        self.level = level

    def __call__(self, record: Record) -> Outcome:
        texts = [record.text] + [str(t.get("value", "")) for t in record.conversations or []]
        new, counts, drop = deidentify_record_texts(texts, self.level)
        if drop:
            return Dropped(record.key, record.source, self.name, "pii", ", ".join(sorted(counts)))
        turns = None if record.conversations is None else [
            {**turn, "value": value} for turn, value in zip(record.conversations, new[1:])]
        return replace(record, text=new[0], conversations=turns, meta={**record.meta, "pii": counts})


def build_stage(spec: dict) -> Callable[[Record], Outcome]:
    spec = dict(spec)
    kinds = [k for k in ("filter", "dedup", "pii") if k in spec]
    if len(kinds) != 1:
        raise RecipeError(f"stage {spec} must have exactly one of filter:, dedup:, pii:")
    kind = kinds[0]
    value = spec.pop(kind)
    try:
        if kind == "pii":
            return PiiStage(value)
        return (build_filter if kind == "filter" else build_dedup)(value, **spec)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:  # unknown name, unknown or bad parameter
        raise RecipeError(f"stage {kind}: {value}: {exc}; see docs/data.md for the stages and their "
                          "parameters") from None


def stage_labels(specs: list[dict]) -> list[str]:
    """The manifest's name of each stage: the filter's name, `pii`, `dedup_<kind>`; repeats get `_<index>`."""
    labels = []
    for i, spec in enumerate(specs):
        label = f"dedup_{spec['dedup']}" if "dedup" in spec else ("pii" if "pii" in spec else str(spec.get("filter")))
        labels.append(label if label not in labels else f"{label}_{i}")
    return labels


def build_stages(specs: list[dict], labels: list[str]) -> list[tuple[str, Callable[[Record], Outcome]]]:
    return [(label, build_stage(spec)) for label, spec in zip(labels, specs)]


def is_stateful(stage) -> bool:
    return hasattr(stage, "state_dict")


def run_stages(stages: list[tuple[str, Callable]], record: Record) -> Outcome:
    """The record through (label, stage) pairs; a Dropped carries the label of the stage that dropped it."""
    for label, stage in stages:
        record = stage(record)
        if isinstance(record, Dropped):
            return replace(record, stage=label)
    return record


_WORKER_STAGES: list = []


def _init_worker(stage_specs: list[dict], labels: list[str]) -> None:
    global _WORKER_STAGES
    _WORKER_STAGES = build_stages(stage_specs, labels)


def _run_chunk(chunk: list[Outcome]) -> list[Outcome]:
    return [r if isinstance(r, Dropped) else run_stages(_WORKER_STAGES, r) for r in chunk]


# -- the recipe ------------------------------------------------------------------------------------------

FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")  # ${name:...}, e.g. ${oc.env:HOME}


def _read_recipe(path: Path) -> dict:
    """The recipe's YAML as a dict, its ${key} references resolved; RecipeError for bad YAML and for resolvers
    such as ${oc.env:...} (a recipe's values end up in the manifest: no environment or code goes there)."""
    try:
        conf = OmegaConf.load(path)
        if not isinstance(OmegaConf.to_container(conf), dict):
            raise RecipeError(f"recipe {path} is not a mapping; it holds name:, sources:, stages:, output:")
        _refuse_resolvers(path, OmegaConf.to_container(conf, resolve=False), "")
        return OmegaConf.to_container(conf, resolve=True)
    except (YAMLError, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"recipe {path} cannot be read ({first}); fix the YAML") from None


def _refuse_resolvers(path: Path, node, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_resolvers(path, value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_resolvers(path, value, f"{where}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        raise RecipeError(f"recipe {path}: {where}={node!r} calls a resolver; recipes may refer to their own keys "
                          "(${key}) but not read the environment or run resolvers (${oc.env:...}): write the "
                          "value into the recipe")


@dataclass
class Recipe:
    name: str
    sources: list[dict]
    stages: list[dict] = field(default_factory=list)
    output: dict = field(default_factory=dict)
    base: Path = Path(".")

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist; pass the path of a recipe YAML file")
        raw = _read_recipe(path)
        unknown = set(raw) - {"name", "sources", "stages", "output"}
        if unknown:
            raise RecipeError(f"recipe {path}: unknown keys {sorted(unknown)}; use name, sources, stages, output")
        if not raw.get("sources"):
            raise RecipeError(f"recipe {path} lists no sources")
        recipe = cls(raw.get("name", path.stem), raw["sources"], raw.get("stages") or [], raw.get("output") or {},
                     path.parent.resolve())
        recipe.check_shapes(path)
        return recipe

    def check_shapes(self, path: Path) -> None:
        """sources and stages: lists of mappings; output: a mapping whose file-name parts are plain stems."""
        for key in ("sources", "stages"):
            items = getattr(self, key)
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise RecipeError(f"recipe {path}: {key} must be a list of mappings ({{type: ..., ...}})")
        if not isinstance(self.output, dict):
            raise RecipeError(f"recipe {path}: output must be a mapping (format:, split:, ...)")
        for key in ("split", "prefix"):  # parts of the output file names
            value = self.output.get(key, "train")
            if not isinstance(value, str) or not FILE_STEM.fullmatch(value):
                raise RecipeError(f"recipe {path}: output.{key}={value!r} is not a plain file-name stem (letters, "
                                  f"digits, '.', '_', '-'; no path or command); e.g. output.{key}: train")

    def source_specs(self) -> list[dict]:
        specs = []
        for spec in self.sources:
            spec = dict(spec)
            for key in ("path", "tokenizer", "image_root"):  # the file parameters of sources
                if spec.get(key) and not os.path.isabs(spec[key]):
                    spec[key] = str(self.base / spec[key])
            specs.append(spec)
        return specs

    def to_dict(self) -> dict:
        return {"name": self.name, "sources": self.sources, "stages": self.stages, "output": self.output}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def input_fingerprint(specs: list[dict]) -> str:
    """sha256 over every input file's path, size and mtime (cheap; a changed input means a new build)."""
    h = hashlib.sha256()
    for spec in specs:
        root = Path(spec["path"])
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:  # a file, or a prefix / glob (tar shards, indexed datasets)
            files = [root] if root.is_file() else sorted(Path(p) for p in glob.glob(str(root) + "*"))
        for p in files:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- output ----------------------------------------------------------------------------------------------


def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def encode_sample(record: Record, index: int) -> dict:
    """A webdataset sample the training loader reads: images as 0.png, 1.jpg, ... and a json member."""
    meta = {"caption": record.text, "source": record.source, "license": record.license, "key": record.key}
    if record.conversations is not None:
        meta["conversations"] = record.conversations
    if record.meta.get("pii"):
        meta["pii"] = record.meta["pii"]
    sample = {"__key__": f"{index:09d}", "json": json.dumps(meta, sort_keys=True).encode()}
    for i, data in enumerate(record.images):
        sample[f"{i}.{_image_ext(data)}"] = data
    return sample


class ShardWriter:
    """Tar shards of about `shard_bytes`, written under a temporary name and renamed when complete."""

    def __init__(self, out: Path, prefix: str, shard_bytes: int, shards: list[dict]):
        self.out, self.prefix, self.shard_bytes = out, prefix, shard_bytes
        self.shards = shards  # finished ones (resumed builds start with theirs)
        self.writer, self.count, self.bytes = None, 0, 0

    @property
    def current(self) -> Path:
        return self.out / f"{self.prefix}-{len(self.shards):06d}.tar"

    def write(self, sample: dict) -> bool:
        """Write one sample; True when this closed a shard."""
        if self.writer is None:
            self.writer = wds.TarWriter(str(self.current) + ".partial", encoder=False, mtime=0.0)
            self.count = self.bytes = 0
        self.writer.write(sample)
        self.count += 1
        self.bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self.bytes >= self.shard_bytes:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.current
        os.replace(str(path) + ".partial", path)
        self.shards.append({"file": path.name, "samples": self.count, "bytes": path.stat().st_size,
                            "sha256": mf.sha256_file(path)})
        self.writer = None


# -- the build -------------------------------------------------------------------------------------------


@dataclass
class BuildState:
    consumed: int = 0  # records of the input stream fully accounted for
    written: int = 0
    shards: list = field(default_factory=list)
    dropped: dict = field(default_factory=lambda: defaultdict(Counter))  # stage -> reason -> n
    sources: dict = field(default_factory=Counter)  # source -> samples written
    pii: dict = field(default_factory=Counter)
    dedup: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"consumed": self.consumed, "written": self.written, "shards": self.shards,
                "dropped": {k: dict(v) for k, v in self.dropped.items()}, "sources": dict(self.sources),
                "pii": dict(self.pii), "dedup": self.dedup}

    @classmethod
    def from_json(cls, d: dict) -> "BuildState":
        s = cls(d["consumed"], d["written"], d["shards"])
        for stage, reasons in d["dropped"].items():
            s.dropped[stage].update(reasons)
        s.sources.update(d["sources"])
        s.pii.update(d["pii"])
        s.dedup = d["dedup"]
        return s


def _stream(specs: list[dict]) -> Iterator[Outcome]:
    for spec in specs:
        yield from build_source(spec)


def _split_stages(specs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per-record stages up to the first dedup (parallel), and the rest (main process, in order)."""
    for i, spec in enumerate(specs):
        if "dedup" in spec:
            return specs[:i], specs[i:]
    return specs, []


def build(recipe_path: str | Path, out: str | Path, workers: int = 1, progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Build the recipe into `out`; returns the manifest. stop_after: records to process before stopping
    as if interrupted (tests)."""
    from tqdm import tqdm

    from mmfm import __version__

    recipe = Recipe.load(recipe_path)
    specs = recipe.source_specs()
    for spec in specs:
        build_source(spec)  # validates every source before any work
    o = recipe.output
    fmt = o.get("format", "webdataset")
    if fmt not in ("webdataset", "indexed"):
        raise RecipeError(f"output.format={fmt!r} is unknown; use webdataset or indexed")
    stage_specs = list(recipe.stages)
    labels = stage_labels(stage_specs)
    parallel_specs, serial_specs = _split_stages(stage_specs)
    n_parallel = len(parallel_specs)
    build_stages(stage_specs, labels)  # validates every stage
    out = Path(out)
    fingerprint = input_fingerprint(specs)
    if (out / mf.MANIFEST).is_file():
        existing = json.loads((out / mf.MANIFEST).read_text())
        if existing.get("recipe_sha256") == recipe.digest() and existing.get("inputs_sha256") == fingerprint:
            log.info("%s is already built from this recipe and these inputs: nothing to do", out)
            return existing
        raise RecipeError(f"{out} holds a data set built from another recipe or other inputs; choose another "
                          "output folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, recipe.digest(), fingerprint)
    serial = build_stages(serial_specs, labels[n_parallel:])
    for stage, saved in zip([s for _, s in serial if is_stateful(s)], state.dedup):
        stage.load_state_dict(saved)
    for stale in out.glob("*.partial"):
        stale.unlink()
    split, prefix = o.get("split", "train"), o.get("prefix", o.get("split", "train"))
    writer = None
    if fmt == "webdataset":
        writer = ShardWriter(out, prefix, int(o.get("shard_bytes", 100_000_000)), state.shards)
    kept_texts: list[str] = []
    records = itertools.islice(_stream(specs), state.consumed, None)
    bar = tqdm(desc=f"building {recipe.name}", unit=" records", initial=state.consumed, disable=not progress)
    worker_args = (parallel_specs, labels[:n_parallel])
    pool = mp.get_context("spawn").Pool(workers, _init_worker, worker_args) if workers > 1 else None
    if pool is None:
        _init_worker(*worker_args)
    try:
        chunks = iter(lambda: list(itertools.islice(records, CHUNK)), [])
        results = pool.imap(_run_chunk, chunks) if pool else map(_run_chunk, chunks)
        for chunk in results:
            for outcome in chunk:
                if not isinstance(outcome, Dropped):
                    outcome = run_stages(serial, outcome)
                state.consumed += 1
                bar.update(1)
                if isinstance(outcome, Dropped):
                    state.dropped[outcome.stage][outcome.reason] += 1
                    log.debug("dropped %s/%s at %s: %s %s", outcome.source, outcome.key, outcome.stage,
                              outcome.reason, outcome.detail)
                    continue
                state.written += 1
                state.sources[outcome.source] += 1
                state.pii.update(outcome.meta.get("pii", {}))
                if writer is not None and writer.write(encode_sample(outcome, state.written - 1)):
                    _save_state(out, recipe, fingerprint, state, serial)
                elif writer is None:
                    kept_texts.append(outcome.text)
                if stop_after is not None and state.consumed >= stop_after:
                    raise KeyboardInterrupt
        if writer is not None:
            writer.close()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return _finish(out, recipe, fingerprint, state, writer, kept_texts, split, __version__)


def _load_state(out: Path, digest: str, fingerprint: str) -> BuildState:
    path = out / STATE
    if not path.is_file():
        return BuildState()
    saved = json.loads(path.read_text())
    if saved.get("recipe_sha256") != digest or saved.get("inputs_sha256") != fingerprint:
        raise RecipeError(f"{out} holds an unfinished build of another recipe or other inputs; delete {path} "
                          "(and its shards) or choose another output folder")
    state = BuildState.from_json(saved["state"])
    keep = {s["file"] for s in state.shards}
    for tar in out.glob("*.tar"):
        if tar.name not in keep:  # written after the last saved state: redone
            tar.unlink()
    log.info("resuming the build in %s after %d input records (%d shards)", out, state.consumed, len(state.shards))
    return state


def _save_state(out: Path, recipe: Recipe, fingerprint: str, state: BuildState, serial: list) -> None:
    state.dedup = [s.state_dict() for _, s in serial if is_stateful(s)]
    mf.write_json_atomic(out / STATE, {"recipe_sha256": recipe.digest(), "inputs_sha256": fingerprint,
                                       "state": state.to_json()})


def _finish(out: Path, recipe: Recipe, fingerprint: str, state: BuildState, writer: Optional[ShardWriter],
            kept_texts: list[str], split: str, version: str) -> dict:
    o = recipe.output
    manifest = {
        "format": mf.FORMAT if writer is not None else "mmfm-indexed/1", "generator": "mmfm data build",
        "mmfm_version": version, "recipe": recipe.to_dict(), "recipe_sha256": recipe.digest(),
        "inputs_sha256": fingerprint, "records_read": state.consumed,
        "stages": _stage_report(recipe, state), "pii": dict(state.pii),
        "sources": {s["name"]: {"samples": state.sources.get(s["name"], 0), "license": s.get("license", ""),
                                "type": s.get("type")} for s in recipe.sources},
    }
    tokenizer_spec = o.get("tokenizer")
    if writer is not None:
        manifest["splits"] = {split: {"samples": state.written, "shards": writer.shards}}
        if tokenizer_spec:
            manifest["tokenizer"] = _tokenizer(out, tokenizer_spec, _shard_texts(out, writer.shards), recipe.base)
    else:
        if not tokenizer_spec:
            raise RecipeError("output.format=indexed needs output.tokenizer ({file: ...} or {vocab_size: N})")
        manifest["tokenizer"] = _tokenizer(out, tokenizer_spec, kept_texts, recipe.base)
        manifest["indexed"] = write_indexed(out, o.get("prefix", split), kept_texts, out / mf.TOKENIZER)
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    return manifest


def _stage_report(recipe: Recipe, state: BuildState) -> dict:
    """Per stage, in recipe order: records kept and dropped by reason; `read`: what the sources could not use."""
    read_drops = dict(state.dropped.get("read", {}))
    report = {"read": {"kept": state.consumed - sum(read_drops.values()), "dropped": read_drops}}
    entering = report["read"]["kept"]
    for label in stage_labels(recipe.stages):
        dropped = dict(state.dropped.get(label, {}))
        report[label] = {"kept": entering - sum(dropped.values()), "dropped": dropped}
        entering = report[label]["kept"]
    report["written"] = state.written
    return report


def _shard_texts(out: Path, shards: list[dict]) -> Iterator[str]:
    for shard in shards:
        for sample in wds.WebDataset(str(out / shard["file"]), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            yield meta.get("caption", "")
            for turn in meta.get("conversations") or []:
                yield str(turn.get("value", ""))


def _tokenizer(out: Path, spec: dict, texts, base: Path) -> dict:
    """output.tokenizer: {file: tokenizer.json or a Hugging Face model folder} (copied; a pretrained one gets
    <image> when it lacks it) or {vocab_size: N} (trained on the kept texts)."""
    from mmfm.data.tokenizer import install_tokenizer, train_tokenizer

    target = out / mf.TOKENIZER
    if "file" in spec:
        src = Path(spec["file"]) if os.path.isabs(spec["file"]) else base / spec["file"]
        if not src.exists():
            raise RecipeError(f"output.tokenizer.file {src} does not exist")
        return install_tokenizer(src, out)
    train_tokenizer(texts, int(spec.get("vocab_size", 512))).save(str(target))
    vocab = json.loads(target.read_text())["model"]["vocab"]
    return {"file": mf.TOKENIZER, "vocab_size": len(vocab), "sha256": mf.sha256_file(target)}


def write_indexed(out: Path, prefix: str, texts: list[str], tokenizer_file: Path) -> dict:
    """Token ids of each document (+ eos) as a Megatron indexed dataset: `{prefix}.bin` / `{prefix}.idx`."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mmfm.data.tokenizer import TextTokenizer

    tok = TextTokenizer.load(tokenizer_file)
    builder = IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=np.int32)
    tokens = 0
    for text in texts:
        ids = tok.encode(text) + [tok.eos_id]
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(str(out / f"{prefix}.idx"))
    return {"prefix": prefix, "documents": len(texts), "tokens": tokens,
            "sha256": {ext: mf.sha256_file(out / f"{prefix}.{ext}") for ext in ("bin", "idx")}}

