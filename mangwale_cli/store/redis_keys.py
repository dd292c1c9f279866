"""Every Redis key mangwale uses, in one place, all under one configurable prefix.

Several ``mangwale serve`` instances share one Redis; a second deployment on the same Redis
(or a test) picks another prefix. Values are UTF-8 JSON in the wire form (``wire.dumps``)
unless noted. Schema 2 (``meta`` field ``schema``); docs/storage.md draws the layout.

The record (``RedisStore``; each change is one Lua script, ``redis_scripts``)::

    job:{id}             string  the job document (``Job.to_dict``), ``jobSeq`` and ``lease`` included
    jobs                 zset    job ids scored by createdAt; equal scores order by id
    status:{status}      zset    job ids per status, scored by createdAt (counts, filtered pages)
    lease:{id}           string  ``holder|token`` of the job's current lease, PX = the lease: the
                                 authoritative expiry (Redis's clock, not the instances')
    idem:{key}           hash    jobId, fingerprint; expires after the store's idempotency TTL (24 h),
                                 whether or not its job is still there
    dataset:{id}         string  the dataset document (``Dataset.to_dict``)
    datasets             zset    dataset ids scored by createdAt
    meta                 hash    small metadata, JSON values; field ``schema`` holds the version
    lines:{job}:{name}   list    JSON lines of a job's ``logs`` or ``metrics``
    artifact:{job}       hash    relative file name -> raw bytes, plus ``ARTIFACT_DIGEST_FIELD``;
                                 with ``artifacts.dir``: name -> JSON {size, sha256} (the files
                                 are on the shared disk), plus ``MANIFEST_FIELD``
    events               stream  the event log: entry ``<seq>-1`` per event
    seq                  string  the last seq issued
    epoch                string  the event log's id
    write:{id}           string  the reply of a write script, kept ``WRITE_TTL`` s or more: a retry of
                                 the same write (a lost reply) gets it back and changes nothing

The job queue (``redisqueue.RedisQueue``)::

    queue                stream  runnable job ids, read by the consumer group ``WORKERS_GROUP``
    queue:entries        hash    job id -> its entry in ``queue``: an entry nobody read is deleted
                                 when a remote worker starts the job (``RedisQueue.forget``)
    cancel:{id}          string  a cancel request for a job, seen by whoever takes it next
    cancel               channel job ids to cancel, for the instance running them now

The worker registry (``workerboard.RedisBoard``; not part of the record, nothing to migrate)::

    worker:{id}          string  the worker's ``GET /workers`` row, written by the instance it is
                                 connected to; PX = half a lease + ``workers.forget_after``, renewed
                                 by its heartbeats, so a worker whose instance died is shown lost,
                                 then forgotten
    workers              set     ids of those rows (an id whose row expired is removed when read)
    workerupdates        stream  ``worker_update`` messages (field ``d``) for every instance's
                                 clients, MAXLEN ~ ``workers.update_retention``

Schema 1 also had ``jobseq`` (hash: job id -> last jobSeq), ``jobidem:{id}`` (the key that
created a job) and ``batch:{id}``; the migration to 2 (``redis_scripts.MIGRATE_1_TO_2``) removes
the first two, the last expires by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire import JobStatus

DEFAULT_PREFIX = "mangwale:"
ENTRIES_SUFFIX = ":entries"  # the queue's key + this: job id -> stream entry id
WORKERS_GROUP = "workers"  # the queue's consumer group: a name inside ``queue``, not a key
#: a field of ``artifact:{job}`` that no relative file name can be: the digest of the set
ARTIFACT_DIGEST_FIELD = "/digest"
#: a field of ``artifact:{job}`` saying the hash is a manifest of files on ``artifacts.dir``
MANIFEST_FIELD = "/manifest"
#: the ``lines:{job}:{name}`` lists a job can have (deleted with the job)
LINE_NAMES = ("logs", "metrics")
WRITE_TTL = 600  # seconds a write's reply is kept for a retry at least (the store keeps it 2 leases if longer)


@dataclass(frozen=True)
class RedisKeys:
    """Key names under ``prefix``. Methods take the variable part; properties are fixed keys."""

    prefix: str = DEFAULT_PREFIX

    # --- storage ----------------------------------------------------------------------------

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}jobs"

    def status(self, status: JobStatus | str) -> str:
        value = status.value if isinstance(status, JobStatus) else status
        return f"{self.prefix}status:{value}"

    def job_idem(self, job_id: str) -> str:
        """schema 1 only: removed by the migration to 2"""
        return f"{self.prefix}jobidem:{job_id}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def dataset(self, dataset_id: str) -> str:
        return f"{self.prefix}dataset:{dataset_id}"

    @property
    def datasets(self) -> str:
        return f"{self.prefix}datasets"

    @property
    def meta(self) -> str:
        return f"{self.prefix}meta"

    def lines(self, job_id: str, name: str) -> str:
        return f"{self.prefix}lines:{job_id}:{name}"

    def artifact(self, job_id: str) -> str:
        return f"{self.prefix}artifact:{job_id}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    def write(self, write_id: str) -> str:
        return f"{self.prefix}write:{write_id}"

    # --- the event stream -------------------------------------------------------------------

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def seq(self) -> str:
        return f"{self.prefix}seq"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def jobseq(self) -> str:
        """schema 1 only: removed by the migration to 2"""
        return f"{self.prefix}jobseq"

    # --- the worker registry -----------------------------------------------------------------

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    @property
    def worker_updates(self) -> str:
        return f"{self.prefix}workerupdates"

    # --- the job queue ------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        return f"{self.prefix}queue"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    @property
    def cancel_channel(self) -> str:
        """pub/sub: job ids whose cancel was asked for, for the instance running them now"""
        return f"{self.prefix}cancel"
