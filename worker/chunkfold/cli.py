"""The ``chunkfold`` command: ``replay``, ``worker``, ``produce``, ``tail``.

Bad input ends a command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chunkfold.config import Settings
from chunkfold.core import codec
from chunkfold.core.inputs import InputError, read_text


class UsageError(Exception):
    """A problem with the command's input or arguments; printed as one line."""


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


def _write_lines(values: Any) -> None:
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
        settings = Settings.from_env(
            snapshots=args.snapshots or None, partial_parse=args.partial_parse or None
        )
        lines = list(replay.replay_kafka(text, request, settings))
    _write_lines(lines)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkfold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="run the engine over a capture (SSE or JSON Lines) with no Kafka")
    p.add_argument("input", help="capture file, or - for stdin")
    p.add_argument("--request", help="request context (create-params JSON)")
    p.add_argument("--format", choices=("kafka", "sdk"), default="kafka")
    p.add_argument("--snapshots", action="store_true", help="kafka format: snapshots on delta events")
    p.add_argument(
        "--partial-parse", action="store_true", help="kafka format: partial parses on delta events"
    )
    p.set_defaults(func=cmd_replay)

    for module in ("chunkfold.app.main", "chunkfold.produce", "chunkfold.tail", "chunkfold.audit_sink"):
        # every dependency of these is declared: an ImportError is a broken install and must
        # show, not silently remove a subcommand
        register: Callable[[Any], None] = importlib.import_module(module).register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (UsageError, InputError) as exc:
        print(f"chunkfold {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
