"""``chunkfold replay``: the engine over a capture (SSE or JSON Lines) with no Kafka.

The folding is ``chunkfold.replay``'s; this module reads the files and writes JSON Lines.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chunkfold.cli import options
from chunkfold.cli.options import UsageError
from chunkfold.core import codec
from chunkfold.core.inputs import read_text


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser(
        "replay", help="run the engine over a capture (SSE or JSON Lines) with no Kafka"
    )
    p.add_argument("input", help="capture file, or - for stdin")
    p.add_argument("--request", help="request context (create-params JSON)")
    p.add_argument("--format", choices=("kafka", "sdk"), default="kafka")
    options.add_delta_extras(p, scope="kafka format: ")
    p.set_defaults(func=cmd_replay)


def _read_input(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    return read_text(data, path)


def load_request(path: str | None) -> dict[str, Any] | None:
    """The create-params of ``path``; a fixture file's ``request_body`` is taken as they."""
    if path is None:
        return None
    try:
        value = codec.loads(_read_input(path))
    except codec.DecodeError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: the request context must be a JSON object")
    body = value.get("request_body")
    return body if isinstance(body, dict) and "messages" not in value else value


def _write_lines(values: Iterable[Any]) -> None:
    out = sys.stdout.buffer
    for value in values:
        out.write(codec.dumps(value))
        out.write(b"\n")
    out.flush()


def cmd_replay(args: argparse.Namespace) -> int:
    from chunkfold import replay

    text = _read_input(args.input)
    request = load_request(args.request)
    if args.format == "sdk":
        lines = list(replay.replay_sdk(text, request))
    else:
        lines = list(replay.replay_kafka(text, request, options.settings(args)))
    _write_lines(lines)
    return 0
