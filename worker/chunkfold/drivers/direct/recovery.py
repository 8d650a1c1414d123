"""Restoring the direct driver's state when partitions are assigned: from the local copy
(``CHUNKFOLD_STORE=rocksdb://``) plus the changelog from its checkpoint on, or the whole
changelog; and keeping that local copy up to date with acknowledged changelog writes.

Kafka Streams' checkpoint model: the changelog topic stays the source of truth. Once a
checkpoint's state writes are acknowledged, the same writes go to a RocksDB database on the
worker's volume (``chunkfold.state.rocksdb``) together with, per changelog partition, the
offset after them. A restart or a partition coming back loads those entries and reads the
changelog only from that offset on; a checkpoint too old for the changelog's tombstones, or
outside its offsets, means a full read as without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.metrics_core import Metric

from chunkfold.config import Settings
from chunkfold.kafka_io import Connection, KafkaClients, topic_config
from chunkfold.metrics import counter
from chunkfold.state.changelog import ChangelogStore

if TYPE_CHECKING:
    from chunkfold.state.rocksdb import Checkpoint, LocalState

log = logging.getLogger("chunkfold.worker")
RESTORE_YIELD_EVERY = 10_000
"""Entries loaded from the local copy between two yields to the event loop (heartbeats)."""

Written = list[tuple[int, str, bytes | None]]
"""Changelog writes: (partition, key, value), None deletes."""


def local_checkpoint_max_age_s(delete_retention_ms: int) -> float:
    """How old a local checkpoint may be and still be used: half the changelog's
    ``delete.retention.ms``. A tombstone written after the checkpoint stays in the changelog
    at least that long, so the tail read from the checkpoint still deletes what it deleted
    (the other half is margin for clock differences and the time a restore takes)."""
    return delete_retention_ms / 2000


def keeps_local_state(settings: Settings) -> bool:
    """Whether this driver keeps a local copy of its state (in ``data_dir``): with a
    ``rocksdb://`` store; ``memory://`` (the default) opens no local database."""
    return settings.store.startswith("rocksdb://")


async def changelog_delete_retention_ms(servers: Connection, topic: str) -> int | None:
    """The topic's ``delete.retention.ms`` as the brokers report it; None when it cannot be read."""
    value = (await topic_config(servers, [topic], "delete.retention.ms")).get(topic)
    return None if value is None else int(value)


