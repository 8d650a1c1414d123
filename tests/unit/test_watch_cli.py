"""``chunkfold watch``: its event-stream decoder on awkward input, and the command against a tiny
query listener served from a thread of this test (the command runs its own event loop): the
events as JSON lines and exit 0, each refusal one line on stderr and exit 1, bad arguments exit 2."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from chunkfold.cli import main
from chunkfold.query.resume import sse_frame
from chunkfold.watch import ServerSentEvent, SseDecoder, events_url
from tests.postgres import free_port

pytestmark = pytest.mark.unit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(autouse=True)
def no_chunkfold_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read the environment: these tests set what they need on a clean one."""
    import os

    for name in list(os.environ):
        if name.startswith("CHUNKFOLD_"):
            monkeypatch.delenv(name)


# -- the decoder -----------------------------------------------------------------------------


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SseDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


AWKWARD = (
    b"\xef\xbb\xbf: a comment first, after a byte order mark\r\n"
    b"retry: 1000\r\n"
    b"id: 1\r\n"
    b"event: content.delta\r\n"
    b'data: {"seq": 1,\r\n'
    b'data:"text": "h\xc3\xa9"}\r\n'
    b"\r\n"
    b": keep-alive\r"
    b"\r"
    b"unknown: field\n"
    b"data\n"
    b"\n"
    b"id: bad\x00id\n"
    b"data:  two spaces keep one\n"
    b"\n"
    b"event: no data, so never dispatched\n"
    b"\n"
    b"id: 9\n"
    b"data: the stream ends before this event does\n"
)
AWKWARD_EVENTS = [
    ServerSentEvent('{"seq": 1,\n"text": "hé"}', "content.delta", "1"),
    ServerSentEvent("", "message", "1"),
    ServerSentEvent(" two spaces keep one", "message", "1"),
]


def test_the_decoder_follows_the_standard_on_awkward_input() -> None:
    assert decode(AWKWARD) == AWKWARD_EVENTS


def test_the_decoder_gives_the_same_events_however_the_bytes_are_cut() -> None:
    """Cut after every byte, and at every single point (a CR ending one chunk with the LF of its
    CRLF starting the next, a UTF-8 sequence split in two)."""
    assert decode(*(AWKWARD[i : i + 1] for i in range(len(AWKWARD)))) == AWKWARD_EVENTS
    for cut in range(len(AWKWARD)):
        assert decode(AWKWARD[:cut], AWKWARD[cut:]) == AWKWARD_EVENTS, cut


def test_lone_cr_lf_and_crlf_each_end_one_line() -> None:
    assert decode(b"data: a\rdata: b\ndata: c\r\n\r\n") == [ServerSentEvent("a\nb\nc")]
    assert decode(b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n") == [
        ServerSentEvent("a"),
        ServerSentEvent("b"),
    ]


