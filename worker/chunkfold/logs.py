"""Structured logs: one JSON object per line, with the completion id on every line about one; or
plain text, one escaped line per record."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

CONTEXT_FIELDS = ("completion_id", "status", "reason", "partition", "offset", "chunks", "events")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...context}``; context comes from ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def _escape_table(keep: str = "") -> dict[int, str]:
    """``str.translate`` table writing out every character that could end a line or fake an
    escape: C0 controls, DEL, C1 controls (NEL breaks lines for some readers), the Unicode line
    and paragraph separators, and the backslash itself; except those in ``keep``."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
    codes = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, ord("\\")]
    return {code: named.get(chr(code), f"\\u{code:04x}") for code in codes if chr(code) not in keep}


_ESCAPES = _escape_table()
_ESCAPES_BUT_NEWLINE = _escape_table(keep="\n")


def escape(text: str) -> str:
    """``text`` as one line: nothing in it can end the line, and ``\\`` marks only escapes."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``[time] LEVEL logger: message key=value ...`` (the JSON lines' context fields).

    Every interpolated value is escaped (:func:`escape`), so a record is one line whatever its
    message arguments or ``extra=`` fields hold (a completion id is the client's text) and no
    record can forge another. A traceback follows on lines indented by two spaces, which no
    record's first line is."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"[{self.formatTime(record)}] {record.levelname} {escape(record.name)}: "
            f"{escape(record.getMessage())}"
        )
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line += f" {name}={escape(str(value))}"
        if record.exc_info:
            line += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += _indented(self.formatStack(record.stack_info))
        return line


def _indented(block: str) -> str:
    """``block`` (a traceback) as lines that start with two spaces, controls but ``\\n`` escaped."""
    return "".join(f"\n  {part}" for part in block.translate(_ESCAPES_BUT_NEWLINE).split("\n"))


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the worker: JSON (default) or plain text on stderr."""
    formatter: dict[str, Any] = {"()": f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }
