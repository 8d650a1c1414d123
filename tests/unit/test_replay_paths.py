"""Replay's two paths publish the same bytes: a JSON Lines capture goes through a loop that folds
plain chunk lines itself (``_Replay.jsonl``), which must equal the per-frame path
(``published_from_frames`` over ``frames_to_keys(iter_frames(...))``) on every input, hostile
lines and all, in both strictness modes."""

from __future__ import annotations

import io
import random
from typing import Any

import orjson
import pytest

from chunkfold import replay as replay_module
from chunkfold.config import Settings
from chunkfold.core import fit
from chunkfold.core.inputs import InputError, frames_to_keys, iter_frames
from chunkfold.core.records import max_key_bytes
from chunkfold.replay import Published, ReplayCounts, published, published_from_frames
from tests.shapes import all_shapes_stream
from tests.streams import choice, chunk, jsonl, structured_request

pytestmark = pytest.mark.unit

SETTINGS = Settings(max_record_bytes=4096, max_message_bytes=64 * 1024)
"""Small limits, so that the generated lines and keys fall on both sides of the size rules."""
SNAPSHOT_SETTINGS = SETTINGS.model_copy(update={"snapshots": True, "partial_parse": True})
"""``--snapshots --partial-parse``: every chunk takes the engine's general path."""
HOSTILE_LINES = [
    "{not json",
    "",
    "   ",
    "[1, 2]",
    "42",
    '"text"',
    "[DONE]",
    '{"kind": "bogus", "key": "x"}',
    '{"kind": "chunk", "key": 5, "value": {}}',
    '{"kind": "chunk", "key": "x", "value": [1]}',
    '{"kind": "chunk", "key": "x", "seq": -1, "value": {}}',
    '{"kind": "done"}',
    '{"kind": "abort", "key": "nobody"}',
    '{"kind": "request", "key": "late", "value": {"messages": []}}',
    '{"choices": []}',
    '{"id": "", "choices": [{"index": 0, "delta": {"content": "no id"}}]}',
    '{"id": 7, "choices": [{"index": 0, "delta": {"content": "id not a string"}}]}',
    '{"error": {"message": "overloaded"}}',
    '{"object": "", "choices": [{"index": 0, "content_filter_results": {}}]}',
]


def _line(rng: random.Random, kind: str, value: bytes, headers: list[tuple[str, bytes]], key: str) -> str:
    """One gateway record as a JSON Lines line: plain where a plain form exists, else (or at
    random) an envelope, with its seq when the record had one."""
    seq = next((int(v) for k, v in headers if k == "chunkfold.seq"), None)
    if kind == "chunk" and rng.random() < 0.8:
        return value.decode()
    if kind == "done" and rng.random() < 0.5:
        return "[DONE]"
    envelope: dict[str, Any] = {"kind": kind, "key": key}
    if kind != "done":
        envelope["value"] = orjson.loads(value)
    if seq is not None and rng.random() < 0.7:
        envelope["seq"] = seq
    return orjson.dumps(envelope).decode()


