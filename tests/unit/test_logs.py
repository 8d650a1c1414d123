"""Text log lines (``--log-format text``): one line per record whatever its message arguments
and ``extra=`` fields hold, so a client-chosen completion id cannot forge log lines."""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import Iterator

import pytest

from chunkfold.logs import TextFormatter, escape, logging_config

pytestmark = pytest.mark.unit

FORGED = "x\n[2026-01-01 00:00:00,000] ERROR chunkfold.worker: forged\r\x00\x1b[2J\x85\u2028\u2029\x7f"
BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def make_record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("chunkfold.worker", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def after_time(line: str) -> str:
    """The line after its ``[time] `` (the time is in the local zone)."""
    return line.split("] ", 1)[1]


def test_control_characters_in_arguments_and_fields_are_escaped() -> None:
    record = make_record("finished %s: %s", FORGED, "tab\there", completion_id=FORGED, partition=3)
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert not any(c in line for c in BREAKS) and all(c not in line for c in "\x00\x1b\x7f")
    escaped = (
        "x\\n[2026-01-01 00:00:00,000] ERROR chunkfold.worker: forged\\r\\u0000\\u001b[2J"
        "\\u0085\\u2028\\u2029\\u007f"
    )
    assert after_time(line) == (
        f"WARNING chunkfold.worker: finished {escaped}: tab\\there completion_id={escaped} partition=3"
    )


def test_escapes_cannot_be_faked_with_a_backslash() -> None:
    assert escape("a\\nb") == "a\\\\nb"
    assert escape("a\nb") == "a\\nb"
    assert escape("a\\nb") != escape("a\nb")
    assert escape("plain text, ünïcode, emoji 🙂") == "plain text, ünïcode, emoji 🙂"


def test_a_traceback_follows_on_indented_lines() -> None:
    try:
        raise ValueError(FORGED)
    except ValueError:
        record = logging.LogRecord(
            "chunkfold.worker", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    first, *rest = TextFormatter().format(record).split("\n")
    assert after_time(first) == "ERROR chunkfold.worker: failed"
    assert rest[0] == "  Traceback (most recent call last):"
    assert all(part.startswith("  ") for part in rest)
    assert rest[-2:] == [  # the message's own line break kept, the forged line indented
        "  ValueError: x",
        "  [2026-01-01 00:00:00,000] ERROR chunkfold.worker: forged\\r\\u0000\\u001b[2J\\u0085"
        "\\u2028\\u2029\\u007f",
    ]
    assert not any(c in "".join(rest) for c in BREAKS if c != "\n")


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_the_text_format_of_the_commands_writes_one_line_per_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.config.dictConfig(logging_config("info", "text"))
    logging.getLogger("chunkfold.audit").warning(
        "conflict: %s kept the stored one", FORGED, extra={"completion_id": FORGED}
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert after_time(lines[0]).startswith("WARNING chunkfold.audit: conflict: x\\n[2026-01-01")
    assert lines[0].endswith(" completion_id=" + escape(FORGED))
