"""Rate-limited logs for the HTTP server (`http.serve` puts `LogRateLimit` on uvicorn's and
the root's handlers): a flood of failing connections once wrote 114 MB of tracebacks in 40 s;
now each kind of record is written at most `limit` times per interval, then one line says
how many were dropped."""

from __future__ import annotations

import logging
import sys
import threading
import time


class LogRateLimit(logging.Filter):
    """At most `limit` records of one kind (logger, level and message template, not the
    formatted text) per `interval` seconds. The record after them says that the rest are
    dropped (without its traceback); the first one of the next interval says how many
    were. Kinds beyond `max_kinds` share one count.

    A handler filter: put it on the handlers, where it sees the records of every logger
    (a logger's own filters skip the records of its children)."""

    def __init__(self, limit: int, interval: float, max_kinds: int = 512):
        super().__init__()
        self.limit, self.interval, self.max_kinds = limit, interval, max_kinds
        self._kinds: dict[tuple, list] = {}  # kind -> [interval start, records, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        kind = (record.name, record.levelno, template)
        now = time.monotonic()
        with self._lock:
            if kind not in self._kinds and len(self._kinds) >= self.max_kinds:
                kind = ("other",)
            count = self._kinds.get(kind)
            if count is None or now - count[0] >= self.interval:
                dropped = count[2] if count is not None else 0
                self._kinds[kind] = [now, 1, 0]
                if dropped:
                    _annotate(record, f"[{dropped} more like this were dropped in the last {self.interval:g} s]")
                return True
            count[1] += 1
            if count[1] <= self.limit:
                return True
            if count[1] == self.limit + 1:
                _annotate(record, f"[and more like this: dropped for the next {self.interval - (now - count[0]):.0f} s]")
                record.exc_info = record.exc_text = record.stack_info = None
                return True
            count[2] += 1
            return False


def _annotate(record: logging.LogRecord, note: str) -> None:
    if isinstance(record.msg, str):
        record.msg = record.msg + " " + note.replace("%", "%%")


def limit_logs(limiter: logging.Filter, loggers: tuple[str, ...] = ("", "uvicorn", "uvicorn.access")) -> None:
    """Put `limiter` on the handlers of `loggers` (uvicorn's own, and the root's, which
    asyncio's and softprompt's records reach; a stderr handler is added to the root if it
    has none, instead of Python's unfiltered last resort)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(name)s: %(message)s"))
        root.addHandler(handler)
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if limiter not in handler.filters:
                handler.addFilter(limiter)


__all__ = ["LogRateLimit", "limit_logs"]
