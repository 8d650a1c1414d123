"""``chunkfold replay`` streams its input: compressed captures, dead letters where the worker
would publish them, the same bytes whatever way the input arrives."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from chunkfold.config import Settings
from chunkfold.core.inputs import InputError
from chunkfold.core.records import MAX_KEY_BYTES
from chunkfold.gateway import GatewayRecord
from chunkfold.replay import MAX_TOMBSTONES, ReplayCounts, published, replay_kafka
from tests.harness import offline_run
from tests.streams import choice, chunk, jsonl, sse

pytestmark = pytest.mark.unit


def run(tmp_path: Path, data: bytes, *args: str, name: str = "capture") -> subprocess.CompletedProcess[bytes]:
    capture = tmp_path / name
    capture.write_bytes(data)
    return subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", "replay", *args, str(capture)],
        capture_output=True,
        timeout=60,
    )


def two_completions() -> str:
    return jsonl(
        chunk(choice(0, role="assistant", content="A"), cid="a"),
        chunk(choice(0, role="assistant", content="B"), cid="b"),
        chunk(choice(0, content="a", finish_reason="stop"), cid="a"),
        chunk(choice(0, content="b", finish_reason="stop"), cid="b"),
    )


def test_gzip_and_zstd_captures_replay_like_the_plain_one(tmp_path: Path) -> None:
    text = two_completions().encode()
    plain = run(tmp_path, text)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count(b"\n") == 8  # 6 events, 2 done records
    for data, name in (
        (gzip.compress(text), "capture.jsonl.gz"),
        (zstandard.ZstdCompressor().compress(text), "capture.jsonl.zst"),
        (b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"), "capture.jsonl"),
    ):
        got = run(tmp_path, data, name=name)
        assert got.returncode == 0, got.stderr
        assert got.stdout == plain.stdout, name


def test_a_damaged_compressed_capture_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data = gzip.compress(two_completions().encode() * 50)
    got = run(tmp_path, data[: len(data) // 2], name="cut.gz")
    assert got.returncode == 2
    err = got.stderr.decode()
    assert err.count("\n") == 1 and "cannot be read" in err and "Traceback" not in err


def test_bad_records_are_the_dead_letters_the_worker_publishes(tmp_path: Path) -> None:
    good = two_completions().splitlines()
    bad = [
        "{not json",
        orjson.dumps({"id": "a", "choices": [{"index": 0, "delta": {"content": 5}}]}).decode(),
        orjson.dumps({"id": "b", "choices": [{"index": 0, "delta": {"content": [7]}}]}).decode(),
    ]
    lines = [good[0], good[1], bad[0], good[2], bad[1], bad[2], good[3], "[DONE]"]
    got = run(tmp_path, ("\n".join(lines) + "\n").encode())
    assert got.returncode == 0, got.stderr
    records = [orjson.loads(line) for line in got.stdout.splitlines()]
    letters = [r["value"] for r in records if r["topic"] == "completion-deadletter"]
    assert got.stderr.decode().count("\n") == 1
    assert "3 dead letters (1 invalid_json, 2 wrong_type)" in got.stderr.decode()
    # the same records published by a gateway (keyed as replay keyed them) through the worker's loop
    keys = ["a", "b", "b", "a", "a", "b", "b", "b"]
    gateway = [GatewayRecord(k.encode(), line.encode(), []) for k, line in zip(keys, lines, strict=True)]
    _, done, worker_letters = offline_run(gateway)
    assert len(letters) == len(worker_letters) == 3
    for replayed, worker in zip(letters, worker_letters, strict=True):
        same = ("reason", "detail", "key", "value_b64", "value_bytes", "value_sha256", "headers")
        assert {k: replayed[k] for k in same} == {k: worker[k] for k in same}
        assert replayed["source"]["offset"] == lines.index(replayed["value_text"]) + 1
    replay_done = {r["key"]: r["value"] for r in records if r["topic"] == "completion-done"}
    assert replay_done["b"] == {**done["b"], "timing": replay_done["b"]["timing"]}
    assert replay_done["a"]["status"] == "completed"  # the end of the input ends it; the worker waits
    strict = run(tmp_path, ("\n".join(lines) + "\n").encode(), "--strict")
    assert strict.returncode == 2 and b"line 3: " in strict.stderr


def test_the_python_api_reads_lines_as_they_come_and_counts() -> None:
    def lines() -> Any:
        yield from io.StringIO(sse(chunk(choice(0, role="assistant", content="x")), "[DONE]"))

    counts = ReplayCounts()
    out = list(published(lines(), None, Settings(), counts=counts))
    assert [r.topic for r in out] == ["completion-events", "completion-done"]
    assert (counts.records, counts.completions, counts.events) == (2, 1, 1)
    assert list(
        replay_kafka(sse(chunk(choice(0, role="assistant", content="x")), "[DONE]"), None, Settings())
    ) == [{"topic": r.topic, "key": r.key, "value": orjson.loads(r.value)} for r in out]


def test_tombstones_beyond_the_bound_are_dropped_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import chunkfold.replay as replay_module

    monkeypatch.setattr(replay_module, "MAX_TOMBSTONES", 2)
    assert MAX_TOMBSTONES > 2
    finished = [jsonl(chunk(choice(0, role="assistant", content="x"), cid=c)).strip() for c in "abc"]
    late = jsonl(chunk(choice(0, content="y"), cid="a")).strip()
    text = (
        "\n".join(
            [
                *finished[:1],
                '{"kind": "done", "key": "a"}',
                finished[1],
                '{"kind": "done", "key": "b"}',
                finished[2],
                '{"kind": "done", "key": "c"}',
                late,
            ]
        )
        + "\n"
    )
    out = list(published(text, None, Settings(), strict=False))
    # "a" was forgotten: its late chunk starts a new completion instead of being after_end
    assert [r.topic for r in out].count("completion-deadletter") == 0
    assert [r.key for r in out if r.topic == "completion-done"] == ["a", "b", "c", "a"]


def test_records_over_the_worker_size_limits_are_its_dead_letters_not_a_crash() -> None:
    big_id = "k" * (MAX_KEY_BYTES + 1)
    big_value = orjson.dumps(
        {"id": "v", "choices": [{"index": 0, "delta": {"content": "x" * 2048}}]}
    ).decode()
    settings = Settings(max_record_bytes=1024)
    lines = [orjson.dumps({"id": big_id, "choices": []}).decode(), big_value]
    out = list(published("\n".join(lines) + "\n", None, settings, strict=False))
    letters = [orjson.loads(r.value) for r in out if r.topic == "completion-deadletter"]
    assert [letter["reason"] for letter in letters] == ["key_too_large", "oversized"]
    assert all(len(r.key.encode()) <= MAX_KEY_BYTES for r in out)
    assert all(len(r.value) <= settings.max_message_bytes for r in out)
    gateway = [
        GatewayRecord(big_id.encode(), lines[0].encode(), []),
        GatewayRecord(b"v", lines[1].encode(), []),
    ]
    _, _, worker_letters = offline_run(gateway, settings)
    for replayed, worker in zip(letters, worker_letters, strict=True):
        same = ("reason", "detail", "value_bytes", "value_sha256")
        assert {k: replayed[k] for k in same} == {k: worker[k] for k in same}
    with pytest.raises(InputError, match="line 1: key_too_large"):
        list(published("\n".join(lines) + "\n", None, settings))
