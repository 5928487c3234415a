"""Rule-based rewards for GRPO: a function of the decoded answer and the reference answer, in [0, 1]."""

from __future__ import annotations

from mmfm.registry import lookup


def exact_answer(prediction: str, reference: str) -> float:
    """1 when the answer equals the reference (surrounding whitespace ignored), else 0."""
    return float(prediction.strip() == reference.strip())


def first_word(prediction: str, reference: str) -> float:
    """1 when the answers' first words agree (e.g. "red." vs "red, I think"), else 0."""
    def word(text: str) -> str:
        parts = text.strip().split()
        return parts[0].strip(".,!?;:").lower() if parts else ""

    return float(word(prediction) != "" and word(prediction) == word(reference))


REWARDS = {"exact_answer": exact_answer, "first_word": first_word}


def reward_function(name: str):
    return lookup(REWARDS, name, "reward")
