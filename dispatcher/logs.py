"""Structured logging: one JSON object per line (or a plain line for people),
every line carrying the flow run it is about, and no credential value ever.

The flow run id travels in a context variable, so every line logged inside a
run's task carries it without each call having to pass it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Optional

ROOT_LOGGER = "pushpool"
_log_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("pushpool_log_context", default={})

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)
MASK = "********"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT_LOGGER}.{name.removeprefix(ROOT_LOGGER + '.')}")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (such as `flow_run_id`) to every line logged inside the block."""
    token = _log_context.set({**_log_context.get(), **{k: str(v) for k, v in fields.items()}})
    try:
        yield
    finally:
        _log_context.reset(token)


class Redactor:
    """Replaces known secret values with a mask. Secrets are added as they
    become known: settings at start, block data as blocks are resolved."""

    MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if isinstance(s, str) and len(s) >= self.MIN_SECRET_LENGTH)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class _ContextFilter(logging.Filter):
    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _log_context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        record.msg = self.redactor.redact(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, self.redactor.redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, instead of leaving it to the formatter.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            # Also when another handler's filter rendered it first, with what it knew.
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True


def redacting_filter(redactor: Redactor) -> logging.Filter:
    """A handler filter that adds the log context (flow run id, pool) to each
    record and masks every known secret in it; for handlers pushpool did not
    make itself (such as aws-lambda-powertools')."""
    log_filter = _ContextFilter(redactor)
    log_filter._pushpool = True  # type: ignore[attr-defined]
    return log_filter


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{datetime.fromtimestamp(record.created).strftime('%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += f"  [{extras}]"
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def configure_logging(
    redactor: Redactor, *, level: str = "INFO", json_lines: bool = True, stream: Optional[Any] = None
) -> logging.Handler:
    """Send pushpool's logs to `stream` (stderr) through the redactor. Idempotent."""
    root = logging.getLogger(ROOT_LOGGER)
    for handler in list(root.handlers):
        if getattr(handler, "_pushpool", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._pushpool = True  # type: ignore[attr-defined]
    handler.addFilter(_ContextFilter(redactor))
    handler.setFormatter(JSONFormatter() if json_lines else PlainFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return handler
