"""Error messages for outside callers: a client's own strings come back short, nothing internal does."""

from __future__ import annotations

CLIENT_TEXT_CHARS = 64
LISTED = 10


def quoted(text: str, limit: int = CLIENT_TEXT_CHARS) -> str:
    """A client's string as an error may show it: repr-quoted, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def listed(texts: list[str], limit: int = LISTED, quote: bool = True) -> str:
    """At most `limit` client strings, each cut short, and how many more there were."""
    shown = [quoted(t) if quote else quoted(t)[1:-1] for t in texts[:limit]]
    more = f" (and {len(texts) - limit} more)" if len(texts) > limit else ""
    return ", ".join(shown) + more
