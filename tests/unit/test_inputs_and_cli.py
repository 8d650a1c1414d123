"""SSE / JSON Lines framing and the replay command's handling of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from chunkfold.core.inputs import detect_format, iter_sse_data
from tests.streams import choice, chunk, jsonl, sse

pytestmark = pytest.mark.unit


def test_sse_framing_follows_the_spec() -> None:
    text = "\ufeff: keep-alive comment\r\ndata: one\r\n\r\nevent: x\nid: 7\ndata: two\ndata: lines\n\n:c\rdata:three\r\r"
    assert [data for _, data in iter_sse_data(text)] == ["one", "two\nlines", "three"]


def test_an_unterminated_last_event_is_still_delivered() -> None:
    assert [data for _, data in iter_sse_data("data: a\n\ndata: [DONE]")] == ["a", "[DONE]"]


def test_format_detection() -> None:
    assert detect_format(": hi\n\ndata: {}\n\n") == "sse"
    assert detect_format('\n{"id": "x"}\n') == "jsonl"


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
        ("data: {not json\n\n", "line 1: not JSON"),
        ("data: [1, 2]\n\n", "line 1: expected a JSON object, got list"),
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
        proc = run_replay(tmp_path, text, "--format", fmt)
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
