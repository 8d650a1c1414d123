"""The direct driver's state: the assigned partitions' entries in memory, backed by the
changelog topic a Faust table named ``state`` uses (``<app id>-state-changelog``, one partition
per input partition, raw keys and values, ``None`` deletes)."""

from __future__ import annotations

from collections.abc import Iterable

from chunkfold.config import Settings
from chunkfold.state.memory import MemoryStore


def changelog_topic(settings: Settings) -> str:
    """The state changelog: the same topic a Faust table named ``state`` uses."""
    return f"{settings.app_id}-state-changelog"


class ChangelogStore(MemoryStore):
    """``MemoryStore`` of the assigned partitions' state; its write ``log`` is the outbox of
    changelog records still to send (to the partition of the completion's input partition)."""

    def __init__(self) -> None:
        super().__init__()
        self.partition_of: dict[str, int] = {}

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        super().write(partition, key, value)
        self._place(partition, key, value)

    def load(self, partition: int, key: str, value: bytes | None) -> None:
        """Apply one changelog record read back (not a new write)."""
        self.put(key, value)
        self._place(partition, key, value)

    def _place(self, partition: int, key: str, value: bytes | None) -> None:
        if value is None:
            self.partition_of.pop(key, None)
        else:
            self.partition_of[key] = partition

    def take_outbox(self) -> list[tuple[int, str, bytes | None]]:
        outbox, self.log = self.log, []
        return outbox

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state and unsent writes of ``partitions`` (given up to another worker)."""
        gone = set(partitions)
        for key in [k for k, p in self.partition_of.items() if p in gone]:
            del self.data[key]
            del self.partition_of[key]
        self.log = [w for w in self.log if w[0] not in gone]
