"""Storage backends behind one interface (``Store``)."""

from __future__ import annotations

from .base import SCHEMA_VERSION, Store

__all__ = ["SCHEMA_VERSION", "Store"]
