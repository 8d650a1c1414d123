"""``chunkfold replay``: the engine over a capture (SSE or JSON Lines) with no Kafka.

The folding is ``chunkfold.replay``'s; this module opens the input (a file or stdin, gzip or
zstd compressed or not, told by its first bytes), streams its lines through it and writes
JSON Lines, with a summary (and, on a terminal, a progress line) on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import zstandard

from chunkfold.cli import options
from chunkfold.cli.options import UsageError
from chunkfold.core import codec
from chunkfold.core.inputs import InputError

if TYPE_CHECKING:
    from chunkfold.replay import Published, ReplayCounts

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WRITE_BATCH = 512
"""Output lines joined into one write."""
PROGRESS_EVERY_S = 1.0
KEY_CACHE_SIZE = 4096
"""Output line heads kept (one per topic and open completion; dropped whole when full)."""


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser(
        "replay", help="run the engine over a capture (SSE or JSON Lines) with no Kafka"
    )
    p.add_argument("input", help="capture file (may be .gz or .zst compressed), or - for stdin")
    p.add_argument("--request", help="request context (create-params JSON)")
    p.add_argument("--format", choices=("kafka", "sdk"), default="kafka")
    p.add_argument(
        "--strict",
        action="store_true",
        help="kafka format: stop with exit 2 at the first record the worker would dead-letter "
        "(default: print its dead letter as the worker publishes it, and go on)",
    )
    options.add_delta_extras(p, scope="kafka format: ")
    p.set_defaults(func=cmd_replay)


@contextlib.contextmanager
def open_capture(path: str) -> Iterator[Iterator[str]]:
    """The lines of the capture at ``path`` (``-``: stdin), decompressed when its first bytes
    are a gzip or zstd frame, decoded as UTF-8 (a BOM is dropped later, with the line ends)."""
    try:
        raw: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    with contextlib.ExitStack() as stack:
        if raw is not sys.stdin.buffer:
            stack.callback(raw.close)
        buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, raw))
        magic = buffered.peek(4)[:4]
        stream: io.BufferedIOBase = buffered
        if magic.startswith(GZIP_MAGIC):
            stream = gzip.GzipFile(fileobj=buffered)
        elif magic == ZSTD_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(buffered)
            stream = io.BufferedReader(cast(io.RawIOBase, reader))
        text = io.TextIOWrapper(cast(BinaryIO, stream), encoding="utf-8", newline=None)
        yield _checked_lines(text, path)


def _checked_lines(text: IO[str], path: str) -> Iterator[str]:
    """The lines of ``text``; what makes reading fail is one line naming the place."""
    number = 0
    try:
        for number, line in enumerate(text, start=1):  # noqa: B007 (used after the loop)
            yield line
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 (after line {number})") from None
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise InputError(f"{path}: cannot be read after line {number} ({exc})") from None


def load_request(path: str | None) -> dict[str, Any] | None:
    """The create-params of ``path``; a fixture file's ``request_body`` is taken as they."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    try:
        value = codec.loads(data)
    except codec.DecodeError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: the request context must be a JSON object")
    body = value.get("request_body")
    return body if isinstance(body, dict) and "messages" not in value else value


def _write(lines: Iterator[bytes]) -> None:
    out = sys.stdout.buffer
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= WRITE_BATCH:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))
    out.flush()


def cmd_replay(args: argparse.Namespace) -> int:
    from chunkfold import replay

    request = load_request(args.request)
    settings = options.settings(args)
    with open_capture(args.input) as lines:
        if args.format == "sdk":
            _write(codec.dumps(value) + b"\n" for value in replay.replay_sdk(lines, request))
            return 0
        counts = replay.ReplayCounts()
        records = replay.published(lines, request, settings, strict=args.strict, counts=counts)
        progress = _Progress(counts) if sys.stderr.isatty() else None
        _write(_kafka_lines(records, progress))
    if progress is not None:
        progress.clear()
    print(f"chunkfold replay: {_summary(counts)}", file=sys.stderr)
    return 0


def _kafka_lines(records: Iterator[Published], progress: _Progress | None) -> Iterator[bytes]:
    """``{"topic", "key", "value"}`` lines, the value's JSON as the worker publishes it."""
    dumps = codec.dumps
    heads: dict[tuple[str, str], bytes] = {}  # '{"topic":...,"key":...,"value":' per topic and key
    for n, (topic, key, value) in enumerate(records):
        head = heads.get((topic, key))
        if head is None:
            if len(heads) >= KEY_CACHE_SIZE:
                heads.clear()
            head = heads[(topic, key)] = b'{"topic":%b,"key":%b,"value":' % (dumps(topic), dumps(key))
        yield head + value + b"}\n"
        if progress is not None and n % 4096 == 0:
            progress.tick()


def _summary(counts: ReplayCounts) -> str:
    dead = sum(counts.deadletters.values())
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts.deadletters.items()))
    return (
        f"{counts.records:,} records, {counts.completions:,} completions, {counts.events:,} events, "
        f"{dead:,} dead letters" + (f" ({reasons})" if reasons else "")
    )


class _Progress:
    """A progress line on a terminal's stderr, rewritten at most once a second."""

    def __init__(self, counts: ReplayCounts) -> None:
        self.counts = counts
        self.start = self.last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.counts.records / (now - self.start)
            sys.stderr.write(f"\r{_summary(self.counts)} ({rate:,.0f} records/s)\x1b[K")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.last != self.start:
            sys.stderr.write("\r\x1b[K")
