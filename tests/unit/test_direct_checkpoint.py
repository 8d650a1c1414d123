"""The direct driver's checkpoint order, without a broker: outputs acknowledged, then state
written, then offsets committed. (Everything else of the driver runs against a real broker in
the integration and fault tiers; this pins the one ordering a crash could otherwise exploit.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from chunkfold.config import Settings
from chunkfold.drivers.direct.checkpoint import OrderedCheckpointer
from chunkfold.drivers.direct.sender import TrackedBatches, delivered_ends
from chunkfold.processor import Processor
from chunkfold.state.changelog import ChangelogStore, changelog_topic
from tests.streams import CID, choice, chunk

pytestmark = pytest.mark.unit


@dataclass
class Message:
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 1_700_000_000_000


class ScriptedSender:
    """Stands in for ``BatchSender``: logs every add, and hands out one future per ``take``
    that the test resolves (the broker's acknowledgement)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.marks = 0
        self.acks: list[asyncio.Future[Any]] = []

    def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        self.log.append(("add", topic))

    def kick(self) -> int:
        self.marks += 1
        return self.marks

    async def take(self, mark: int) -> list[asyncio.Future[Any]]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        self.log.append(("take", None))
        return [ack]

    def take_tracked(self, topic: str) -> list[Any]:
        return []


class RecordingConsumer:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.log.append(("commit", offsets))


async def settle_in_steps(
    fail_outputs: bool,
) -> tuple[OrderedCheckpointer, ScriptedSender, list[list[tuple[str, Any]]]]:
    settings = Settings(bootstrap_servers="unused:9092")
    store = ChangelogStore()
    processor = Processor(settings, store)
    sender = ScriptedSender()
    checkpointer = OrderedCheckpointer(
        processor,
        store,
        settings,
        asyncio.Event(),
        sender=sender,  # type: ignore[arg-type]
        commit=RecordingConsumer(sender.log).commit,
        local_copy=None,
    )
    processor.assign([0])
    value = orjson.dumps(chunk(choice(0, role="assistant", content="hi")))
    message = Message(offset=7, key=CID.encode(), value=value)
    outputs, _ = processor.process(
        partition=0,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=message.headers,
        timestamp_ms=message.timestamp,
        handle=None,
    )
    checkpointer.send(0, outputs)
    checkpointer.processed(0, message.offset + 1)
    assert ("add", settings.events_topic) in sender.log
    sender.log.clear()
    settling = asyncio.ensure_future(checkpointer.settle(checkpointer.capture()))
    steps: list[list[tuple[str, Any]]] = []
    for ack in range(2):
        for _ in range(5):
            await asyncio.sleep(0)
        steps.append(list(sender.log))
        if ack < len(sender.acks):
            if fail_outputs:
                sender.acks[ack].set_exception(KafkaTimeoutError())
            else:
                sender.acks[ack].set_result(None)
    await settling
    steps.append(list(sender.log))
    return checkpointer, sender, steps


def test_state_is_written_only_after_the_outputs_are_acknowledged_and_offsets_last() -> None:
    checkpointer, _, (before_ack, after_outputs, after_state) = asyncio.run(
        settle_in_steps(fail_outputs=False)
    )
    changelog = changelog_topic(checkpointer.settings)
    # waiting for the outputs' acknowledgement: no state write, no commit yet
    assert before_ack == [("take", None)]
    # outputs acknowledged: the state write goes out, the commit still waits for it
    assert after_outputs == [("take", None), ("add", changelog), ("take", None)]
    # state acknowledged: the offset after the record is committed
    assert after_state[-1] == ("commit", {TopicPartition(checkpointer.settings.input_topic, 0): 8})
    assert checkpointer.failure is None


def test_a_failed_output_delivery_writes_no_state_and_commits_nothing() -> None:
    checkpointer, sender, steps = asyncio.run(settle_in_steps(fail_outputs=True))
    assert steps[-1] == [("take", None)]
    assert checkpointer.failure is not None and checkpointer.stopping.is_set()
    assert all(entry[0] != "commit" for entry in sender.log)


def test_events_positions_are_the_ends_of_delivered_batches() -> None:
    """Base offset (the delivery report) plus the batch's record count, the largest per
    partition; a batch not delivered, or failed, tells nothing."""

    @dataclass
    class Batch:
        records: int

        def record_count(self) -> int:
            return self.records

    @dataclass
    class Delivered:
        offset: int

    async def ends() -> dict[int, int]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(4)]
        futures[0].set_result(Delivered(10))
        futures[1].set_result(Delivered(40))
        futures[2].set_exception(KafkaTimeoutError())
        tracked = TrackedBatches(["events"])
        for (partition, records), future in zip([(0, 5), (0, 2), (1, 9), (1, 3)], futures, strict=True):
            tracked.handed("events", partition, Batch(records), future)
        tracked.handed("other", 2, Batch(1), futures[0])
        return delivered_ends(tracked.take("events"))

    assert asyncio.run(ends()) == {0: 42}
