"""``chunkfold watch``: one completion's events, live, from a worker's query listener (``chunkfold.watch``).

Prints each event's JSON on one line, from ``--from-seq`` on, and exits 0 after the
completion's last event. A fleet that is rebalancing, a listener it cannot reach or a stream
broken off is retried for ``--retry-for`` seconds, resuming after the last event printed. A
refusal (unknown completion, missing or wrong token), or a failure that outlasts the retries:
one line on stderr and exit 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from chunkfold.cli import options
from chunkfold.config import Settings

DEFAULT_RETRY_FOR_S = 30.0
"""Long enough for a consumer group to rebalance after a worker left (its session timeout, 10 s)
and for the new owner to restore the partition."""

URL_VARIABLE = "CHUNKFOLD_QUERY_URL"
"""Where ``watch`` finds a query listener when ``--url`` is not given (no worker setting: the
worker's own address comes from its query settings)."""


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser(
        "watch", help="follow one completion's events from a worker's query listener, from any seq"
    )
    p.add_argument("completion_id", metavar="ID", help="the completion id (the key of its chunk records)")
    p.add_argument("--from-seq", type=int, default=0, metavar="N", help="the first seq to print (default 0)")
    p.add_argument(
        "--url",
        help=f"any worker's query listener (default ${URL_VARIABLE}, else this environment's worker: "
        "$CHUNKFOLD_QUERY_ADVERTISED_URL or http://$CHUNKFOLD_QUERY_HOST:$CHUNKFOLD_QUERY_PORT)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a file holding the bearer token (default: $CHUNKFOLD_QUERY_TOKEN or $CHUNKFOLD_QUERY_TOKEN_FILE)",
    )
    p.add_argument(
        "--retry-for",
        type=float,
        default=DEFAULT_RETRY_FOR_S,
        metavar="SECONDS",
        help="while the fleet rebalances (503), cannot be reached or breaks the stream off, retry for this "
        f"long, resuming after the last event printed (default {DEFAULT_RETRY_FOR_S:g}; 0: give up at once)",
    )
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    if not args.completion_id:
        raise options.UsageError("the completion id is empty")
    if args.from_seq < 0:
        raise options.UsageError(f"--from-seq {args.from_seq}: a seq is 0 or more")
    if not args.retry_for >= 0:  # also refuses nan
        raise options.UsageError(f"--retry-for {args.retry_for:g}: 0 or more seconds")
    settings = options.settings(args)
    url = listener_url(args.url or os.environ.get(URL_VARIABLE, ""), settings)
    token = read_token(args.token_file) if args.token_file else settings.query_bearer_token()
    # imported here: aiohttp would add a tenth of a second to every other command's start
    from chunkfold import watch

    try:
        asyncio.run(
            watch.follow(
                url,
                args.completion_id,
                args.from_seq,
                token,
                sys.stdout,
                retry_for=args.retry_for,
                notify=_note if sys.stderr.isatty() else None,
            )
        )
    except watch.WatchError as exc:
        print(f"chunkfold watch: {exc}", file=sys.stderr)
        return 1
    return 0


def _note(line: str) -> None:
    """A retry, told on a terminal (a script's stderr gets only the final line of a failure)."""
    print(f"chunkfold watch: {line}", file=sys.stderr)


def listener_url(given: str, settings: Settings) -> str:
    """``given`` (checked: ``http(s)://host[:port]``), else the query listener of ``settings``."""
    if not given:
        if settings.query_port == 0:
            raise options.UsageError(
                f"which query listener? give --url, or set {URL_VARIABLE} or CHUNKFOLD_QUERY_PORT"
            )
        return settings.query_url()
    from yarl import URL  # here too: yarl comes with aiohttp's weight

    try:
        url = URL(given)
        valid = url.scheme in ("http", "https") and bool(url.host)
    except ValueError:
        valid = False
    if not valid:
        raise options.UsageError(f"{given!r} is not an http(s)://host:port URL")
    return given


def read_token(path: Path) -> str:
    """The bearer token in ``path``, without surrounding blanks."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise options.UsageError(f"--token-file {str(path)!r}: cannot read it ({reason})") from None
    if not token:
        raise options.UsageError(f"--token-file {str(path)!r}: the file is empty")
    return token
