"""Every recorded API stream replays to exactly the SDK's events and final completion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chunkfold.replay import replay_sdk
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
