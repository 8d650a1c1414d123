"""The audit sink's Kafka side: consume the done topic as a consumer group and hand each batch to
:class:`~chunkfold.audit.store.AuditStore`; entry :func:`run` (called by ``chunkfold audit-sink``).

The consumer reads with ``enable_auto_commit=False`` and ``isolation_level=read_committed``.
Invariant, the order of the two commits: a batch's database transaction (rows and
``sink_offsets``) commits first, its Kafka offsets only after. On every assignment each
partition is sought to the offset stored in the database when that is ahead of Kafka's
committed offset, so a crash between the two commits neither repeats nor loses a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from chunkfold.audit.database import DatabaseUrlError, connect, database_errors, redact
from chunkfold.audit.store import AuditStore, SchemaTooNew, SourceRecord
from chunkfold.config import Settings
from chunkfold.kafka_io import KafkaClients

log = logging.getLogger("chunkfold.audit")

DatabaseCommitHook = Callable[[int], None]
"""Called with the number of database commits so far, right after each batch's database commit
and before its Kafka offset commit: the window a crash must survive without repeating or losing
a record (tests inject a crash there; production passes none)."""


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """What ``chunkfold audit-sink`` was told: the database URL, the group, the topic and batch
    size, the settings (used to create the topic when it is missing and allowed to, and to
    describe a Kafka failure) and the clients they make."""

    database: str
    group: str
    topic: str
    batch: int
    settings: Settings
    kafka: KafkaClients


def _rebalance_listener(sink: AuditSink) -> Any:
    from aiokafka.abc import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            await sink.on_revoked(revoked)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await sink.on_assigned(assigned)

    return Listener()


class AuditSink:
    """The consumer loop. ``lock`` serialises database access and rebalances, so a partition is
    never revoked or re-sought in the middle of a batch."""

    def __init__(
        self, config: SinkConfig, store: AuditStore, after_database_commit: DatabaseCommitHook | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.after_database_commit = after_database_commit
        # Serialises database access (one connection, used from worker threads) and keeps a
        # rebalance from revoking partitions in the middle of a batch.
        self.lock = asyncio.Lock()
        self.consumer: Any = None
        self.stop = asyncio.Event()
        self.db_commits = 0
        self.batches = 0
        # offsets sought from the database, to be committed to Kafka (outside the listener)
        self.realign: dict[Any, int] = {}

    async def on_revoked(self, revoked: Any) -> None:
        gone = set(revoked)
        async with self.lock:  # wait for the batch in progress
            self.realign = {tp: o for tp, o in self.realign.items() if tp not in gone}
        if revoked:
            log.info("revoked %s", _partitions(revoked))

    async def on_assigned(self, assigned: Any) -> None:
        tps = sorted((tp for tp in assigned if tp.topic == self.config.topic), key=lambda tp: tp.partition)
        log.info("assigned %s", _partitions(tps))
        async with self.lock:
            stored = await asyncio.to_thread(
                self.store.stored_offsets, self.config.topic, [tp.partition for tp in tps]
            )
            for tp in tps:
                db_next = stored.get(tp.partition)
                if db_next is None:
                    continue
                committed = await self.consumer.committed(tp)
                if committed is None or db_next > committed:
                    # The database committed a batch whose Kafka commit never happened.
                    self.consumer.seek(tp, db_next)
                    self.realign[tp] = db_next
                    log.info(
                        "resume %s[%d] at offset %d from the database (Kafka committed %s)",
                        tp.topic,
                        tp.partition,
                        db_next,
                        committed,
                    )
                elif db_next < committed:
                    log.warning(
                        "%s[%d]: Kafka committed %d is ahead of the database's %d; following Kafka",
                        tp.topic,
                        tp.partition,
                        committed,
                        db_next,
                    )

    async def commit_kafka(self, offsets: dict[Any, int]) -> None:
        from aiokafka.errors import KafkaError

        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # rebalanced away, coordinator moved: the database has them
            log.warning("Kafka offset commit failed (%s); the database holds the offsets", exc)

    async def run(self) -> None:
        from aiokafka.structs import TopicPartition

        from chunkfold.kafka_checks import require_topics
        from chunkfold.kafka_io import ensure_topics

        cfg = self.config
        s = cfg.settings
        if s.create_topics:
            await ensure_topics(cfg.kafka, [cfg.topic], s.partitions, s.replication_factor)
        await require_topics(cfg.kafka, {cfg.topic: ["READ", "DESCRIBE"]}, create_topics=s.create_topics)
        self.consumer = cfg.kafka.consumer(
            group_id=cfg.group,
            client_id="chunkfold-audit-sink",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self.consumer.subscribe([cfg.topic], listener=_rebalance_listener(self))
        await self.consumer.start()
        log.info(
            "audit-sink: %s (group %s) -> %s, batches of up to %d",
            cfg.topic,
            cfg.group,
            redact(cfg.database),
            cfg.batch,
        )
        try:
            while not self.stop.is_set():
                if self.realign:  # offsets sought from the database: tell Kafka too
                    realign, self.realign = self.realign, {}
                    await self.commit_kafka(realign)
                fetched = await self.consumer.getmany(timeout_ms=500, max_records=cfg.batch)
                records = [
                    SourceRecord(tp.topic, tp.partition, m.offset, m.key, m.value)
                    for tp, messages in sorted(fetched.items(), key=lambda kv: kv[0].partition)
                    for m in messages
                ]
                if not records:
                    continue
                started = time.monotonic()
                async with self.lock:
                    result = await asyncio.to_thread(self.store.write_batch, records)
                    self.db_commits += 1
                    # This batch's commit supersedes a pending realignment (never go back).
                    for partition in result.next_offsets:
                        self.realign.pop(TopicPartition(cfg.topic, partition), None)
                    if self.after_database_commit is not None:
                        self.after_database_commit(self.db_commits)
                db_ms = (time.monotonic() - started) * 1000
                await self.commit_kafka(
                    {TopicPartition(cfg.topic, p): o for p, o in result.next_offsets.items()}
                )
                self.batches += 1
                offsets = ",".join(f"p{p}:{o}" for p, o in sorted(result.next_offsets.items()))
                log.info(
                    "batch=%d records=%d stored=%d repeats=%d conflicts=%d rejected=%d skipped=%d "
                    "offsets=%s db_ms=%.1f",
                    self.batches,
                    result.records,
                    result.stored,
                    result.repeats,
                    result.conflicts,
                    result.rejected,
                    result.skipped,
                    offsets or "-",
                    db_ms,
                )
        finally:
            await self.consumer.stop()
            log.info("audit-sink stopped after %d batches", self.batches)


def _partitions(tps: Iterable[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps) or "nothing"


async def _serve(config: SinkConfig, after_database_commit: DatabaseCommitHook | None) -> None:
    db = await asyncio.to_thread(connect, config.database)
    try:
        store = AuditStore(db)
        await asyncio.to_thread(store.migrate)
        sink = AuditSink(config, store, after_database_commit)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop.set)
        try:
            await sink.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        with contextlib.suppress(Exception):
            db.close()


def run(config: SinkConfig, after_database_commit: DatabaseCommitHook | None = None) -> int:
    """Migrate the database, then store the done topic until SIGTERM or SIGINT; the exit status:
    0 after a clean stop, 2 for a database URL or schema this sink cannot use, 3 when Kafka
    refuses it (authentication, an ACL, the topic missing: one line), 1 on a Kafka or
    database error (nothing of the failed batch is committed anywhere: a restart takes it up
    again)."""
    from aiokafka.errors import KafkaError

    from chunkfold.kafka_checks import StartupError, guarded

    try:
        asyncio.run(guarded(_serve(config, after_database_commit), config.kafka, config.settings))
    except StartupError as exc:
        print(f"chunkfold audit-sink: {exc}", file=sys.stderr)
        return 3
    except DatabaseUrlError as exc:
        print(f"chunkfold audit-sink: {exc}", file=sys.stderr)
        return 2
    except SchemaTooNew as exc:
        log.error("%s", exc)
        return 2
    except KafkaError as exc:
        log.error("Kafka error: %s: %s", type(exc).__name__, exc)
        return 1
    except database_errors() as exc:
        log.error("database error: %s: %s", type(exc).__name__, exc)
        return 1
    return 0
