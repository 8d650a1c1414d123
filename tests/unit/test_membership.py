"""The query membership assignor, through the bytes the group protocol carries: each member's
metadata as JoinGroup sends it, the leader's assignment as SyncGroup hands it to each member."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata

from chunkfold.query.membership import QueryMembership, assignment_strategy, decode_member_url, decode_owners

pytestmark = pytest.mark.unit

TOPIC = "chunks"
PARTITIONS = 8


class Cluster:
    """The one thing an assignor reads of aiokafka's ``ClusterMetadata``."""

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(PARTITIONS)) if topic == TOPIC else None


def join(members: dict[str, QueryMembership]) -> dict[str, ConsumerProtocolMemberMetadata]:
    """What the leader decodes from the JoinGroup response: every member's metadata."""
    return {
        member_id: ConsumerProtocol.METADATA.decode(membership.metadata([TOPIC]).encode())
        for member_id, membership in members.items()
    }


def rebalance(members: dict[str, QueryMembership], leader: str) -> dict[str, list[int]]:
    """One rebalance: ``leader`` assigns, each member receives its assignment's bytes; returns
    the partitions each member was given."""
    assignments = members[leader].assign(Cluster(), join(members))  # type: ignore[arg-type]
    given: dict[str, list[int]] = {}
    for member_id, membership in members.items():
        received = ConsumerProtocol.ASSIGNMENT.decode(assignments[member_id].encode())
        membership.on_assignment(received)
        given[member_id] = sorted(tp.partition for tp in received.partitions())
    return given


def test_three_members_each_learn_every_owner_and_the_plain_assignment() -> None:
    members = {f"member-{n}": QueryMembership(f"http://10.0.0.{n}:7070") for n in range(3)}
    given = rebalance(members, leader="member-1")

    plain = RoundRobinPartitionAssignor.assign(Cluster(), join(members))  # type: ignore[arg-type]
    assert given == {m: sorted(tp.partition for tp in a.partitions()) for m, a in plain.items()}
    assert sorted(p for ps in given.values() for p in ps) == list(range(PARTITIONS))
    assert all(given.values())
    owner_of = {p: members[m].url for m, ps in given.items() for p in ps}
    for membership in members.values():  # followers too: they never saw the others' metadata
        assert {p: membership.owner(TOPIC, p) for p in range(PARTITIONS)} == owner_of
        assert membership.owner("other-topic", 0) is None
        assert membership.assignments == 1


def test_a_member_without_a_listener_owns_partitions_nobody_can_route_to() -> None:
    members = {"a": QueryMembership("http://a:7070"), "b": QueryMembership("")}
    given = rebalance(members, leader="a")
    assert given["b"]
    for p in given["b"]:
        assert members["a"].owner(TOPIC, p) == ""
    for p in given["a"]:
        assert members["b"].owner(TOPIC, p) == "http://a:7070"


def test_a_new_rebalance_replaces_the_map() -> None:
    members = {f"m{n}": QueryMembership(f"http://m{n}:1") for n in range(3)}
    rebalance(members, leader="m0")
    del members["m2"]
    given = rebalance(members, leader="m1")
    for p in range(PARTITIONS):
        owner = next(m for m, ps in given.items() if p in ps)
        assert members["m0"].owner(TOPIC, p) == f"http://{owner}:1"


@pytest.mark.parametrize(
    "user_data", [b"", b"\xff not json", b'{"v": 99, "query_url": "http://x:1"}', b"[1]"]
)
def test_metadata_it_cannot_read_advertises_no_url(user_data: bytes) -> None:
    assert decode_member_url(user_data) == ""
    assert decode_owners(user_data) is None


def test_a_group_with_an_older_member_agrees_on_one_protocol_and_routes_only_under_a_new_leader() -> None:
    """An older chunkfold member speaks plain ``roundrobin``: its metadata carries no URL, and
    when it leads, its assignments carry no map, so no member knows the owners."""
    new = QueryMembership("http://new:1")
    assert [s.name for s in assignment_strategy(new)] == [RoundRobinPartitionAssignor.name]
    assert new.owner(TOPIC, 0) is None  # before any assignment

    metadata = {
        "new": ConsumerProtocol.METADATA.decode(new.metadata([TOPIC]).encode()),
        "old": ConsumerProtocol.METADATA.decode(RoundRobinPartitionAssignor.metadata([TOPIC]).encode()),
    }
    led_by_new = new.assign(Cluster(), metadata)  # type: ignore[arg-type]
    new.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(led_by_new["new"].encode()))
    old_partitions = [p for _, ps in led_by_new["old"].assignment for p in ps]
    assert old_partitions and all(new.owner(TOPIC, p) == "" for p in old_partitions)

    led_by_old = RoundRobinPartitionAssignor.assign(Cluster(), metadata)  # type: ignore[arg-type]
    new.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(led_by_old["new"].encode()))
    assert [new.owner(TOPIC, p) for p in range(PARTITIONS)] == [None] * PARTITIONS
    assert new.assignments == 2
