"""What a worker does with each input record, without any Kafka or Faust: decode, load the
completion's state, fold, keep the state, produce outputs, and write state behind.

Delivery invariant (at least once): a record's acknowledgement handle is released only by
``FlushBatch.acks`` after the state that includes it has been written to the store, and the
driver writes a batch only after every output produced before ``capture()`` was delivered. So
an input offset is committed only when both its outputs and its state are durable; a crash
repeats outputs (identically, the engine is deterministic) but never loses a record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client.metrics_core import Metric

from chunkfold.config import Settings
from chunkfold.core import engine, fit, outputs
from chunkfold.core.persist import CorruptState, Cursor, completion_of, delete_writes, flush_writes, restore
from chunkfold.core.records import InvalidRecord, RecordKind, decode_record, max_key_bytes
from chunkfold.core.snapshot import snapshot
from chunkfold.core.state import AnyState, ClosedCompletion, CompletionState, StateVersionError
from chunkfold.metrics import Families, Metrics, counter, gauge, histogram, worker_registry
from chunkfold.state.store import StateStore

Headers = Sequence[tuple[str, bytes]]
Fold = Callable[[AnyState | None, str, Any, engine.FoldOptions], engine.FoldResult]
Highwater = Callable[[int], int | None]
"""The input topic's end offset of a partition (None: not known), for the consumer lag."""
EventsPartition = Callable[[bytes], int]
"""The events topic's partition of a completion key (the driver's partitioner)."""
SWEEP_SLICE = 5_000
"""Completions (open or tombstones) one ``sweep`` call examines: about 5 ms of work."""
log = logging.getLogger("chunkfold.worker")


def _no_highwater(_partition: int) -> int | None:
    return None


def _describe(exc: Exception) -> str:
    """An unexpected exception in one line of bounded length, for a dead letter or done record."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:1000]


class Received(NamedTuple):
    """One input record as the driver handed it over (what a dead letter reports)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int | None


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes
    value: bytes


@dataclass(slots=True)
class Tracked:
    """A completion this worker holds in memory."""

    state: AnyState
    cursor: Cursor
    partition: int
    dirty: bool = False
    pending: list[Any] = field(default_factory=list)
    stored_bytes: int = 0


