"""Startup checks: refuse a cluster the worker cannot run on correctly, with one line, before
anything is consumed or written.

``prepare_worker_topics`` creates the missing topics (unless ``create_topics`` is off) and then
checks, in order, each failure a ``StartupError`` with a one-line message:

* the brokers can be reached and authenticate us (a wrong password, a CA that does not sign the
  brokers' certificates: ``describe_failure`` turns aiokafka's and ``ssl``'s errors into a line);
* every topic exists (with creation off, a missing one is named, never created);
* the ACLs allow what the worker does: READ on the input topic and the changelog, WRITE on the
  outputs and the changelog, DESCRIBE_CONFIGS on the topics whose configs it reads, READ on the
  consumer group. Topic permissions come from the brokers' own answer (Metadata v8's
  ``topic_authorized_operations``: what this principal may do on each topic), the group's from
  DescribeGroups with authorized operations; nothing is written to find out;
* the state changelog has as many partitions as the input topic (state is mapped by partition)
  and ``cleanup.policy=compact``.

What cannot be asked without doing it (the transactional ids of ``exactly_once``) fails on its
first use, which comes before any record is processed (``describe_failure`` names it too).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from aiokafka import errors
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from chunkfold.config import Settings
from chunkfold.core.fit import MIN_OUTPUT_BYTES
from chunkfold.kafka_io import KafkaClients, ensure_topics

OPERATIONS = {
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "ALTER": 7,
    "DESCRIBE": 8,
    "DESCRIBE_CONFIGS": 10,
    "ALTER_CONFIGS": 11,
}
"""Kafka's ``AclOperation`` codes; an authorized-operations field has bit ``1 << code`` set for
each operation allowed."""
UNKNOWN_TOPIC = 3
TOPIC_AUTHORIZATION_FAILED = 29
AUTHORIZED_OPERATIONS_OMITTED = -(2**31)
CHANGELOG_POLICY = "compact"
CHANGELOG_DELETE_RETENTION_MS = 86_400_000
"""``delete.retention.ms`` of the changelog when chunkfold creates it (Kafka's default, set
explicitly): compaction may remove a tombstone once it is that old."""


class StartupError(Exception):
    """The cluster is not as the worker needs it; the message is one line."""


class _MetadataResponse_v8(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(("node_id", Int32), ("host", String("utf-8")), ("port", Int32), ("rack", String("utf-8"))),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequest_v8(RequestStruct):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponse_v8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class _AuthorizedMetadataRequest(Request[_MetadataRequest_v8]):  # type: ignore[misc]
    """Metadata of some topics with what this principal may do on each (aiokafka's own
    MetadataRequest stops at v5, before ``include_topic_authorized_operations``)."""

    API_KEY: ClassVar[int] = 3

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics

    def build(self, request_struct_class: type[_MetadataRequest_v8]) -> _MetadataRequest_v8:
        return request_struct_class(self.topics, False, False, True)


@dataclass(frozen=True)
class TopicAccess:
    """What the brokers told about one topic."""

    exists: bool
    described: bool
    """False when this principal may not even DESCRIBE it (then nothing else is known)."""
    partitions: int
    allowed: frozenset[str] | None
    """The operations allowed on it; None when the brokers did not say."""


async def topic_access(
    kafka: KafkaClients, topics: Iterable[str], *, settle_s: float = 0.0
) -> dict[str, TopicAccess]:
    """Existence, partition count and allowed operations of each of ``topics``. ``settle_s``:
    topics just created may take a moment to show in a broker's metadata; ask again for up to
    that long while one is missing."""
    topics = sorted(set(topics))
    client = kafka.client()
    await client.bootstrap()
    deadline = asyncio.get_running_loop().time() + settle_s
    try:
        while True:
            node = client.get_random_node()
            found = _access(await client.send(node, _AuthorizedMetadataRequest(topics)))
            settled = all(a.exists and a.partitions > 0 for a in found.values() if a.described)
            if settled or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await client.close()


def _access(response: Any) -> dict[str, TopicAccess]:
    found: dict[str, TopicAccess] = {}
    for error_code, topic, _, partitions, operations, *_ in response.topics:
        allowed = (
            None
            if operations == AUTHORIZED_OPERATIONS_OMITTED
            else frozenset(name for name, code in OPERATIONS.items() if operations & (1 << code))
        )
        found[topic] = TopicAccess(
            exists=error_code not in (UNKNOWN_TOPIC, TOPIC_AUTHORIZATION_FAILED),
            described=error_code != TOPIC_AUTHORIZATION_FAILED,
            partitions=len(partitions),
            allowed=allowed,
        )
    return found


async def group_allowed(kafka: KafkaClients, group: str) -> frozenset[str] | None:
    """The operations allowed on consumer group ``group`` (None when the brokers do not say)."""
    admin = kafka.admin()
    await admin.start()
    try:
        for attempt in range(30):  # a new cluster creates its offsets topic on first demand
            try:
                responses = await admin.describe_consumer_groups([group], include_authorized_operations=True)
                break
            except errors.GroupCoordinatorNotAvailableError:
                if attempt == 29:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    for response in responses:
        for description in response.groups:
            error_code, operations = description[0], description[-1]
            if error_code == errors.GroupAuthorizationFailedError.errno:
                return frozenset()
            if isinstance(operations, int) and operations != AUTHORIZED_OPERATIONS_OMITTED:
                return frozenset(name for name, code in OPERATIONS.items() if operations & (1 << code))
    return None


def check_access(
    access: Mapping[str, TopicAccess], needs: Mapping[str, Iterable[str]], *, create_topics: bool
) -> None:
    """Raise ``StartupError`` naming every topic that is missing, and every operation ``needs``
    (topic: operations) that the ACLs deny."""
    hidden = sorted(t for t in needs if not access[t].described)
    missing = sorted(t for t in needs if access[t].described and not access[t].exists)
    if missing:
        hint = (
            "CHUNKFOLD_CREATE_TOPICS=false: create them first (see README, Connecting to a secured cluster)"
            if not create_topics
            else "they could not be created"
        )
        raise StartupError(f"missing topic(s) {', '.join(missing)} ({hint})")
    denied = []
    for topic in hidden:
        # Not even DESCRIBE, which READ and WRITE imply: those it needs are denied for sure.
        implying = [op for op in needs[topic] if op in ("READ", "WRITE")] or ["DESCRIBE"]
        denied += [f"{op} on topic {topic}" for op in implying]
    for topic, operations in needs.items():
        allowed = access[topic].allowed
        if topic in hidden or allowed is None:
            continue
        denied += [f"{op} on topic {topic}" for op in operations if op not in allowed]
    if denied:
        raise StartupError(f"not authorized: the ACLs deny {'; '.join(denied)}")


def worker_needs(settings: Settings, changelog: str) -> dict[str, list[str]]:
    """The topic operations a worker needs (its ACLs; see README)."""
    s = settings
    return {
        s.input_topic: ["READ", "DESCRIBE"],
        **{
            t: ["WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"]
            for t in (s.events_topic, s.done_topic, s.deadletter_topic)
        },
        changelog: ["READ", "WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"],
    }


async def changelog_policy(kafka: KafkaClients, changelog: str) -> str | None:
    from chunkfold.kafka_io import topic_config

    return (await topic_config(kafka, [changelog], "cleanup.policy")).get(changelog)


async def small_record_limits(kafka: KafkaClients, topics: Iterable[str]) -> dict[str, int]:
    """The topics whose ``max.message.bytes`` is under ``MIN_OUTPUT_BYTES`` (a limit that
    cannot be read is not reported: the worker then assumes its setting)."""
    from chunkfold.kafka_io import topic_config

    limits = await topic_config(kafka, topics, "max.message.bytes")
    return {topic: int(limit) for topic, limit in limits.items() if int(limit) < MIN_OUTPUT_BYTES}


async def prepare_worker_topics(kafka: KafkaClients, settings: Settings, changelog: str) -> None:
    """Create what is missing (unless ``create_topics`` is off), then check everything the worker
    needs of its topics and group; raises ``StartupError``."""
    s = settings
    outputs = (s.events_topic, s.done_topic, s.deadletter_topic)
    if s.create_topics:
        await ensure_topics(kafka, [s.input_topic], s.partitions, s.replication_factor)
        await ensure_topics(
            kafka,
            outputs,
            s.partitions,
            s.replication_factor,
            configs={"max.message.bytes": str(s.max_message_bytes)},
        )
        # State is mapped by partition: the changelog gets the input topic's partition count.
        input_partitions = (await topic_access(kafka, [s.input_topic], settle_s=30))[s.input_topic].partitions
        await ensure_topics(
            kafka,
            [changelog],
            input_partitions or s.partitions,
            s.replication_factor,
            configs={
                "cleanup.policy": CHANGELOG_POLICY,
                "delete.retention.ms": str(CHANGELOG_DELETE_RETENTION_MS),
                "max.message.bytes": str(s.max_message_bytes),
            },
        )
    access = await topic_access(
        kafka, [s.input_topic, *outputs, changelog], settle_s=30 if s.create_topics else 0
    )
    check_access(access, worker_needs(s, changelog), create_topics=s.create_topics)
    group = await group_allowed(kafka, s.app_id)
    if group is not None and "READ" not in group:
        raise StartupError(f"not authorized: the ACLs deny READ on group {s.app_id}")
    ins, states = access[s.input_topic].partitions, access[changelog].partitions
    if ins != states:
        raise StartupError(
            f"changelog {changelog} has {states} partitions and input topic {s.input_topic} {ins}: "
            "state is kept by input partition, so they must be equal (recreate the changelog with "
            f"{ins} partitions, or drop it to have chunkfold create it)"
        )
    small = await small_record_limits(kafka, outputs)
    if small:
        topic, limit = min(small.items())
        raise StartupError(
            f"output topic {topic} has max.message.bytes={limit}: chunkfold needs at least "
            f"{MIN_OUTPUT_BYTES} (room for every output with its key)"
        )
    policy = await changelog_policy(kafka, changelog)
    if policy is None:
        raise StartupError(f"cannot read cleanup.policy of changelog {changelog} (DESCRIBE_CONFIGS)")
    if {p.strip() for p in policy.split(",")} != {CHANGELOG_POLICY}:
        raise StartupError(
            f"changelog {changelog} has cleanup.policy={policy}: it must be compact alone "
            "(delete would drop the state of completions still open or remembered)"
        )


async def require_topics(
    kafka: KafkaClients, needs: Mapping[str, Iterable[str]], *, create_topics: bool
) -> None:
    """``check_access`` for a tool (``produce``, ``tail``, the audit sink)."""
    needs = dict(needs)
    check_access(await topic_access(kafka, needs), needs, create_topics=create_topics)


def describe_failure(exc: BaseException, settings: Settings) -> str | None:
    """One line for a failure to connect, authenticate or be authorized (None for any other
    error): which, and what to look at. Never includes a secret."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:  # the TLS or SASL error may be wrapped
        if isinstance(cause, ssl.SSLCertVerificationError):
            ca = settings.ssl_cafile or "the system's CAs"
            return (
                f"TLS: the broker's certificate is not trusted ({getattr(cause, 'verify_message', None) or cause}); "
                f"CHUNKFOLD_SSL_CAFILE={ca} must hold the CA that signed it"
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or cause}): check the ssl_* settings and the listener's protocol"
        if isinstance(cause, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
            return (
                f"authentication failed as {settings.sasl_username or '(no user)'} with "
                f"{settings.sasl_mechanism}: check CHUNKFOLD_SASL_USERNAME and the password"
            )
        if isinstance(cause, errors.UnsupportedSaslMechanismError):
            return f"the brokers do not offer SASL mechanism {settings.sasl_mechanism} (CHUNKFOLD_SASL_MECHANISM)"
        if isinstance(cause, errors.TopicAuthorizationFailedError):
            return f"not authorized: the ACLs deny an operation on a topic ({_detail(cause)})"
        if isinstance(cause, errors.GroupAuthorizationFailedError):
            return f"not authorized: the ACLs deny READ on group {settings.app_id} ({_detail(cause)})"
        if isinstance(cause, errors.TransactionalIdAuthorizationFailed):
            return (
                f"not authorized: the ACLs deny WRITE on transactional id {settings.app_id}-{settings.input_topic}-* "
                "(exactly_once: a PREFIXED ACL on that transactional id prefix)"
            )
        if isinstance(cause, errors.ClusterAuthorizationFailedError):
            return f"not authorized: the ACLs deny an operation on the cluster ({_detail(cause)})"
        cause = cause.__cause__ or cause.__context__
        seen += 1
    if isinstance(exc, errors.KafkaConnectionError | errors.NoBrokersAvailable | errors.KafkaTimeoutError):
        return (
            f"cannot connect to Kafka at {settings.bootstrap_servers} ({type(exc).__name__}: {_detail(exc)}); "
            f"security protocol {settings.security_protocol}"
        )
    return None


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def startup_failure(exc: BaseException, settings: Settings) -> str | None:
    """``StartupError``'s message, or ``describe_failure``'s line."""
    if isinstance(exc, StartupError):
        return str(exc)
    return describe_failure(exc, settings)


async def probe(kafka: KafkaClients) -> BaseException | None:
    """Why connecting to the first bootstrap server fails, if it does: aiokafka's clients log the
    TLS or SASL error and raise a bare "Unable to bootstrap"; one connection made by hand raises
    the error itself."""
    from aiokafka.conn import create_conn

    host, _, port = kafka.servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await create_conn(host.strip("[]"), int(port), request_timeout_ms=15_000, **kafka.options)
    except Exception as exc:
        return exc
    conn.close()
    return None


async def explain(exc: BaseException, kafka: KafkaClients, settings: Settings) -> str | None:
    """``describe_failure``'s line, with the real cause of a failed bootstrap (``probe``)."""
    if isinstance(exc, errors.KafkaConnectionError):
        cause = await probe(kafka)
        if cause is not None:
            line = describe_failure(cause, settings)
            if line is not None:
                return line
    return describe_failure(exc, settings)


async def guarded(coroutine: Any, kafka: KafkaClients, settings: Settings) -> Any:
    """Await ``coroutine``; a connection, authentication or authorization failure becomes a
    ``StartupError`` with its line."""
    try:
        return await coroutine
    except StartupError:
        raise
    except Exception as exc:
        line = await explain(exc, kafka, settings)
        if line is None:
            raise
        raise StartupError(line) from None