def _hostile(rng: random.Random, keys: list[str]) -> str:
    """A line the plain loop must hand to the per-frame path, or fold exactly as it would."""
    key = rng.choice(keys)
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(HOSTILE_LINES)
    if pick < 0.55:  # a wrong type in a chunk of a live completion: a dead letter
        return orjson.dumps(chunk(choice(0, content=rng.choice([5, [7], {"a": 1}])), cid=key)).decode()
    if pick < 0.7:  # around the size rule: 1,000 to 1,400 characters, some of them 4 bytes
        text = "".join(rng.choice("ab🌍é") for _ in range(rng.randint(700, 1100)))
        return orjson.dumps(chunk(choice(0, content=text), cid=key)).decode()
    if pick < 0.8:  # keys around the key rule: 4-byte characters, control characters, ASCII
        limit = max_key_bytes(SETTINGS.max_message_bytes)
        long_key = rng.choice(
            ["🌍" * (limit // 4), "🌍" * (limit // 4 + 1), "\x01" * limit, "k" * (limit + rng.choice([0, 1]))]
        )
        return orjson.dumps(chunk(choice(0, content="x"), cid=long_key)).decode()
    if pick < 0.9:  # a chunk without id: it takes the previous line's key
        return orjson.dumps({"choices": [{"index": 0, "delta": {"content": "keyless"}}]}).decode()
    return orjson.dumps(chunk(choice(0, content="late"), cid=key)).decode() + "\r"


def capture(seed: int) -> str:
    """Several generated completions (every field shape), interleaved, with hostile lines."""
    rng = random.Random(seed)
    keys = [f"cmpl-{seed}-{n}" for n in range(rng.randint(1, 4))]
    streams = {key: all_shapes_stream(rng, key) for key in keys}
    lines: list[str] = [""] * rng.randint(0, 2)  # blank lines before the first
    if rng.random() < 0.3:  # records without id before any key: they wait for one
        lines.append('{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}')
    while any(streams.values()):
        key = rng.choice([k for k, records in streams.items() if records])
        kind, value, headers = streams[key].pop(0)
        lines.append(_line(rng, kind, value, headers, key))
        if rng.random() < 0.08:
            lines.append(_hostile(rng, keys))
    for key in keys:  # chunks after their completion ended: after_end
        if rng.random() < 0.3:
            lines.append(orjson.dumps(chunk(choice(0, content="after"), cid=key)).decode())
    ending = rng.choice(["\n", "\r\n"])
    text = ending.join(lines) + ending
    return ("\ufeff" + text) if rng.random() < 0.2 else text


def run(
    source: str | list[str],
    request: dict[str, Any] | None,
    settings: Settings,
    *,
    strict: bool,
    by_frames: bool,
) -> tuple[list[Published], ReplayCounts, str | None]:
    """What a replay published (up to an ``InputError`` in strict mode), its counts, the error."""
    counts = ReplayCounts()
    if by_frames:
        records = published_from_frames(
            frames_to_keys(iter_frames(source, strict=strict)),
            request,
            settings,
            strict=strict,
            counts=counts,
        )
    else:
        records = published(source, request, settings, strict=strict, counts=counts)
    out: list[Published] = []
    try:
        out.extend(records)
    except InputError as exc:
        return out, counts, str(exc)
    return out, counts, None


@pytest.mark.parametrize("seed", range(60))
def test_the_plain_loop_publishes_what_the_per_frame_path_publishes(seed: int) -> None:
    text = capture(seed)
    request = structured_request() if seed % 3 == 0 else None
    settings = SNAPSHOT_SETTINGS if seed % 4 == 1 else SETTINGS
    # as one string, and as the CLI reads a file: lines with their (universal) line ends
    for source in (text, list(io.StringIO(text, newline=None))):
        for strict in (False, True):
            fast = run(source, request, settings, strict=strict, by_frames=False)
            general = run(source, request, settings, strict=strict, by_frames=True)
            assert fast[0] == general[0], (seed, strict)
            assert fast[1] == general[1] and fast[2] == general[2], (seed, strict)
            assert fast[0] or fast[2]
            for record in fast[0]:  # and every record fits its topic, with its key
                assert len(record.value) <= fit.value_budget(SETTINGS.max_message_bytes, record.key.encode())


def test_the_hostile_captures_reach_every_rule() -> None:
    """The seeds above cover dead letters of every kind the reader and the size rules give."""
    reasons: set[str] = set()
    for seed in range(60):
        _, counts, _ = run(capture(seed), None, SETTINGS, strict=False, by_frames=False)
        reasons |= set(counts.deadletters)
    assert {
        "invalid_json",
        "not_an_object",
        "unknown_kind",
        "invalid_key",
        "invalid_seq",
        "wrong_type",
        "oversized",
        "key_too_large",
        "after_end",
        "unknown_completion",
    } <= reasons


def test_plain_chunk_lines_take_the_loop_not_the_per_frame_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first chunk of each completion goes through the per-frame path (it opens the
    state); the others are folded by the loop."""
    calls: list[int] = []
    per_frame = replay_module._Replay.frame

    def counted(self: Any, key: str, frame: Any) -> Any:
        calls.append(frame.line)
        return per_frame(self, key, frame)

    monkeypatch.setattr(replay_module._Replay, "frame", counted)
    lines = [chunk(choice(0, role="assistant", content=""), cid=cid) for cid in ("a", "b")] + [
        chunk(choice(0, content=str(n)), cid="ab"[n % 2]) for n in range(10)
    ]
    out = list(published(jsonl(*lines), None, Settings()))
    assert calls == [1, 2]
    assert [r.topic for r in out].count("completion-events") == 12
    assert out == list(published_from_frames(frames_to_keys(iter_frames(jsonl(*lines))), None, Settings()))
