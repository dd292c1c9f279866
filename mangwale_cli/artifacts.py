"""The files a job left, as clients read them back: listed (``GET /training/jobs/{id}/artifacts``)
and served one at a time (``GET /training/jobs/{id}/artifacts/{name}``). No web framework here:
the route turns an ``ArtifactFile`` into a streamed response.

A job's files are the regular files directly in its artifact directory whose names an upload
could use (``wire.artifact_name_problem``): the model, a worker's uploads, what a local trainer
left. Never the server's own (``logs.jsonl``, ``metrics.jsonl``), temp files or dotfiles.

An upload's sha256 is checked before the file is put in place, so it is known: it is kept in a
sidecar (``.NAME.sha256``, with the size and mtime it describes) and becomes the file's strong
``ETag``. A sidecar that no longer matches its file (the file was replaced another way) is
ignored: such a file has no sha256 to show, rather than a wrong one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import wire


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    path: Path
    size: int
    sha256: str | None  # known for uploads; None for a file a trainer wrote in place

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def write_digest(path: Path, sha256: str) -> None:
    """Remember ``path``'s sha256 (checked by the upload) beside it."""
    st = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtimeNs": st.st_mtime_ns}))


def read_digest(path: Path, st: os.stat_result) -> str | None:
    """The sha256 remembered for ``path``, if its sidecar still describes this very file."""
    try:
        doc = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("size") != st.st_size or doc.get("mtimeNs") != st.st_mtime_ns:
        return None
    digest = wire.parse_sha256(str(doc.get("sha256")))
    return digest


def _entry(root: Path, name: str) -> ArtifactFile | None:
    path = root / name
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return ArtifactFile(name, path, st.st_size, read_digest(path, st))


def list_files(root: Path) -> list[ArtifactFile]:
    """The job's files in ``root``, by name."""
    try:
        names = sorted(os.listdir(root))
    except OSError:  # no directory: a job that left nothing
        return []
    found = (_entry(root, n) for n in names if wire.artifact_name_problem(n) is None)
    return [f for f in found if f is not None]


def find(root: Path, name: str) -> ArtifactFile | None:
    """One of the job's files (``name`` already checked with ``wire.artifact_name_problem``)."""
    return _entry(root, name)