@dataclass(slots=True)
class FlushBatch:
    generation: int
    writes: list[tuple[int, str, bytes | None]] = field(default_factory=list)
    acks: list[tuple[int, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Stats:
    chunks_in: int = 0
    records_in: int = 0
    replayed_skipped: int = 0
    events_out: int = 0
    completions_out: dict[str, int] = field(default_factory=dict)
    deadletters: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    state_writes: int = 0
    state_bytes_written: int = 0
    unreadable_state: int = 0
    """Stored completions (or keys) ``scan`` skipped because they do not read back."""
    metrics: Metrics = field(default_factory=Metrics)


class Processor:
    """Per-worker driver of the engine over the partitions this worker owns."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        clock: Callable[[], float] = time.time,
        fold: Fold = engine.fold,
        highwater: Highwater = _no_highwater,
        events_partition: EventsPartition | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.fold = fold
        """The engine's fold (a test passes one that fails, to prove failures are contained)."""
        self.limits = dict.fromkeys(
            (settings.events_topic, settings.done_topic, settings.deadletter_topic),
            settings.max_message_bytes,
        )
        """Each output topic's largest record (the driver lowers it to what the topic accepts,
        ``set_limits``)."""
        self.max_key = max_key_bytes(settings.max_message_bytes)
        """The longest input key: every output keyed by it fits the smallest of ``limits``."""
        self.options = engine.FoldOptions(snapshots=settings.snapshots, partial_parse=settings.partial_parse)
        self.tracked: dict[str, Tracked] = {}
        self.dirty: dict[str, Tracked] = {}
        """The tracked completions changed since the last ``capture`` (so a capture costs what
        changed, not every completion and tombstone held)."""
        self.sweep_order: list[str] = []
        self.sweep_next = 0
        """``sweep`` examines ``sweep_order`` (the tracked ids when its cycle began) from here."""
        self.assigned: set[int] = set()
        self.unscanned: set[int] = set()
        self.positions: dict[int, int] = {}
        self.stream_time: dict[int, int] = {}
        self.last_record_at: dict[int, int] = {}
        self.generation = 0
        self.stats = Stats()
        self.highwater = highwater
        """The driver's view of the input topic's end offsets (``chunkfold_consumer_lag``)."""
        self.registry = worker_registry()
        """This worker's Prometheus series (``/metrics``); a driver registers its own here."""
        self.registry.register(Families(self.metric_families))
        self.events_partition = events_partition
        """Where a completion's events go; None: no events-topic positions are kept."""
        self.events_positions: dict[int, int] = {}
        """Events-topic partition -> an offset every event produced from now on lands at or
        after (``note_events_position``)."""

    # -- records --------------------------------------------------------------------------

    def process(
        self,
        *,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
        timestamp_ms: int | None,
        handle: Any,
    ) -> tuple[list[Output], bool]:
        """Fold one input record. Returns the outputs to send and whether ``handle`` may be
        acknowledged at once (the record changed no state); otherwise it is held until the
        state that includes it is flushed. ``handle`` None: the driver tracks delivery by
        offsets itself, nothing is held.

        Never raises for what a record holds: a record that cannot be folded is dead-lettered,
        and one whose fold fails unexpectedly is dead-lettered ``internal_error`` and ends its
        completion ``failed`` (``_contain``). No other completion is touched either way."""
        self.stats.records_in += 1
        self.positions[partition] = offset
        now_ms = self.last_record_at[partition] = self.clock_ms()
        received = Received(partition, offset, key, value, headers, timestamp_ms)
        try:
            return self._process(received, handle, now_ms)
        except Exception as exc:  # a record's content must never stop the worker
            return self._contain(exc, received, handle, folded=True)

    def _process(self, received: Received, handle: Any, now_ms: int) -> tuple[list[Output], bool]:
        partition, offset, key, value, headers, timestamp_ms = received
        try:
            completion_id, record = decode_record(
                key,
                value,
                headers,
                offset=offset,
                timestamp_ms=timestamp_ms,
                max_bytes=self.settings.max_record_bytes,
                max_key=self.max_key,
            )
            tracked = self._load(completion_id, partition)
        except InvalidRecord as exc:
            return [self._deadletter(exc, received)], True
        except Exception as exc:  # before the fold: no state was touched, the completion goes on
            return self._contain(exc, received, handle, folded=False)
        expired = self._expire_before(completion_id, tracked, offset, timestamp_ms)
        try:
            result = self.fold(tracked.state if tracked else None, completion_id, record, self.options)
        except InvalidRecord as exc:
            return [
                *expired,
                self._deadletter(exc, received),
            ], True
        if record.kind is RecordKind.CHUNK:
            self.stats.chunks_in += 1
        if result.skipped == "replayed":
            self.stats.replayed_skipped += 1
            return expired, True
        if result.state is None:
            return expired, True
        if result.events and result.events[0]["seq"] == 0:
            self._stamp_events_from(completion_id, result.state)
        self._advance_stream_time(partition, timestamp_ms, now_ms)
        if tracked is None:
            tracked = self.tracked[completion_id] = Tracked(result.state, Cursor(), partition)
        tracked.state = result.state
        tracked.partition = partition
        self._changed(completion_id, tracked)
        if handle is not None:
            tracked.pending.append(handle)
        return [*expired, *self._outputs(completion_id, result)], False

    def _stamp_events_from(self, completion_id: str, state: AnyState) -> None:
        """Record where the completion's first events (being produced now) land at the earliest:
        the known position of its events partition. A redelivery that produces them again
        stamps the later position of the copies it produces, which the reader finds all the same."""
        if self.events_partition is not None:
            events_partition = self.events_partition(completion_id.encode("utf-8"))
            state.events_from = self.events_positions.get(events_partition)

    def note_events_position(self, partition: int, next_offset: int) -> None:
        """The events topic's ``partition`` holds records up to ``next_offset - 1``: every event
        handed to the producer after this call lands at ``next_offset`` or later. Keeps the
        largest (delivery reports may arrive out of order)."""
        if next_offset > self.events_positions.get(partition, -1):
            self.events_positions[partition] = next_offset

    def _advance_stream_time(self, partition: int, timestamp_ms: int | None, now_ms: int) -> None:
        """Stream time (the sweep's "now" while a partition is busy) moves only for records that
        folded, and never past this worker's clock plus the skew allowance: a record stamped far
        ahead (the broker accepts up to an hour) cannot make the sweep expire other
        completions."""
        if timestamp_ms is None:
            return
        latest = min(timestamp_ms, now_ms + int(self.settings.max_clock_skew_s * 1000))
        if latest > self.stream_time.get(partition, -1):
            self.stream_time[partition] = latest

    def _contain(
        self, exc: Exception, received: Received, handle: Any, *, folded: bool
    ) -> tuple[list[Output], bool]:
        """An unexpected failure on one record: dead-letter it ``internal_error`` (with the
        exception class). When it came in or after the fold (``folded``), the completion's
        state may be half updated: end it ``failed`` when it is open here. Deterministic like
        the fold itself, so a redelivery repeats the same outputs."""
        log.exception(
            "record failed unexpectedly", extra={"partition": received.partition, "offset": received.offset}
        )
        detail = _describe(exc)
        out = [self._deadletter(InvalidRecord("internal_error", detail), received)]
        key = received.key
        completion_id = key.decode("utf-8", "replace") if key and folded else None
        tracked = self.tracked.get(completion_id) if completion_id is not None else None
        if tracked is None or not isinstance(tracked.state, CompletionState):
            return out, True
        try:
            result = engine.fail(tracked.state, "InternalError", detail, received.timestamp_ms)
            assert result.state is not None
            done = self._outputs(tracked.state.completion_id, result)
        except Exception:  # even the failure cannot be reported: the dead letter says why
            log.exception("completion could not be failed", extra={"completion_id": completion_id})
            return out, True
        tracked.state = result.state
        self._changed(tracked.state.completion_id, tracked)
        if handle is not None:
            tracked.pending.append(handle)
        return [*out, *done], False

    def _expire_before(
        self, completion_id: str, tracked: Tracked | None, offset: int, timestamp_ms: int | None
    ) -> list[Output]:
        """Expire an open completion that a new record finds idle past the timeout (by the
        record's own timestamp), so that whether the record is folded in or dead-lettered as
        ``after_end`` depends on the input alone, not on when the sweep timer last ran: a
        redelivery after a crash then repeats the same outputs."""
        state = tracked.state if tracked is not None else None
        if (
            tracked is None
            or not isinstance(state, CompletionState)
            or timestamp_ms is None
            or state.last_activity_ms is None
            or (state.last_offset is not None and offset <= state.last_offset)
            or timestamp_ms - state.last_activity_ms < int(self.settings.idle_timeout_s * 1000)
        ):
            return []
        return self._expire(completion_id, tracked, state, timestamp_ms)

    def _expire(
        self, completion_id: str, tracked: Tracked, state: CompletionState, now_ms: int
    ) -> list[Output]:
        """End an idle completion ``expired``; if its state cannot even be closed (a fault no
        input check foresaw), end it ``failed`` instead of stopping the sweep."""
        try:
            result = engine.expire(state, now_ms)
        except Exception as exc:
            log.exception("expiring a completion failed", extra={"completion_id": completion_id})
            result = engine.fail(state, "InternalError", _describe(exc), now_ms)
        assert result.state is not None
        tracked.state = result.state
        self._changed(completion_id, tracked)
        return self._outputs(completion_id, result)

    def _changed(self, completion_id: str, tracked: Tracked) -> None:
        tracked.dirty = True
        self.dirty[completion_id] = tracked

    def _load(self, completion_id: str, partition: int) -> Tracked | None:
        tracked = self.tracked.get(completion_id)
        if tracked is not None:
            return tracked
        try:
            restored = restore(completion_id, self.store.get)
        except (CorruptState, StateVersionError, KeyError, ValueError) as exc:
            raise InvalidRecord("state_unreadable", f"stored state of {completion_id!r}: {exc}") from None
        if restored is None:
            return None
        tracked = self.tracked[completion_id] = Tracked(restored.state, restored.cursor, partition)
        return tracked

    def _outputs(self, completion_id: str, result: engine.FoldResult) -> list[Output]:
        key = completion_id.encode("utf-8")
        events_topic = self.settings.events_topic
        out = [
            Output(
                events_topic, key, self._fitted(events_topic, key, outputs.event_value(completion_id, event))
            )
            for event in result.events
        ]
        self.stats.events_out += len(out)
        if result.done is not None:
            status = result.done["status"]
            self.stats.completions_out[status] = self.stats.completions_out.get(status, 0) + 1
            log.info(
                "completion finished",
                extra={
                    "completion_id": completion_id,
                    "status": status,
                    "chunks": result.done["chunk_count"],
                    "events": result.done["event_count"],
                },
            )
            timing = result.done["timing"]
            if timing["time_to_first_token_ms"] is not None:
                self.stats.metrics.time_to_first_token_s.observe(timing["time_to_first_token_ms"] / 1000)
            if timing["tokens_per_second"] is not None:
                self.stats.metrics.tokens_per_second.observe(timing["tokens_per_second"])
            out.append(
                Output(
                    self.settings.done_topic, key, self._fitted(self.settings.done_topic, key, result.done)
                )
            )
        return out

    def _fitted(self, topic: str, key: bytes, value: dict[str, Any]) -> bytes:
        """``value``'s JSON, cut to fit ``topic`` when it is larger than the topic accepts."""
        data, whole = fit.encode(value, self.limits[topic], key)
        if whole > len(data):
            self.stats.truncated[topic] = self.stats.truncated.get(topic, 0) + 1
            log.warning(
                "output cut to fit %s (%d bytes, kept %d)",
                topic,
                whole,
                len(data),
                extra={"completion_id": value.get("completion_id")},
            )
        return data

    def _deadletter(self, exc: InvalidRecord, received: Received) -> Output:
        partition, offset, key, value, headers, timestamp_ms = received
        self.stats.deadletters[exc.reason] = self.stats.deadletters.get(exc.reason, 0) + 1
        log.warning(
            "record dead-lettered: %s",
            exc.detail or exc.reason,
            extra={
                "completion_id": (key or b"")[:256].decode("utf-8", "replace"),
                "reason": exc.reason,
                "partition": partition,
                "offset": offset,
            },
        )
        dead = outputs.deadletter_value(
            reason=exc.reason,
            detail=exc.detail,
            key=key,
            value=value,
            headers=headers,
            topic=self.settings.input_topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
        )
        topic = self.settings.deadletter_topic
        dead_key = (key or b"")[: self.max_key]
        return Output(topic, dead_key, self._fitted(topic, dead_key, dead))

    # -- write-behind ---------------------------------------------------------------------

    def capture(self) -> FlushBatch:
        """The writes that persist every changed completion as of now, and the handles they
        release. Call, then make sure earlier outputs are delivered, then ``apply``."""
        batch = FlushBatch(self.generation)
        changed, self.dirty = self.dirty, {}
        for tracked in changed.values():
            if isinstance(tracked.state, ClosedCompletion):
                tracked.stored_bytes = 0
            for key, value in flush_writes(tracked.state, tracked.cursor, tracked.partition):
                batch.writes.append((tracked.partition, key, value))
                tracked.stored_bytes += len(key) + len(value or b"")
            batch.acks.extend((tracked.partition, handle) for handle in tracked.pending)
            tracked.pending = []
            tracked.dirty = False
        return batch

    def apply(self, batch: FlushBatch) -> list[Any]:
        """Write ``batch`` to the store; returns the handles that may now be acknowledged.

        A batch captured before a rebalance is dropped whole: everything it describes was
        forgotten at the revocation and will be redone from the store and the committed
        offsets, and writing it now could interleave with newer writes for the same keys."""
        if batch.generation != self.generation:
            return []
        for partition, key, value in batch.writes:
            if partition in self.assigned:
                self.store.write(partition, key, value)
                self.stats.state_writes += 1
                self.stats.state_bytes_written += len(key) + (len(value) if value else 0)
        return [handle for partition, handle in batch.acks if partition in self.assigned]

    # -- time -----------------------------------------------------------------------------

    def sweep(self, now_ms: int | None = None) -> list[Output]:
        """Close completions idle longer than the idle timeout (status ``expired``) and forget
        tombstones older than their TTL. Their store updates go out with the next flush.

        Idle time is measured in stream time: while a partition is being consumed, "now" is
        the newest record timestamp seen on it, so a worker catching up on a backlog does not
        expire completions whose next records are still in that backlog. A partition that
        has been quiet for the whole timeout uses the wall clock.

        One call examines at most ``SWEEP_SLICE`` completions, continuing where the last one
        stopped (tombstones live as long as the idle timeout, so a busy worker holds many):
        a call costs a bounded pause, and with N held a completion is examined every
        N / ``SWEEP_SLICE`` calls. (Records arriving late find an idle completion expired by
        their own timestamp anyway, see ``_expire_before``.)"""
        wall_ms = self.clock_ms() if now_ms is None else now_ms
        idle_ms = int(self.settings.idle_timeout_s * 1000)
        tombstone_ms = int(self.settings.tombstone_s * 1000)
        out: list[Output] = []
        if self.sweep_next >= len(self.sweep_order):
            self.sweep_order, self.sweep_next = list(self.tracked), 0
        ids = self.sweep_order[self.sweep_next : self.sweep_next + SWEEP_SLICE]
        self.sweep_next += len(ids)
        for completion_id in ids:
            tracked = self.tracked.get(completion_id)
            if tracked is None:
                continue
            now = self._stream_now(tracked.partition, wall_ms, idle_ms)
            since = engine.idle_since_ms(tracked.state)
            if since is None:
                since = now
                if isinstance(tracked.state, CompletionState):
                    tracked.state.last_activity_ms = now
            if isinstance(tracked.state, CompletionState):
                if now - since >= idle_ms:
                    out += self._expire(completion_id, tracked, tracked.state, now)
            elif now - since >= tombstone_ms and not tracked.dirty:
                if tracked.partition in self.assigned:
                    for key, value in delete_writes(completion_id, tracked.cursor):
                        self.store.write(tracked.partition, key, value)
                del self.tracked[completion_id]
        return out

    def _stream_now(self, partition: int, wall_ms: int, idle_ms: int) -> int:
        last_record_at = self.last_record_at.get(partition)
        if last_record_at is not None and wall_ms - last_record_at < idle_ms:
            return self.stream_time.get(partition, wall_ms)
        return wall_ms

    # -- queries --------------------------------------------------------------------------

    def snapshot(self, completion_id: str, *, committed: bool = False) -> dict[str, Any] | None:
        """The completion as it stands (``core.snapshot``), or None when no state for it (open
        or tombstone) is held in a partition assigned here. From memory, or with ``committed``
        from the store as last written (what a worker that took the partition over now would
        restore), decoded afresh and not kept. Changes nothing: no state, no stats.

        Raises ``CorruptState`` / ``StateVersionError`` (``committed`` only) when the stored
        state does not read back."""
        if committed:
            restored = restore(completion_id, self.store.get)
            if restored is None or restored.partition is None:
                return None
            state, partition = restored.state, restored.partition
        else:
            tracked = self.tracked.get(completion_id)
            if tracked is None:
                return None
            state, partition = tracked.state, tracked.partition
        if partition not in self.assigned:
            return None
        return snapshot(state, partition)

    # -- ownership ------------------------------------------------------------------------

    def set_limits(self, limits: Mapping[str, int]) -> None:
        """The output topics' record limits as the brokers report them (at most the setting)."""
        self.limits.update(limits)
        self.max_key = max_key_bytes(min(self.limits.values()))

    def assign(self, partitions: Iterable[int]) -> None:
        new = set(partitions) - self.assigned
        self.assigned |= new
        self.unscanned |= new

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget everything about ``partitions``: unflushed work will be redone by the next
        owner from the last committed offset and the last flushed state. Starts a new
        generation, so flush batches captured before now are dropped."""
        self.generation += 1
        gone = set(partitions)
        self.assigned -= gone
        self.unscanned -= gone
        for completion_id in [c for c, t in self.tracked.items() if t.partition in gone]:
            del self.tracked[completion_id]
            self.dirty.pop(completion_id, None)

    def scan(self) -> int:
        """Load the stored completions of newly assigned partitions, so that abandoned ones
        expire even if no record of theirs ever arrives again. Returns how many were loaded."""
        if not self.unscanned:
            return 0
        loaded = 0
        for completion_id in self._stored_completions() - self.tracked.keys():
            try:
                restored = restore(completion_id, self.store.get)
            except (CorruptState, StateVersionError) as exc:
                self._skip_unreadable(completion_id, exc)
                continue
            if restored is not None and restored.partition in self.unscanned:
                self.tracked[completion_id] = Tracked(restored.state, restored.cursor, restored.partition)
                loaded += 1
        self.unscanned.clear()
        return loaded

    def _stored_completions(self) -> set[str]:
        """The completion ids the store holds entries for; a key that is no completion's is
        skipped (logged and counted), so that one bad entry cannot stop an assignment."""
        ids: set[str] = set()
        for key, _ in self.store.items():
            try:
                ids.add(completion_of(key))
            except CorruptState as exc:
                self._skip_unreadable(key, exc)
        return ids

    def _skip_unreadable(self, what: str, exc: ValueError) -> None:
        self.stats.unreadable_state += 1
        log.warning("stored state skipped: %s", exc, extra={"completion_id": what[:200]})

    def metric_families(self) -> list[Metric]:
        """The processor's Prometheus series, read at each scrape."""
        s = self.stats
        lag = {}
        for partition in sorted(self.assigned):
            end = self.highwater(partition)
            if end is not None:
                lag[str(partition)] = max(0, end - self.positions.get(partition, -1) - 1)
        return [
            counter("chunkfold_records_in_total", "input records read", s.records_in),
            counter("chunkfold_chunks_in_total", "chunk records folded", s.chunks_in),
            counter(
                "chunkfold_replayed_skipped_total",
                "redelivered records already folded into the stored state (skipped)",
                s.replayed_skipped,
            ),
            counter("chunkfold_events_out_total", "events published", s.events_out),
            counter(
                "chunkfold_completions_out_total",
                "completion-done records by status",
                s.completions_out,
                "status",
            ),
            counter("chunkfold_deadletters_total", "dead-letter records by reason", s.deadletters, "reason"),
            counter(
                "chunkfold_truncated_outputs_total",
                "output records cut to fit their topic, by topic",
                s.truncated,
                "topic",
            ),
            counter("chunkfold_state_writes_total", "state store writes (changelog records)", s.state_writes),
            counter("chunkfold_state_written_bytes_total", "state bytes written", s.state_bytes_written),
            gauge("chunkfold_open_completions", "completions open on this worker", self.open_completions()),
            gauge(
                "chunkfold_closed_tombstones",
                "finished completions kept to catch late records",
                self.closed_tombstones(),
            ),
            gauge(
                "chunkfold_state_bytes", "bytes of state stored for tracked completions", self.state_bytes()
            ),
            gauge("chunkfold_assigned_partitions", "input partitions owned", len(self.assigned)),
            gauge(
                "chunkfold_consumer_lag", "records behind the end of each input partition", lag, "partition"
            ),
            histogram(
                "chunkfold_processing_latency_seconds",
                "time to fold one record",
                s.metrics.processing_latency_s,
            ),
            histogram(
                "chunkfold_end_to_end_latency_seconds",
                "record timestamp to its outputs being sent",
                s.metrics.end_to_end_latency_s,
            ),
            histogram(
                "chunkfold_time_to_first_token_seconds",
                "of finished completions",
                s.metrics.time_to_first_token_s,
            ),
            histogram("chunkfold_tokens_per_second", "of finished completions", s.metrics.tokens_per_second),
        ]

    def clock_ms(self) -> int:
        return int(self.clock() * 1000)

    def state_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tracked.values())

    def readiness(self, recovering: bool) -> dict[str, Any]:
        """The ``/readyz`` body: ready once partitions are assigned and not being recovered."""
        return {
            "ready": bool(self.assigned) and not recovering,
            "partitions": sorted(self.assigned),
            "open": self.open_completions(),
        }

    def open_completions(self) -> int:
        return sum(1 for t in self.tracked.values() if isinstance(t.state, CompletionState))

    def closed_tombstones(self) -> int:
        return sum(1 for t in self.tracked.values() if isinstance(t.state, ClosedCompletion))
