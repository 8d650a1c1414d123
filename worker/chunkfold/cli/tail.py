"""``chunkfold tail``: follow completion-events / completion-done in a readable form (``chunkfold.tail``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from chunkfold import tail
from chunkfold.cli import options


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser("tail", help="follow completion-events / completion-done in a readable form")
    options.add_bootstrap_servers(p)
    p.add_argument("--events", action="store_true", help="events only")
    p.add_argument("--done", action="store_true", help="completion-done only")
    p.add_argument("--deadletter", action="store_true", help="also the dead-letter topic")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--json", action="store_true", help="print raw JSON values, one per line")
    p.add_argument("--max", type=int, default=0, help="stop after this many records")
    p.set_defaults(func=cmd_tail)


def cmd_tail(args: argparse.Namespace) -> int:
    settings = options.settings(args)
    topics = []
    if not args.done:
        topics.append(settings.events_topic)
    if not args.events:
        topics.append(settings.done_topic)
    if args.deadletter:
        topics.append(settings.deadletter_topic)
    try:
        asyncio.run(
            tail.follow(settings, topics, from_beginning=args.from_beginning, raw=args.json, limit=args.max)
        )
    except RuntimeError as exc:
        print(f"chunkfold tail: {exc}", file=sys.stderr)
        return 2
    return 0
