"""A byte-level BPE tokenizer trained offline on the data set's own text, with fixed special-token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmfm.errors import MmfmError

# Their ids are their positions here: <pad>=0, <bos>=1, <eos>=2, <image>=3.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")


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


class TextTokenizer:
    """Encode/decode text; exposes the special-token ids the model and loader rely on."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise TokenizerError(f"tokenizer special tokens {SPECIAL_TOKENS} have ids {ids}, expected 0..3; "
                                 "rebuild the data set with `mmfm data synth`")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"no tokenizer at {path}; make the data set with `mmfm data synth --out "
                                 f"{path.parent}` or point data.path at a folder holding tokenizer.json")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"tokenizer file {path} is unreadable ({exc}); rebuild it with `mmfm data synth`") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
