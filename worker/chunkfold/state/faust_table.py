"""``TableStore``: the ``StateStore`` of the Faust driver, over a Faust table with raw ``bytes``
keys and values. Imported only by ``chunkfold.drivers.faust`` (it needs faust-streaming)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

from faust.streams import _current_event


class _PartitionEvent:
    """Stands in for the current event so that table writes made from the timer go to the
    changelog partition (and RocksDB column) of the completion's input partition."""

    def __init__(self, topic: str, partition: int) -> None:
        self.message = SimpleNamespace(topic=topic, partition=partition)


@contextlib.contextmanager
def _in_partition(topic: str, partition: int) -> Iterator[None]:
    event = _PartitionEvent(topic, partition)
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        yield
    finally:
        _current_event.reset(token)


class TableStore:
    """``StateStore`` over a Faust table with raw ``bytes`` keys and values."""

    def __init__(self, table: Any, input_topic: str) -> None:
        self.table = table
        self.input_topic = input_topic

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.table.data.get(key.encode("utf-8"))
        return value

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        raw = key.encode("utf-8")
        with _in_partition(self.input_topic, partition):
            if value is None:
                if raw in self.table.data:
                    del self.table[raw]
            else:
                self.table[raw] = value

    def items(self) -> Iterable[tuple[str, bytes]]:
        return [(k.decode("utf-8"), v) for k, v in self.table.data.items()]
