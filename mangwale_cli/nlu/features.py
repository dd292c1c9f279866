"""What the intent model reads from text, and what a data set must have for it to learn at all.

The model (``model.py``) turns text into TF-IDF word n-grams and character n-grams within
word boundaries. The settings of both live here, beside a plain-Python account of what each
keeps, so that the server can tell a client *when the job is created* that a data set cannot
be trained on, and say why in its own words, without loading scikit-learn (or numpy) into the
server; the trainer's child process runs the same checks before it fits.

What nlu-train needs:

* examples of at least two intents (a classifier with one class has nothing to decide);
* something to learn from the text: a word of two or more letters or digits (the word
  features), or a run of 2-5 characters that two examples share (the character features keep
  only runs seen in at least ``CHAR_MIN_DF`` examples).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)
CHAR_MIN_DF = 2
# scikit-learn's default token pattern for the word features: runs of 2+ word characters.
WORD_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s\s+")


class TrainingDataError(ValueError):
    """The examples cannot be trained on; the message says why, in the tool's words."""

    plain_message = True  # a failed job shows the message alone (trainers.process)


def normalize(text: str) -> str:
    """Lower-case, every digit as 0: intents rarely hinge on which number was said."""
    return _DIGITS.sub("0", text.lower())


def has_words(texts: Iterable[str]) -> bool:
    """Whether the word features get a vocabulary: some text has a token of 2+ characters."""
    return any(WORD_TOKEN.search(t) for t in texts)


def _char_ngrams(text: str) -> set[str]:
    """The character n-grams of one text, as scikit-learn's ``char_wb`` analyzer makes them:
    each word padded with one space on either side, short words counted once."""
    out: set[str] = set()
    lo, hi = CHAR_NGRAMS
    for word in _SPACES.sub(" ", text).split():
        padded = f" {word} "
        for n in range(lo, hi + 1):
            if len(padded) <= n:
                out.add(padded)
                break
            out.update(padded[i : i + n] for i in range(len(padded) - n + 1))
    return out


def has_shared_chars(texts: Iterable[str]) -> bool:
    """Whether the character features keep anything: some n-gram is in ``CHAR_MIN_DF`` texts."""
    seen: dict[str, int] = {}
    for text in texts:
        for gram in _char_ngrams(text):
            count = seen.get(gram, 0) + 1
            if count >= CHAR_MIN_DF:
                return True
            seen[gram] = count
    return False


def usable_features(texts: Sequence[str]) -> list[str]:
    """The feature kinds (``words``, ``chars``) that would learn something from ``texts``
    (already normalized); an empty list means the texts yield nothing."""
    kinds = []
    if has_words(texts):
        kinds.append("words")
    if has_shared_chars(texts):
        kinds.append("chars")
    return kinds


def check_examples(examples: Sequence[Mapping[str, object]], what: str = "the data set") -> None:
    """Raise ``TrainingDataError`` when nlu-train could not learn from ``examples``."""
    counts: dict[str, int] = {}
    for ex in examples:
        intent = str(ex["intent"])
        counts[intent] = counts.get(intent, 0) + 1
    if len(counts) < 2:
        only = f"only of intent {next(iter(counts))!r}" if counts else "none"
        raise TrainingDataError(
            f"{what} has examples {only}; nlu-train needs examples of at least 2 intents"
        )
    # Generators: on real data the first text with a word ends the check.
    if not has_words(normalize(str(ex["text"])) for ex in examples) and not has_shared_chars(
        normalize(str(ex["text"])) for ex in examples
    ):
        raise TrainingDataError(
            f"{what} gives nlu-train nothing to learn from: no example has a word of 2 or more "
            "letters or digits, and no two examples share a run of 2-5 characters"
        )
