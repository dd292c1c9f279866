"""Tests for the persisted event log: numbering across reopen, torn and corrupt files, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mangwale_cli import wire
from mangwale_cli.eventlog import HEADER_KEY, FileEventLog, Record


def opened(path: Path, retention: int = 1000, fallback_head: int = 0) -> FileEventLog:
    elog = FileEventLog(path, retention=retention, fallback_head=fallback_head)
    elog.open()
    return elog


def append(elog: FileEventLog, *job_ids: str | None) -> list[Record]:
    """Append one batch: a training_update per job id, a dataset_update per None."""
    records = []
    seq = elog.head
    for job_id in job_ids:
        seq += 1
        if job_id is None:
            event = wire.dataset_update("ds-1", "updated")
        else:
            event = {"type": "training_update", "jobId": job_id, "status": "running", "progress": 0}
        event.update(seq=seq, epoch=elog.epoch)
        job_seq = None
        if job_id is not None:
            job_seq = elog.next_job_seq(job_id)
            event["jobSeq"] = job_seq
        records.append(Record(seq, job_id, job_seq, wire.dumps(event)))
    elog.append(records)
    return records


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def seqs(records: object) -> list[int]:
    return [r.seq for r in records]  # type: ignore[attr-defined]


def test_new_log_starts_after_the_fallback_head(tmp_path: Path) -> None:
    """A missing file starts a new epoch whose first seq follows fallback_head."""
    path = tmp_path / "events.jsonl"
    elog = opened(path, fallback_head=41)
    assert elog.head == 41 and elog.epoch
    assert seqs(append(elog, "a")) == [42]
    elog.close()
    header = lines(path)[0]
    assert header[HEADER_KEY] == 1 and header["baseSeq"] == 41 and header["epoch"] == elog.epoch


def test_append_and_reopen_keep_seq_epoch_and_job_seq(tmp_path: Path) -> None:
    """After reopen the head, the epoch, the kept events and each job's jobSeq carry on."""
    path = tmp_path / "events.jsonl"
    elog = opened(path)
    epoch = elog.epoch
    append(elog, "a", "b", None)
    append(elog, "a", "a")
    elog.close()
    assert [ev["seq"] for ev in lines(path)[1:]] == [1, 2, 3, 4, 5]

    again = opened(path)
    assert again.epoch == epoch and again.head == 5
    assert seqs(again.after(0)) == [1, 2, 3, 4, 5]
    assert [r.job_seq for r in again.after(0, {"a"})] == [1, 2, 3]
    assert again.next_job_seq("a") == 4 and again.next_job_seq("b") == 2
    assert again.next_job_seq("new") == 1
    assert seqs(append(again, "a")) == [6]
    again.close()


def test_torn_last_line_is_dropped_in_the_same_epoch(tmp_path: Path) -> None:
    """A half-written last line is cut off; the log keeps its epoch and appends after it."""
    path = tmp_path / "events.jsonl"
    elog = opened(path)
    epoch = elog.epoch
    append(elog, "a", "a", "a")
    elog.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"type":"training_update","jobId":"a","seq":4,"ep')

    again = opened(path)
    assert again.epoch == epoch and again.head == 3
    assert path.read_bytes() == whole
    assert again.next_job_seq("a") == 4
    assert not list(tmp_path.glob("*.untrusted-*"))
    append(again, "a")
    again.close()

    third = opened(path)
    assert third.epoch == epoch and seqs(third.after(0)) == [1, 2, 3, 4]
    third.close()


def _damage(path: Path, line_no: int, replacement: bytes | None) -> bytes:
    """Replace (or with None remove) line ``line_no`` (0 = header); returns the original bytes."""
    original = path.read_bytes()
    rows = original.split(b"\n")
    if replacement is None:
        del rows[line_no]
    else:
        rows[line_no] = replacement
    path.write_bytes(b"\n".join(rows))
    return original


