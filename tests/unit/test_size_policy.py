"""The size policy: every output value fits its topic, cuts are deterministic and reported."""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

import orjson
import pytest

from chunkfold.config import Settings
from chunkfold.core import fit, persist
from chunkfold.core.records import KIND_HEADER, MAX_KEY_BYTES, max_key_bytes
from chunkfold.processor import Output, Processor
from chunkfold.state.memory import MemoryStore
from chunkfold_schemas.deadletter import parse_deadletter
from chunkfold_schemas.done import parse_done
from chunkfold_schemas.events import parse_event
from tests.streams import USAGE, choice, chunk

pytestmark = pytest.mark.unit
LIMIT = 1 << 20
KEY = b"chatcmpl-big"


def processor(limit: int = LIMIT) -> Processor:
    p = Processor(Settings(partitions=1, max_message_bytes=limit), MemoryStore())
    p.assign([0])
    return p


def run(
    p: Processor, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]], start: int = 0
) -> list[Output]:
    """Feed ``records`` at offsets from ``start`` (each record's timestamp is its offset)."""
    out: list[Output] = []
    for offset, (key, value, headers) in enumerate(records, start=start):
        got, _ = p.process(
            partition=0,
            offset=offset,
            key=key,
            value=value,
            headers=headers,
            timestamp_ms=offset,
            handle=None,
        )
        out += got
    return out


def assert_all_fit(p: Processor, out: list[Output]) -> None:
    for o in out:
        assert len(o.value) <= fit.value_budget(p.limits[o.topic], o.key), (o.topic, len(o.value))


def content_stream(parts: list[str], key: bytes = KEY) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    cid = key.decode()
    records = [(key, orjson.dumps(chunk(choice(0, role="assistant", content=""), cid=cid)), [])]
    records += [(key, orjson.dumps(chunk(choice(0, content=part), cid=cid)), []) for part in parts]
    records.append((key, orjson.dumps(chunk(choice(0, finish_reason="stop"), cid=cid)), []))
    records.append((key, orjson.dumps(chunk(usage=USAGE, cid=cid)), []))
    records.append((key, b"[DONE]", []))
    return records


def test_three_400kb_chunks_make_a_done_record_and_content_done_that_fit_and_say_what_was_cut() -> None:
    parts = ["".join(random.Random(n).choices("abcdefgh ", k=400_000)) for n in range(3)]
    whole = "".join(parts)
    p = processor()
    out = run(p, content_stream(parts))
    assert_all_fit(p, out)
    [done_out] = [o for o in out if o.topic == p.settings.done_topic]
    done = parse_done(done_out.value)
    assert done.status == "completed"
    assert done.truncated is not None
    [cut] = [t for t in done.truncated if t.path == "/completion/choices/0/message/content"]
    content = done.completion.choices[0].message.content if done.completion else None
    assert content is not None and whole.startswith(content) and len(content) < len(whole)
    assert cut.original_bytes == len(whole.encode()) and cut.kept_bytes == len(content.encode())
    assert cut.sha256 == hashlib.sha256(whole.encode()).hexdigest()
    events = [orjson.loads(o.value) for o in out if o.topic == p.settings.events_topic]
    [content_done] = [e for e in events if e["type"] == "content.done"]
    assert parse_event(orjson.dumps(content_done)).truncated
    assert whole.startswith(content_done["content"])
    # the whole is in the deltas, which were not cut
    deltas = [e["delta"] for e in events if e["type"] == "content.delta"]
    assert "".join(deltas) == whole
    assert p.stats.truncated == {p.settings.done_topic: 1, p.settings.events_topic: 1}


def test_a_value_within_its_budget_is_published_unchanged() -> None:
    p = processor()
    out = run(p, content_stream(["hello"]))
    assert all(b"truncated" not in o.value for o in out)
    assert p.stats.truncated == {}


@pytest.mark.parametrize(
    "value",
    [b"\x01" * 150_000, b"a" * 600_000, random.Random(1).randbytes(900_000)],
    ids=["control-bytes", "ascii", "random-binary"],
)
def test_a_dead_letter_over_the_limit_keeps_a_prefix_and_identifies_the_whole(value: bytes) -> None:
    p = processor()
    [dead] = run(p, [(KEY, value, [])])
    assert dead.topic == p.settings.deadletter_topic
    assert len(dead.value) <= fit.value_budget(LIMIT, dead.key)
    letter = parse_deadletter(dead.value)
    assert letter.reason == "invalid_json"
    assert letter.value_bytes == len(value)
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    kept = letter.original_value()
    if letter.truncated and any(t.path == "/value_b64" for t in letter.truncated):
        assert kept is not None and 0 < len(kept) < len(value) and value.startswith(kept)
    else:
        assert kept == value


def test_the_cut_is_the_same_on_every_run() -> None:
    big = base64.b64encode(random.Random(3).randbytes(1_200_000)).decode()
    value: dict[str, Any] = {"type": "content.done", "completion_id": "c", "content": big, "parsed": None}
    assert fit.fit(value, 500_000) == fit.fit(orjson.loads(orjson.dumps(value)), 500_000)


