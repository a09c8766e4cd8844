"""Log output of unclip's server processes: `text` (the default) or `json`, one object per line.

Every record logged while a request is being answered carries that request's id and trace id
(`unclip.observe`), and each request ends with one line of its own (logger `unclip.requests`)
with its method, status and duration, so an operator can follow one request across the gateway
and the stages by its id.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
# Attributes a record may carry (through `extra=` or the filter below) that both formats show.
CONTEXT_FIELDS = ("request_id", "trace_id", "protocol", "method", "status", "duration_ms")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestContextFilter(logging.Filter):
    """Puts the current request's id and trace id on every record logged while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        from unclip import observe, tracing

        if getattr(record, "request_id", None) is None:
            record.request_id = observe.current_request_id()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = tracing.trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={value}" for name in ("request_id", "trace_id") if (value := getattr(record, name, None)))
        return f"{line} [{context}]" if context else line


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send this process's logs to stderr in `log_format`, replacing earlier handlers."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("unclip").setLevel(level)
