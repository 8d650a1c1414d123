"""``Owners``: where the query listener finds the member that owns a completion's partition,
and whether it may answer at all right now. One implementation per driver: ``GroupOwners``
(direct driver, from ``QueryMembership``); the Faust driver's from its own assignor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from chunkfold.query.membership import QueryMembership


class Owners(Protocol):
    def owner(self, partition: int) -> str | None:
        """The advertised query URL of the member that owns input partition ``partition``;
        None when unknown, "" when that member runs no query listener."""

    def settled(self) -> bool:
        """False while the group rebalances or this member restores state: ownership is about to
        change or state is incomplete, so nothing is answered (503) rather than something wrong."""


class GroupOwners:
    """The direct driver's ``Owners``: the map of the latest assignment of ``membership`` for
    ``input_topic``; settled when ``settled()`` (the worker: not between a revocation and the
    end of the assignment's restore) says so."""

    def __init__(self, membership: QueryMembership, input_topic: str, settled: Callable[[], bool]) -> None:
        self.membership = membership
        self.input_topic = input_topic
        self._settled = settled

    def owner(self, partition: int) -> str | None:
        return self.membership.owner(self.input_topic, partition)

    def settled(self) -> bool:
        return self._settled()