def test_the_id_stays_until_changed_and_an_empty_id_resets_it() -> None:
    events = decode(b"id: 4\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert [event.id for event in events] == ["4", "4", ""]


def test_the_events_url_escapes_the_id_into_one_segment() -> None:
    url = events_url("http://h:1/base/", "chat cmpl/1?x", 3)
    assert str(url) == "http://h:1/base/completions/chat%20cmpl%2F1%3Fx/events?from_seq=3"


# -- the command against a listener -----------------------------------------------------------


@contextmanager
def listener(handler: Handler) -> Iterator[str]:
    """``handler`` serving ``GET /completions/{id}/events`` on a free loopback port, in a thread."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/completions/{id}/events", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


EVENTS = [
    {"type": "chunk.first", "completion_id": "c 1", "choice_index": 0, "seq": 0},
    {"type": "content.delta", "completion_id": "c 1", "choice_index": 0, "seq": 1, "delta": "a\nb"},
    {"type": "content.done", "completion_id": "c 1", "choice_index": 0, "seq": 2, "content": "a\nb"},
]


class EventsListener:
    """Streams ``EVENTS`` from ``from_seq`` on, in small writes with keep-alive comments between,
    when the request carries ``token`` (if any); records each request it gets."""

    def __init__(
        self, token: str | None = None, break_off_after: int | None = None, unavailable: int = 0
    ) -> None:
        self.token = token
        self.break_off_after = break_off_after
        self.unavailable = unavailable
        """The first requests answered 503, as while the fleet rebalances."""
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            {
                "id": request.match_info["id"],
                "query": dict(request.query),
                "authorization": request.headers.get("Authorization"),
            }
        )
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if len(self.requests) <= self.unavailable:
            return web.json_response({"error": "rebalancing"}, status=503, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS[int(request.query["from_seq"]) :]:
            if event["seq"] == self.break_off_after and len(self.requests) == self.unavailable + 1:
                assert request.transport is not None
                request.transport.close()
                return response
            frame = sse_frame(orjson.dumps(event))
            for piece in (b": keep-alive\n\n", frame[:7], frame[7:]):
                await response.write(piece)
                await asyncio.sleep(0.01)
        await response.write_eof()
        return response


def refusing(status: int, **headers: str) -> Handler:
    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response({"error": f"the reason for {status}"}, status=status, headers=headers)

    return refuse


def watch(*args: str) -> int:
    return main(["watch", *args])


def lines(text: str) -> list[Any]:
    return [orjson.loads(line) for line in text.splitlines()]


def test_watch_prints_each_event_as_one_json_line_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    served = EventsListener()
    with listener(served) as url:
        assert watch("c 1", "--url", url) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.count("\n") == 3
    assert lines(out.out) == EVENTS
    assert served.requests == [{"id": "c 1", "query": {"from_seq": "0"}, "authorization": None}]


def test_watch_asks_from_the_seq_given(capsys: pytest.CaptureFixture[str]) -> None:
    served = EventsListener()
    with listener(served) as url:
        assert watch("c 1", "--from-seq", "1", "--url", url + "/") == 0
    assert lines(capsys.readouterr().out) == EVENTS[1:]
    assert served.requests[0]["query"] == {"from_seq": "1"}


def test_watch_sends_the_token_of_its_file_or_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    served = EventsListener(token="s3cret")
    with listener(served) as url:
        assert watch("c 1", "--url", url, "--token-file", str(token_file)) == 0
        monkeypatch.setenv("CHUNKFOLD_QUERY_TOKEN", "s3cret")
        assert watch("c 1", "--url", url) == 0
    assert lines(capsys.readouterr().out) == EVENTS + EVENTS
    assert [request["authorization"] for request in served.requests] == ["Bearer s3cret"] * 2


def test_watch_finds_the_listener_of_its_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with listener(EventsListener()) as url:
        monkeypatch.setenv("CHUNKFOLD_QUERY_URL", url)
        assert watch("c 1") == 0
        monkeypatch.delenv("CHUNKFOLD_QUERY_URL")
        monkeypatch.setenv("CHUNKFOLD_QUERY_PORT", url.rsplit(":", 1)[1])
        assert watch("c 1") == 0
    assert lines(capsys.readouterr().out) == EVENTS + EVENTS


def assert_one_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.startswith("chunkfold watch: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


@pytest.mark.parametrize(
    ("handler", "parts"),
    [
        (EventsListener(token="s3cret"), ["401", "--token-file"]),
        (refusing(404), ["no completion 'c 1' (404 the reason for 404)"]),
        (refusing(400), ["answered 400: the reason for 400"]),
        (refusing(503, **{"Retry-After": "2"}), ["(503 the reason for 503): retry in 2 s"]),
        (refusing(200), ["application/json, not an event stream"]),
    ],
    ids=["401", "404", "400", "503", "not-sse"],
)
def test_a_refusal_is_one_line_and_exit_1(
    handler: Handler, parts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with listener(handler) as url:
        assert watch("c 1", "--url", url, "--retry-for", "0") == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert_one_line(out.err, *parts)


def test_no_listener_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert watch("c 1", "--url", url, "--retry-for", "0") == 1
    assert_one_line(capsys.readouterr().err, f"cannot connect to {url}")


def test_a_stream_broken_off_says_where_to_resume_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with listener(EventsListener(break_off_after=2)) as url:
        assert watch("c 1", "--url", url, "--retry-for", "0") == 1
    out = capsys.readouterr()
    assert lines(out.out) == EVENTS[:2]
    assert_one_line(out.err, "broke the stream off", "resume with --from-seq 2")


def test_watch_waits_out_a_rebalance_and_prints_every_event_once(capsys: pytest.CaptureFixture[str]) -> None:
    served = EventsListener(unavailable=2)
    started = time.monotonic()
    with listener(served) as url:
        assert watch("c 1", "--url", url) == 0
    out = capsys.readouterr()
    assert lines(out.out) == EVENTS
    assert out.err == ""  # retries are told only on a terminal
    assert [r["query"] for r in served.requests] == [{"from_seq": "0"}] * 3
    assert time.monotonic() - started >= 2.0, "each retry waits the Retry-After the listener gave"


def test_watch_resumes_a_broken_stream_after_the_last_event_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = EventsListener(break_off_after=2)
    with listener(served) as url:
        assert watch("c 1", "--from-seq", "1", "--url", url) == 0
    assert lines(capsys.readouterr().out) == EVENTS[1:]  # seq 1 once, though it came before the break
    assert [r["query"] for r in served.requests] == [{"from_seq": "1"}, {"from_seq": "2"}]


def test_retries_end_after_retry_for_with_the_last_failure(capsys: pytest.CaptureFixture[str]) -> None:
    served = EventsListener(unavailable=100)
    started = time.monotonic()
    with listener(served) as url:
        assert watch("c 1", "--url", url, "--retry-for", "1.5") == 1
    assert 1.0 <= time.monotonic() - started < 10
    assert (
        len(served.requests) == 2
    )  # the first, and one retry after Retry-After: 1; a second would end past 1.5 s
    assert_one_line(capsys.readouterr().err, "(503 rebalancing): retry in 1 s")


def test_a_refusal_that_cannot_pass_is_not_retried(capsys: pytest.CaptureFixture[str]) -> None:
    served = EventsListener(token="s3cret")
    with listener(served) as url:
        assert watch("c 1", "--url", url) == 1
    assert len(served.requests) == 1
    assert_one_line(capsys.readouterr().err, "401")


def test_an_event_that_is_not_json_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 0\ndata: {not json\n\n")
        return response

    with listener(garbage) as url:
        assert watch("c 1", "--url", url) == 1
    assert_one_line(capsys.readouterr().err, "event 0 is not JSON")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["c 1", "--from-seq", "-1", "--url", "http://127.0.0.1:1"], "--from-seq -1: a seq is 0 or more"),
        (["", "--url", "http://127.0.0.1:1"], "the completion id is empty"),
        (["c 1", "--url", "ftp://host:1"], "'ftp://host:1' is not an http(s)://host:port URL"),
        (["c 1", "--url", "127.0.0.1:8080"], "is not an http(s)://host:port URL"),
        (["c 1"], "which query listener? give --url"),
        (["c 1", "--url", "http://h:1", "--retry-for", "-1"], "--retry-for -1: 0 or more seconds"),
        (["c 1", "--url", "http://h:1", "--retry-for", "nan"], "--retry-for nan: 0 or more seconds"),
        (["c 1", "--url", "http://h:1", "--token-file", "/nonexistent/token"], "cannot read it"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert watch(*args) == 2
    assert_one_line(capsys.readouterr().err, message)


def test_an_empty_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "token").write_text(" \n")
    assert watch("c 1", "--url", "http://h:1", "--token-file", str(tmp_path / "token")) == 2
    assert_one_line(capsys.readouterr().err, "the file is empty")
