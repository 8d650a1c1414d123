"""Who owns which partition, learnt through the consumer group's own protocol, the way Kafka
Streams spreads ``application.server``: each member puts its query URL into the user data of
its member metadata (``JoinGroup``); the leader, the only member that sees everybody's
metadata, assigns the partitions exactly as the group's plain assignor would and writes the
whole map, partition -> owner URL, into every member's assignment user data (``SyncGroup``);
each member keeps the map of its latest assignment.

aiokafka calls ``name``, ``version``, ``metadata(topics)``, ``assign(cluster, members)`` and
``on_assignment(assignment)`` on each object of ``partition_assignment_strategy`` and accepts
instances as well as classes: ``QueryMembership`` is an instance that holds this member's URL
and the map.

It is the group's only protocol, and it keeps the name of the assignment it makes,
``roundrobin`` (what aiokafka's consumer, and so the direct driver, always used). A second
protocol for older members does not work with aiokafka 0.14: it sends one JoinGroup per
assignor (aio-libs/aiokafka#1168), and three members starting together rebalanced for minutes.
Under the one name a group with an older chunkfold member still agrees: an older member ignores
the user data, and when it leads, its assignments carry none, so no member knows the owners
(``owner`` None) and queries for other members' partitions get 503 until a newer member leads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

PROTOCOL = RoundRobinPartitionAssignor.name
USER_DATA_VERSION = 1
"""The version inside the user data JSON (the struct's own ``version`` is the consumer
protocol's, 0 as aiokafka's assignors send it, so tools such as ``kafka-consumer-groups``
still decode the metadata)."""

OwnerMap = dict[str, dict[int, str]]
"""Topic -> partition -> advertised query URL of its owner ("" for a member without one)."""


def encode_member_url(url: str) -> bytes:
    return orjson.dumps({"v": USER_DATA_VERSION, "query_url": url})


def decode_member_url(user_data: bytes) -> str:
    """The URL a member advertised; "" (not routable) for metadata without a readable one."""
    try:
        decoded = orjson.loads(user_data) if user_data else None
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(decoded, dict) or decoded.get("v") != USER_DATA_VERSION:
        return ""
    url = decoded.get("query_url")
    return url if isinstance(url, str) else ""


def encode_owners(owners: OwnerMap) -> bytes:
    """The map grouped by URL (a handful of members, many partitions: each URL written once)."""
    grouped: dict[str, dict[str, list[int]]] = {}
    for topic, partitions in owners.items():
        by_url = grouped.setdefault(topic, {})
        for partition, url in sorted(partitions.items()):
            by_url.setdefault(url, []).append(partition)
    return orjson.dumps({"v": USER_DATA_VERSION, "owners": grouped})


def decode_owners(user_data: bytes) -> OwnerMap | None:
    """The map a leader wrote; None when the user data holds none this version reads."""
    try:
        decoded = orjson.loads(user_data) if user_data else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(decoded, dict) or decoded.get("v") != USER_DATA_VERSION:
        return None
    grouped = decoded.get("owners")
    if not isinstance(grouped, dict):
        return None
    owners: OwnerMap = {}
    for topic, by_url in grouped.items():
        if not isinstance(by_url, dict):
            return None
        partitions = owners.setdefault(topic, {})
        for url, numbers in by_url.items():
            if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers):
                return None
            partitions.update(dict.fromkeys(numbers, url))
    return owners


class QueryMembership:
    """The assignor of one member: advertises ``url`` and keeps the owner map of the latest
    assignment (``owner``); None before the first one, and after one made by a leader that
    wrote none (an older member)."""

    name = PROTOCOL
    version = RoundRobinPartitionAssignor.version

    def __init__(self, url: str) -> None:
        self.url = url
        """This member's advertised query URL; "" when it runs no query listener."""
        self.owners: OwnerMap | None = None
        self.assignments = 0
        """Assignments received so far (each rebalance adds one)."""

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, list(topics), encode_member_url(self.url))

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """The plain assignor's assignment (``RoundRobinPartitionAssignor`` ignores user data),
        each member's carrying the whole owner map."""
        plain = RoundRobinPartitionAssignor.assign(cluster, members)
        owners: OwnerMap = {}
        for member_id, assignment in plain.items():
            url = decode_member_url(members[member_id].user_data)
            for topic, partitions in assignment.assignment:
                owners.setdefault(topic, {}).update(dict.fromkeys(partitions, url))
        user_data = encode_owners(owners)
        return {
            member_id: ConsumerProtocolMemberAssignment(self.version, assignment.assignment, user_data)
            for member_id, assignment in plain.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owners = decode_owners(assignment.user_data)
        self.assignments += 1

    def owner(self, topic: str, partition: int) -> str | None:
        """The advertised URL of the owner of ``topic``'s ``partition`` ("" for an owner without
        a query listener); None when the latest assignment says nothing about it."""
        if self.owners is None:
            return None
        return self.owners.get(topic, {}).get(partition)


def assignment_strategy(membership: QueryMembership) -> tuple[QueryMembership]:
    """``partition_assignment_strategy`` for the group consumer."""
    return (membership,)
