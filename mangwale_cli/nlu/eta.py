"""How long a training run has left, from what the run itself has measured so far.

Four parts: the epochs still to go, at the mean pace of the last three; the validation at the
end, counted as 1.5 times the last epoch's validation pass; the save, which on a small data set
takes longer than all the epochs together; and ``FINISH_SECONDS``. The save is estimated from the
model's size, at this machine's present speed (``save_seconds``: a small sample of what
``modelfile.dump`` will do, writing vocabulary entries as JSON and compressing the weights, timed
and scaled up). The entity extractor's training is not counted.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from typing import Any

FINISH_SECONDS = 0.08  # after the save: metrics.json, the child's exit, the runner's last write
PROBE_ENTRIES = 1000
PROBE_BYTES = 1 << 20


class Eta:
    """Seconds left in a run of ``epochs`` epochs; feed it each epoch's duration."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.durations: list[float] = []
        self.validation = 0.0  # one validation pass, as measured in the last epoch
        self.save = 0.0

    def epoch_done(self, seconds: float, validation: float = 0.0) -> None:
        self.durations.append(seconds)
        self.validation = validation

    def left(self) -> float:
        done = len(self.durations)
        if not done:
            return 0.0
        recent = self.durations[-3:]  # the pace of now: a machine's load changes as a run goes on
        pace = sum(recent) / len(recent)
        return pace * (self.epochs - done) + 1.5 * self.validation + self.save + FINISH_SECONDS


def save_seconds(vectorizer: Any, classifier: Any) -> float:
    """About how long saving the model (``modelfile.dump``) will take: the vocabularies are
    written as JSON and compressed, then zlib compresses the weight arrays. Both rates
    are measured on a sample here, so a busy machine gets a longer estimate."""
    import numpy as np

    vocabs = [t.vocabulary_ for _, t in vectorizer.transformer_list if hasattr(t, "vocabulary_")]
    entries = sum(len(v) for v in vocabs)
    seconds = 0.0
    if entries:
        sample = dict(itertools.islice(max(vocabs, key=len).items(), PROBE_ENTRIES))
        t0 = time.perf_counter()
        zlib.compress(json.dumps({w: int(i) for w, i in sample.items()}).encode(), 3)
        seconds += (time.perf_counter() - t0) / len(sample) * entries
    coef = np.ascontiguousarray(classifier.coef_).ravel()
    arrays = classifier.coef_.nbytes + sum(
        t.idf_.nbytes for _, t in vectorizer.transformer_list if hasattr(t, "idf_")
    )
    chunk = coef[: max(1, PROBE_BYTES // coef.itemsize)].tobytes()
    t0 = time.perf_counter()
    zlib.compress(chunk, 3)
    seconds += (time.perf_counter() - t0) / max(len(chunk), 1) * arrays
    return seconds
