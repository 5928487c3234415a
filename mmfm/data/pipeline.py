"""Offline data construction: `mmfm data build <recipe.yaml>` (example recipes: `data_pipeline/` in the repository).

A recipe (YAML) names its sources, an ordered list of stages and the output:

    name: my-set
    sources:                       # mmfm.data.sources: image_folder | jsonl | llava | tar | text
      - {type: jsonl, path: captions.jsonl, name: web, license: CC-BY-4.0}
    stages:                        # run in this order
      - {filter: decode}           # mmfm.data.filters: decode, min_image_size, aspect_ratio, text_length, language
      - {pii: mask}                # mmfm.data.pii: keep | mask | drop
      - {dedup: exact}             # mmfm.data.dedup: exact, image_near, text_near
    output:                        # these keys only (others are refused)
      format: webdataset           # or `indexed`: Megatron .bin/.idx of token ids (text-only corpora)
      split: train
      shard_bytes: 100000000       # target tar size
      tokenizer: {vocab_size: 512} # train one on the kept (train) texts, or {file: tokenizer.json}
      val_fraction: 0.01           # or val_count: 1000; also write a val split (mmfm.data.splits), by a hash of
                                   # each sample's source name and key; neither: one split

Paths are relative to the recipe file. `output.split` and `output.prefix` (default: the split) are plain
file-name stems: the output stays inside `--out`. Values may refer to other keys of the recipe
(`${output.split}`) but call no resolver (`${oc.env:...}` is refused: recipe values go into the manifest).

Records stream from the sources in order; the per-record stages before the first dedup run in `workers`
processes (order kept), the rest in the main process, so a build is deterministic: the same recipe and
inputs give byte-identical shards. Every record dropped anywhere is counted by stage and reason in
`manifest.json`, which also holds per-split and per-shard counts, bytes and sha256, the samples and licence of
each source, the PII counts (stages in recipe order), the recipe and the tool version. The manifest is written
last; a build that keeps no record, or leaves a split empty, is refused (RecipeError) and removes what it wrote.

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
from mmfm.data.splits import SPOOL, VAL, SplitRule, ValSpool, pick_val, split_hash

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
        """The caption, every turn and the source metadata's string values, de-identified together."""
        values = [str(t.get("value", "")) for t in record.conversations or []]
        extra = source_meta(record.meta)
        new, counts, drop = deidentify_record_texts([record.text] + values + _strings(extra), self.level)
        if drop:
            return Dropped(record.key, record.source, self.name, "pii", ", ".join(sorted(counts)))
        text, values, meta_values = new[0], new[1:1 + len(values)], new[1 + len(values):]
        turns = None if record.conversations is None else [
            {**turn, "value": value} for turn, value in zip(record.conversations, values)]
        meta = {**record.meta, **_with_strings(extra, iter(meta_values)), "pii": counts}
        return replace(record, text=text, conversations=turns, meta=meta)


STAGE_META = ("pii", "image_sizes")  # what stages add to Record.meta; the rest is the source's own metadata


def source_meta(meta: dict) -> dict:
    """A record's metadata as its source read it (img2dataset's url, width, ...; a sidecar's other fields)."""
    return {k: v for k, v in meta.items() if k not in STAGE_META}


def _strings(node) -> list[str]:
    """The string values in a JSON value, depth first (keys are not values)."""
    if isinstance(node, str):
        return [node]
    items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for item in items for s in _strings(item)]


