"""Tokenizers: mmfm's own byte-level BPE (trained offline on a data set's text) or a pretrained model's, read from
the files a Hugging Face folder holds.

- mmfm's own: tokenizer.json alone, special tokens <pad>, <bos>, <eos>, <image> (ids 0-3 as trained).
- Pretrained: tokenizer.json beside tokenizer_config.json (bos/eos/pad tokens, maybe the chat template) and maybe
  chat_template.jinja (which wins, as in transformers). Special-token ids are looked up in the tokenizer; a
  tokenizer without <image> gets it added as a special token at the end of its vocabulary when a data set is
  built (`install_tokenizer`), so the model's embedding may have to grow by one row (docs/models.md). No pad
  token: the eos token pads (padding never carries loss and attention masks come from lengths, not ids).

Every file is untrusted: JSON and text only, size-capped; a tokenizer_config.json that names code (auto_map) is
refused; the chat template is rendered in a sandbox (mmfm.data.chat_template).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mmfm.errors import MmfmError

# mmfm's own tokenizers: their ids are their positions here, <pad>=0, <bos>=1, <eos>=2, <image>=3.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
IMAGE_TOKEN = "<image>"
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1 << 20


class TokenizerError(MmfmError):
    pass


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _read_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise TokenizerError(f"no tokenizer at {path}; make the data set with `mmfm data synth --out "
                             f"{path.parent}` or point data.path at a folder holding tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"tokenizer file {path} is unreadable ({' '.join(str(exc).split())[:120]}); rebuild "
                             "the data set or re-copy the tokenizer") from None


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_chat_template(folder: Path, config: dict) -> Optional[str]:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a string, or
    a list of named templates: "default")."""
    file = folder / CHAT_TEMPLATE_FILE
    if file.is_file():
        if file.stat().st_size > MAX_TEMPLATE_BYTES:
            raise TokenizerError(f"{file} is larger than {MAX_TEMPLATE_BYTES >> 20} MiB; it is not a chat template")
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / HF_CONFIG}: chat_template is a {type(template).__name__}, not a string")
    return template or None


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json (plus special_tokens_map.json's tokens it lacks), refused when it names code."""
    from mmfm.checkpoint.hf import read_json

    config = read_json(folder / HF_CONFIG)
    if "auto_map" in config:
        raise TokenizerError(f"{folder / HF_CONFIG} names custom code (auto_map); mmfm never runs code from a "
                             "download: use a tokenizer that tokenizer.json describes fully")
    if (folder / SPECIAL_TOKENS_MAP).is_file():
        for key, value in read_json(folder / SPECIAL_TOKENS_MAP).items():
            config.setdefault(key, value)
    return config


class TextTokenizer:
    """Encode/decode text; the special-token ids the model and loader rely on (bos_id may be None: a pretrained
    tokenizer without one, e.g. Qwen's); the chat template when the tokenizer has one."""

    def __init__(self, tokenizer: Tokenizer, special_ids: Optional[tuple[int, Optional[int], int, int]] = None,
                 chat_template: Optional[str] = None, source: str = "", pretrained: bool = False):
        """special_ids: (pad, bos, eos, image); None: mmfm's own tokens, which must sit at ids 0..3."""
        self._tok = tokenizer
        if special_ids is None:
            special_ids = tuple(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
            if special_ids != tuple(range(len(SPECIAL_TOKENS))):
                raise TokenizerError(f"tokenizer {source or ''} has special tokens {SPECIAL_TOKENS} at ids "
                                     f"{list(special_ids)}, not 0..3, and no {HF_CONFIG} beside it naming its own; "
                                     "rebuild the data set with `mmfm data synth`, or copy the pretrained "
                                     f"tokenizer's {HF_CONFIG} next to it")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = special_ids
        self.chat_template = chat_template
        self.source = source
        self.pretrained = pretrained  # read with a tokenizer_config.json (a Hugging Face tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """tokenizer.json at `path`: a pretrained tokenizer when tokenizer_config.json lies beside it."""
        path = Path(path)
        tok = _read_tokenizer(path)
        if (path.parent / HF_CONFIG).is_file():
            return cls._pretrained(tok, path.parent)
        return cls(tok, source=str(path))

    @classmethod
    def _pretrained(cls, tok: Tokenizer, folder: Path) -> "TextTokenizer":
        config = read_tokenizer_config(folder)

        def token_id(key: str, required: bool) -> Optional[int]:
            text = _token_text(config.get(key))
            if text is None:
                if required:
                    raise TokenizerError(f"{folder / HF_CONFIG} names no {key}; mmfm needs it to end samples")
                return None
            found = tok.token_to_id(text)
            if found is None:
                raise TokenizerError(f"{folder / HF_CONFIG}: {key} {text!r} is not in {folder / TOKENIZER_FILE}")
            return found

        eos = token_id("eos_token", required=True)
        pad = token_id("pad_token", required=False)
        image = tok.token_to_id(IMAGE_TOKEN)
        if image is None:
            raise TokenizerError(f"{folder / TOKENIZER_FILE} has no {IMAGE_TOKEN} token; build the data set with "
                                 "`mmfm data build` / `mmfm data instruct --tokenizer FOLDER`, which add it")
        ids = (eos if pad is None else pad, token_id("bos_token", required=False), eos, image)
        return cls(tok, ids, read_chat_template(folder, config), str(folder / TOKENIZER_FILE), pretrained=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def special_token_strings(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token as text, the variables a chat template reads ("" for none)."""
        def text(token_id):
            return "" if token_id is None else self._tok.id_to_token(token_id)
        return {"bos_token": text(self.bos_id), "eos_token": text(self.eos_id), "pad_token": text(self.pad_id)}

    def bos(self) -> list[int]:
        """[bos_id], or [] for a tokenizer without one."""
        return [] if self.bos_id is None else [self.bos_id]


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files of a folder (a data set, a run, a Hugging Face model), tokenizer.json first."""
    return [f for f in (TOKENIZER_FILE, HF_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE) if (folder / f).is_file()]


def tokenizer_digest(source: str | Path) -> str:
    """sha256 of a tokenizer source (a tokenizer.json file: the file's; a folder: over its tokenizer files)."""
    from mmfm.data.manifest import sha256_file

    source = Path(source)
    if source.is_file():
        return sha256_file(source)
    return hashlib.sha256("".join(f"{n}:{sha256_file(source / n)};" for n in tokenizer_files(source)).encode()).hexdigest()


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    for name in tokenizer_files(Path(src_dir)):
        shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)


def install_tokenizer(source: str | Path, out: str | Path) -> dict:
    """Copy a tokenizer into a data set folder and return its manifest entry. source: a tokenizer.json file
    (mmfm's own, or one with tokenizer_config.json beside it) or a Hugging Face folder. A pretrained tokenizer
    without <image> gets it as a new special token (id = its vocabulary size), recorded in "added_tokens"."""
    from mmfm.data.manifest import sha256_file

    source, out = Path(source), Path(out)
    folder = source if source.is_dir() else source.parent
    src_file = folder / TOKENIZER_FILE if source.is_dir() else source
    if source.is_dir() and not src_file.is_file():
        raise TokenizerError(f"{source} holds no {TOKENIZER_FILE}; give a Hugging Face model folder with a fast "
                             "tokenizer (tokenizer.json) or a tokenizer.json file")
    tok = _read_tokenizer(src_file)
    pretrained = (folder / HF_CONFIG).is_file()
    added = []
    if pretrained:
        read_tokenizer_config(folder)  # refuses custom code before anything is copied
        for name in tokenizer_files(folder)[1:]:
            shutil.copyfile(folder / name, out / name)
        if tok.token_to_id(IMAGE_TOKEN) is None:
            tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
            added.append(IMAGE_TOKEN)
    if added:
        tok.save(str(out / TOKENIZER_FILE))
    elif src_file.resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(src_file, out / TOKENIZER_FILE)
    loaded = TextTokenizer.load(out / TOKENIZER_FILE)
    entry = {"file": TOKENIZER_FILE, "vocab_size": loaded.vocab_size, "sha256": sha256_file(out / TOKENIZER_FILE)}
    if pretrained:
        entry.update(pretrained=True, image_token_id=loaded.image_id, added_tokens=added)
    return entry


def markers_chat_template(system: str, user: str, assistant: str, turn_end: str) -> str:
    """data.chat's role markers as a Jinja chat template (for transformers, on export): the same text mmfm's
    markers make; each string is a quoted literal (json.dumps escapes it), never template code."""
    import json

    s, u, a, e = (json.dumps(x) for x in (system, user, assistant, turn_end))
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ " + s + " }}{% elif m['role'] == "
            "'user' %}{{ " + u + " }}{% else %}{{ " + a + " }}{% endif %}{{ m['content'] }}{{ " + e + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + a + " }}{% endif %}")


def export_tokenizer(src_dir: Path, out_dir: Path, chat) -> None:
    """A run's tokenizer files as transformers reads them: a pretrained tokenizer's files as they are; mmfm's own
    tokenizer.json with a tokenizer_config.json naming its special tokens and a chat template of data.chat's
    markers (chat: ChatConfig)."""
    import json

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    tok = TextTokenizer.load(src_dir / TOKENIZER_FILE)
    if tok.pretrained:
        copy_tokenizer(src_dir, out_dir)
        return
    shutil.copyfile(src_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    pad, bos, eos, _ = SPECIAL_TOKENS
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "extra_special_tokens": {"image_token": IMAGE_TOKEN}, "model_max_length": 1 << 30}
    (out_dir / HF_CONFIG).write_text(json.dumps(config, indent=2))
    (out_dir / CHAT_TEMPLATE_FILE).write_text(markers_chat_template(chat.system, chat.user, chat.assistant,
                                                                    chat.turn_end))