def test_a_long_array_keeps_a_prefix_of_its_items() -> None:
    items = [{"token": f"t{n}", "logprob": -0.5, "bytes": [116], "top_logprobs": []} for n in range(50_000)]
    value = {
        "type": "logprobs.content.done",
        "completion_id": "c",
        "choice_index": 0,
        "seq": 9,
        "content": items,
    }
    data = fit.fit(value, 200_000)
    assert len(data) <= 200_000
    got = orjson.loads(data)
    assert got["content"] == items[: len(got["content"])] and 0 < len(got["content"]) < len(items)
    [cut] = got["truncated"]
    assert cut["path"] == "/content" and cut["original_bytes"] == len(orjson.dumps(items))


def test_a_value_with_nothing_to_cut_keeps_its_identity() -> None:
    value = {"type": "x", "completion_id": "c", "seq": 1, "many": {str(n): n for n in range(100_000)}}
    got = orjson.loads(fit.fit(value, 10_000))
    assert {k: got[k] for k in ("type", "completion_id", "seq")} == {
        "type": "x",
        "completion_id": "c",
        "seq": 1,
    }
    assert got["truncated"][0]["path"] == ""


def test_a_pre_created_topic_with_a_lower_limit_lowers_the_budget() -> None:
    p = processor()
    p.set_limits({p.settings.done_topic: 64 * 1024})
    out = run(p, content_stream(["x" * 50_000, "y" * 50_000]))
    assert_all_fit(p, out)
    [done] = [o for o in out if o.topic == p.settings.done_topic]
    assert len(done.value) > 32 * 1024 and parse_done(done.value).truncated


def test_a_key_longer_than_a_completion_id_may_be_is_dead_lettered_under_a_shortened_key() -> None:
    p = processor()
    key = b"k" * (MAX_KEY_BYTES + 1)
    [dead] = run(p, [(key, orjson.dumps(chunk(choice(0, content="a"), cid=key.decode())), [])])
    assert parse_deadletter(dead.value).reason == "key_too_large"
    assert dead.key == key[:MAX_KEY_BYTES]
    assert len(dead.value) <= fit.value_budget(LIMIT, dead.key)


@pytest.mark.parametrize("limit", [fit.MIN_OUTPUT_BYTES, 64 * 1024, 900 * 1024, LIMIT])
def test_every_output_of_a_key_at_the_key_limit_fits_and_a_longer_key_is_dead_lettered(limit: int) -> None:
    """The key limit follows the smallest output limit: a key of control characters (whose JSON
    is 6 bytes a byte) at the limit still gets events and a done record that fit, cut to their
    essential fields if need be; one byte more is ``key_too_large``, under a key cut to fit."""
    p = processor()
    p.set_limits(dict.fromkeys(p.limits, limit))
    assert p.max_key == max_key_bytes(limit) <= MAX_KEY_BYTES
    assert max_key_bytes(fit.MIN_OUTPUT_BYTES) == 2048 and max_key_bytes(LIMIT) == MAX_KEY_BYTES
    key = b"\x01" * p.max_key
    out = run(p, content_stream(["a", "b" * 5_000], key=key))
    assert_all_fit(p, out)
    whole = run(processor(), content_stream(["a", "b" * 5_000]))
    assert [o.topic for o in out] == [o.topic for o in whole]  # every event and the done record
    done = orjson.loads(next(o.value for o in out if o.topic == p.settings.done_topic))
    assert done["status"] == "completed"  # an essential field: kept however the value is cut
    longer = key + b"\x01"
    [dead] = run(p, content_stream(["a"], key=longer)[:1], start=100)
    assert parse_deadletter(dead.value).reason == "key_too_large"
    assert dead.key == longer[: p.max_key]
    assert_all_fit(p, [dead])


def test_a_request_context_near_the_input_limit_still_gives_a_done_record_that_fits() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "q" * 900_000}]}
    records = [(KEY, orjson.dumps(request), [(KIND_HEADER, b"request")]), *content_stream(["z" * 300_000])]
    p = processor()
    out = run(p, records)
    assert_all_fit(p, out)
    [done] = [parse_done(o.value) for o in out if o.topic == p.settings.done_topic]
    assert done.status == "completed" and done.truncated


def test_state_writes_stay_within_a_changelog_record_and_restore_exactly() -> None:
    """Three 400 KB chunks between two flushes, and a request context near the input limit:
    every state write is at most SEGMENT_BYTES, and a worker restoring them mid-stream finishes
    the completion byte for byte as one that never stopped."""
    request = {"model": "m", "messages": [{"role": "user", "content": "\x01q" * 300_000}]}
    parts = ["".join(random.Random(n).choices('ab"\\\n ', k=400_000)) for n in range(3)]
    records = [(KEY, orjson.dumps(request), [(KIND_HEADER, b"request")]), *content_stream(parts)]
    uninterrupted = run(processor(), records)

    store = MemoryStore()
    first = Processor(Settings(partitions=1), store)
    first.assign([0])
    half = len(records) - 3
    out = run(first, records[:half])
    batch = first.capture()
    assert max(len(value or b"") for _, _, value in batch.writes) <= persist.SEGMENT_BYTES
    assert len(batch.writes) > 3
    first.apply(batch)
    second = Processor(Settings(partitions=1), store)
    second.assign([0])
    out += run(second, records[half:], start=half)
    assert [o.value for o in out] == [o.value for o in uninterrupted]
