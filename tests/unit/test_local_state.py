"""The direct driver's local copy of its state (worker/chunkfold/state/rocksdb.py, kept up to
date by worker/chunkfold/drivers/direct/recovery.py): write batches, checkpoints across a
reopen, wipes, and the checks that decide whether a checkpoint may stand in for the changelog
before it."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunkfold.config import Settings
from chunkfold.drivers.direct.recovery import LocalCopy, local_checkpoint_max_age_s
from chunkfold.state.rocksdb import Checkpoint, LocalState, local_state_path

pytestmark = pytest.mark.unit
DAY_S = 86_400.0


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalState]:
    state = LocalState(tmp_path / "state")
    yield state
    state.close()


def test_a_write_batch_applies_puts_and_deletes_in_order_per_partition(local: LocalState) -> None:
    local.write(
        [(0, "a/0", b"1"), (0, "b/0", b"2"), (1, "a/0", b"other partition"), (0, "a/0", b"1bis")],
        {0: 4, 1: 1},
        1_000.0,
    )
    local.write([(0, "b/0", None), (0, "c/0", b"3"), (0, "never/0", None)], {0: 7}, 1_001.0)
    assert list(local.entries(0)) == [("a/0", b"1bis"), ("c/0", b"3")]
    assert list(local.entries(1)) == [("a/0", b"other partition")]
    assert list(local.entries(2)) == []
    assert local.checkpoint(0) == Checkpoint(7, 1_001.0)
    assert local.checkpoint(1) == Checkpoint(1, 1_000.0)
    assert local.checkpoint(2) is None


def test_partitions_do_not_bleed_into_each_other_at_byte_boundaries(local: LocalState) -> None:
    # keys of partition 255 and 256 differ only in the partition prefix's low bytes
    local.write([(255, "\xff", b"x"), (256, "", b"y"), (1 << 16, "k", b"z")], {}, 0.0)
    assert list(local.entries(255)) == [("\xff", b"x")]
    assert list(local.entries(256)) == [("", b"y")]
    local.wipe([255])
    assert list(local.entries(255)) == []
    assert list(local.entries(256)) == [("", b"y")]
    assert list(local.entries(1 << 16)) == [("k", b"z")]


def test_entries_and_checkpoints_survive_closing_and_reopening(tmp_path: Path) -> None:
    first = LocalState(tmp_path / "state")
    first.write([(3, "chatcmpl-1/s0", b"segment"), (3, "chatcmpl-1/h", b"head")], {3: 42}, 1_234.5)
    first.close()
    second = LocalState(tmp_path / "state")
    try:
        assert list(second.entries(3)) == [("chatcmpl-1/h", b"head"), ("chatcmpl-1/s0", b"segment")]
        assert second.checkpoint(3) == Checkpoint(42, 1_234.5)
    finally:
        second.close()


def _open_in_child(path: str, result: Any) -> None:
    try:
        LocalState(path).close()
        result.put("opened")
    except RuntimeError as exc:
        result.put(str(exc))


def test_a_second_worker_on_the_same_directory_is_refused(local: LocalState) -> None:
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    child = context.Process(target=_open_in_child, args=(str(local.path), result))
    child.start()
    child.join(60)
    message = result.get(timeout=5)
    assert "one worker per data directory" in message


def test_a_wipe_forgets_the_entries_and_the_checkpoint_and_a_wiping_write_replaces_them(
    local: LocalState,
) -> None:
    local.write([(0, "old/0", b"1"), (0, "old/1", b"2"), (1, "kept/0", b"3")], {0: 10, 1: 5}, 100.0)
    local.write([(0, "new/0", b"4")], {0: 20}, 200.0, wipe=[0])
    assert list(local.entries(0)) == [("new/0", b"4")]
    assert local.checkpoint(0) == Checkpoint(20, 200.0)
    local.wipe([0, 1])
    assert list(local.entries(0)) == list(local.entries(1)) == []
    assert local.checkpoint(0) is None and local.checkpoint(1) is None


def test_a_checkpoint_is_used_only_within_the_changelogs_offsets_and_age(local: LocalState) -> None:
    now = time.time()
    local.write([(0, "k", b"v")], {0: 100}, now - 60)
    max_age = local_checkpoint_max_age_s(86_400_000)
    assert max_age == DAY_S / 2

    def usable(begin: int, end: int, at: float = now, limit: float = max_age) -> tuple[bool, str]:
        checkpoint, why = local.usable(0, begin=begin, end=end, now=at, max_age_s=limit)
        assert (checkpoint is None) == (why != "local checkpoint")
        return checkpoint is not None, why

    assert usable(0, 100) == (True, "local checkpoint")  # nothing written since: read nothing
    assert usable(100, 250) == (True, "local checkpoint")
    checkpoint = local.usable(0, begin=0, end=250, now=now, max_age_s=max_age)[0]
    assert checkpoint is not None and checkpoint.offset == 100
    # stored in milliseconds, rounded down: never younger than it was
    assert now - 60 - 0.001 < checkpoint.written_at <= now - 60
    # the changelog ends before the checkpoint: recreated or truncated topic
    ok, why = usable(0, 99)
    assert not ok and "outside the changelog's offsets 0..99" in why
    # records before the checkpoint were deleted from the log
    ok, why = usable(101, 300)
    assert not ok and "outside" in why
    # older than half of delete.retention.ms: a tombstone after it may be compacted away
    ok, why = usable(0, 250, at=now + max_age)
    assert not ok and "old (limit 43200 s)" in why
    assert usable(0, 250, at=now + max_age - 120)[0]
    # no trust at all (the retention could not be read)
    assert not usable(0, 250, limit=0.0)[0]
    # other partitions have no checkpoint
    assert local.usable(1, begin=0, end=0, now=now, max_age_s=max_age) == (None, "no local checkpoint")


def test_a_checkpoint_of_another_format_or_a_damaged_one_is_ignored(local: LocalState) -> None:
    local.write([], {0: 5, 1: 6}, 10.0)
    local.db[b"c" + (0).to_bytes(4, "big")] = b"\x02" + bytes(16)  # a future format version
    local.db[b"c" + (1).to_bytes(4, "big")] = b"garbage"
    assert local.checkpoint(0) is None and local.checkpoint(1) is None


def test_the_database_lives_under_the_data_dir_per_app_id(tmp_path: Path) -> None:
    settings = Settings(app_id="cf-x", data_dir=str(tmp_path), store="rocksdb://")
    assert local_state_path(settings) == tmp_path / "cf-x" / "direct-state"
    # the default store is in memory: the driver opens no local database for it
    assert not Settings().store.startswith("rocksdb://")


class _Acked:
    """A delivered batch's future result: aiokafka's RecordMetadata carries the base offset."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


