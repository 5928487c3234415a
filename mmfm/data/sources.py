"""Sources for offline data construction (`mmfm data build <recipe>`): readers of existing data sets.

Each source is built from a recipe's parameters (`build_source`), carries the recipe's `name` and a
`license` tag, and iterates, in a deterministic order (sorted file lists), over `Record`s and, for input it
cannot use, `Dropped(stage="read", reason, detail)`. Bad input never raises out of the iterator. Image
bytes are read as stored, not decoded: decoding and validation are a later stage.

Reasons: "missing_image", "invalid_json", "empty_caption", "no_caption", "bad_conversation",
"truncated_tar", "unreadable_file", "unsafe_path" (an image path in a data file that is absolute, a URL or
command, or leads outside the source's image folder).

Formats:
- image_folder: images (jpg/jpeg/png/webp, recursive) each with a caption sidecar of the same stem:
  `.txt` (the caption) or `.json` ({"caption": ...} or {"text": ...}; other fields go to meta).
- jsonl: one JSON object per line, {"image": path | [paths] (optional), "text": ..., "id"/"key" (optional),
  ...}; paths relative to the JSONL file's folder, inside image_root; no image means a text-only record.
- llava: the LLaVA JSON list, [{"id", "image" (optional, path or [paths] under image_root),
  "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}, ...].
- tar: webdataset / img2dataset shards; members `<key>.<ext>` grouped by key; caption from "txt",
  "caption", or "json" ({"caption"} / {"text"}); images from `[N.]jpg|jpeg|png|webp`; "json"'s other fields are
  meta (img2dataset: url, key, status, width, height, original_width, original_height, exif, sha256, ...).
- text: UTF-8 `*.txt` files; one document per non-empty line, per file, or per paragraph.
- indexed: a Megatron indexed dataset (`<path>.bin/.idx`), documents decoded with its tokenizer.json.
- lerobot: a LeRobot robot data set, one record per frame with its state and action chunk (LeRobotSource).
"""

from __future__ import annotations

import glob
import inspect
import json
import lzma
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from braceexpand import braceexpand

from mmfm.data.manifest import MANIFEST, DataError, UnsafePath, contained
from mmfm.data.records import Dropped, Outcome, Record

READ = "read"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ROLES = ("human", "gpt", "system")
PLACEHOLDER = "<image>"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# what reading a damaged tar stream can raise (ReadError, "unexpected end of data", zlib, xz, EOF, OS errors)
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


class SourceError(DataError, ValueError):
    """A source that cannot be built: unknown type, missing path, bad parameter."""


class _Bad(Exception):
    """One input that cannot be used; becomes a Dropped(reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# ---- small helpers ---------------------------------------------------------------------------------------


def _existing(path: Union[str, Path], name: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"source {name!r}: path {str(path)!r} does not exist")
    return p


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    """root itself if a file, else its files ending in `suffixes` (any case), recursive, sorted, no dotfiles."""
    if root.is_file():
        return [root]
    found = [p for p in root.rglob("*") if p.name.lower().endswith(tuple(suffixes)) and p.is_file()
             and not _hidden(p.relative_to(root))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _doc_id(path: Path, root: Path) -> str:
    """The file's stem for a single-file source, else its relative path without extension."""
    if path == root:
        return path.stem
    return path.relative_to(root).with_suffix("").as_posix()


def _read_bytes(path: Path, missing: str = "missing_image") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Bad(missing, f"{path} does not exist") from None
    except OSError as exc:
        raise _Bad("unreadable_file", f"{path}: {exc}") from None


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Bad("unreadable_file", f"{where}: not UTF-8 ({exc})") from None


def _json_object(data: Union[bytes, str], where: str) -> dict:
    try:
        obj = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _Bad("invalid_json", f"{where}: {exc}") from None
    if not isinstance(obj, dict):
        raise _Bad("invalid_json", f"{where}: a JSON {type(obj).__name__}, expected an object")
    return obj


def _caption_field(obj: dict, fields: Sequence[str], where: str) -> Optional[str]:
    """The first of `fields` in obj (None if none is there or it is null); must be a string."""
    for f in fields:
        if obj.get(f) is not None:
            if not isinstance(obj[f], str):
                raise _Bad("invalid_json", f"{where}: {f!r} is a {type(obj[f]).__name__}, expected a string")
            return obj[f]
    return None


def _caption(text: Optional[str], where: str) -> str:
    if text is None:
        raise _Bad("no_caption", f"{where}: no caption")
    if not text.strip():
        raise _Bad("empty_caption", f"{where}: empty caption")
    return text.strip()


