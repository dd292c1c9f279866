"""mangwale: ML training jobs with live progress."""

from __future__ import annotations

__version__ = "0.1.0"
