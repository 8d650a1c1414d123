"""``MemoryStore``: a dict-backed ``StateStore`` (tests, replay, and the base of the direct
driver's changelog store)."""

from __future__ import annotations

from collections.abc import Iterable


class MemoryStore:
    """A dict-backed ``StateStore`` (tests, replay); keeps a per-partition log of writes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.log: list[tuple[int, str, bytes | None]] = []

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        self.log.append((partition, key, value))
        self.put(key, value)

    def put(self, key: str, value: bytes | None) -> None:
        """Set (None: delete) ``key`` without logging a write."""
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def items(self) -> Iterable[tuple[str, bytes]]:
        return list(self.data.items())
