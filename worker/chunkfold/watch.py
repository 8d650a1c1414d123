"""Follow one completion's events from a worker's query listener (``chunkfold watch``).

``follow`` asks ``GET /completions/{id}/events?from_seq=N`` and writes each event's JSON on one
line as it arrives; the server ends the stream after the completion's last event. The stream is
Server-Sent Events, decoded by ``SseDecoder`` as the HTML standard's event-stream parser does
(any of CRLF, LF and CR ends a line, comments, multi-line data, ids). A refusal (401, 404,
400, 503), a listener that cannot be reached or a stream that breaks off is a ``WatchError``
with one line naming the problem; the passing ones (503, unreachable, broken off) are retried
for a while first, resuming after the last event written.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

RETRY_DELAY_S = 1.0
"""How long to wait before a retry when the listener did not say (``Retry-After``)."""

CONNECT_TIMEOUT_S = 10.0
"""How long connecting may take; reading has no limit (a live completion may pause for long)."""

LINE_END = re.compile(rb"\r\n|\r|\n")
"""What ends a line of an event stream (these bytes never occur inside a UTF-8 sequence)."""

DETAIL_CHARS = 200
"""The most of a refusal's body a ``WatchError`` quotes."""


class WatchError(Exception):
    """The query listener refused, could not be reached, or broke the stream off; one line."""


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its ``data`` (lines joined with ``\\n``), ``event`` type and the
    stream's last event ``id`` when it was dispatched."""

    data: str
    event: str = "message"
    id: str = ""


class SseDecoder:
    """Turns the bytes of a ``text/event-stream`` body, fed in chunks cut anywhere, into events.

    A line is a field (``name: value``, one space after the colon dropped), a comment (``:``
    first) or empty, which dispatches the event gathered so far if it has data. Unknown fields
    and ``retry`` are ignored; an ``id`` holding NUL is ignored; the last event's lines, not
    ended by an empty line when the stream ends, are dropped, as the standard says.
    """

    def __init__(self) -> None:
        self.last_event_id = ""
        self._pending = b""
        self._skip_lf = False  # the previous chunk ended with CR: an LF starting this one is its CRLF
        self._at_start = True
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by ``chunk``."""
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = False
        buffer = self._pending + chunk
        events = []
        start = 0
        for end in LINE_END.finditer(buffer):
            event = self._line(buffer[start : end.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end.end()
            self._skip_lf = end.group() == b"\r" and start == len(buffer)
        self._pending = buffer[start:]
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if self._at_start:
            line = line.removeprefix("\ufeff")
            self._at_start = False
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self.last_event_id)


def events_url(base_url: str, completion_id: str, from_seq: int) -> URL:
    """``<base_url>/completions/<id>/events?from_seq=<from_seq>``, the id one escaped path segment."""
    base = URL(base_url)
    path = f"{base.raw_path.rstrip('/')}/completions/{quote(completion_id, safe='')}/events"
    return base.with_path(path, encoded=True).with_query(from_seq=str(from_seq))


class Retryable(WatchError):
    """A failure that may pass: the fleet rebalancing (503), a listener not reachable, a stream
    broken off. ``delay``: the seconds the listener asked to wait (``Retry-After``), if any."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


async def follow(
    base_url: str,
    completion_id: str,
    from_seq: int,
    token: str | None,
    out: TextIO,
    *,
    retry_for: float = 0.0,
    notify: Callable[[str], None] | None = None,
) -> None:
    """Write the events of ``completion_id`` from seq ``from_seq`` on to ``out``, each event's
    JSON on one line, flushed as it comes, until the listener at ``base_url`` ends the stream.
    ``token``: the bearer token to send (None: none). Raises ``WatchError``.

    A ``Retryable`` failure is retried for up to ``retry_for`` seconds from the first of an
    unbroken run of them (after the listener's ``Retry-After``, else ``RETRY_DELAY_S``), each
    time from the seq after the last event written: the lines written are the events from
    ``from_seq`` on, each once, however often the stream is resumed. ``notify`` hears a line
    before each retry."""
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    next_seq = from_seq
    failing_since: float | None = None
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            stream = _Stream(next_seq)
            try:
                await stream.read(session, base_url, completion_id, headers, out)
                return
            except Retryable as exc:
                now = time.monotonic()
                if stream.connected or failing_since is None:
                    failing_since = now  # a stream that was answered starts a new run of failures
                next_seq = stream.next_seq
                left = failing_since + retry_for - now
                delay = RETRY_DELAY_S if exc.delay is None else exc.delay
                if left <= 0 or delay > left:
                    raise
                if notify is not None:
                    notify(f"{exc}; retrying from seq {next_seq} in {delay:g} s")
                await asyncio.sleep(delay)


class _Stream:
    """One request for the events from ``next_seq`` on; ``next_seq`` follows the events written."""

    def __init__(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self.connected = False

    async def read(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        completion_id: str,
        headers: dict[str, str],
        out: TextIO,
    ) -> None:
        decoder = SseDecoder()
        try:
            async with session.get(
                events_url(base_url, completion_id, self.next_seq), headers=headers
            ) as response:
                if response.status != 200:
                    body = await response.text(errors="replace")
                    message = _refusal(response, completion_id, body)
                    if response.status == 503:
                        raise Retryable(message, _retry_after(response))
                    raise WatchError(message)
                if response.content_type != "text/event-stream":
                    raise WatchError(f"{base_url} answered {response.content_type}, not an event stream")
                self.connected = True
                async for chunk in response.content.iter_any():
                    for event in decoder.feed(chunk):
                        out.write(_json_line(event) + "\n")
                        out.flush()
                        if event.id.isdigit():
                            self.next_seq = int(event.id) + 1
        except aiohttp.ClientConnectorError as exc:
            raise Retryable(
                f"cannot connect to {base_url}: {exc.os_error.strerror or exc.os_error}"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            raise Retryable(
                f"{base_url} broke the stream off before its end: resume with --from-seq {self.next_seq}"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WatchError(f"{base_url}: {type(exc).__name__}: {exc}") from None


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    """The listener's ``Retry-After`` in seconds (the delta-seconds form; a date is ignored)."""
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _refusal(response: aiohttp.ClientResponse, completion_id: str, body: str) -> str:
    """One line saying why the listener did not stream the events."""
    detail = _reason(body) or response.reason or ""
    if response.status == 401:
        return (
            f"the query listener refused the request (401 {detail}): give its bearer token with --token-file"
        )
    if response.status == 404:
        return (
            f"no completion {completion_id!r} (404 {detail}): unknown to the fleet, or finished and forgotten"
        )
    if response.status == 503:
        retry = response.headers.get("Retry-After")
        when = f": retry in {retry} s" if retry else ""
        return f"the fleet cannot answer now, its partitions are moving (503 {detail}){when}"
    return f"the query listener answered {response.status}: {detail}"


def _reason(body: str) -> str:
    """What a refusal's body says: the query listener's ``{"error": ...}``, else its first line."""
    try:
        reason = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        reason = None
    text = reason if isinstance(reason, str) else (body.strip().splitlines() or [""])[0]
    return text[:DETAIL_CHARS]


def _json_line(event: ServerSentEvent) -> str:
    """The event's JSON on one line (a multi-line ``data`` is JSON with line breaks as blanks)."""
    try:
        value = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        raise WatchError(f"event {event.id or '(no id)'} is not JSON: {event.data[:80]!r}") from None
    return event.data if "\n" not in event.data else orjson.dumps(value).decode()
