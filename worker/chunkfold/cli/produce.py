"""``chunkfold produce``: publish captures to the input topic as a gateway would (``chunkfold.produce``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from chunkfold.cli import options
from chunkfold.gateway import GatewayRecord, capture_records, interleave, load_captures
from chunkfold.produce import publish


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser(
        "produce", help="publish SSE / JSON Lines captures (files or directories) as a gateway would"
    )
    p.add_argument("paths", nargs="+", type=Path)
    options.add_bootstrap_servers(p)
    options.add_topic(p, "input_topic", "--topic", what="input topic")
    options.add_partitions(p, "partitions if the topic must be created")
    p.add_argument("--rate", type=float, default=0.0, help="records per second (0: as fast as possible)")
    p.add_argument(
        "--repeat", type=int, default=1, help="publish every capture N times as distinct completions"
    )
    p.add_argument("--no-seq", action="store_true", help="leave out the chunkfold.seq header")
    p.set_defaults(func=cmd_produce)


def cmd_produce(args: argparse.Namespace) -> int:
    settings = options.settings(args)
    streams: list[list[GatewayRecord]] = []
    for path, text, request in load_captures(args.paths):
        for n in range(args.repeat):
            suffix = f"-{n}" if args.repeat > 1 else ""
            streams += capture_records(
                text, request, key_suffix=suffix, with_seq=not args.no_seq, unnamed_key=path.stem
            ).values()
    records = list(interleave(streams))
    sent = asyncio.run(publish(settings, records, args.rate))
    print(
        f"published {sent} records of {len(streams)} completions to {settings.input_topic}", file=sys.stderr
    )
    return 0
