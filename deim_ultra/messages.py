"""Helpers for the wording of log lines and errors."""

from __future__ import annotations


def listing(items: list[str], limit: int = 12) -> str:
    """The first `limit` items comma-separated, then how many more, to keep error messages readable."""
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
