"""Routing: which taker (a server's own runner or a remote worker) may run which job.

A job runs only where every one of its labels is among the taker's labels and the taker can
run its kind. Nothing here knows how jobs are handed out; the runner and the worker hub ask it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from .wire import Job


def can_run(job: Job, labels: Collection[str], kinds: Collection[str]) -> bool:
    """Whether a taker with ``labels`` that runs ``kinds`` may take ``job``."""
    return job.kind in kinds and all(label in labels for label in job.labels)


def waiting_for(job: Job, takers: Iterable[tuple[Collection[str], Collection[str]]]) -> str | None:
    """What a job no taker can run waits for ("waiting for a worker with labels gpu"), or None
    when some taker in ``takers`` (``(labels, kinds)`` each) can run it."""
    takers = list(takers)
    if any(can_run(job, labels, kinds) for labels, kinds in takers):
        return None
    wants = []
    if job.labels:
        wants.append(f"labels {', '.join(job.labels)}")
    # The kind is named when the labels are not the whole story: no labels asked for, or a
    # taker has them but does not run the kind ("labels gpu and kind steps").
    labelled = [kinds for labels, kinds in takers if all(label in labels for label in job.labels)]
    if not job.labels or labelled:
        wants.append(f"kind {job.kind}")
    return "waiting for a worker with " + " and ".join(wants)
