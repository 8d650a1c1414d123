"""SSE / JSON Lines framing of captures (``chunkfold.core.inputs``)."""

from __future__ import annotations

import pytest

from chunkfold.core.inputs import detect_format, iter_sse_data

pytestmark = pytest.mark.unit


def test_sse_framing_follows_the_spec() -> None:
    text = "\ufeff: keep-alive comment\r\ndata: one\r\n\r\nevent: x\nid: 7\ndata: two\ndata: lines\n\n:c\rdata:three\r\r"
    assert [data for _, data in iter_sse_data(text)] == ["one", "two\nlines", "three"]


def test_an_unterminated_last_event_is_still_delivered() -> None:
    assert [data for _, data in iter_sse_data("data: a\n\ndata: [DONE]")] == ["a", "[DONE]"]


def test_format_detection() -> None:
    assert detect_format(": hi\n\ndata: {}\n\n") == "sse"
    assert detect_format('\n{"id": "x"}\n') == "jsonl"
