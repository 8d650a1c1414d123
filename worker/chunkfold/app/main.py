"""``chunkfold worker``: run the Faust worker with settings from the environment and flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import sys
from typing import Any

from chunkfold.config import Settings

GUARANTEES = ("at_least_once", "exactly_once")


def register(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker of the chunkfold consumer group")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--app-id", help="consumer group / Faust app id (default chunkfold)")
    p.add_argument(
        "--driver",
        choices=("direct", "faust"),
        help="direct (default): batches on aiokafka; faust: a Faust agent and table (same topics and state)",
    )
    p.add_argument(
        "--processing-guarantee",
        choices=GUARANTEES,
        help="at_least_once (default): idempotent outputs, de-duplicable by (completion id, seq); "
        "exactly_once: Kafka transactions, nothing repeated for read_committed consumers (direct driver)",
    )
    p.add_argument("--input-topic")
    p.add_argument("--events-topic")
    p.add_argument("--done-topic")
    p.add_argument("--deadletter-topic")
    p.add_argument("--partitions", type=int, help="partitions of the input and state topics (default 8)")
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", help="seconds before expiry (600)")
    p.add_argument(
        "--commit-interval", type=float, dest="commit_interval_s", help="write-behind interval (1.0)"
    )
    p.add_argument("--store", help="memory:// (default) or rocksdb://")
    p.add_argument("--data-dir", help="directory for RocksDB table data")
    p.add_argument("--web-port", type=int, help="metrics/health port (6066; 0 disables)")
    p.add_argument("--snapshots", action="store_true", default=None, help="snapshots on delta events")
    p.add_argument(
        "--partial-parse", action="store_true", default=None, help="partial parses on delta events"
    )
    p.add_argument("--loglevel", default="info")
    p.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines as JSON (default) or text"
    )
    p.set_defaults(func=run_worker)


async def _prepare_topics(settings: Settings) -> dict[str, int]:
    """Create missing topics (the outputs with a deliberate ``max.message.bytes``) and return
    the largest record each output topic accepts."""
    from chunkfold.kafka_io import ensure_topics, record_limits

    s = settings
    outputs = (s.events_topic, s.done_topic, s.deadletter_topic)
    await ensure_topics(s.bootstrap_servers, [s.input_topic], s.partitions, s.replication_factor)
    await ensure_topics(
        s.bootstrap_servers,
        outputs,
        s.partitions,
        s.replication_factor,
        configs={"max.message.bytes": str(s.max_message_bytes)},
    )
    return await record_limits(s.bootstrap_servers, outputs, s.max_message_bytes)


def run_worker(args: argparse.Namespace) -> int:
    from chunkfold.app.logs import logging_config

    names = (
        "bootstrap_servers",
        "app_id",
        "driver",
        "processing_guarantee",
        "input_topic",
        "events_topic",
        "done_topic",
        "deadletter_topic",
        "partitions",
        "idle_timeout_s",
        "commit_interval_s",
        "store",
        "data_dir",
        "web_port",
        "snapshots",
        "partial_parse",
    )
    settings = Settings.from_env(**{name: getattr(args, name) for name in names})
    if not settings.bootstrap_servers:
        print(
            "chunkfold worker: no Kafka: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers", file=sys.stderr
        )
        return 2
    if settings.driver not in ("direct", "faust"):
        print(f"chunkfold worker: unknown driver {settings.driver!r} (direct or faust)", file=sys.stderr)
        return 2
    if settings.processing_guarantee not in GUARANTEES:
        print(
            f"chunkfold worker: unknown processing guarantee {settings.processing_guarantee!r} "
            "(at_least_once or exactly_once)",
            file=sys.stderr,
        )
        return 2
    if settings.processing_guarantee == "exactly_once" and settings.driver != "direct":
        print("chunkfold worker: exactly_once needs the direct driver (--driver direct)", file=sys.stderr)
        return 2
    if settings.driver == "faust":
        try:
            from chunkfold.app.faust_app import create_app
        except ImportError as exc:
            print(
                f"chunkfold worker: the Faust driver needs faust-streaming ({exc}): "
                "pip install 'chunkfold[faust]'",
                file=sys.stderr,
            )
            return 2
    config = logging_config(args.loglevel, args.log_format)
    logging.config.dictConfig(config)
    limits = asyncio.run(_prepare_topics(settings))
    if settings.driver == "direct":
        from chunkfold.app import direct

        return direct.run(settings)
    app, processor = create_app(settings)
    processor.limits.update(limits)
    from faust.worker import Worker

    worker = Worker(app, loglevel=args.loglevel, quiet=True, logging_config=config)
    # Faust's progress spinner lowers the root logger to DEBUG so that it can spin on every log
    # call: then every aiokafka/Faust debug call builds a record on the hot path.
    worker.spinner = None
    worker.execute_from_commandline()
    return 0