def test_an_acknowledged_checkpoint_advances_each_partition_to_after_its_last_batch(
    local: LocalState,
) -> None:
    async def settle() -> None:
        def acked(offset: int) -> asyncio.Future[Any]:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_result(_Acked(offset))
            return future

        copy = LocalCopy(local, max_age_s=0.0)
        first, second, third = object(), object(), object()
        written: list[tuple[int, str, bytes | None]] = [
            (0, "a/0", b"1"),
            (0, "a/1", b"2"),
            (0, "b/0", None),
            (2, "c/0", b"3"),
        ]
        # partition 0: two batches (2 records at offset 10, then 1 at 12); partition 2: one
        # record at 40 (the broker's offset, whatever was appended before it)
        acknowledged = [(0, first, acked(10)), (0, second, acked(12)), (2, third, acked(40))]
        copy.keep(written, {first: 2, second: 1, third: 1}, acknowledged, 500.0)

    asyncio.run(settle())
    assert local.checkpoint(0) == Checkpoint(13, 500.0)
    assert local.checkpoint(2) == Checkpoint(41, 500.0)
    assert local.checkpoint(1) is None
    assert list(local.entries(0)) == [("a/0", b"1"), ("a/1", b"2")]
    assert list(local.entries(2)) == [("c/0", b"3")]


def test_a_write_without_a_reported_offset_drops_the_partitions_copy_until_its_next_restore(
    local: LocalState,
) -> None:
    def acked(offset: int | None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(_Acked(offset))  # type: ignore[arg-type]
        return future

    async def settle() -> LocalCopy:
        copy = LocalCopy(local, max_age_s=0.0)
        local.write([(0, "a/0", b"old")], {0: 5, 1: 5}, 100.0)
        lost, kept, later = object(), object(), object()
        first: list[tuple[int, str, bytes | None]] = [(0, "a/0", b"lost"), (1, "b/0", b"kept")]
        copy.keep(first, {lost: 1, kept: 1}, [(0, lost, acked(None)), (1, kept, acked(5))], 200.0)
        assert local.checkpoint(0) is None and list(local.entries(0)) == []
        assert local.checkpoint(1) == Checkpoint(6, 200.0)
        # a later write of partition 0 with its offset must not claim the lost one
        copy.keep([(0, "c/0", b"new")], {later: 1}, [(0, later, acked(7))], 300.0)
        return copy

    copy = asyncio.run(settle())
    assert local.checkpoint(0) is None and list(local.entries(0)) == []
    assert copy.stale == {0}
