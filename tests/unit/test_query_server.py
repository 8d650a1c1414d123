"""The query listener without Kafka: two members (real listeners on loopback ports) over fakes of
the processor, the group's owner map and the events reader. Routing, forwarding, the loop
guard, 503s, 404, 401 and the SSE route's parameters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web

from chunkfold.config import Settings
from chunkfold.query import tokens as tokens_module
from chunkfold.query.resume import sse_frame
from chunkfold.query.server import FORWARDED_HEADER, no_commit_in_flight, serve_queries
from tests.postgres import free_port

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"
OWNED_BY_A = "chatcmpl-a/1 ünïcode?#%"
OWNED_BY_B = "chatcmpl-b"
UNKNOWN_ON_A = "chatcmpl-a-unknown"
PARTITION = {OWNED_BY_A: 0, UNKNOWN_ON_A: 0, OWNED_BY_B: 1}


def snapshot_of(completion_id: str, member: str) -> dict[str, Any]:
    return {"version": 1, "completion_id": completion_id, "status": "in_progress", "held_by": member}


@dataclass
class FakeProcessor:
    member: str
    assigned: set[int]
    held: set[str]
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def snapshot(self, completion_id: str, *, committed: bool = False) -> dict[str, Any] | None:
        self.calls.append((completion_id, committed))
        return snapshot_of(completion_id, self.member) if completion_id in self.held else None


@dataclass
class FakeOwners:
    owners: dict[int, str | None]
    is_settled: bool = True

    def owner(self, partition: int) -> str | None:
        return self.owners.get(partition)

    def settled(self) -> bool:
        return self.is_settled


@dataclass
class FakeEvents:
    """Yields ``count`` events with seq >= from_seq after asking for the snapshot once."""

    count: int = 6
    snapshots: list[dict[str, Any] | None] = field(default_factory=list)
    pause_s: float = 0.0
    """How long the completion pauses before each event (a live one waiting for its tokens)."""

    async def resume_events(
        self,
        completion_id: str,
        from_seq: int,
        snapshot: Callable[[], Awaitable[dict[str, Any] | None]],
    ) -> AsyncIterator[bytes]:
        self.snapshots.append(await snapshot())
        for seq in range(from_seq, self.count):
            await asyncio.sleep(self.pause_s)
            yield event(completion_id, seq)


def event(completion_id: str, seq: int) -> bytes:
    return orjson.dumps({"completion_id": completion_id, "seq": seq, "type": "content.delta"})


@dataclass
class Member:
    url: str
    processor: FakeProcessor
    owners: FakeOwners
    events: FakeEvents


@dataclass
class Fleet:
    a: Member
    b: Member
    session: aiohttp.ClientSession
    token: str | None

    async def get(
        self, member: Member, completion_id: str, suffix: str = "", *, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        sent.update(headers or {})
        url = f"{member.url}/completions/{quote(completion_id, safe='')}{suffix}"
        async with self.session.get(url, headers=sent) as response:
            return response.status, dict(response.headers), await response.read()


async def start_member(
    port: int,
    processor: FakeProcessor,
    owners: FakeOwners,
    *,
    token: str | None,
    token_file: Path | None = None,
    guarantee: str = "at_least_once",
    between_commits: Callable[[], Awaitable[None]] = no_commit_in_flight,
    keep_alive_s: float = 15.0,
) -> tuple[Member, web.AppRunner]:
    settings = Settings(
        bootstrap_servers="unused:9092",
        query_port=port,
        query_token=token,
        query_token_file=token_file,
        processing_guarantee=guarantee,
    )
    events = FakeEvents()
    runner = await serve_queries(
        settings,
        processor,
        owners,
        lambda key: PARTITION[key.decode("utf-8")],
        events,
        between_commits=between_commits,
        keep_alive_s=keep_alive_s,
    )
    return Member(settings.query_url(), processor, owners, events), runner


@asynccontextmanager
async def fleet(*, token: str | None = TOKEN, **options: Any) -> AsyncIterator[Fleet]:
    """Member A owns partition 0, member B partition 1; both know the map."""
    ports = free_port(), free_port()
    urls = {0: f"http://127.0.0.1:{ports[0]}", 1: f"http://127.0.0.1:{ports[1]}"}
    a, runner_a = await start_member(
        ports[0], FakeProcessor("a", {0}, {OWNED_BY_A}), FakeOwners(dict(urls)), token=token, **options
    )
    b, runner_b = await start_member(
        ports[1], FakeProcessor("b", {1}, {OWNED_BY_B}), FakeOwners(dict(urls)), token=token, **options
    )
    try:
        async with aiohttp.ClientSession() as session:
            yield Fleet(a, b, session, token)
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


def test_the_owner_answers_itself_and_the_other_member_forwards_to_it() -> None:
    async def test() -> None:
        async with fleet() as f:
            status, headers, body = await f.get(f.a, OWNED_BY_A)
            assert (status, orjson.loads(body)) == (200, snapshot_of(OWNED_BY_A, "a"))
            assert headers["Content-Type"].startswith("application/json")
            forwarded = await f.get(f.b, OWNED_BY_A)
            assert (forwarded[0], forwarded[2]) == (status, body)
            assert f.b.processor.calls == []  # B never looked at its own state for it
            assert f.a.processor.calls == [(OWNED_BY_A, False), (OWNED_BY_A, False)]
            status, _, body = await f.get(f.a, OWNED_BY_B)
            assert (status, orjson.loads(body)) == (200, snapshot_of(OWNED_BY_B, "b"))

    run(test)


def test_an_unknown_id_is_404_wherever_it_is_asked() -> None:
    async def test() -> None:
        async with fleet() as f:
            for member in (f.a, f.b):
                status, _, body = await f.get(member, UNKNOWN_ON_A)
                assert status == 404, member
                assert UNKNOWN_ON_A in orjson.loads(body)["error"]

    run(test)


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"bearer {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Basic x"]
)
def test_a_missing_or_wrong_token_is_401(authorization: str | None) -> None:
    async def test() -> None:
        async with fleet() as f:
            f.token = None
            headers = {} if authorization is None else {"Authorization": authorization}
            for suffix in ("", "/events"):
                status, got, _ = await f.get(f.a, OWNED_BY_A, suffix, headers=headers)
                assert (status, got.get("WWW-Authenticate")) == (401, "Bearer")
            assert f.a.processor.calls == []

    run(test)


def test_without_a_token_configured_anyone_is_answered() -> None:
    async def test() -> None:
        async with fleet(token=None) as f:
            assert (await f.get(f.b, OWNED_BY_A))[0] == 200

    run(test)


def assert_unavailable(answer: tuple[int, dict[str, str], bytes], reason: str) -> None:
    status, headers, body = answer
    assert (status, headers.get("Retry-After")) == (503, "1"), body
    assert reason in orjson.loads(body)["error"]


def test_503_with_retry_after_while_unsettled_or_the_owner_is_unknown_or_unreachable() -> None:
    async def test() -> None:
        async with fleet() as f:
            f.a.owners.is_settled = False
            assert_unavailable(await f.get(f.a, OWNED_BY_A), "rebalancing")
            assert f.a.processor.calls == []
            f.a.owners.is_settled = True

            f.b.owners.owners[0] = None
            assert_unavailable(await f.get(f.b, OWNED_BY_A), "not known")
            f.b.owners.owners[0] = ""
            assert_unavailable(await f.get(f.b, OWNED_BY_A), "no query listener")
            f.b.owners.owners[0] = f.b.url  # the map names B, which has not taken it over yet
            assert_unavailable(await f.get(f.b, OWNED_BY_A), "taken over")
            f.b.owners.owners[0] = f"http://127.0.0.1:{free_port()}"
            assert_unavailable(await f.get(f.b, OWNED_BY_A), "unreachable")

            f.b.owners.owners[0] = f.a.url
            f.a.owners.is_settled = False  # the owner's own 503 is passed on
            assert_unavailable(await f.get(f.b, OWNED_BY_A), "rebalancing")

    run(test)


def test_a_forwarded_request_on_a_non_owner_gets_503_never_a_second_hop() -> None:
    async def test() -> None:
        async with fleet() as f:
            f.a.owners.owners[1] = f.a.url  # a stale map on A would send it back to itself
            answer = await f.get(f.a, OWNED_BY_B, headers={FORWARDED_HEADER: "1"})
            assert_unavailable(answer, "does not own partition 1")
            # B's map is stale: it forwards to A, which does not own the partition any more
            f.b.processor.assigned.clear()
            f.b.owners.owners[1] = f.a.url
            assert_unavailable(await f.get(f.b, OWNED_BY_B), "does not own partition 1")
            assert f.a.processor.calls == [] and f.b.processor.calls == []

    run(test)


def test_forwarding_carries_the_token() -> None:
    """A member forwards with its own token: A refuses B's forward when B's token differs."""

    async def test() -> None:
        port_a, port_b = free_port(), free_port()
        urls = {0: f"http://127.0.0.1:{port_a}", 1: f"http://127.0.0.1:{port_b}"}
        a, runner_a = await start_member(
            port_a, FakeProcessor("a", {0}, {OWNED_BY_A}), FakeOwners(urls), token=TOKEN
        )
        b, runner_b = await start_member(
            port_b, FakeProcessor("b", {1}, {OWNED_BY_B}), FakeOwners(urls), token="another"
        )
        try:
            async with aiohttp.ClientSession() as session:
                f = Fleet(a, b, session, "another")
                status, _, body = await f.get(b, OWNED_BY_A)
                assert status == 502
                assert "401" in orjson.loads(body)["error"]
        finally:
            await runner_a.cleanup()
            await runner_b.cleanup()

    run(test)


def test_a_member_that_rotated_its_token_forwards_to_one_that_has_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's token file changes (a Secret update reaches B first): clients with the new token are
    answered by B, and B's forward to A, which still knows only the old token, is retried with
    the old one; A refuses the new one until its own file changes."""
    monkeypatch.setattr(tokens_module, "CHECK_EVERY_S", 0.0)

    async def test() -> None:
        port_a, port_b = free_port(), free_port()
        urls = {0: f"http://127.0.0.1:{port_a}", 1: f"http://127.0.0.1:{port_b}"}
        a, runner_a = await start_member(
            port_a, FakeProcessor("a", {0}, {OWNED_BY_A}), FakeOwners(urls), token=TOKEN
        )
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        b, runner_b = await start_member(
            port_b, FakeProcessor("b", {1}, {OWNED_BY_B}), FakeOwners(urls), token=None, token_file=token_file
        )
        try:
            async with aiohttp.ClientSession() as session:
                token_file.write_text("rotated-" + TOKEN)
                f = Fleet(a, b, session, "rotated-" + TOKEN)
                status, _, body = await f.get(b, OWNED_BY_A)
                assert status == 200 and orjson.loads(body) == snapshot_of(OWNED_BY_A, "a")
                status, _, _ = await f.get(a, OWNED_BY_A)
                assert status == 401
                f.token = TOKEN  # a client that has not seen the rotation: B still lets it in
                status, _, _ = await f.get(b, OWNED_BY_B)
                assert status == 200
        finally:
            await runner_a.cleanup()
            await runner_b.cleanup()

    run(test)


