"""The direct driver's local copy of its state (``CHUNKFOLD_STORE=rocksdb://``) on a real broker:
a worker stopped mid-stream (SIGTERM, or kill -9) and started again on the same data directory
finishes every completion as a run without the stop does, and its restore reads only the
changelog's tail instead of the whole changelog. Afterwards a worker on a fresh data directory
(a full changelog read) and one on the kept directory (local copy plus tail) must end up holding
the same state."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from chunkfold.config import Settings
from chunkfold.state.changelog import changelog_topic
from tests.harness import (
    BackgroundProducer,
    WorkerProcess,
    assert_matches_reference,
    collect,
    done_count,
    fresh_settings,
    offline_reference,
    recorded_records,
    wait_for,
    wait_group_stable,
)

pytestmark = pytest.mark.integration
RESTORED = re.compile(
    r"restored partitions \[[\d, ]*\]: (\d+) entries from local state, (\d+) changelog records read, "
    r"(\d+) entries held"
)


@dataclass(frozen=True)
class Restore:
    from_local: int
    changelog_read: int
    held: int


@dataclass
class InfoWorker(WorkerProcess):
    """A worker process logging at info (its restore lines)."""

    loglevel: str = "info"

    def restores(self) -> list[Restore]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                message = orjson.loads(line).get("msg", "")
            except orjson.JSONDecodeError:
                continue
            match = RESTORED.search(message)
            if match:
                found.append(Restore(*(int(g) for g in match.groups())))
        return found

    def restore(self) -> Restore:
        """The one restore of a worker that owned every partition from its start."""
        wait_for(lambda: bool(self.restores()), 60, f"a restore line in {self.log_path}")
        restores = self.restores()
        assert len(restores) == 1, restores
        return restores[0]


async def _changelog_records(settings: Settings) -> int:
    """How many records the changelog holds: what a restore without a local copy reads."""
    reader = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await reader.start()
    try:
        tps = [TopicPartition(changelog_topic(settings), p) for p in range(settings.partitions)]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        count = 0
        todo = {tp for tp in tps if ends[tp] > await reader.position(tp)}
        while todo:
            batch = await reader.getmany(*todo, timeout_ms=500)
            count += sum(len(messages) for messages in batch.values())
            for tp in list(todo):
                if await reader.position(tp) >= ends[tp]:
                    todo.discard(tp)
        return count
    finally:
        await reader.stop()


def changelog_records(settings: Settings) -> int:
    return asyncio.run(_changelog_records(settings))


def start(settings: Settings, log: Path, workers: list[WorkerProcess]) -> InfoWorker:
    worker = InfoWorker(settings, log).start()
    workers.append(worker)
    wait_group_stable(settings, 1)
    return worker


def stopped_mid_stream_then_restarted(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], *, kill: bool = False, interim: bool = False
) -> None:
    """Stream; stop the worker (SIGTERM, or kill -9) mid-stream; with ``interim``, let a worker on
    another data directory carry on for a while and stop it; start a worker on the first one's
    data directory again; let the stream finish."""
    settings = fresh_settings(kafka, store="rocksdb://", data_dir=str(tmp_path / "data"))
    records, completions = recorded_records(repeat=4)
    first = start(settings, tmp_path / "first.log", workers)
    assert first.restore() == Restore(0, 0, 0)  # a new changelog
    producer = BackgroundProducer(settings, records, rate=600)
    producer.start()
    wait_for(lambda: producer.sent >= len(records) // 3, 60, "a third of the records published")
    stopped_at = time.time()
    if kill:
        first.kill()
    else:
        first.stop()
        assert first.proc is not None and first.proc.returncode == 0, first.log_tail()
    in_flight = producer.in_flight_at(stopped_at)
    at_stop = changelog_records(settings)
    written_meanwhile = 0
    if interim:
        other = start(
            settings.model_copy(update={"data_dir": str(tmp_path / "other")}), tmp_path / "other.log", workers
        )
        assert other.restore() == Restore(0, at_stop, other.restore().held)  # nothing local there
        time.sleep(3)
        other.stop()
        written_meanwhile = changelog_records(settings) - at_stop
        assert written_meanwhile > 0
    full = at_stop + written_meanwhile  # what a restart without the local copy would read
    second = start(settings, tmp_path / "second.log", workers)
    restart = second.restore()
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert_matches_reference(got, offline_reference(records))
    assert in_flight > 0, "the stop came after the last completion finished"
    assert restart.from_local > 0, restart
    if kill:
        # at most what was written since the last checkpoint that reached the local copy
        assert restart.changelog_read < full / 2, (restart, full)
    else:
        # a clean stop leaves the local copy at the changelog's end: the restart reads exactly
        # what the interim worker wrote, if any
        assert restart.changelog_read == written_meanwhile, (restart, written_meanwhile)
    print(
        f"\n{'kill -9' if kill else 'SIGTERM'}{' + interim worker' if interim else ''}: "
        f"{in_flight} completions in flight; restart {restart}; "
        f"a restart without the local copy would have read {full} changelog records"
    )
    compare_with_full_restore(settings, tmp_path, workers, second)


def compare_with_full_restore(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess], last: InfoWorker
) -> None:
    """Stop ``last``; a worker on a fresh data directory reads the whole changelog, then one on
    the kept directory restores from its local copy: both hold the same state, and the second
    read only what the first may have added."""
    last.stop()
    full_records = changelog_records(settings)
    fresh = start(
        settings.model_copy(update={"data_dir": str(tmp_path / "fresh")}), tmp_path / "fresh.log", workers
    )
    from_changelog = fresh.restore()
    fresh.stop()
    kept = start(settings, tmp_path / "kept.log", workers)
    from_local = kept.restore()
    kept.stop()
    print(f"fresh data dir: {from_changelog}; kept data dir: {from_local}")
    assert from_changelog.from_local == 0 and from_changelog.changelog_read == full_records > 0
    assert from_local.held == from_changelog.held > 0
    assert from_local.from_local == from_local.held
    assert from_local.changelog_read == 0


def test_a_restart_on_the_same_volume_reads_only_the_changelog_tail(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    stopped_mid_stream_then_restarted(kafka, tmp_path, workers)


def test_a_restart_after_another_worker_carried_on_reads_just_what_it_wrote(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    stopped_mid_stream_then_restarted(kafka, tmp_path, workers, interim=True)


def test_after_kill_9_the_restart_still_matches_the_reference_and_reads_a_tail(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    stopped_mid_stream_then_restarted(kafka, tmp_path, workers, kill=True)
