"""The metrics of the evaluation task types (docs/evaluation.md).

Captioning: BLEU-4 and CIDEr (CIDEr-D, as the COCO caption server reports it) from pycocoevalcap, the COCO
caption evaluation code. Its PTBTokenizer runs Stanford CoreNLP in Java; `caption_words` does what mmfm needs of it
here (lower case, punctuation dropped) in Python.
Open VQA: the VQAv2 answer normalization and accuracy, written here: the official evaluation script is not a
package (lmms-eval and lm-evaluation-harness each carry their own copy of it).
Multiple choice: MMBench's answer-letter extraction (a single option letter standing alone in the answer, else a
single option text quoted in it), written here for the same reason.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Optional, Sequence

# --- captions --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> str:
    """Lower-cased words separated by single spaces, punctuation dropped (what COCO's tokenizer feeds the scorers)."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of the predictions against their references (one or more per item)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not references:
        return {"bleu4": 0.0, "cider": 0.0}
    gts = {key: [caption_words(r) for r in refs] for key, refs in references.items()}
    res = {key: [caption_words(predictions[key])] for key in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# --- open VQA (VQAv2) -------------------------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # a mark beside a space, or any mark in a text with a digit-comma-digit, goes; elsewhere it splits words
        if f"{p} " in text or f" {p}" in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split() if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """VQAv2's answer normalization: whitespace, punctuation (kept inside numbers), number words to digits,
    articles dropped, contractions given their apostrophe."""
    return _digits_and_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: with the usual 10 human answers, the mean over the 10 sets of 9 of min(1, matches / 3);
    with any other number of answers, 1 when the prediction matches one of them (all after normalization)."""
    pred = normalize_vqa_answer(prediction)
    gold = [normalize_vqa_answer(a) for a in answers]
    if len(gold) != 10:
        return float(pred in gold)
    matches = [g == pred for g in gold]
    return sum(min(1.0, (sum(matches) - m) / 3) for m in matches) / 10


# --- multiple choice --------------------------------------------------------------------------------------------

LETTERS = string.ascii_uppercase
_STRIP = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def option_letters(count: int) -> str:
    return LETTERS[:count]


def extract_choice(answer: str, options: Sequence[str]) -> Optional[int]:
    """The option an answer picks, as MMBench reads it: the one option letter standing alone among its words
    (punctuation taken as spaces: "B", "(B)", "B. blue", "the answer is B"); failing that (no letter, or several),
    the one option whose text the answer contains (case-insensitive). None when neither gives exactly one."""
    words = set(answer.translate(_STRIP).split())
    letters = [i for i, letter in enumerate(option_letters(len(options))) if letter in words]
    if len(letters) == 1:
        return letters[0]
    lowered = answer.lower()
    quoted = [i for i, option in enumerate(options) if str(option).lower() in lowered]
    return quoted[0] if len(quoted) == 1 else None


def render_options(options: Sequence[str]) -> str:
    """'A. first\\nB. second ...': how a multiple-choice prompt lists its options."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


# --- perplexity -------------------------------------------------------------------------------------------------

def perplexity(total_logprob: float, tokens: int) -> float:
    """exp(-sum log p / tokens) over a corpus's tokens."""
    return math.exp(-total_logprob / tokens) if tokens else float("nan")


def majority(values: Sequence[str]) -> str:
    """The most common value (the first of the most common): a constant-answer baseline's answer."""
    return Counter(values).most_common(1)[0][0] if values else ""