def sse_body(completion_id: str, seqs: range) -> bytes:
    return b"".join(sse_frame(event(completion_id, seq)) for seq in seqs)


@pytest.mark.parametrize(
    ("query", "headers", "first"),
    [
        ("", {}, 0),
        ("?from_seq=3", {}, 3),
        ("", {"Last-Event-ID": "4"}, 5),
        ("?from_seq=2", {"Last-Event-ID": "4"}, 2),
    ],
)
def test_events_stream_from_the_seq_asked_for(query: str, headers: dict[str, str], first: int) -> None:
    async def test() -> None:
        async with fleet() as f:
            for member in (f.a, f.b):  # B streams too, asking A for the snapshots
                status, got, body = await f.get(member, OWNED_BY_A, f"/events{query}", headers=headers)
                assert status == 200
                assert got["Content-Type"] == "text/event-stream"
                assert body == sse_body(OWNED_BY_A, range(first, 6))
                assert member.events.snapshots == [snapshot_of(OWNED_BY_A, "a")]

    run(test)


def paused_events(query: str, *, keep_alive_s: float, pause_s: float) -> bytes:
    """The body of ``/events{query}`` for a completion of A asked of B, its events ``pause_s``
    apart, on listeners that keep a stream alive after ``keep_alive_s``."""

    async def test() -> bytes:
        async with fleet(keep_alive_s=keep_alive_s) as f:
            f.b.events.pause_s = pause_s
            status, _, body = await f.get(f.b, OWNED_BY_A, f"/events{query}")
            assert status == 200
            return body

    return run(test)