def _image_paths(value, base: Path, root: Path, where: str) -> list[Path]:
    """An image field (absent, a path, or a list of paths) as paths relative to `base`, each inside `root`
    (unsafe_path otherwise: a data file cannot point at other files)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise _Bad("invalid_json", f"{where}: image must be a path or a list of paths, got {value!r}")
    try:
        return [contained(base, v, root) for v in items]
    except UnsafePath as exc:
        raise _Bad("unsafe_path", f"{where}: image {exc}; image paths must be relative and stay inside "
                                  "the image folder (image_root)") from None


def _natural(text: str) -> list:
    """Sort key: "2.jpg" before "10.jpg"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


# ---- sources -----------------------------------------------------------------------------------------------


class Source:
    """Base: a named, licensed iterable of Record | Dropped."""

    def __init__(self, name: str, license: str = ""):
        if not name:
            raise SourceError(f"{type(self).__name__} needs a name (the recipe's source name)")
        self.name, self.license = name, license

    def __iter__(self) -> Iterator[Outcome]:
        raise NotImplementedError

    def _drop(self, key: str, bad: _Bad) -> Dropped:
        return Dropped(key=key, source=self.name, stage=READ, reason=bad.reason, detail=bad.detail)

    def _record(self, key: str, **fields) -> Record:
        return Record(key=key, source=self.name, license=self.license, **fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ImageFolderSource(Source):
    """Images (jpg/jpeg/png/webp, recursive, sorted) with a same-stem caption sidecar, `.txt` or `.json`.

    key: the image's path relative to the folder, without extension. Reasons: no_caption (no sidecar),
    empty_caption, invalid_json, unreadable_file.
    """

    def __init__(self, path, name: str, license: str = "", caption_ext: Sequence[str] = (".txt", ".json")):
        super().__init__(name, license)
        self.root = _existing(path, name)
        self.caption_ext = tuple(caption_ext)
        if not self.caption_ext or any(e not in (".txt", ".json") for e in self.caption_ext):
            raise SourceError(f"source {name!r}: caption_ext must be some of ('.txt', '.json'), got {caption_ext}")

    def __iter__(self) -> Iterator[Outcome]:
        for image in _files(self.root, tuple("." + e for e in IMAGE_EXTS)):
            key = _doc_id(image, self.root)
            try:
                yield self._read(image, key)
            except _Bad as bad:
                yield self._drop(key, bad)

    def _read(self, image: Path, key: str) -> Record:
        sidecars = [image.with_suffix(e) for e in self.caption_ext]
        sidecar = next((s for s in sidecars if s.is_file()), None)
        if sidecar is None:
            raise _Bad("no_caption", f"{image}: no {' or '.join(s.name for s in sidecars)}")
        data, meta = _read_bytes(sidecar, "no_caption"), {}
        if sidecar.suffix == ".json":
            meta = _json_object(data, str(sidecar))
            text = _caption_field(meta, ("caption", "text"), str(sidecar))
            meta = {k: v for k, v in meta.items() if k not in ("caption", "text")}
        else:
            text = _utf8(data, str(sidecar))
        return self._record(key, text=_caption(text, str(sidecar)), images=[_read_bytes(image)], meta=meta)


class JsonlSource(Source):
    """JSON Lines: {"image": path | [paths] (optional), "text": ..., "id"/"key" (optional), ...} per line.

    `path` is a .jsonl file or a folder of them (recursive, sorted). Image paths are relative to the JSONL
    file's folder and must stay inside image_root (default: the folder, or the file's folder); no image field
    means a text-only record. Blank lines are skipped. key: "id" or "key" if given, else "<file stem>:<line
    number>"; the other fields go to meta. Reasons: invalid_json (detail has the line), missing_image,
    unsafe_path, no_caption (no text field), empty_caption, unreadable_file.
    """

    def __init__(self, path, name: str, license: str = "", image_field: str = "image", text_field: str = "text",
                 image_root=None):
        super().__init__(name, license)
        self.root = _existing(path, name)
        self.image_field, self.text_field = image_field, text_field
        default_root = self.root if self.root.is_dir() else self.root.parent
        self.image_root = default_root if image_root is None else _existing(image_root, name)

    def __iter__(self) -> Iterator[Outcome]:
        for file in _files(self.root, (".jsonl",)):
            yield from self._read_file(file)

    def _read_file(self, file: Path) -> Iterator[Outcome]:
        doc = _doc_id(file, self.root)
        try:
            with open(file, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield self._line(file, f"{doc}:{line_no}", f"{file}:{line_no}", line)
        except OSError as exc:
            yield self._drop(doc, _Bad("unreadable_file", f"{file}: {exc}"))

    def _line(self, file: Path, key: str, where: str, line: bytes) -> Outcome:
        try:
            obj = _json_object(line, where)
            key = next((str(obj[k]) for k in ("id", "key") if obj.get(k) is not None), key)
            text = _caption(_caption_field(obj, (self.text_field,), where), where)
            paths = _image_paths(obj.get(self.image_field), file.parent, self.image_root, where)
            meta = {k: v for k, v in obj.items() if k not in (self.image_field, self.text_field)}
            return self._record(key, text=text, images=[_read_bytes(p) for p in paths], meta=meta)
        except _Bad as bad:
            return self._drop(key, bad)


class LlavaSource(Source):
    """The LLaVA instruction format: one JSON list of
    {"id", "image" (optional: a path or list of paths inside image_root, default the JSON's folder),
     "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}, ...], ...}.

    Record: conversations = the turns ({"from", "value"} only), text = "", images in order; key = "id",
    else "<file stem>:<index>"; other fields go to meta. The number of "<image>" placeholders must equal the
    number of images; with images and no placeholder, "<image>\\n" is prepended to the first human turn (as
    LLaVA does). Reasons: bad_conversation, missing_image, unsafe_path, invalid_json (the file, or an entry's
    image field), unreadable_file.
    """

    def __init__(self, path, name: str, license: str = "", image_root=None):
        super().__init__(name, license)
        self.path = _existing(path, name)
        if not self.path.is_file():
            raise SourceError(f"source {name!r}: {str(path)!r} is not a file (a LLaVA JSON list)")
        self.image_root = self.path.parent if image_root is None else _existing(image_root, name)

    def __iter__(self) -> Iterator[Outcome]:
        try:
            entries = json.loads(_read_bytes(self.path, "unreadable_file"))
            if not isinstance(entries, list):
                raise _Bad("invalid_json", f"{self.path}: a JSON {type(entries).__name__}, expected a list")
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            yield self._drop(self.path.stem, _Bad("invalid_json", f"{self.path}: {exc}"))
            return
        except _Bad as bad:
            yield self._drop(self.path.stem, bad)
            return
        for index, entry in enumerate(entries):
            yield self._entry(index, entry)

    def _entry(self, index: int, entry) -> Outcome:
        key, where = f"{self.path.stem}:{index}", f"{self.path} entry {index}"
        try:
            if not isinstance(entry, dict):
                raise _Bad("bad_conversation", f"{where}: a {type(entry).__name__}, expected an object")
            if entry.get("id") is not None:
                key, where = str(entry["id"]), f"{where} (id {entry['id']!r})"
            paths = _image_paths(entry.get("image"), self.image_root, self.image_root, where)
            turns = _with_placeholders(_turns(entry.get("conversations"), where), len(paths), where)
            meta = {k: v for k, v in entry.items() if k not in ("id", "image", "conversations")}
            return self._record(key, images=[_read_bytes(p) for p in paths], conversations=turns, meta=meta)
        except _Bad as bad:
            return self._drop(key, bad)


def _turns(conversations, where: str) -> list[dict]:
    """The turns as new {"from", "value"} dicts; raises bad_conversation unless each is well formed."""
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("bad_conversation", f"{where}: conversations must be a non-empty list")
    turns = []
    for i, t in enumerate(conversations):
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            raise _Bad("bad_conversation", f"{where}: turn {i} is not {{'from': {'|'.join(ROLES)}, "
                                            f"'value': str}}: {str(t)[:100]}")
        turns.append({"from": t["from"], "value": t["value"]})
    return turns


def _with_placeholders(turns: list[dict], num_images: int, where: str) -> list[dict]:
    count = sum(t["value"].count(PLACEHOLDER) for t in turns)
    if num_images and count == 0:
        human = next((t for t in turns if t["from"] == "human"), None)
        if human is None:
            raise _Bad("bad_conversation", f"{where}: {num_images} image(s) but no human turn to place them in")
        human["value"] = PLACEHOLDER + "\n" + human["value"]
        count = 1
    if count != num_images:
        raise _Bad("bad_conversation", f"{where}: {count} {PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    return turns


class TarShardSource(Source):
    """webdataset / img2dataset tar shards (plain, or gzip/bz2/xz compressed), read as a stream.

    Members `<key>.<ext>` (key: the path up to the first dot of the basename; ext lower-cased) are grouped
    into samples while the key stays the same, as webdataset does; `__*__` members, directories and names
    without a dot are skipped. Caption: "txt", else "caption", else "json"'s "caption"/"text". Images:
    exts ending in jpg/jpeg/png/webp ("jpg", "0.jpg", "1.png", ...), in natural order. "json"'s fields other than
    "caption"/"text" (e.g. img2dataset's url/status/width/...) are the meta. Other members are ignored. key: "<shard>/<key>", <shard> the
    shard's path under the shards' common folder without its tar suffix.

    Damage: a shard that cannot be opened -> one unreadable_file; a read error mid-stream, or a stream
    that ends without the tar end-of-archive marker (Python's tarfile stops silently there), or fewer
    samples than an mmfm manifest.json beside the shard lists -> the complete samples before the damage,
    then one truncated_tar (the sample in progress is not used). Per sample: no_caption, empty_caption,
    invalid_json, unreadable_file (caption not UTF-8).
    """

    def __init__(self, paths_or_glob, name: str, license: str = ""):
        super().__init__(name, license)
        self.paths = _shard_paths(paths_or_glob, name)
        folders = [os.path.dirname(os.path.abspath(p)) for p in self.paths]
        self._root = os.path.commonpath(folders)
        self._manifests: dict[str, dict] = {}

    def __iter__(self) -> Iterator[Outcome]:
        for path in self.paths:
            yield from self._read_shard(path)

    def _shard_id(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self._root).replace(os.sep, "/")
        return next((rel[: -len(s)] for s in TAR_SUFFIXES if rel.endswith(s)), rel)

    def _read_shard(self, path: str) -> Iterator[Outcome]:
        shard, read = self._shard_id(path), 0
        try:
            for key, members in _tar_samples(path):
                read += 1
                yield self._sample(f"{shard}/{key}", path, members)
            expected = self._expected(path)
            if expected is not None and read < expected:
                raise _Bad("truncated_tar", f"{path}: {read} samples read, but {MANIFEST} lists {expected}")
        except _Bad as bad:
            yield self._drop(shard, bad)

    def _sample(self, key: str, path: str, members: dict[str, bytes]) -> Outcome:
        where = f"{path}: {key}"
        try:
            meta = _json_object(members["json"], f"{where}.json") if "json" in members else {}
            text = next((_utf8(members[e], f"{where}.{e}") for e in ("txt", "caption") if e in members), None)
            if text is None:
                text = _caption_field(meta, ("caption", "text"), f"{where}.json")
            exts = sorted((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS), key=_natural)
            meta = {k: v for k, v in meta.items() if k not in ("caption", "text")}  # the caption is the record's
            return self._record(key, text=_caption(text, where), images=[members[e] for e in exts], meta=meta)
        except _Bad as bad:
            return self._drop(key, bad)

    def _expected(self, path: str) -> Optional[int]:
        """The shard's sample count in an mmfm manifest.json in its folder, if there is one."""
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in self._manifests:
            self._manifests[folder] = _manifest_counts(Path(folder) / MANIFEST)
        return self._manifests[folder].get(os.path.basename(path))


def _shard_paths(spec, name: str) -> list[str]:
    """Shard files from a path, glob, brace pattern ("a-{000..009}.tar"), folder, or a list of them."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[str] = []
    for item in items:
        for pattern in braceexpand(str(item)):
            pattern = os.path.expanduser(pattern)
            if glob.has_magic(pattern):
                found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            elif os.path.isdir(pattern):
                found = [str(p) for p in _files(Path(pattern), TAR_SUFFIXES)]
            else:
                found = [pattern] if os.path.exists(pattern) else []
            if not found:
                raise SourceError(f"source {name!r}: path {pattern!r} does not exist or holds no tar shards")
            paths += [p for p in found if p not in paths]
    return paths


def _manifest_counts(path: Path) -> dict[str, int]:
    """{shard file: samples} from an mmfm manifest.json; {} if there is none or it is not one."""
    try:
        manifest = json.loads(path.read_text())
        return {s["file"]: int(s["samples"]) for split in manifest["splits"].values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class _EndAwareInfo(tarfile.TarInfo):
    """Records on the TarFile why reading a header failed: how tarfile's silent end is told apart."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.mmfm_header_error = exc
            raise


_SKIP_META = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in stream order; raises _Bad for an unreadable or damaged shard."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _Bad("unreadable_file", f"{path}: {exc}") from None
    key, group, done = None, {}, 0
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndAwareInfo)
        except TAR_ERRORS as exc:  # the first header (or compression header) is bad
            raise _Bad("unreadable_file", f"{path}: not a tar file ({type(exc).__name__}: {exc})") from None
        try:
            while (member := tf.next()) is not None:
                tf.members = []  # streaming: keep no member list
                match = _KEY_EXT.match(member.name)
                if not member.isreg() or not match or _SKIP_META.match(member.name):
                    continue
                if match.group(1) != key:  # a new key: the previous sample is complete
                    if group:
                        yield key, group
                        done += 1
                    key, group = match.group(1), {}
                group[match.group(2).lower()] = tf.extractfile(member).read()
            end = getattr(tf, "mmfm_header_error", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                raise tarfile.ReadError(f"stream ends without the end-of-archive marker ({end})")
        except TAR_ERRORS as exc:
            lost = f"; sample {key!r} in progress not used" if key is not None else ""
            raise _Bad("truncated_tar", f"{path}: {type(exc).__name__}: {exc} after {done} complete "
                                        f"sample(s){lost}") from None
    if group:
        yield key, group


class TextSource(Source):
    """Plain UTF-8 text: a file or a folder of `*.txt` (recursive, sorted), read into text-only records.

    mode "line": one document per non-empty line (blank lines are not documents), key "<file>:<line>";
    "paragraph": blank-line-separated paragraphs, key "<file>:<first line>"; "file": the whole file, key
    "<file>". Texts are stripped. Reasons: empty_caption (a file with no document), unreadable_file (not
    UTF-8, or an OS error; the documents before the bad bytes are kept).
    """

    MODES = ("line", "paragraph", "file")

    def __init__(self, path, name: str, license: str = "", mode: str = "line"):
        super().__init__(name, license)
        if mode not in self.MODES:
            raise SourceError(f"source {name!r}: mode must be one of {self.MODES}, got {mode!r}")
        self.root, self.mode = _existing(path, name), mode

    def __iter__(self) -> Iterator[Outcome]:
        for file in _files(self.root, (".txt",)):
            doc, count = _doc_id(file, self.root), 0
            try:
                for key, text in self._documents(file, doc):
                    count += 1
                    yield self._record(key, text=text)
            except (OSError, UnicodeDecodeError) as exc:
                yield self._drop(doc, _Bad("unreadable_file", f"{file}: {type(exc).__name__}: {exc} "
                                                              f"after {count} document(s)"))
                continue
            if count == 0:
                yield self._drop(doc, _Bad("empty_caption", f"{file}: no text"))

    def _documents(self, file: Path, doc: str) -> Iterator[tuple[str, str]]:
        with open(file, encoding="utf-8-sig", errors="strict") as f:
            if self.mode == "file":
                text = f.read().strip()
                if text:
                    yield doc, text
                return
            start, para = 0, []  # the paragraph so far and its first line
            for line_no, line in enumerate(f, 1):
                text = line.strip()
                if text and self.mode == "line":
                    yield f"{doc}:{line_no}", text
                elif text:
                    start = start or line_no
                    para.append(line.rstrip())
                elif para:
                    yield f"{doc}:{start}", "\n".join(para).strip()
                    start, para = 0, []
            if para:
                yield f"{doc}:{start}", "\n".join(para).strip()


# ---- recipes -------------------------------------------------------------------------------------------------

class IndexedSource(Source):
    """A Megatron indexed dataset (`<path>.bin` / `<path>.idx`, e.g. one prepared for Megatron-LM): each
    document's token ids decoded to text with `tokenizer` (a Hugging Face tokenizer.json: the one the corpus
    was tokenized with). key = f"{stem}:{document index}"; a document that decodes to nothing -> "empty_caption"."""

    def __init__(self, path, name: str, license: str = "", tokenizer: str = ""):
        super().__init__(name, license)
        self.prefix = str(path)
        for ext in (".bin", ".idx"):
            _existing(self.prefix + ext, name)
        if not tokenizer:
            raise SourceError(f"source {name!r} (indexed) needs tokenizer: the tokenizer.json the corpus was made with")
        self.tokenizer = _existing(tokenizer, name)

    def __iter__(self) -> Iterator[Outcome]:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from tokenizers import Tokenizer

        tok, docs = Tokenizer.from_file(str(self.tokenizer)), IndexedDataset(self.prefix)
        stem = Path(self.prefix).name
        for i in range(len(docs)):
            text = tok.decode(docs[i].tolist(), skip_special_tokens=True).strip()
            key = f"{stem}:{i}"
            yield self._record(key, text=text) if text else self._drop(key, _Bad("empty_caption", "empty document"))


class LeRobotSource(Source):
    """A LeRobot data set (codebase v3.0 or v2.x, a camera stored as images or as video; mmfm.embodied.lerobot): one
    record per frame, the episode's task as its text, the camera's frame as its image (a video frame decoded and
    stored as PNG), and under meta["robot"] the episode and frame indices, the proprioceptive state and the chunk of
    the next `horizon` actions (the episode's last one repeated past its end, flagged in actions_pad).
    key = "episode_E/frame_T"; an episode's frames go to one split. A bad episode is one Dropped, key "episode_E",
    reason missing_frames, bad_video, wrong_dimension, nan_action or nan_state. The manifest records per source the
    state and action statistics of the kept episodes (for normalization) under "robot"."""

    def __init__(self, path, name: str, license: str = "", camera: str = "", horizon: int = 4):
        from mmfm.embodied.lerobot import is_video, pick_camera, read_info
        from mmfm.embodied.video import pyav

        super().__init__(name, license)
        self.root = _existing(path, name)
        if int(horizon) < 1:
            raise SourceError(f"source {name!r} (lerobot): horizon={horizon} must be at least 1 (actions per chunk)")
        self.camera, self.horizon = camera, int(horizon)
        self.info = read_info(self.root)
        if is_video(self.info, pick_camera(self.info, camera)):
            pyav()  # a one-line error before the build starts when PyAV is missing

    def __iter__(self) -> Iterator[Outcome]:
        from mmfm.embodied.lerobot import BadEpisode, action_chunk, read_episodes

        for episode in read_episodes(self.root, self.camera):
            if isinstance(episode, BadEpisode):
                yield self._drop(f"episode_{episode.index:06d}", _Bad(episode.reason, episode.detail))
                continue
            for t, image in enumerate(episode.images):
                chunk, pad = action_chunk(episode.actions, t, self.horizon)
                robot = {"episode": episode.index, "frame": t, "state": episode.states[t].tolist(),
                         "actions": chunk.tolist(), "actions_pad": pad.tolist()}
                yield self._record(f"episode_{episode.index:06d}/frame_{t:06d}", text=episode.task, images=[image],
                                   meta={"robot": robot}, group=f"episode_{episode.index:06d}")

    def summary(self) -> dict:
        """The manifest's "robot" entry: what the records' numbers mean and their statistics."""
        import numpy as np

        from mmfm.embodied.lerobot import ACTION, STATE, Episode, pick_camera, read_episodes, stats

        kept = [e for e in read_episodes(self.root, self.camera, images=False) if isinstance(e, Episode)]
        if not kept:
            return {"robot": {"episodes": 0}}
        return {"robot": {"episodes": len(kept), "fps": self.info.get("fps"), "camera": pick_camera(self.info,
                          self.camera), "horizon": self.horizon, "robot_type": self.info.get("robot_type"),
                          "state_names": self.info["features"][STATE].get("names"),
                          "action_names": self.info["features"][ACTION].get("names"),
                          "state": stats(np.concatenate([e.states for e in kept])),
                          "action": stats(np.concatenate([e.actions for e in kept]))}}


SOURCE_TYPES = {"image_folder": ImageFolderSource, "jsonl": JsonlSource, "llava": LlavaSource,
                "tar": TarShardSource, "text": TextSource, "indexed": IndexedSource, "lerobot": LeRobotSource}


def build_source(spec: dict) -> Source:
    """A source from a recipe entry: {"type", "path", "name", "license" (optional), other parameters}."""
    spec = dict(spec)
    kind, name = spec.pop("type", None), spec.get("name")
    if kind not in SOURCE_TYPES:
        raise SourceError(f"source {name!r}: unknown type {kind!r}; known types: {', '.join(SOURCE_TYPES)}")
    if not name:
        raise SourceError(f"a {kind!r} source has no name; give each source a name")
    if "path" not in spec:
        raise SourceError(f"source {name!r} ({kind}) has no path")
    cls = SOURCE_TYPES[kind]
    params = list(inspect.signature(cls.__init__).parameters)[2:]  # after self and the path
    unknown = sorted(set(spec) - {"path", *params})
    if unknown:
        raise SourceError(f"source {name!r} ({kind}): unknown parameter(s) {unknown}; known: {params}")
    return cls(spec.pop("path"), **spec)
