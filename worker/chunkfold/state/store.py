"""The ``StateStore`` protocol: what the ``Processor`` needs of a table's storage."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class StateStore(Protocol):
    """Table storage: reads are local; writes go to the local store and the changelog of
    ``partition`` (the completion's input partition)."""

    def get(self, key: str) -> bytes | None: ...

    def write(self, partition: int, key: str, value: bytes | None) -> None: ...

    def items(self) -> Iterable[tuple[str, bytes]]: ...
