"""State keys encode any completion id unambiguously, and bad stored entries are skipped.

An id is its own key unless it holds the separator ``\\x1f`` or the escape ``\\x10`` (so the
state of earlier releases, which joined keys unescaped, still restores); ``completion_of``
inverts every key exactly. ``restore`` raises only ``CorruptState`` / ``StateVersionError``
whatever the store holds, and ``scan`` skips (logs, counts) what does not read back.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkfold.config import Settings
from chunkfold.core import codec, engine
from chunkfold.core.persist import (
    CorruptState,
    Cursor,
    completion_of,
    flush_writes,
    restore,
    segment_key,
    tombstone_key,
)
from chunkfold.core.records import InvalidRecord, decode_record
from chunkfold.core.state import ClosedCompletion, CompletionState, StateVersionError
from chunkfold.processor import Output, Processor
from chunkfold.state.memory import MemoryStore
from tests.shapes import all_shapes_stream
from tests.unit.test_restore_exact import restored_after_every_record, uninterrupted

pytestmark = pytest.mark.unit

TRICKY_IDS = [
    "victim",
    "victim\x1f0",
    "victim\x1f",
    "\x1f",
    "\x1f\x1f0",
    "\x10",
    "\x10s",
    "a\x10\x1fb\x10\x10s",
    "\x00",
    "nul\x00id\x00",
    b"\xff\xfeid".decode("utf-8", "replace"),  # how a lenient reader would decode non-UTF-8
    b"caf\xe9".decode("latin-1"),
    "\udcff",  # surrogateescape: keys only, such an id never reaches a store (see below)
    "é🌍日本",
    "x" * 100_000,
    "\x1f\x10" * 50_000,
]
SAFE_IDS = [i for i in TRICKY_IDS if i != "\udcff"]


@pytest.mark.parametrize("completion_id", TRICKY_IDS, ids=lambda i: repr(i[:12]))
def test_completion_of_inverts_every_key_of_any_id(completion_id: str) -> None:
    assert completion_of(tombstone_key(completion_id)) == completion_id
    for n in (0, 1, 12):
        key = segment_key(completion_id, n)
        assert completion_of(key) == completion_id
        assert key.count("\x1f") == 1 and key.endswith(f"\x1f{n}")


def test_ordinary_ids_keep_the_keys_of_the_previous_release() -> None:
    for completion_id in ("chatcmpl-abc", "a b/c\\d", "é🌍", "x" * 1000):
        assert tombstone_key(completion_id) == completion_id
        assert segment_key(completion_id, 7) == f"{completion_id}\x1f7"


def test_the_separator_and_the_escape_are_escaped() -> None:
    assert tombstone_key("victim\x1f0") == "victim\x10s0"
    assert tombstone_key("a\x10b") == "a\x10\x10b"
    assert segment_key("victim\x1f0", 1) == "victim\x10s0\x1f1"


ID_TEXT = st.text(alphabet=st.sampled_from(["\x1f", "\x10", "s", "0", "1", "a", "\x00", "é"]), max_size=8)


@settings(max_examples=400, deadline=None)
@given(ID_TEXT, ID_TEXT, st.integers(0, 30), st.integers(0, 30))
def test_keys_of_different_ids_never_meet(a: str, b: str, n: int, m: int) -> None:
    keys_a = {tombstone_key(a), segment_key(a, n), segment_key(a, m)}
    assert {completion_of(k) for k in keys_a} == {a}
    if a != b:
        assert keys_a.isdisjoint({tombstone_key(b), segment_key(b, n), segment_key(b, m)})


@pytest.mark.parametrize("completion_id", SAFE_IDS, ids=lambda i: repr(i[:12]))
def test_state_of_any_id_restores_exactly(completion_id: str) -> None:
    stream = all_shapes_stream(11, completion_id)
    assert restored_after_every_record(stream, completion_id) == uninterrupted(stream, completion_id)


def test_a_key_that_is_not_utf8_is_dead_lettered_before_it_becomes_an_id() -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode_record(b"\xff\xfeid", b'{"choices": []}')
    assert caught.value.reason == "invalid_key"
    store = MemoryStore()
    processor = Processor(Settings(partitions=1), store)
    processor.assign([0])
    out, _ = processor.process(
        partition=0, offset=0, key=b"\xff", value=b"{}", headers=None, timestamp_ms=1, handle=None
    )
    assert [codec.loads(o.value)["reason"] for o in out] == ["invalid_key"]
    processor.apply(processor.capture())
    assert store.items() == []


# -- the collision of issue 10 (item 6) -------------------------------------------------------


def chunk_value(completion_id: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return codec.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [choice],
        }
    )


def feed(processor: Processor, records: list[tuple[str, bytes]], first_offset: int) -> list[Output]:
    out: list[Output] = []
    for i, (completion_id, value) in enumerate(records):
        produced, _ = processor.process(
            partition=0,
            offset=first_offset + i,
            key=completion_id.encode(),
            value=value,
            headers=None,
            timestamp_ms=1000 + first_offset + i,
            handle=None,
        )
        out += produced
    processor.apply(processor.capture())
    return out


def done_records(out: list[Output]) -> dict[str, Any]:
    return {o.key.decode(): codec.loads(o.value) for o in out if o.topic == Settings().done_topic}


def test_an_id_holding_the_separator_does_not_collide_with_its_prefix() -> None:
    """``victim\\x1f0``'s keys used to be ``victim``'s segment keys: ``victim``'s records were
    dead-lettered ``state_unreadable``, it never finished, and a restart raised in ``scan``."""
    ids = ["victim", "victim\x1f0", "victim\x1f0\x1f0"]
    store = MemoryStore()
    first = Processor(Settings(partitions=1), store)
    first.assign([0])
    opening = [(i, chunk_value(i, {"role": "assistant", "content": f"<{n}"})) for n, i in enumerate(ids)]
    middle = [(i, chunk_value(i, {"content": "|"})) for i in ids]
    out = feed(first, opening, 0) + feed(first, middle, 10)
    assert not [o for o in out if o.topic == Settings().deadletter_topic]

    restarted = Processor(Settings(partitions=1), store)
    restarted.assign([0])
    assert restarted.scan() == len(ids)
    assert restarted.stats.unreadable_state == 0
    closing = [(i, chunk_value(i, {"content": ">"}, "stop")) for i in ids] + [(i, b"[DONE]") for i in ids]
    out = feed(restarted, closing, 20)
    assert not [o for o in out if o.topic == Settings().deadletter_topic]
    done = done_records(out)
    assert {i: d["completion"]["choices"][0]["message"]["content"] for i, d in done.items()} == {
        i: f"<{n}|>" for n, i in enumerate(ids)
    }
    assert all(done[i]["status"] == "completed" for i in ids)


# -- bad stored entries ------------------------------------------------------------------------


def segment_of(completion_id: str) -> bytes:
    """A valid first segment, for a key it does not belong under."""
    state = engine.fold(
        None,
        completion_id,
        decode_record(completion_id.encode(), chunk_value(completion_id, {"content": "a"}))[1],
    ).state
    assert state is not None
    ((_, value),) = flush_writes(state, Cursor(), 0)
    assert value is not None
    return value


BAD_ENTRIES: dict[str, bytes] = {
    "bad-json\x1f0": b"not json",
    "bad-shape": b"[1, 2]",
    "bad-fields\x1f0": b'{"d": {"v": 3}}',
    "bad-types\x1f0": b'{"d": 5, "c": []}',
    "bad-buffer\x1f0": b'{"b": {"0:t:content": 7}}',
    "bad-owner\x1f0": b"",  # filled below: another completion's segment
    "bad-partition": b'{"v":3,"closed":true,"id":"bad-partition","status":"completed","last_offset":1,'
    b'"next_seq":null,"closed_at_ms":1,"last_activity_ms":1,"p":[0]}',
    "newer": b'{"v": 99, "closed": true}',
    "bad-escape\x10": b"{}",
    "bad-number\x1fx": b"{}",
}
BAD_ENTRIES["bad-owner\x1f0"] = segment_of("someone-else")


def test_restore_raises_only_its_two_errors_for_bad_entries() -> None:
    for key, value in BAD_ENTRIES.items():
        try:
            completion_id = completion_of(key)
        except CorruptState:
            continue
        store = {key: value}
        with pytest.raises((CorruptState, StateVersionError)):
            restore(completion_id, store.get)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=40),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(-2, 9), st.text(max_size=4)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3),
                st.dictionaries(
                    st.sampled_from(["d", "c", "b", "request", "v", "0", "choices"]), inner, max_size=4
                ),
            ),
            max_leaves=10,
        ).map(codec.dumps),
    ),
    st.booleans(),
)
def test_restore_of_anything_stored_reads_back_or_raises_corrupt_state(
    value: bytes, as_tombstone: bool
) -> None:
    key = tombstone_key("c") if as_tombstone else segment_key("c", 0)
    store = {key: value}
    try:
        restored = restore("c", store.get)
    except (CorruptState, StateVersionError):
        return
    assert restored is not None and restored.state.completion_id == "c"


def test_scan_skips_what_does_not_read_back_and_loads_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    writer = Processor(Settings(partitions=1), store)
    writer.assign([0])
    feed(writer, [("good", chunk_value("good", {"role": "assistant", "content": "ok"}))], 0)
    for key, value in BAD_ENTRIES.items():
        store.put(key, value)

    processor = Processor(Settings(partitions=1), store)
    processor.assign([0])
    with caplog.at_level(logging.WARNING, logger="chunkfold.worker"):
        assert processor.scan() == 1
    assert set(processor.tracked) == {"good"}
    assert processor.stats.unreadable_state == len(BAD_ENTRIES)
    assert sum("stored state skipped" in r.getMessage() for r in caplog.records) == len(BAD_ENTRIES)

    # a record of a completion whose state does not read back is dead-lettered, not raised
    out, _ = processor.process(
        partition=0,
        offset=5,
        key=b"bad-json",
        value=chunk_value("bad-json", {"content": "x"}),
        headers=None,
        timestamp_ms=1,
        handle=None,
    )
    assert [codec.loads(o.value)["reason"] for o in out] == ["state_unreadable"]


# -- state written by the previous release -----------------------------------------------------

PREVIOUS_RELEASE_STORE = {
    # written by d4a1f54 (before escaped keys and byte heads) for a stream cut before its end:
    # request, "Hel", "lo" (with an audio delta, which that release lost), a tool call in two
    # parts; flushed after records 1, 2 and 4. And a finished completion's tombstone.
    "chatcmpl-old\x1f0": b'{"d":{"v":3,"id":"chatcmpl-old","header":{"id":"chatcmpl-old","object":"chat.completion","created":1,"model":"m"},"fp":null,"usage":null,"moderation":null,"status":null,"error":null,"pos":[1,2,1],"counters":[1,0,0,0,0],"times":[1000,1001,1001,1001,1001],"p":2},"c":{"0":{"index":0,"extra":{},"finish_reason":null,"role":"assistant","text":{"content":3},"message_extra":{},"tools":[],"current_tool":null,"logprobs":[false,null,null,false],"flags":[false,false,false,false,false],"parsed_partial":null}},"b":{"0:t:content":"Hel"},"request":{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"},"strict":false}}]}}',
    "chatcmpl-old\x1f1": b'{"d":{"pos":[2,3,2],"counters":[2,0,0,0,0],"times":[1000,1001,1002,1001,1002]},"c":{"0":{"text":{"content":5}}},"b":{"0:t:content":"lo"}}',
    "chatcmpl-old\x1f2": b'{"d":{"pos":[4,5,5],"counters":[4,0,0,0,0],"times":[1000,1001,1004,1001,1004]},"c":{"0":{"tools":[[0,"c1","function","f",7,{},{},false,null,true]],"current_tool":0,"flags":[true,false,false,false,false]}},"b":{"0:a:0":"{\\"a\\":1}"}}',
    "chatcmpl-old-done": b'{"v":3,"closed":true,"id":"chatcmpl-old-done","status":"completed","last_offset":11,"next_seq":2,"closed_at_ms":2001,"last_activity_ms":2001,"p":2}',
}


def test_state_written_by_the_previous_release_still_restores_and_continues() -> None:
    store = MemoryStore()
    for key, value in PREVIOUS_RELEASE_STORE.items():
        store.put(key, value)
    processor = Processor(Settings(partitions=3), store)
    processor.assign([2])
    assert processor.scan() == 2
    assert processor.stats.unreadable_state == 0
    closed = processor.tracked["chatcmpl-old-done"].state
    assert isinstance(closed, ClosedCompletion) and closed.last_offset == 11
    open_state = processor.tracked["chatcmpl-old"].state
    assert isinstance(open_state, CompletionState)
    assert open_state.choices[0].text_of("content") == "Hello"
    assert open_state.choices[0].tools[0].arguments_text() == '{"a":1}'

    out, _ = processor.process(
        partition=2,
        offset=5,
        key=b"chatcmpl-old",
        value=b"[DONE]",
        headers=None,
        timestamp_ms=1005,
        handle=None,
    )
    (done,) = done_records(out).values()
    message = done["completion"]["choices"][0]["message"]
    assert (done["status"], message["content"], message["tool_calls"][0]["function"]["arguments"]) == (
        "completed",
        "Hello",
        '{"a":1}',
    )
    assert done["request"]["tools"][0]["function"]["name"] == "f"
    # the next flush continues the old segments, under the same keys
    writes = processor.capture().writes
    assert [key for _, key, _ in writes] == ["chatcmpl-old", *(f"chatcmpl-old\x1f{n}" for n in range(3))]
