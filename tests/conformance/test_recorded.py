"""Every recorded API stream replays to exactly the SDK's events and final completion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chunkfold.config import Settings
from chunkfold.replay import replay_kafka, replay_sdk
from tests.recorded import Recording, recordings

pytestmark = pytest.mark.conformance
RECORDINGS = recordings()


def test_all_recordings_present() -> None:
    assert len(RECORDINGS) == 49


@pytest.mark.parametrize("rec", RECORDINGS, ids=[r.name for r in RECORDINGS])
def test_replay_sdk_matches_golden(rec: Recording) -> None:
    got = list(replay_sdk(rec.sse.read_text(), rec.request))
    expected = rec.expected_sdk_lines()
    assert len(got) == len(expected)
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"line {index}"


@pytest.mark.parametrize("rec", RECORDINGS, ids=[r.name for r in RECORDINGS])
def test_the_worker_publishes_the_sdk_events_with_their_values(rec: Recording) -> None:
    """Kafka mode (what the worker publishes) gives the SDK's events on every recorded OpenAI
    stream: same types and values, without the snapshots the SDK recomputes per chunk."""
    published = list(replay_kafka(rec.sse.read_text(), rec.request, Settings()))
    got = [r["value"] for r in published if r["topic"] == "completion-events"]
    sdk = [line for line in rec.expected_sdk_lines() if line["type"] not in ("completion", "error")]
    assert [e["type"] for e in got] == [e["type"] for e in sdk]
    for event, expected in zip(got, sdk, strict=True):
        for field in ("delta", "content", "refusal", "arguments_delta", "name", "index"):
            if field in expected and field in event:
                assert event[field] == expected[field], (event["type"], field)


@pytest.mark.parametrize(
    "rec", [r for r in RECORDINGS if not r.name.startswith("hist_")], ids=lambda r: r.name
)
def test_replay_command_prints_the_golden(rec: Recording) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chunkfold.cli",
            "replay",
            "--format",
            "sdk",
            "--request",
            str(rec.request_file),
            str(rec.sse),
        ],
        capture_output=True,
        check=True,
    )
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert got == rec.expected_sdk_lines()