class LocalCopy:
    """The local copy of the state as the driver keeps it. Losing it (a failed write) is not
    fatal: the worker goes on without it, and what it holds stays consistent (entries and
    checkpoint are written in one batch), so the next start reads the changelog from its last
    good checkpoint."""

    def __init__(self, state: LocalState, max_age_s: float) -> None:
        self.state: LocalState | None = state
        """The database; None once lost."""
        self.max_age_s = max_age_s
        """How old a checkpoint may be and still be used (0: none is trusted)."""
        self.stale: set[int] = set()
        """Partitions whose local copy was dropped (a write's offset unknown): not kept locally
        until their next restore."""

    def usable(self, partition: int, *, begin: int, end: int, now: float) -> tuple[Checkpoint | None, str]:
        """The partition's checkpoint if its entries may stand in for the changelog before it
        (``LocalState.usable`` with this copy's age limit); otherwise None and why."""
        if self.state is None:
            return None, "local state lost"
        return self.state.usable(partition, begin=begin, end=end, now=now, max_age_s=self.max_age_s)

    def entries(self, partition: int) -> Iterator[tuple[str, bytes]]:
        """The partition's entries (key, value), in key order."""
        if self.state is not None:
            yield from self.state.entries(partition)

    def keep(
        self,
        written: Written,
        counts: dict[Any, int],
        acknowledged: list[tuple[int, Any, asyncio.Future[Any]]],
        stamp: float,
    ) -> None:
        """Apply acknowledged changelog writes, with each written partition's new checkpoint:
        the offset after its last batch (its base offset from the broker's acknowledgement plus
        the records in it, ``counts`` per batch). ``acknowledged`` holds (partition, batch,
        future) of the changelog batches sent; those not in ``counts`` are not these writes.
        This worker is the partition's only writer while it owns it, and everything before
        that batch is either already local or a retried duplicate of these writes, so the
        entries reflect the changelog up to there."""
        if self.state is None:
            return
        ends: dict[int, int] = {}
        unknown: set[int] = set()
        for partition, batch, future in acknowledged:
            count = counts.get(batch)
            if count is None:
                continue  # not one of these writes
            metadata = future.result()
            if metadata is None or metadata.offset is None or metadata.offset < 0:
                unknown.add(partition)
            else:
                ends[partition] = max(ends.get(partition, 0), metadata.offset + count)
        # A partition with a batch whose offset was not reported loses its local copy until it
        # is next restored from the changelog: skipping just these writes would let a later
        # checkpoint claim them.
        unknown -= self.stale
        self.stale |= unknown
        for partition in self.stale:
            ends.pop(partition, None)
        items = [w for w in written if w[0] in ends]
        try:
            self.state.write(items, ends, stamp, wipe=unknown)
        except Exception as exc:
            self.lose(exc)

    def restored(self, items: Written, checkpoints: dict[int, int], stamp: float, *, full: list[int]) -> None:
        """Bring the copy of restored partitions up to what was read: ``full`` ones were read
        from the changelog's beginning (their old entries are wiped)."""
        if self.state is None:
            return
        try:
            self.state.write(items, checkpoints, stamp, wipe=full)
        except Exception as exc:
            self.lose(exc)
        else:
            self.stale.difference_update(checkpoints)

    def lose(self, exc: BaseException) -> None:
        """A local write failed: keep running without the local copy."""
        log.error("writing the local state failed (%r); continuing without it", exc)
        state, self.state = self.state, None
        if state is not None:
            with contextlib.suppress(Exception):
                state.close()

    def close(self) -> None:
        if self.state is not None:
            self.state.close()


async def open_local_copy(settings: Settings, changelog: str, kafka: KafkaClients) -> LocalCopy:
    """Open the local copy, and take its checkpoints' age limit from the changelog's
    ``delete.retention.ms`` as the brokers report it (a topic created elsewhere may set its
    own; when it cannot be read, no checkpoint is trusted)."""
    try:
        from chunkfold.state.rocksdb import LocalState, local_state_path
    except ImportError as exc:
        raise RuntimeError(
            f"CHUNKFOLD_STORE={settings.store} needs rocksdict (pip install 'chunkfold[rocksdb]')"
        ) from exc

    path = local_state_path(settings)
    state = LocalState(path)
    retention_ms = await changelog_delete_retention_ms(kafka, changelog)
    if retention_ms is None:
        log.warning(
            "could not read delete.retention.ms of %s: the local state at %s is kept but every "
            "restore reads the changelog from the beginning",
            changelog,
            path,
        )
        return LocalCopy(state, 0.0)
    max_age_s = local_checkpoint_max_age_s(retention_ms)
    log.info(
        "local state at %s; its checkpoints are used up to %.0f s old (changelog delete.retention.ms %d)",
        path,
        max_age_s,
        retention_ms,
    )
    return LocalCopy(state, max_age_s)