@pytest.mark.parametrize(
    ("line_no", "replacement"),
    [
        (2, b"{not json"),  # a corrupt line in the middle
        (2, b"[1, 2]"),  # valid JSON, not an event
        (2, None),  # a gap: seq 2 is missing
        (2, b'{"type":"dataset_update","seq":2,"epoch":"other"}'),  # another epoch's line
        (0, b"garbage header"),
    ],
    ids=["corrupt-line", "not-an-event", "seq-gap", "foreign-epoch", "bad-header"],
)
def test_untrusted_log_starts_a_new_epoch_above_every_seq_seen(
    tmp_path: Path, line_no: int, replacement: bytes | None
) -> None:
    """A log that cannot be trusted is moved aside; a new epoch starts above every seq it held."""
    path = tmp_path / "events.jsonl"
    elog = opened(path)
    old_epoch = elog.epoch
    append(elog, "a", "a", "b", "a", None, "b")
    elog.close()
    original = _damage(path, line_no, replacement)
    damaged = path.read_bytes()

    again = opened(path)
    assert again.epoch != old_epoch
    assert again.head >= 6, "a seq a client may have seen would be reused"
    assert list(again.after(0)) == []
    aside = list(tmp_path.glob("events.jsonl.untrusted-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged != original
    first = append(again, "a")[0]
    assert first.seq == again.head and first.seq > 6
    again.close()

    third = opened(path)
    assert third.epoch == again.epoch and third.head == first.seq
    third.close()


def test_fallback_head_also_bounds_a_new_epoch(tmp_path: Path) -> None:
    """An untrusted log restarts above the store's recorded head when that is higher."""
    path = tmp_path / "events.jsonl"
    elog = opened(path)
    append(elog, "a", "a")
    elog.close()
    path.write_bytes(b"nonsense\n")
    again = opened(path, fallback_head=100)
    assert again.head == 100
    again.close()


def test_retention_trims_and_compaction_keeps_numbering(tmp_path: Path) -> None:
    """Past twice the retention the file is rewritten; seq and every job's jobSeq continue."""
    path = tmp_path / "events.jsonl"
    elog = opened(path, retention=10)
    epoch = elog.epoch
    append(elog, "early", "early", "early")  # seq 1-3, all compacted away below
    append(elog, "late", "late")  # seq 4-5, compacted away too
    for _ in range(15):
        append(elog, "busy", None)  # seq 6-35
    append(elog, "late")  # seq 36: late keeps one event
    assert elog.head == 36
    assert len(elog.ring) == 10 and elog.ring[0].seq == 27 and elog.lost_through == 26
    file_events = lines(path)[1:]
    assert len(file_events) < 20, "the file was never compacted"
    elog.close()

    again = opened(path, retention=10)
    assert again.epoch == epoch and again.head == 36
    assert seqs(again.after(0)) == list(range(27, 37))
    assert again.next_job_seq("early") == 4  # all of its events were compacted
    assert again.next_job_seq("late") == 4  # seq 4, 5 compacted, 36 kept as jobSeq 3
    assert again.next_job_seq("busy") == 16
    assert seqs(append(again, None)) == [37]
    again.close()


def test_missing_since_and_after_with_job_filters(tmp_path: Path) -> None:
    """missing_since tells what replay can no longer offer; after() filters by seq and job."""
    path = tmp_path / "events.jsonl"
    elog = opened(path, retention=10)
    append(elog, "old", "old")  # seq 1-2
    for _ in range(5):
        append(elog, "x", "y")  # seq 3-12
    append(elog, "new")  # seq 13
    assert elog.lost_through == 3  # seq 1-3 trimmed: old's two events and x's first

    assert elog.missing_since(0)
    assert elog.missing_since(2)
    assert not elog.missing_since(3)
    assert not elog.missing_since(13)
    assert elog.missing_since(0, {"old"})
    assert elog.missing_since(1, {"old"})
    assert not elog.missing_since(2, {"old"})
    assert elog.missing_since(0, {"x"}) and not elog.missing_since(3, {"x"})
    assert not elog.missing_since(0, {"y"})  # y's first event (seq 4) is still kept
    assert not elog.missing_since(0, {"new", "y"})
    assert elog.missing_since(0, {"new", "old"})

    assert seqs(elog.after(3)) == list(range(4, 14))
    assert seqs(elog.after(10)) == [11, 12, 13]
    assert seqs(elog.after(0, {"y"})) == [4, 6, 8, 10, 12]
    assert seqs(elog.after(6, {"x", "new"})) == [7, 9, 11, 13]
    assert list(elog.after(13)) == []
    assert list(elog.after(99)) == []
    assert list(elog.after(0, set())) == []
    assert elog.describe() == {"epoch": elog.epoch, "headSeq": 13, "firstSeq": 4}
    elog.close()
