"""The recorded API streams in ``tests/fixtures/openai-recorded`` and their SDK goldens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "openai-recorded"


@dataclass(frozen=True)
class Recording:
    name: str
    sse: Path
    request_file: Path
    golden_file: Path

    @property
    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.request_file.read_text())["request_body"]
        return body

    @property
    def golden(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.golden_file.read_text())
        return value

    def expected_sdk_lines(self) -> list[dict[str, Any]]:
        """What ``chunkfold replay --format sdk`` must print for this stream."""
        golden = self.golden
        lines = [e for step in golden["steps"] for e in step["events"] if e["type"] != "chunk"]
        if golden["stream_error"]:
            lines.append({"type": "error", "error": golden["stream_error"]["type"]})
        elif golden["final_completion_error"]:
            lines.append({"type": "error", "error": golden["final_completion_error"]["type"]})
        else:
            lines.append({"type": "completion", "completion": golden["final_completion"]})
        return lines


def recordings() -> list[Recording]:
    return [
        Recording(
            p.name.removesuffix(".sse"), p, p.with_suffix(".request.json"), p.with_suffix(".golden.json")
        )
        for p in sorted(FIXTURES.glob("*.sse"))
    ]
