"""Pre-serialized response bodies of GET routes, valid for one position of the store's record.

Every entry was rendered after the store stood at ``head`` (``Store.head()``), and every write
that changes a job or a dataset moves the head before it is answered. So a request that reads
the head first and finds an entry for that head gets a body at least as new as every write
answered before it began: a client sees its own create in its next list, and on Redis a create
answered by another instance too. The first request that sees a new head drops every entry (they
are all stale); an entry rendered for an older head than the cache's is not kept.

Bounded twice: at most ``max_entries`` bodies and ``max_bytes`` bytes, least recently used out
first, so a client walking many distinct query strings evicts, never grows, the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """A rendered 200: its body, its entity tag and its ASGI headers (ETag included)."""

    body: bytes
    etag: str
    headers: list[tuple[bytes, bytes]]


class BodyCache:
    def __init__(self, max_entries: int = 512, max_bytes: int = 32 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.head: str | None = None
        self.size = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, head: str, key: Hashable) -> Entry | None:
        if head != self.head:
            self._entries.clear()
            self.size = 0
            self.head = head
            self.misses += 1
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, head: str, key: Hashable, entry: Entry) -> None:
        if head != self.head or len(entry.body) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old.body)
        self._entries[key] = entry
        self.size += len(entry.body)
        while len(self._entries) > self.max_entries or self.size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.size -= len(dropped.body)