def test_a_paused_stream_gets_keep_alive_comments_between_its_events() -> None:
    body = paused_events("?from_seq=4", keep_alive_s=0.1, pause_s=0.35)
    frames = [frame + b"\n\n" for frame in body.split(b"\n\n") if frame]
    comments = [frame for frame in frames if frame.startswith(b":")]
    events = b"".join(frame for frame in frames if not frame.startswith(b":"))
    assert events == sse_body(OWNED_BY_A, range(4, 6))  # comments change nothing else
    assert set(comments) == {b": keep-alive\n\n"}
    assert len(comments) >= 4  # about three in each 0.35 s pause at 0.1 s
    assert frames[-1] != comments[-1], "the stream ends with its last event"


def test_a_busy_stream_gets_no_keep_alive_comments() -> None:
    assert paused_events("", keep_alive_s=0.5, pause_s=0.01) == sse_body(OWNED_BY_A, range(6))


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?from_seq=-1", {}),
        ("?from_seq=x", {}),
        ("?from_seq=", {}),
        ("?from_seq=+1", {}),
        ("", {"Last-Event-ID": "a"}),
    ],
)
def test_a_bad_seq_is_400(query: str, headers: dict[str, str]) -> None:
    async def test() -> None:
        async with fleet() as f:
            status, _, body = await f.get(f.a, OWNED_BY_A, f"/events{query}", headers=headers)
            assert status == 400, body
            assert f.a.events.snapshots == []

    run(test)


def test_events_of_an_unknown_or_unavailable_completion_are_not_streamed() -> None:
    async def test() -> None:
        async with fleet() as f:
            assert (await f.get(f.b, UNKNOWN_ON_A, "/events"))[0] == 404
            f.a.owners.is_settled = False
            assert_unavailable(await f.get(f.b, OWNED_BY_A, "/events"), "rebalancing")
            assert f.b.events.snapshots == []

    run(test)


def test_exactly_once_snapshots_come_from_committed_state_between_commits() -> None:
    async def test() -> None:
        commit_over = asyncio.Event()

        async def between_commits() -> None:
            await commit_over.wait()

        async with fleet(guarantee="exactly_once", between_commits=between_commits) as f:
            asking = asyncio.ensure_future(f.get(f.a, OWNED_BY_A))
            await asyncio.sleep(0.3)
            assert not asking.done() and f.a.processor.calls == []  # waits while a commit is in flight
            commit_over.set()
            assert (await asking)[0] == 200
            assert f.a.processor.calls == [(OWNED_BY_A, True)]

    run(test)
