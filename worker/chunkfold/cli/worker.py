"""``chunkfold worker``: run a worker of the consumer group with settings from the environment and flags.

Checks the settings, configures logging, prepares and checks the topics and the cluster's ACLs
(``chunkfold.kafka_checks``), then hands over to the chosen
driver: ``chunkfold.drivers.direct.run`` or ``chunkfold.drivers.faust.create_app``. Drivers are
imported only when chosen (the Faust one needs the optional ``chunkfold[faust]`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import logging.config
import sys
from typing import get_args

from chunkfold.cli import options
from chunkfold.config import Driver, ProcessingGuarantee


def register(subcommands: options.Subcommands) -> None:
    p = subcommands.add_parser("worker", help="run a worker of the chunkfold consumer group")
    options.add_bootstrap_servers(p)
    p.add_argument("--app-id", help="consumer group / Faust app id (default chunkfold)")
    p.add_argument(
        "--driver",
        choices=get_args(Driver),
        help="direct (default): batches on aiokafka; faust: a Faust agent and table (same topics and state)",
    )
    p.add_argument(
        "--processing-guarantee",
        choices=get_args(ProcessingGuarantee),
        help="at_least_once (default): idempotent outputs, de-duplicable by (completion id, seq); "
        "exactly_once: Kafka transactions, nothing repeated for read_committed consumers (direct driver)",
    )
    for topic in ("input_topic", "events_topic", "done_topic", "deadletter_topic"):
        options.add_topic(p, topic)
    options.add_partitions(p, "partitions of the input and state topics")
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", help="seconds before expiry (600)")
    p.add_argument(
        "--commit-interval", type=float, dest="commit_interval_s", help="write-behind interval (1.0)"
    )
    p.add_argument("--store", help="memory:// (default) or rocksdb://")
    p.add_argument("--data-dir", help="directory for RocksDB table data")
    p.add_argument("--web-port", type=int, help="metrics/health port (6066; 0 disables)")
    options.add_delta_extras(p)
    options.add_logging(p)
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from chunkfold.logs import logging_config

    settings = options.settings(args)
    if not settings.bootstrap_servers:
        print(
            "chunkfold worker: no Kafka: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers", file=sys.stderr
        )
        return 2
    if settings.processing_guarantee == "exactly_once" and settings.driver != "direct":
        print("chunkfold worker: exactly_once needs the direct driver (--driver direct)", file=sys.stderr)
        return 2
    if settings.driver == "faust":
        try:
            from chunkfold.drivers.faust import create_app
        except ImportError as exc:
            print(
                f"chunkfold worker: the Faust driver needs faust-streaming ({exc}): "
                "pip install 'chunkfold[faust]'",
                file=sys.stderr,
            )
            return 2
    from chunkfold.drivers.partitions import KeyPartitions
    from chunkfold.kafka_checks import guarded, prepare_worker_topics
    from chunkfold.kafka_io import KafkaClients, partition_counts, record_limits
    from chunkfold.state.changelog import changelog_topic

    kafka = KafkaClients.of(settings)
    config = logging_config(args.loglevel, args.log_format)
    logging.config.dictConfig(config)
    # Before anything is consumed: topics created (unless CHUNKFOLD_CREATE_TOPICS=false) and
    # checked, ACLs and the changelog too; a failure is a StartupError (one line, exit 3), and
    # the worker never reports ready.
    changelog = changelog_topic(settings)
    asyncio.run(guarded(prepare_worker_topics(kafka, settings, changelog), kafka, settings))
    if settings.driver == "direct":
        from chunkfold.drivers import direct

        return direct.run(settings, kafka)
    outputs = (settings.events_topic, settings.done_topic, settings.deadletter_topic)
    partitions = KeyPartitions(asyncio.run(partition_counts(kafka, outputs)))
    app, processor = create_app(settings, partitions, kafka)
    cap = settings.max_message_bytes
    processor.set_limits(asyncio.run(record_limits(kafka, processor.limits, cap)))
    from faust.worker import Worker

    worker = Worker(app, loglevel=args.loglevel, quiet=True, logging_config=config)
    # Faust's progress spinner lowers the root logger to DEBUG so that it can spin on every log
    # call: then every aiokafka/Faust debug call builds a record on the hot path.
    worker.spinner = None
    worker.execute_from_commandline()
    return 0
