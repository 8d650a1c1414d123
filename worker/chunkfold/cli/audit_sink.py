"""``chunkfold audit-sink``: the command line of :mod:`chunkfold.audit` (options, the sink's
configuration from them and the settings, logging); the sink itself is
:func:`chunkfold.audit.sink.run`."""

from __future__ import annotations

import argparse
import logging.config

from chunkfold.audit import sink
from chunkfold.audit.sink import SinkConfig
from chunkfold.cli import options
from chunkfold.cli.options import Subcommands, UsageError
from chunkfold.kafka_io import KafkaClients
from chunkfold.logs import logging_config

DEFAULT_DATABASE = "sqlite:///.cache/audit.sqlite3"
DEFAULT_GROUP = "chunkfold-audit"
DEFAULT_BATCH = 500


def register(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "audit-sink", help="store every completion-done record in SQLite or PostgreSQL, exactly once"
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help=f"sqlite:///PATH or postgresql://user@host:port/db (default {DEFAULT_DATABASE})",
    )
    parser.add_argument("--group", default=DEFAULT_GROUP, help=f"consumer group (default {DEFAULT_GROUP})")
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"records per database transaction, at most (default {DEFAULT_BATCH})",
    )
    options.add_bootstrap_servers(parser)
    options.add_topic(parser, "done_topic", what="topic to consume")
    options.add_logging(parser)
    parser.set_defaults(func=run)


def sink_config(args: argparse.Namespace) -> SinkConfig:
    """The sink's configuration from the options and the settings; :class:`UsageError` without a
    broker or with an empty batch (checked before anything connects)."""
    settings = options.settings(args)
    if not settings.bootstrap_servers:
        raise UsageError("no Kafka: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    return SinkConfig(
        database=args.database,
        group=args.group,
        topic=settings.done_topic,
        batch=args.batch,
        settings=settings,
        kafka=KafkaClients.of(settings),
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Log lines as ``--loglevel`` and ``--log-format`` say, like the worker's."""
    logging.config.dictConfig(logging_config(args.loglevel, args.log_format))


def run(args: argparse.Namespace) -> int:
    """The ``audit-sink`` command: its exit status (see :func:`chunkfold.audit.sink.run`)."""
    config = sink_config(args)
    configure_logging(args)
    return sink.run(config)
