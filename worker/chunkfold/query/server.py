"""The query listener: any member of the group answers for any completion.

Routes (every one requires ``Authorization: Bearer <token>`` when a token is configured; 401
with ``WWW-Authenticate: Bearer`` otherwise; a token file is followed as it changes, ``tokens``):

* ``GET /completions/{id}``: the completion as it stands (``Processor.snapshot``), 200 JSON;
  404 when its owner holds nothing for that id.
* ``GET /completions/{id}/events?from_seq=N``: its events from seq N on as server-sent events
  (``resume.EventsSource``), ending after its last event; without ``from_seq``, a
  ``Last-Event-ID`` header resumes after that seq; 0 otherwise. A ``: keep-alive`` comment
  after ``KEEP_ALIVE_S`` without an event keeps proxies from closing a paused stream.

The id is any UTF-8 string, percent-encoded in the path. A completion lives on the member that
owns its input partition. A request for another member's completion is proxied to that member
(one hop: the proxied request carries ``X-Chunkfold-Forwarded: 1``, and a forwarded request
that lands on a member that does not own the partition gets 503 rather than a second hop). The
events are read from the events topic by the member the client is connected to; only the
snapshots that tell where they start and end come from the owner.

503 with ``Retry-After: 1``, never a stale or partial answer, while the group rebalances, the
owner restores state, the owner is unknown or unreachable. With ``exactly_once`` a snapshot is
taken from the state as last committed (what ``read_committed`` readers of the outputs can
see), never while a commit is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Set
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from chunkfold.config import Settings
from chunkfold.query.owners import Owners
from chunkfold.query.resume import sse_frame
from chunkfold.query.tokens import BearerTokens

log = logging.getLogger("chunkfold.query")

RETRY_AFTER_S = 1
FORWARDED_HEADER = "X-Chunkfold-Forwarded"
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=5.0, sock_connect=2.0)
"""A member that does not answer a snapshot within this is taken as unreachable (503)."""
RESUME_PATIENCE_S = 30.0
"""How long a resume stream waits for the completion's owner to answer again (a rebalance in
progress) before it ends without its last events."""
KEEP_ALIVE_S = 15.0
"""A resume stream with no event for this long gets a comment line (``: keep-alive``), which
clients ignore: proxies and load balancers close connections idle for a minute or so, and a
live completion may pause that long (a tool call being prepared)."""
KEEP_ALIVE_FRAME = b": keep-alive\n\n"
JSON_CONTENT_TYPE = "application/json"
SEQ_PATTERN = re.compile(r"[0-9]{1,18}")

SnapshotFetch = Callable[[], Awaitable[dict[str, Any] | None]]


class Snapshots(Protocol):
    """What the listener reads of the worker's ``Processor``."""

    @property
    def assigned(self) -> Set[int]: ...

    def snapshot(self, completion_id: str, *, committed: bool = False) -> dict[str, Any] | None: ...


class EventsReader(Protocol):
    """``chunkfold.query.resume.EventsSource``."""

    def resume_events(
        self, completion_id: str, from_seq: int, snapshot: SnapshotFetch
    ) -> AsyncIterator[bytes]: ...


async def no_commit_in_flight() -> None:
    """``between_commits`` of a worker whose state the listener may read at any moment."""


class Unavailable(Exception):
    """No member can answer for the completion right now: 503, try again."""


class BadRequest(Exception):
    """The request names no completion or seq this listener can read: 400."""


class OwnerFailed(Exception):
    """The owner answered something other than a snapshot, 404 or 503 (a token it refuses)."""


