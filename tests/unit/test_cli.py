"""The ``chunkfold`` command line: bad input, arguments and settings are one line on stderr and
exit 2; replay's output; the worker's checks before it connects; tail reads committed records."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from chunkfold.cli import main
from chunkfold.config import Settings
from chunkfold.kafka_io import output_consumer
from tests.streams import choice, chunk, jsonl, sse

pytestmark = pytest.mark.unit


def run_replay(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    capture = tmp_path / "capture.txt"
    capture.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", "replay", *args, str(capture)],
        capture_output=True,
        timeout=60,
    )


def test_crlf_sse_capture_replays_like_lf(tmp_path: Path) -> None:
    stream = [
        chunk(choice(0, role="assistant", content="Hi")),
        chunk(choice(0, finish_reason="stop")),
        "[DONE]",
    ]
    lf = run_replay(tmp_path, sse(*stream), "--format", "sdk")
    crlf = run_replay(tmp_path, sse(*stream).replace("\n", "\r\n"), "--format", "sdk")
    assert lf.returncode == 0 and crlf.returncode == 0
    assert lf.stdout == crlf.stdout
    assert orjson.loads(lf.stdout.splitlines()[-1])["completion"]["choices"][0]["message"]["content"] == "Hi"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("data: {not json\n\n", "line 1: invalid_json: "),
        ("data: [1, 2]\n\n", "line 1: not_an_object: chunk value must be a JSON object"),
        (
            jsonl({"id": "x", "choices": [{"index": "0", "delta": {}}]}),
            "choice.index must be a non-negative integer",
        ),
        (
            jsonl({"id": "x", "choices": [{"index": 0, "delta": {"content": 5}}]}),
            "delta.content must be a string",
        ),
        (jsonl({"kind": "nonsense", "key": "x", "value": {}}), "unknown kind 'nonsense'"),
        (jsonl({"id": "x", "object": 3}), "object must be a string"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path: Path, text: str, reason: str) -> None:
    for fmt in ("kafka", "sdk"):
        proc = run_replay(tmp_path, text, "--format", fmt, *(["--strict"] if fmt == "kafka" else []))
        assert proc.returncode == 2
        assert proc.stdout == b""
        err = proc.stderr.decode()
        assert err.count("\n") == 1 and "Traceback" not in err
        assert reason in err


def test_missing_file_and_bad_request_are_one_line_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", "replay", str(tmp_path / "absent.sse")],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1
    request = tmp_path / "request.json"
    request.write_text("[]")
    proc = run_replay(tmp_path, sse(chunk(choice(0, content="x"))), "--request", str(request))
    assert proc.returncode == 2
    assert "request context must be a JSON object" in proc.stderr.decode()


def test_kafka_format_interleaves_completions(tmp_path: Path) -> None:
    text = jsonl(
        chunk(choice(0, role="assistant", content="A"), cid="a"),
        chunk(choice(0, role="assistant", content="B"), cid="b"),
        chunk(choice(0, content="a", finish_reason="stop"), cid="a"),
        chunk(choice(0, content="b", finish_reason="stop"), cid="b"),
    )
    proc = run_replay(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    records = [orjson.loads(line) for line in proc.stdout.splitlines()]
    done = {r["key"]: r["value"] for r in records if r["topic"] == "completion-done"}
    assert {k: v["completion"]["choices"][0]["message"]["content"] for k, v in done.items()} == {
        "a": "Aa",
        "b": "Bb",
    }
    for key in ("a", "b"):
        seqs = [r["value"]["seq"] for r in records if r["topic"] == "completion-events" and r["key"] == key]
        assert seqs == list(range(len(seqs))) and seqs


def test_a_capture_whose_chunks_carry_no_id_replays_as_one_completion(tmp_path: Path) -> None:
    stream = [
        chunk(choice(0, role="assistant", content="Hel"), cid=""),
        chunk(choice(0, content="lo", finish_reason="stop"), cid=""),
        "[DONE]",
    ]
    for text in (sse(*stream), jsonl(*stream)):
        kafka = run_replay(tmp_path, text)
        assert kafka.returncode == 0, kafka.stderr
        done = [r for r in map(orjson.loads, kafka.stdout.splitlines()) if r["topic"] == "completion-done"]
        assert [(r["key"], r["value"]["status"]) for r in done] == [("", "completed")]
        assert done[0]["value"]["completion"]["choices"][0]["message"]["content"] == "Hello"
        sdk = run_replay(tmp_path, text, "--format", "sdk")
        assert sdk.returncode == 0, sdk.stderr
        final = orjson.loads(sdk.stdout.splitlines()[-1])
        assert final["completion"]["choices"][0]["message"]["content"] == "Hello"


def test_an_sse_error_event_fails_the_completion_like_an_error_frame(tmp_path: Path) -> None:
    text = sse(chunk(choice(0, role="assistant", content="Hi"))) + (
        'event: error\ndata: {"message": "overloaded", "code": 529}\n\n'
    )
    kafka = run_replay(tmp_path, text)
    assert kafka.returncode == 0, kafka.stderr
    done = [r for r in map(orjson.loads, kafka.stdout.splitlines()) if r["topic"] == "completion-done"]
    assert [(r["key"], r["value"]["status"]) for r in done] == [("chatcmpl-test", "failed")]
    assert done[0]["value"]["error"]["message"] == "overloaded"
    sdk = run_replay(tmp_path, text, "--format", "sdk")
    assert orjson.loads(sdk.stdout.splitlines()[-1]) == {"type": "error", "error": "APIError"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--driver", "faust", "--processing-guarantee", "exactly_once"],
            "exactly_once needs the direct driver",
        ),
        (["--processing-guarantee", "twice"], "invalid choice"),
    ],
)
def test_worker_refuses_a_guarantee_it_cannot_give(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", "worker", "--bootstrap-servers", "127.0.0.1:1", *args],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr.decode()


def test_the_faust_driver_without_faust_installed_is_one_line_and_exit_2() -> None:
    """``chunkfold[faust]`` is optional: without it the default driver works and the Faust one
    says what to install (simulated by refusing every ``faust`` import)."""
    code = (
        "import sys\n"
        "class NoFaust:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'faust':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoFaust())\n"
        "from chunkfold.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["worker", "--bootstrap-servers", "127.0.0.1:1", "--driver", "faust"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "pip install 'chunkfold[faust]'" in lines[0], lines
    help_proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, timeout=60)
    assert b"worker" in help_proc.stdout and b"audit-sink" in help_proc.stdout


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``chunkfold ARGS`` with ``env`` on top of this environment less its ``CHUNKFOLD_`` variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKFOLD_")}
    return subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", *args],
        env={**clean, **env},
        input=b"",
        capture_output=True,
        timeout=60,
    )


EVERY_COMMAND = [
    ["replay", "--format", "sdk", "-"],
    ["worker", "--bootstrap-servers", "127.0.0.1:1"],
    ["produce", "--bootstrap-servers", "127.0.0.1:1", "absent.sse"],
    ["tail", "--bootstrap-servers", "127.0.0.1:1"],
    ["audit-sink", "--bootstrap-servers", "127.0.0.1:1"],
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda command: command[0])
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHUNKFOLD_PARTITIONS": "eight"}, "CHUNKFOLD_PARTITIONS='eight': Input should be a valid integer"),
        ({"CHUNKFOLD_DRIVER": "fast"}, "CHUNKFOLD_DRIVER='fast': Input should be 'direct' or 'faust'"),
        ({"CHUNKFOLD_SNAPSHOTS": "maybe"}, "CHUNKFOLD_SNAPSHOTS='maybe': Input should be a valid boolean"),
    ],
    ids=["int", "literal", "bool"],
)
def test_a_bad_setting_value_is_one_line_and_exit_2(
    command: list[str], env: dict[str, str], message: str
) -> None:
    proc = run_cli(*command, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"chunkfold {command[0]}: ") and message in err, err


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda command: command[0])
def test_an_unknown_chunkfold_variable_is_one_line_and_exit_2(command: list[str]) -> None:
    """A misspelt setting would otherwise be ignored silently (the worker would run on the default)."""
    proc = run_cli(*command, env={"CHUNKFOLD_PARTITION": "4", "CHUNKFOLD_BOOTSTRAP_SERVERS": "k:9092"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "CHUNKFOLD_BOOTSTRAP_SERVERS, CHUNKFOLD_PARTITION: no such setting" in err, err


class RecordedConsumer:
    """Stands in for the consumer ``chunkfold tail`` builds: yields ``messages``."""

    def __init__(self, messages: list[SimpleNamespace]) -> None:
        self.messages = messages
        self.stopped = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def __aiter__(self) -> AsyncIterator[SimpleNamespace]:
        for message in self.messages:
            yield message


def test_tail_follows_the_chosen_topics_with_the_output_consumer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings()
    dead = {"key": "c1", "reason": "oversized", "detail": "too big"}
    consumer = RecordedConsumer(
        [
            SimpleNamespace(topic=settings.deadletter_topic, value=orjson.dumps(dead)),
            SimpleNamespace(topic=settings.deadletter_topic, value=orjson.dumps(dead)),
        ]
    )
    built: dict[str, Any] = {}

    def output_consumer(settings: Settings, *, from_beginning: bool, topics: Any) -> RecordedConsumer:
        built.update(from_beginning=from_beginning, topics=list(topics))
        return consumer

    monkeypatch.setattr("chunkfold.tail.output_consumer", output_consumer)
    args = ["tail", "--bootstrap-servers", "127.0.0.1:1", "--done", "--deadletter", "--from-beginning"]
    assert main([*args, "--max", "1"]) == 0
    assert built == {"from_beginning": True, "topics": [settings.done_topic, settings.deadletter_topic]}
    assert capsys.readouterr().out == "c1 DEADLETTER oversized: too big\n"
    assert consumer.stopped


def test_the_output_consumer_reads_committed_records_of_the_topics_asked() -> None:
    """``chunkfold tail`` reads through it: with ``exactly_once`` an aborted transaction's
    records never show."""

    async def build() -> tuple[frozenset[str], str]:
        consumer = output_consumer(
            Settings(bootstrap_servers="127.0.0.1:1"), from_beginning=False, topics=["completion-done"]
        )
        try:
            return consumer.subscription(), consumer._isolation_level
        finally:
            await consumer.stop()

    assert asyncio.run(build()) == (frozenset({"completion-done"}), "read_committed")
