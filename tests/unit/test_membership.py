"""The query membership assignor, through the bytes the group protocol carries: each member's
metadata as JoinGroup sends it, the leader's assignment as SyncGroup hands it to each member."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata

from chunkfold.query.membership import (
    QUERY_PROTOCOL,
    QueryMembership,
    RoundRobinFallback,
    assignment_strategy,
    decode_member_url,
    decode_owners,
)

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


def test_before_any_assignment_and_after_a_fallback_one_no_owner_is_known() -> None:
    membership = QueryMembership("http://a:1")
    assert membership.owner(TOPIC, 0) is None
    rebalance({"a": membership}, leader="a")
    assert membership.owner(TOPIC, 0) == "http://a:1"

    fallback = RoundRobinFallback(membership)
    members = {"a": ConsumerProtocol.METADATA.decode(fallback.metadata([TOPIC]).encode())}
    assignment = fallback.assign(Cluster(), members)  # type: ignore[arg-type]
    fallback.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(assignment["a"].encode()))
    assert membership.owner(TOPIC, 0) is None
    assert membership.assignments == 2


def test_the_query_protocol_comes_first_and_plain_round_robin_second() -> None:
    """A group with an older member (``roundrobin`` only) agrees on the second."""
    membership = QueryMembership("http://a:1")
    strategy = assignment_strategy(membership)
    assert [s.name for s in strategy] == [QUERY_PROTOCOL, RoundRobinPartitionAssignor.name]
    assert strategy[1].metadata([TOPIC]).encode() == RoundRobinPartitionAssignor.metadata([TOPIC]).encode()
