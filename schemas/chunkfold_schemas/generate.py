"""Write the JSON Schema (draft 2020-12) of every record to ``schemas/chunkfold_schemas/json/``.

    python -m chunkfold_schemas.generate            # (re)write the files
    python -m chunkfold_schemas.generate --check    # exit 1 if a committed file is missing or stale

The records are the topics' and the query listener's snapshot. The schemas are generated from
the pydantic models (validation mode: what ``parse_*`` accepts), so they can never drift from
them; the output is deterministic (sorted keys, two-space indent, trailing newline) so a
regenerated file diffs cleanly. Imports nothing from ``worker``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from chunkfold_schemas.abort import AbortRecord
from chunkfold_schemas.chunk import ChunkRecord
from chunkfold_schemas.deadletter import DeadLetter
from chunkfold_schemas.done import DoneRecord
from chunkfold_schemas.events import CompletionEvent
from chunkfold_schemas.request import RequestContext
from chunkfold_schemas.snapshot import CompletionSnapshot

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
JSON_DIR = Path(__file__).resolve().parent / "json"


@dataclass(frozen=True, slots=True)
class Contract:
    """One record: its schema file name (without ``.json``), topic and model. ``topic`` None:
    not a topic record but the body of a query listener's response (in the AsyncAPI document
    under ``components/schemas``)."""

    name: str
    topic: str | None
    title: str
    description: str
    adapter: TypeAdapter[Any]


CONTRACTS: tuple[Contract, ...] = (
    Contract(
        "request-context",
        "completion-chunks",
        "RequestContext",
        "The optional request context record on completion-chunks (header chunkfold.kind: request): "
        "the create-params the gateway sent. Key: the completion id.",
        TypeAdapter(RequestContext),
    ),
    Contract(
        "completion-chunk",
        "completion-chunks",
        "CompletionChunk",
        "A chunk record on completion-chunks (header chunkfold.kind absent or chunk): the SSE data "
        "payload exactly as the API streamed it, i.e. a chat.completion.chunk, an error frame or "
        "another provider frame. Exactly the values the worker folds: the fields it reads are typed, "
        "all others allowed. Key: the completion id, which a non-empty chunk id must equal.",
        TypeAdapter(ChunkRecord),
    ),
    Contract(
        "abort",
        "completion-chunks",
        "Abort",
        "An abort record on completion-chunks (header chunkfold.kind: abort) whose value is not "
        "empty: a JSON object (or null); the completion ends with status aborted. Key: the "
        "completion id.",
        TypeAdapter(AbortRecord | None),
    ),
    Contract(
        "completion-event",
        "completion-events",
        "CompletionEvent",
        "A completion-events value: one semantic event (openai-python's event types plus chunkfold's "
        "reasoning events), with completion_id, choice_index and a gap-free per-completion seq. "
        "Key: the completion id; (completion_id, seq) identifies an event across redeliveries.",
        TypeAdapter(CompletionEvent),
    ),
    Contract(
        "completion-done",
        "completion-done",
        "DoneRecord",
        "A completion-done value: exactly one per completion, with its status, the final "
        "ParsedChatCompletion, usage, the request context and timing. Key: the completion id.",
        TypeAdapter(DoneRecord),
    ),
    Contract(
        "dead-letter",
        "completion-deadletter",
        "DeadLetter",
        "A completion-deadletter value: an input record that could not be folded, kept byte for "
        "byte (base64) with the reason. Key: the rejected record's key.",
        TypeAdapter(DeadLetter),
    ),
    Contract(
        "completion-snapshot",
        None,
        "CompletionSnapshot",
        "The body of GET /completions/{id} on a worker's query listener (not a topic record): the "
        "completion as it stands. While it streams (status in_progress), what its completion-done "
        "record would carry if it ended now; once it has ended, while the worker keeps its "
        "tombstone, its terminal status and event count.",
        TypeAdapter(CompletionSnapshot),
    ),
)


def schema_of(contract: Contract) -> dict[str, Any]:
    """The JSON Schema document of one record type."""
    schema = contract.adapter.json_schema(mode="validation", ref_template="#/$defs/{model}")
    schema["$schema"] = DRAFT_2020_12
    schema["title"] = contract.title
    schema["description"] = contract.description
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    """File name -> file text of every schema file."""
    return {f"{c.name}.json": render(schema_of(c)) for c in CONTRACTS}


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Files in ``directory`` that are missing, differ from a fresh generation, or are extra."""
    fresh = generated()
    problems = []
    for name, text in fresh.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: stale")
    problems += [f"{p.name}: not generated" for p in sorted(directory.glob("*.json")) if p.name not in fresh]
    return problems


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chunkfold_schemas.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is missing or stale")
    parser.add_argument("--out", type=Path, default=JSON_DIR, help=f"directory (default {JSON_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.out)
        for problem in problems:
            print(f"schemas/chunkfold_schemas/json/{problem}", file=sys.stderr)
        if problems:
            print("run `python -m chunkfold_schemas.generate` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
