"""Log setup for the gateway's processes: one line per event, human-readable or JSON, with the
fields the event carries, and never a token."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import IO, Any

import orjson

from gateway.settings import LogSettings

# Everything a LogRecord has of its own; any other attribute came in `extra=` as a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
# A JWT (header.payload.signature, base64url; the header always starts `{"` = `eyJ`): a
# token that reaches a log line through an exception's text is cut to its header.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Libraries whose INFO lines are per request (httpx: each OPA decision and revision poll,
# every second; uvicorn.access: each scrape) or say what admin_listening says, wrongly for
# an embedded server ("Press CTRL+C to quit"): their warnings and errors still show.
_CHATTY = ("httpx", "httpcore", "uvicorn.access", "uvicorn.error")


def redact(text: str) -> str:
    return _JWT.sub("<token>", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and k != "event"}


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, msg, logger, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())


class HumanFormatter(logging.Formatter):
    """`ts level logger: msg key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        )
        fields = _fields(record)
        event = getattr(record, "event", None)
        if event:
            fields = {"event": event, **fields}
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def log_format(settings: LogSettings, stream: IO[str] | None = None) -> str:
    """The format in effect: the setting, else human on a terminal and JSON otherwise."""
    out = stream if stream is not None else sys.stderr
    return settings.format or ("human" if out.isatty() else "json")


def configure_logging(settings: LogSettings, stream: IO[str] | None = None) -> logging.Handler:
    """Send the process's logs to `stream` (stderr) in the settings' format and level; a
    second call replaces the first's handler (a reload changes the level)."""
    out = stream if stream is not None else sys.stderr
    fmt = log_format(settings, out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.set_name("pgwarden")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "pgwarden"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