def _with_strings(node, values: Iterator[str]):
    """node with its string values replaced, in _strings order, by the next of `values`."""
    if isinstance(node, str):
        return next(values)
    if isinstance(node, dict):
        return {k: _with_strings(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_strings(v, values) for v in node]
    return node


def build_stage(spec: dict) -> Callable[[Record], Outcome]:
    spec = dict(spec)
    kinds = [k for k in ("filter", "dedup", "pii") if k in spec]
    if len(kinds) != 1:
        raise RecipeError(f"stage {spec} must have exactly one of filter:, dedup:, pii:")
    kind = kinds[0]
    value = spec.pop(kind)
    if kind != "pii" and not isinstance(value, str):
        raise RecipeError(f"stage {kind}: {value!r} is not a {kind} name; write e.g. {{{kind}: "
                          f"{'decode' if kind == 'filter' else 'exact'}}} (docs/data.md lists the stages)")
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

OUTPUT_KEYS = ("format", "split", "prefix", "shard_bytes", "tokenizer", "val_fraction", "val_count")
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
        names = [spec.get("name") for spec in self.sources]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise RecipeError(f"recipe {path}: source name(s) {twice} used more than once; give each source its own "
                              "name (it is part of each sample's identity and of the manifest's per-source counts)")
        if not isinstance(self.output, dict):
            raise RecipeError(f"recipe {path}: output must be a mapping (format:, split:, ...)")
        unknown = sorted(set(self.output) - set(OUTPUT_KEYS), key=str)
        if unknown:
            raise RecipeError(f"recipe {path}: unknown output key(s) {unknown}; known: {', '.join(OUTPUT_KEYS)}")
        for key in ("split", "prefix"):  # parts of the output file names
            value = self.output.get(key, "train")
            if not isinstance(value, str) or not FILE_STEM.fullmatch(value):
                raise RecipeError(f"recipe {path}: output.{key}={value!r} is not a plain file-name stem (letters, "
                                  f"digits, '.', '_', '-'; no path or command); e.g. output.{key}: train")
        split_rule(self.output, f"recipe {path}")

    def names(self) -> tuple[str, str, str]:
        """(the main split, its file prefix, the val split's file prefix)."""
        split = self.output.get("split", "train")
        prefix = self.output.get("prefix", split)
        return split, prefix, VAL if prefix == split else f"{prefix}-{VAL}"

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


def split_rule(output: dict, where: str = "recipe") -> Optional[SplitRule]:
    """output.val_fraction / output.val_count as a SplitRule (None: one split, as before); RecipeError when invalid."""
    fraction, count = output.get("val_fraction"), output.get("val_count")
    if fraction is not None and count is not None:
        raise RecipeError(f"{where}: output.val_fraction and output.val_count are mutually exclusive; set one of them")
    if fraction is None and count is None:
        return None
    if output.get("split", "train") == VAL:
        raise RecipeError(f"{where}: output.split=val is the name of the held-out split that output.val_fraction / "
                          "val_count make; name the main split otherwise, e.g. output.split: train")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise RecipeError(f"{where}: output.val_fraction={fraction!r} must be a number strictly between 0 and 1, "
                              "e.g. output.val_fraction: 0.01")
        return SplitRule(fraction=float(fraction))
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RecipeError(f"{where}: output.val_count={count!r} must be a whole number >= 1, e.g. output.val_count: "
                          "1000")
    return SplitRule(count=count)


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


def encode_sample(record: Record) -> dict:
    """A webdataset sample the training loader reads: images as 0.png, 1.jpg, ... and a json member with the
    source's own metadata under "meta"; the writer gives it its __key__ (its index in the split)."""
    meta = {"caption": record.text, "source": record.source, "license": record.license, "key": record.key}
    if record.conversations is not None:
        meta["conversations"] = record.conversations
    if record.meta.get("pii"):
        meta["pii"] = record.meta["pii"]
    if source_meta(record.meta):
        meta["meta"] = source_meta(record.meta)
    sample = {"json": json.dumps(meta, sort_keys=True).encode()}
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

    @property
    def total(self) -> int:
        """Samples written, in finished shards and the open one."""
        return sum(s["samples"] for s in self.shards) + (self.count if self.writer is not None else 0)

    def write(self, sample: dict) -> bool:
        """Write one sample as the split's next __key__ (000000000, 000000001, ...); True when this closed a shard."""
        key = f"{self.total:09d}"
        if self.writer is None:
            self.writer = wds.TarWriter(str(self.current) + ".partial", encoder=False, mtime=0.0)
            self.count = self.bytes = 0
        self.writer.write({"__key__": key, **sample})
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
    val_spool: int = 0  # bytes of the val spool that belong to this state (output.val_fraction / val_count)

    def to_json(self) -> dict:
        return {"consumed": self.consumed, "written": self.written, "shards": self.shards,
                "dropped": {k: dict(v) for k, v in self.dropped.items()}, "sources": dict(self.sources),
                "pii": dict(self.pii), "dedup": self.dedup, "val_spool": self.val_spool}

    @classmethod
    def from_json(cls, d: dict) -> "BuildState":
        s = cls(d["consumed"], d["written"], d["shards"])
        for stage, reasons in d["dropped"].items():
            s.dropped[stage].update(reasons)
        s.sources.update(d["sources"])
        s.pii.update(d["pii"])
        s.dedup = d["dedup"]
        s.val_spool = d.get("val_spool", 0)
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


class KeptShards:
    """The webdataset output of kept records: the main split's shards, and with output.val_fraction / val_count the
    val samples, spooled while the build streams and written as val shards at the end (mmfm.data.splits)."""

    def __init__(self, out: Path, recipe: Recipe, state: BuildState):
        self.split, prefix, self.val_prefix = recipe.names()
        self.out, self.shard_bytes = out, int(recipe.output.get("shard_bytes", 100_000_000))
        self.rule = split_rule(recipe.output)
        self.train = ShardWriter(out, prefix, self.shard_bytes, state.shards)
        self.spool = ValSpool(out / SPOOL, self.rule.count, state.val_spool) if self.rule else None

    def add(self, record: Record) -> bool:
        """True when this closed a shard of the main split (then the build state is saved)."""
        sample = encode_sample(record)
        if self.rule is None:
            return self.train.write(sample)
        h = split_hash(record.source, record.group or record.key)
        if self.rule.fraction is not None and not self.rule.is_val(h):
            return self.train.write(sample)
        back = self.spool.add(h, sample)  # val_count: a sample pushed out of val goes to train
        return back is not None and self.train.write(back)

    def save(self, state: BuildState) -> None:
        if self.spool is not None:
            self.spool.flush()
            state.val_spool = self.spool.size

    def end(self) -> dict[str, int]:
        """The stream is done: the main split's last shard closed; samples per split."""
        self.train.close()
        return {self.split: self.train.total, **({VAL: len(self.spool)} if self.spool is not None else {})}

    def finish(self) -> dict:
        """The manifest's splits: the main split's shards, and the val shards written from the spool."""
        splits = {self.split: {"samples": self.train.total, "shards": self.train.shards}}
        if self.spool is not None:
            val = ShardWriter(self.out, self.val_prefix, self.shard_bytes, [])
            for sample in self.spool.samples():
                val.write(sample)
            val.close()
            splits[VAL] = {"samples": val.total, "shards": val.shards}
        return splits

    def close(self, remove: bool = False) -> None:
        """Close the spool (remove: delete it too, once the manifest is written)."""
        if self.spool is not None:
            self.spool.close(remove)

    def discard(self) -> None:
        """Remove what the build wrote (it will not become a data set)."""
        self.close(remove=True)
        for shard in self.train.shards:
            (self.out / shard["file"]).unlink(missing_ok=True)


class KeptTexts:
    """The indexed output's kept documents, held until the end; with a split rule, their hashes too."""

    def __init__(self, recipe: Recipe):
        self.split, self.prefix, self.val_prefix = recipe.names()
        self.rule = split_rule(recipe.output)
        self.texts: list[str] = []
        self.hashes: list[int] = []
        self.splits: dict[str, list[str]] = {}

    def add(self, record: Record) -> bool:
        self.texts.append(record.text)
        if self.rule is not None:
            self.hashes.append(split_hash(record.source, record.group or record.key))
        return False

    def save(self, state: BuildState) -> None:
        pass

    def end(self) -> dict[str, int]:
        """The stream is done: the documents split ({split: its documents in stream order}); documents per split."""
        if self.rule is None:
            self.splits = {self.split: self.texts}
        else:
            val = pick_val(self.hashes, self.rule)
            self.splits = {self.split: [t for i, t in enumerate(self.texts) if i not in val],
                           VAL: [t for i, t in enumerate(self.texts) if i in val]}
        return {k: len(v) for k, v in self.splits.items()}

    def close(self, remove: bool = False) -> None:
        pass

    def discard(self) -> None:
        pass


def build(recipe_path: str | Path, out: str | Path, workers: int = 1, progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Build the recipe into `out`; returns the manifest. stop_after: records to process before stopping
    as if interrupted (tests)."""
    from mmfm import __version__

    recipe = Recipe.load(recipe_path)
    specs = recipe.source_specs()
    for spec in specs:
        build_source(spec)  # validates every source before any work
    fmt = _check_output(recipe)
    labels = stage_labels(recipe.stages)
    build_stages(recipe.stages, labels)  # validates every stage
    out = Path(out)
    fingerprint = input_fingerprint(specs)
    if (out / mf.MANIFEST).is_file():
        existing = json.loads((out / mf.MANIFEST).read_text())
        if existing.get("recipe_sha256") == recipe.digest() and existing.get("inputs_sha256") == fingerprint:
            log.info("%s is already built from this recipe and these inputs: nothing to do", out)
            return existing
        raise RecipeError(f"{out} holds a data set built from another recipe or other inputs; choose another "
                          "output folder or delete it")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, recipe.digest(), fingerprint)
    for stale in out.glob("*.partial"):
        stale.unlink()
    sink = KeptShards(out, recipe, state) if fmt == "webdataset" else KeptTexts(recipe)
    try:
        _run(recipe, specs, labels, out, fingerprint, state, sink, workers, progress, stop_after)
        counts = sink.end()
    except BaseException:  # interrupted: resumable from the saved state
        sink.close()
        raise
    try:
        _check_kept(state, counts, split_rule(recipe.output))
    except RecipeError:
        _abandon(out, sink, created)
        raise
    return _finish(out, recipe, fingerprint, state, sink, __version__)


def _check_output(recipe: Recipe) -> str:
    """The output format, checked with the tokenizer it needs before any work."""
    o = recipe.output
    fmt = o.get("format", "webdataset")
    if fmt not in ("webdataset", "indexed"):
        raise RecipeError(f"output.format={fmt!r} is unknown; use webdataset or indexed")
    spec = o.get("tokenizer")
    if fmt == "indexed" and not spec:
        raise RecipeError("output.format=indexed needs output.tokenizer ({file: ...} or {vocab_size: N})")
    if isinstance(spec, dict) and "file" in spec and not _tokenizer_source(spec, recipe.base).exists():
        raise RecipeError(f"output.tokenizer.file {_tokenizer_source(spec, recipe.base)} does not exist")
    return fmt


def _run(recipe: Recipe, specs: list[dict], labels: list[str], out: Path, fingerprint: str, state: BuildState,
         sink, workers: int, progress: bool, stop_after: Optional[int]) -> None:
    """The records after state.consumed through the stages into the sink, the state saved at every closed shard."""
    from tqdm import tqdm

    parallel_specs, serial_specs = _split_stages(list(recipe.stages))
    n_parallel = len(parallel_specs)
    serial = build_stages(serial_specs, labels[n_parallel:])
    for stage, saved in zip([s for _, s in serial if is_stateful(s)], state.dedup):
        stage.load_state_dict(saved)
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
                if sink.add(outcome):
                    sink.save(state)
                    _save_state(out, recipe, fingerprint, state, serial)
                if stop_after is not None and state.consumed >= stop_after:
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


# What to do when every record was dropped for this reason (the most frequent one).
NOTHING_KEPT_FIX = {
    "missing_image": "the image paths lead to no file: jsonl paths are relative to the JSONL file, llava paths to "
                     "the source's image_root (default: the JSON's folder); fix the paths or set the source's "
                     "image_root",
    "unsafe_path": "the image paths leave the source's image_root: set image_root to a folder that holds the "
                   "images (and, for jsonl, the JSONL file)",
    "no_caption": "the samples carry no caption: give each image a .txt/.json sidecar, or set the jsonl source's "
                  "text_field",
    "empty_caption": "the captions are empty: check the caption files or the jsonl text_field",
    "corrupt_image": "the images do not decode: check the image files",
    "language": "filter language's allowed list excludes them: add their languages to allowed",
    "empty_text": "the texts are empty: check the sources' text fields",
    "text_too_short": "lower filter text_length's min_chars / min_words",
    "text_too_long": "raise filter text_length's max_chars / max_words",
    "image_too_small": "lower filter min_image_size's min_side",
    "aspect_ratio": "raise filter aspect_ratio's max_ratio",
    "pii": "pii: drop dropped every record; use pii: mask",
}


def _nothing_kept(state: BuildState) -> RecipeError:
    drops = Counter({f"{stage}/{reason}": n for stage, reasons in state.dropped.items()
                     for reason, n in reasons.items()})
    if not drops:
        return RecipeError("the sources yielded no records; check the sources' paths (and a text source's mode)")
    top = drops.most_common(3)
    fix = NOTHING_KEPT_FIX.get(top[0][0].split("/", 1)[1],
                               "loosen the stage that drops them (docs/data.md lists the stages and their parameters)")
    return RecipeError(f"the build kept none of the {state.consumed} records read (dropped: "
                       f"{', '.join(f'{k} {n}' for k, n in top)}); {fix}; no data set was written")


def _check_kept(state: BuildState, counts: dict[str, int], rule: Optional[SplitRule]) -> None:
    """RecipeError unless some record was kept and every split holds samples."""
    if state.written == 0:
        raise _nothing_kept(state)
    empty = [split for split, n in counts.items() if n == 0]
    if not empty:
        return
    if empty == [VAL]:
        fix = (f"raise output.val_fraction (to {2 / state.written:.2g} or more) or set output.val_count instead"
               if rule.fraction is not None else "raise output.val_count")
    elif rule.count is not None:
        fix = f"set output.val_count below {state.written} or use output.val_fraction"
    else:
        fix = "lower output.val_fraction"
    raise RecipeError(f"{rule.describe()} leaves the {empty[0]} split empty ({state.written} samples kept: "
                      f"{', '.join(f'{k} {n}' for k, n in counts.items())}); {fix}; no data set was written")


def _abandon(out: Path, sink, created: bool) -> None:
    """A build that will not become a data set leaves nothing behind: its shards, spool and state are removed."""
    sink.discard()
    (out / STATE).unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


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
        if tar.name not in keep:  # written after the last saved state (val shards: at the end): redone
            tar.unlink()
    log.info("resuming the build in %s after %d input records (%d shards)", out, state.consumed, len(state.shards))
    return state


def _save_state(out: Path, recipe: Recipe, fingerprint: str, state: BuildState, serial: list) -> None:
    state.dedup = [s.state_dict() for _, s in serial if is_stateful(s)]
    mf.write_json_atomic(out / STATE, {"recipe_sha256": recipe.digest(), "inputs_sha256": fingerprint,
                                       "state": state.to_json()})


def source_summary(spec: dict) -> dict:
    """What a source adds to its manifest entry (a robot data set: its statistics), recomputed from its input."""
    source = build_source(spec)
    return source.summary() if hasattr(source, "summary") else {}


def _finish(out: Path, recipe: Recipe, fingerprint: str, state: BuildState, sink, version: str) -> dict:
    """Val shards, tokenizer and indexed files, then the manifest (last, atomically: a folder without one is no data
    set), then the build state is removed."""
    tokenizer_spec = recipe.output.get("tokenizer")
    manifest = {
        "format": mf.FORMAT if isinstance(sink, KeptShards) else "mmfm-indexed/1", "generator": "mmfm data build",
        "mmfm_version": version, "recipe": recipe.to_dict(), "recipe_sha256": recipe.digest(),
        "inputs_sha256": fingerprint, "records_read": state.consumed,
        "stages": _stage_report(recipe, state), "pii": dict(state.pii),
        "sources": {s["name"]: {"samples": state.sources.get(s["name"], 0), "license": s.get("license", ""),
                                "type": s.get("type"), **source_summary(s)} for s in recipe.source_specs()},
    }
    if isinstance(sink, KeptShards):
        manifest["splits"] = sink.finish()
        if tokenizer_spec:
            texts = _shard_texts(out, manifest["splits"][sink.split]["shards"])
            manifest["tokenizer"] = _tokenizer(out, tokenizer_spec, texts, recipe.base)
    else:
        texts = sink.splits
        manifest["tokenizer"] = _tokenizer(out, tokenizer_spec, texts[sink.split], recipe.base)
        manifest["indexed"] = write_indexed(out, sink.prefix, texts[sink.split], out / mf.TOKENIZER)
        if VAL in texts:
            manifest["indexed_val"] = write_indexed(out, sink.val_prefix, texts[VAL], out / mf.TOKENIZER)
    mf.write_json_atomic(out / mf.MANIFEST, _manifest_order(manifest), sort_keys=False)
    (out / STATE).unlink(missing_ok=True)
    sink.close(remove=True)  # the val spool: kept until now, as the saved state may still need it
    return manifest


def _sorted(node):
    """A JSON value with every object's keys sorted."""
    if isinstance(node, dict):
        return {k: _sorted(node[k]) for k in sorted(node)}
    if isinstance(node, list):
        return [_sorted(v) for v in node]
    return node


def _manifest_order(manifest: dict) -> dict:
    """The manifest as written: keys sorted, except `stages`, which stays in recipe order (read, ..., written)."""
    ordered = _sorted(manifest)
    ordered["stages"] = {label: _sorted(report) for label, report in manifest["stages"].items()}
    return ordered


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
        src = _tokenizer_source(spec, base)
        if not src.exists():
            raise RecipeError(f"output.tokenizer.file {src} does not exist")
        return install_tokenizer(src, out)
    train_tokenizer(texts, int(spec.get("vocab_size", 512))).save(str(target))
    vocab = json.loads(target.read_text())["model"]["vocab"]
    return {"file": mf.TOKENIZER, "vocab_size": len(vocab), "sha256": mf.sha256_file(target)}


def _tokenizer_source(spec: dict, base: Path) -> Path:
    return Path(spec["file"]) if os.path.isabs(spec["file"]) else base / spec["file"]


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