class Recovery:
    """Reads the state of newly assigned partitions into ``store`` before any of their records
    is processed."""

    def __init__(
        self,
        settings: Settings,
        store: ChangelogStore,
        changelog: str,
        local_copy: LocalCopy | None,
        kafka: KafkaClients | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        """Where the changelog is read (None: the settings' brokers and security)."""
        self.store = store
        self.changelog = changelog
        self.local_copy = local_copy
        self.restoring = False
        """A restore (or the fencing before it) is in progress: the worker is not ready."""
        self.local_entries = 0
        self.changelog_records = 0

    @contextlib.contextmanager
    def in_progress(self) -> Iterator[None]:
        """Marks the worker as restoring (``/readyz`` answers 503) for the block's duration."""
        self.restoring = True
        try:
            yield
        finally:
            self.restoring = False

    def metric_families(self) -> list[Metric]:
        return [
            counter(
                "chunkfold_restore_local_entries_total",
                "state entries loaded from the local copy when partitions were assigned",
                self.local_entries,
            ),
            counter(
                "chunkfold_restore_changelog_records_total",
                "state changelog records read when partitions were assigned",
                self.changelog_records,
            ),
        ]

    async def restore(self, partitions: list[int]) -> None:
        """Read the state of ``partitions`` into the store: from the local copy plus the
        changelog from its checkpoint on, where the local copy has a usable checkpoint;
        otherwise the changelog from its beginning to its end. Then bring the local copy up to
        what was read."""
        if not partitions:
            return
        local = self.local_copy if self.local_copy is not None and self.local_copy.state is not None else None
        self.store.drop(partitions)
        reader = (self.kafka or KafkaClients.of(self.settings)).consumer(
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await reader.start()
        try:
            tps = [TopicPartition(self.changelog, p) for p in partitions]
            reader.assign(tps)
            started_at = time.time()  # before any record after what is read can be appended
            from_local: dict[int, int] = {}
            notes: dict[int, str] = {}
            if local is None:
                await reader.seek_to_beginning(*tps)
                ends = await reader.end_offsets(tps)
            else:
                ends = await reader.end_offsets(tps)
                await self._load_local(local, reader, tps, ends, started_at, from_local, notes)
            first = {tp: await reader.position(tp) for tp in tps}
            read = dict.fromkeys(partitions, 0)
            changed: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
            todo = {tp for tp in tps if ends[tp] > first[tp]}
            while todo:
                batch = await reader.getmany(*todo, timeout_ms=500)
                for tp, messages in batch.items():
                    read[tp.partition] += len(messages)
                    seen = changed[tp.partition]
                    for m in messages:
                        if m.key is not None:
                            key = m.key.decode("utf-8", "replace")
                            self.store.load(tp.partition, key, m.value)
                            if local is not None:
                                seen[key] = m.value
                for tp in list(todo):
                    if await reader.position(tp) >= ends[tp]:
                        todo.discard(tp)
            last = {tp.partition: await reader.position(tp) for tp in tps}
        finally:
            await reader.stop()
        if local is not None:
            items = [
                (p, key, value)
                for p in partitions
                for key, value in changed[p].items()
                if value is not None or p in from_local
            ]
            local.restored(items, last, started_at, full=[p for p in partitions if p not in from_local])
        self.local_entries += sum(from_local.values())
        self.changelog_records += sum(read.values())
        restored = set(partitions)
        log.info(
            "restored partitions %s: %d entries from local state, %d changelog records read, "
            "%d entries held (%s)",
            partitions,
            sum(from_local.values()),
            sum(read.values()),
            sum(1 for p in self.store.partition_of.values() if p in restored),
            "; ".join(
                f"p{tp.partition}: {read[tp.partition]} from offset {first[tp]}"
                + (f" ({notes[tp.partition]})" if tp.partition in notes else "")
                + f" to {last[tp.partition]}"
                for tp in tps
            ),
        )

    async def _load_local(
        self,
        local: LocalCopy,
        reader: AIOKafkaConsumer,
        tps: list[TopicPartition],
        ends: dict[TopicPartition, int],
        now: float,
        loaded: dict[int, int],
        notes: dict[int, str],
    ) -> None:
        """Load the local entries of each partition of ``tps`` with a usable checkpoint into the
        store and position ``reader`` at the checkpoint; the others at the changelog's
        beginning. Fills ``loaded`` (partition: entries loaded from the local copy) and
        ``notes`` (partition: where its read starts, and why)."""
        begins = await reader.beginning_offsets(tps)
        for tp in tps:
            checkpoint, why = local.usable(tp.partition, begin=begins[tp], end=ends[tp], now=now)
            notes[tp.partition] = why
            if checkpoint is None:
                reader.seek(tp, begins[tp])
                continue
            count = 0
            for key, value in local.entries(tp.partition):
                self.store.load(tp.partition, key, value)
                count += 1
                if count % RESTORE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            loaded[tp.partition] = count
            reader.seek(tp, checkpoint.offset)