class Queries:
    """The handlers of one worker's query listener."""

    def __init__(
        self,
        settings: Settings,
        processor: Snapshots,
        owners: Owners,
        partitions_of_input: Callable[[bytes], int],
        events: EventsReader,
        between_commits: Callable[[], Awaitable[None]],
        session: aiohttp.ClientSession,
        tokens: BearerTokens,
        keep_alive_s: float = KEEP_ALIVE_S,
    ) -> None:
        self.processor = processor
        self.keep_alive_s = keep_alive_s
        self.owners = owners
        self.partitions_of_input = partitions_of_input
        self.events = events
        self.between_commits = between_commits
        self.session = session
        self.own_url = settings.query_url()
        self.committed = settings.processing_guarantee == "exactly_once"
        self.tokens = tokens

    # -- routing ------------------------------------------------------------------------

    def owner_url(self, completion_id: str, *, forwarded: bool) -> str | None:
        """None when this member answers for ``completion_id`` itself, else the URL of the
        member that does. Raises ``Unavailable`` when neither can answer now."""
        if not self.owners.settled():
            raise Unavailable("the group is rebalancing or this member is restoring state")
        partition = self.partitions_of_input(completion_id.encode("utf-8"))
        if partition in self.processor.assigned:
            return None
        if forwarded:
            raise Unavailable(f"this member does not own partition {partition} (ownership is moving)")
        url = self.owners.owner(partition)
        if url is None:
            raise Unavailable(f"the owner of partition {partition} is not known")
        if not url:
            raise Unavailable(f"the owner of partition {partition} runs no query listener")
        if url == self.own_url:
            raise Unavailable(f"partition {partition} is being taken over by this member")
        return url

    async def snapshot_json(self, completion_id: str, *, forwarded: bool) -> bytes | None:
        """The completion's snapshot as JSON, from this member or its owner; None: unknown."""
        await self.between_commits()
        url = self.owner_url(completion_id, forwarded=forwarded)
        if url is None:
            snapshot = self.processor.snapshot(completion_id, committed=self.committed)
            return None if snapshot is None else orjson.dumps(snapshot)
        return await self.forward(url, completion_id)

    async def forward(self, url: str, completion_id: str) -> bytes | None:
        """The owner's answer: with this member's token, then (an owner that refuses it has not
        seen a rotation yet) with the previous one while its grace lasts."""
        target = URL(f"{url}/completions/{quote(completion_id, safe='')}", encoded=True)
        *first, last = self.tokens.for_forwarding()
        for token in first:
            status, body = await self._ask_owner(url, target, token)
            if status != 401:
                return _owner_answer(url, status, body)
        return _owner_answer(url, *await self._ask_owner(url, target, last))

    async def _ask_owner(self, url: str, target: URL, token: str | None) -> tuple[int, bytes]:
        headers = {FORWARDED_HEADER: "1"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self.session.get(target, headers=headers, timeout=FORWARD_TIMEOUT) as answer:
                return answer.status, await answer.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(f"the owner {url} is unreachable ({type(exc).__name__})") from None

    async def patient_snapshot(self, completion_id: str) -> dict[str, Any] | None:
        """The snapshot, waiting out a rebalance for up to ``RESUME_PATIENCE_S`` (a resume stream
        must not take "cannot answer now" for "finished and forgotten")."""
        deadline = time.monotonic() + RESUME_PATIENCE_S
        while True:
            try:
                body = await self.snapshot_json(completion_id, forwarded=False)
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_AFTER_S)
                continue
            return None if body is None else dict(orjson.loads(body))

    # -- handlers -----------------------------------------------------------------------

    @web.middleware
    async def guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The bearer token (compared in constant time), then the handler; ``Unavailable`` and
        ``OwnerFailed`` become 503 and 502, ``BadRequest`` 400."""
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not self.tokens.accepts(given):
            return _error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except Unavailable as exc:
            return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        except OwnerFailed as exc:
            return _error(502, str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))

    async def completion(self, request: web.Request) -> web.StreamResponse:
        completion_id = _completion_id(request)
        body = await self.snapshot_json(completion_id, forwarded=FORWARDED_HEADER in request.headers)
        if body is None:
            return _error(404, f"no completion {completion_id!r}")
        return web.Response(body=body, content_type=JSON_CONTENT_TYPE)

    async def completion_events(self, request: web.Request) -> web.StreamResponse:
        completion_id = _completion_id(request)
        from_seq = _from_seq(request)
        if await self.snapshot_json(completion_id, forwarded=False) is None:
            return _error(404, f"no completion {completion_id!r}")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)

        async def snapshot() -> dict[str, Any] | None:
            return await self.patient_snapshot(completion_id)

        values = self.events.resume_events(completion_id, from_seq, snapshot)
        sender = _KeptAlive(response, self.keep_alive_s)
        try:
            async for value in values:
                await sender.write(sse_frame(value))
        except ConnectionResetError:
            return response  # the client went away
        except Exception as exc:  # headers are sent: the stream can only end early
            log.warning("resuming the events of %r from seq %d stopped: %r", completion_id, from_seq, exc)
            return response
        finally:
            await sender.stop()
            if isinstance(values, AsyncGenerator):
                await values.aclose()
        await response.write_eof()
        return response


class _KeptAlive:
    """Writes to an event stream, and a ``KEEP_ALIVE_FRAME`` whenever nothing was written for
    ``idle_s`` (from a task of its own; the two never write at once)."""

    def __init__(self, response: web.StreamResponse, idle_s: float) -> None:
        self.response = response
        self.idle_s = idle_s
        self.writing = asyncio.Lock()
        self.last_write = time.monotonic()
        self.task = asyncio.create_task(self._keep_alive())

    async def write(self, data: bytes) -> None:
        async with self.writing:
            await self.response.write(data)
            self.last_write = time.monotonic()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.last_write + self.idle_s - time.monotonic())
            if time.monotonic() - self.last_write >= self.idle_s:
                try:
                    await self.write(KEEP_ALIVE_FRAME)
                except Exception:  # the client went away: the stream's next write says so too
                    return

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def _owner_answer(url: str, status: int, body: bytes) -> bytes | None:
    """A forwarded snapshot: the owner's body (200), None (404), or why there is none."""
    if status == 200:
        return body
    if status == 404:
        return None
    if status == 503:
        raise Unavailable(f"the owner {url} cannot answer now: {_reason(body)}")
    raise OwnerFailed(f"the owner {url} answered {status}: {_reason(body)}")


def _reason(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def _completion_id(request: web.Request) -> str:
    """The path's id, percent-decoded; 400 unless it is UTF-8."""
    completion_id = request.match_info["id"]
    try:
        completion_id.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the completion id is not UTF-8") from None
    return completion_id


def _from_seq(request: web.Request) -> int:
    """``from_seq``, else one after ``Last-Event-ID``, else 0; 400 unless a non-negative integer."""
    given = request.query.get("from_seq")
    if given is not None:
        if not SEQ_PATTERN.fullmatch(given):
            raise BadRequest(f"from_seq={given!r}: not a non-negative integer")
        return int(given)
    last = request.headers.get("Last-Event-ID")
    if last is not None:
        if not SEQ_PATTERN.fullmatch(last.strip()):
            raise BadRequest(f"Last-Event-ID {last!r}: not a seq")
        return int(last) + 1
    return 0


async def serve_queries(
    settings: Settings,
    processor: Snapshots,
    owners: Owners,
    partitions_of_input: Callable[[bytes], int],
    events: EventsReader,
    *,
    between_commits: Callable[[], Awaitable[None]] = no_commit_in_flight,
    keep_alive_s: float = KEEP_ALIVE_S,
) -> web.AppRunner:
    """Serve the query listener on ``query_host``:``query_port``; ``cleanup()`` the runner to
    stop it. ``partitions_of_input`` maps a completion id (UTF-8 key) to its input partition;
    ``between_commits`` returns at a moment no commit is in flight (an exactly_once worker's
    snapshot must not see state applied for a transaction not committed yet), and the snapshot
    is taken right after it, without yielding to the event loop."""
    tokens = BearerTokens(settings)
    session = aiohttp.ClientSession()
    queries = Queries(
        settings,
        processor,
        owners,
        partitions_of_input,
        events,
        between_commits,
        session,
        tokens,
        keep_alive_s,
    )
    app = web.Application(middlewares=[queries.guard])
    app.router.add_get("/completions/{id}", queries.completion)
    app.router.add_get("/completions/{id}/events", queries.completion_events)

    async def close_session(_app: web.Application) -> None:
        await session.close()

    app.on_cleanup.append(close_session)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.query_host, settings.query_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info(
        "query listener on %s:%d, advertised as %s", settings.query_host, settings.query_port, queries.own_url
    )
    return runner
