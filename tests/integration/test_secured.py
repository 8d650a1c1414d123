"""chunkfold on a secured cluster: one broker (``deploy/kafka/kafka.py`` ``SecuredBroker``) with
a SASL_SSL listener (SCRAM-SHA-512), an mTLS listener, KRaft's ``StandardAuthorizer`` and
certificates made for the session. Each principal gets exactly the ACLs the README lists.

The happy paths: ``produce`` -> worker (direct, exactly_once, pre-created topics and no
CreateTopics ACL) -> ``tail`` and the audit sink, all over SASL_SSL; the Faust driver over
SASL_SSL creating its topics; the direct driver over mTLS. The refusals, each one line on stderr
and exit status 3 before anything is consumed or written: a wrong password, a CA that did not
sign the broker's certificate, a missing WRITE ACL, missing topics with creation off, a changelog
with another partition count than the input topic, a changelog that is not compacted.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import GroupCoordinatorNotAvailableError

from chunkfold.audit.database import connect
from chunkfold.config import Settings
from chunkfold.kafka_io import KafkaClients
from chunkfold.produce import publish
from tests.conftest import kafka_module
from tests.harness import (
    ROOT,
    WorkerProcess,
    collect,
    done_count,
    fresh_settings,
    recorded_records,
    settings_env,
    wait_for,
)
from tests.recorded import FIXTURES

pytestmark = pytest.mark.integration

USERS = {"worker": "worker-Secret.1", "gateway": "gateway-Secret.2", "reader": "reader-Secret.3"}
ADMIN_PASSWORD = "admin-Secret.0"
MTLS_USER = "worker-mtls"
STARTUP_FAILED = 3
Acl = tuple[str, str, str, str, str]


@dataclass
class Secured:
    """The session's secured broker, its TLS files and a password file per user."""

    broker: Any
    tls: Any
    password_files: dict[str, Path]

    def settings(self, user: str, **overrides: Any) -> Settings:
        """Fresh topics and app id; SASL_SSL + SCRAM-SHA-512 as ``user`` (password from a file)."""
        base: dict[str, Any] = {
            "security_protocol": "SASL_SSL",
            "ssl_cafile": str(self.tls.ca),
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password_file": str(self.password_files[user]),
            "partitions": 2,
        }
        return fresh_settings(self.broker.sasl_bootstrap, **{**base, **overrides})

    def as_user(self, settings: Settings, user: str) -> Settings:
        """The same topics and app id, another principal."""
        return settings.model_copy(
            update={"sasl_username": user, "sasl_password_file": str(self.password_files[user])}
        )

    def grant(self, acls: list[Acl]) -> None:
        kafka_module().create_acls(self.broker.bootstrap, acls)


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    k = kafka_module()
    root = tmp_path_factory.mktemp("secured-kafka")
    tls = k.make_tls(root / "tls", [MTLS_USER])
    files = {}
    for user, password in {**USERS, "admin": ADMIN_PASSWORD}.items():
        path = root / f"{user}.password"
        path.write_text(password + "\n")
        path.chmod(0o600)
        files[user] = path
    broker = k.SecuredBroker(tls, USERS, ADMIN_PASSWORD, run_dir=root / "broker")
    try:
        broker.start()
        yield Secured(broker, tls, files)
    finally:
        broker.close()


def worker_acls(s: Settings, principal: str, *, skip: tuple[str, ...] = ()) -> list[Acl]:
    """The README's worker ACLs for ``s`` (topic ACLs named ``"OPERATION topic"`` in ``skip`` left out)."""
    changelog = f"{s.app_id}-state-changelog"
    wanted = [
        ("TOPIC", s.input_topic, "READ"),
        ("TOPIC", changelog, "READ"),
        ("TOPIC", changelog, "WRITE"),
        ("TOPIC", changelog, "DESCRIBE_CONFIGS"),
        ("GROUP", s.app_id, "READ"),
    ]
    for topic in (s.events_topic, s.done_topic, s.deadletter_topic):
        wanted += [("TOPIC", topic, "WRITE"), ("TOPIC", topic, "DESCRIBE_CONFIGS")]
    if s.processing_guarantee == "exactly_once":
        wanted.append(("TRANSACTIONAL_ID", f"{s.app_id}-{s.input_topic}-", "WRITE"))
    acls = []
    for resource_type, name, operation in wanted:
        if f"{operation} {name}" in skip:
            continue
        pattern = "PREFIXED" if resource_type == "TRANSACTIONAL_ID" else "LITERAL"
        acls.append((f"User:{principal}", resource_type, name, pattern, operation))
    return acls


def create_topics(
    s: Settings,
    *,
    changelog_partitions: int | None = None,
    policy: str = "compact",
    done_limit: int | None = None,
) -> None:
    """The worker's topics, made by the admin (``s`` must be the admin's settings);
    ``done_limit``: the done topic's ``max.message.bytes``."""
    from chunkfold.kafka_io import ensure_topics

    kafka = KafkaClients.of(s)

    async def run() -> None:
        await ensure_topics(kafka, [s.input_topic, s.events_topic, s.deadletter_topic], s.partitions)
        done_configs = {"max.message.bytes": str(done_limit)} if done_limit is not None else None
        await ensure_topics(kafka, [s.done_topic], s.partitions, configs=done_configs)
        await ensure_topics(
            kafka,
            [f"{s.app_id}-state-changelog"],
            changelog_partitions or s.partitions,
            configs={"cleanup.policy": policy},
        )

    asyncio.run(run())


def run_cli(args: list[str], settings: Settings, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failing_worker(settings: Settings) -> tuple[int, str]:
    """Run a worker that must refuse to start: its exit status and its last stderr line."""
    done = run_cli(["worker", "--log-format", "text", "--loglevel", "warning"], settings, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert lines, done.stdout
    return done.returncode, lines[-1]


def end_offsets(settings: Settings, topics: list[str]) -> int:
    """Records in ``topics`` (all partitions), read as ``settings``' principal."""

    async def run() -> int:
        consumer = KafkaClients.of(settings).consumer(group_id=None)
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
            if not tps:
                await consumer.topics()
                tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
            return sum((await consumer.end_offsets(tps)).values())
        finally:
            await consumer.stop()

    return asyncio.run(run())


def committed_offsets(settings: Settings) -> dict[Any, Any]:
    async def run() -> dict[Any, Any]:
        admin = KafkaClients.of(settings).admin()
        await admin.start()
        try:
            for _ in range(60):  # a new cluster creates its offsets topic on first demand
                try:
                    return dict(await admin.list_consumer_group_offsets(settings.app_id))
                except GroupCoordinatorNotAvailableError:
                    await asyncio.sleep(0.5)
            raise AssertionError("no group coordinator")
        finally:
            await admin.close()

    return asyncio.run(run())


# ------------------------------------------------------------------------------------------
# Happy paths
# ------------------------------------------------------------------------------------------


def test_produce_worker_tail_and_audit_sink_over_sasl_ssl_with_precreated_topics(
    secured: Secured, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """exactly_once on pre-created topics with CHUNKFOLD_CREATE_TOPICS=false: no principal but the
    admin has CREATE anywhere."""
    s = secured.settings("worker", processing_guarantee="exactly_once", create_topics=False)
    admin, gateway, reader = (secured.as_user(s, u) for u in ("admin", "gateway", "reader"))
    create_topics(admin)
    sink_group = f"{s.app_id}-audit"
    secured.grant(
        [
            *worker_acls(s, "worker"),
            ("User:gateway", "TOPIC", s.input_topic, "LITERAL", "WRITE"),
            ("User:reader", "TOPIC", s.done_topic, "LITERAL", "READ"),
            ("User:reader", "TOPIC", s.events_topic, "LITERAL", "READ"),
            ("User:reader", "GROUP", sink_group, "LITERAL", "READ"),
        ]
    )
    workers.append(WorkerProcess(s, tmp_path / "worker.log").start())

    produced = run_cli(["produce", str(FIXTURES)], gateway)
    assert produced.returncode == 0, produced.stderr
    assert "published" in produced.stderr
    _, completions = recorded_records()
    got = collect(admin, done_count(completions))
    done = got.done_by_id()
    assert len(done) == completions == 49 and len(got.done) == 49, "exactly once: no repeats"
    assert {d["status"] for d in done.values()} == {"completed", "length"}
    assert got.deadletters == []
    assert got.events and all(w.alive for w in workers)

    tailed = run_cli(["tail", "--done", "--json", "--from-beginning", "--max", "49"], reader, timeout=60)
    assert tailed.returncode == 0, tailed.stderr
    tailed_ids = {orjson.loads(line)["completion_id"] for line in tailed.stdout.splitlines()}
    assert tailed_ids == set(done)

    database = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    log = (tmp_path / "sink.log").open("w")
    sink = subprocess.Popen(
        [sys.executable, "-m", "chunkfold.cli", "audit-sink", "--database", database, "--group", sink_group],
        env=settings_env(reader),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stored() -> int:
        assert sink.poll() is None, (tmp_path / "sink.log").read_text()[-2000:]
        try:
            db = connect(database)
        except Exception:
            return 0
        try:
            return int(db.query("SELECT count(*) FROM completions")[0][0])
        except Exception:
            return 0
        finally:
            db.close()

    try:
        wait_for(lambda: stored() == 49, 90, "the audit sink to store all 49 completions")
    finally:
        sink.terminate()
        assert sink.wait(30) == 0
    log_text = (tmp_path / "sink.log").read_text() + (tmp_path / "worker.log").read_text()
    for secret in (*USERS.values(), ADMIN_PASSWORD):
        assert secret not in log_text + produced.stderr + tailed.stderr


def test_faust_driver_over_sasl_ssl_creates_its_topics(
    secured: Secured, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    s = secured.settings("worker", driver="faust")
    admin = secured.as_user(s, "admin")
    tag = s.app_id
    # Creation on: the worker may create topics named after its app id (CREATE on the prefix),
    # the input topic is the gateway's.
    secured.grant(
        [
            *worker_acls(s, "worker"),
            *[
                ("User:worker", "TOPIC", name, "LITERAL", "CREATE")
                for name in (s.events_topic, s.done_topic, s.deadletter_topic, f"{tag}-state-changelog")
            ],
        ]
    )
    create_topics_input = admin.model_copy(update={"create_topics": True})
    records, completions = recorded_records()
    asyncio.run(publish(create_topics_input, records))
    workers.append(WorkerProcess(s, tmp_path / "worker.log").start())
    got = collect(admin, done_count(completions), timeout=150)
    assert len(got.done_by_id()) == completions == 49
    assert got.deadletters == []
    assert all(w.alive for w in workers), (tmp_path / "worker.log").read_text()[-3000:]


def test_direct_driver_over_mutual_tls(
    secured: Secured, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """The principal is the client certificate's CN (``ssl.principal.mapping.rules``)."""
    tls = secured.tls
    s = fresh_settings(
        secured.broker.mtls_bootstrap,
        security_protocol="SSL",
        ssl_cafile=str(tls.ca),
        ssl_certfile=str(tls.client_cert(MTLS_USER)),
        ssl_keyfile=str(tls.client_key(MTLS_USER)),
        partitions=2,
        create_topics=False,
    )
    admin = secured.settings("admin").model_copy(
        update={
            k: getattr(s, k)
            for k in ("app_id", "input_topic", "events_topic", "done_topic", "deadletter_topic")
        }
    )
    create_topics(admin)
    secured.grant(worker_acls(s, MTLS_USER))
    records, completions = recorded_records()
    asyncio.run(publish(admin, records))
    workers.append(WorkerProcess(s, tmp_path / "worker.log").start())
    got = collect(admin, done_count(completions))
    assert len(got.done_by_id()) == completions == 49


# ------------------------------------------------------------------------------------------
# Refusals: one line, exit status 3, nothing consumed or written
# ------------------------------------------------------------------------------------------


def test_a_wrong_password_is_one_line_for_the_worker_and_produce(secured: Secured, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    s = secured.settings("worker").model_copy(update={"sasl_password_file": str(wrong)})
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    assert line == (
        "chunkfold worker: authentication failed as worker with SCRAM-SHA-512: "
        "check CHUNKFOLD_SASL_USERNAME and the password"
    )
    produced = run_cli(["produce", str(FIXTURES)], s)
    assert produced.returncode == STARTUP_FAILED
    assert (
        produced.stderr.strip()
        .splitlines()[-1]
        .startswith("chunkfold produce: authentication failed as worker")
    )
    assert "not-the-password" not in produced.stderr


def test_a_ca_that_did_not_sign_the_brokers_certificate_is_one_line(secured: Secured) -> None:
    s = secured.settings("worker", ssl_cafile=str(secured.tls.other_ca))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    assert line.startswith("chunkfold worker: TLS: the broker's certificate is not trusted (")
    assert line.endswith(f"CHUNKFOLD_SSL_CAFILE={secured.tls.other_ca} must hold the CA that signed it")


def test_a_missing_write_acl_names_it_and_nothing_is_written(secured: Secured) -> None:
    s = secured.settings("worker", create_topics=False)
    admin = secured.as_user(s, "admin")
    create_topics(admin)
    secured.grant(worker_acls(s, "worker", skip=(f"WRITE {s.done_topic}",)))
    records, _ = recorded_records()
    asyncio.run(publish(admin, records))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    assert line == f"chunkfold worker: not authorized: the ACLs deny WRITE on topic {s.done_topic}"
    outputs = [s.events_topic, s.done_topic, s.deadletter_topic, f"{s.app_id}-state-changelog"]
    assert end_offsets(admin, outputs) == 0, "nothing half-written"
    assert committed_offsets(admin) == {}, "nothing consumed"


def test_missing_topics_with_creation_off_are_named(secured: Secured) -> None:
    s = secured.settings("worker", create_topics=False)
    secured.grant(worker_acls(s, "worker"))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    changelog = f"{s.app_id}-state-changelog"
    names = ", ".join(sorted([s.input_topic, s.events_topic, s.done_topic, s.deadletter_topic, changelog]))
    assert line == (
        f"chunkfold worker: missing topic(s) {names} (CHUNKFOLD_CREATE_TOPICS=false: create them first "
        "(see README, Connecting to a secured cluster))"
    )


@pytest.mark.parametrize(
    ("changelog_partitions", "policy", "want"),
    [
        (3, "compact", "has 3 partitions and input topic {input} 2: state is kept by input partition"),
        (2, "delete", "has cleanup.policy=delete: it must be compact alone"),
    ],
    ids=["partition-count", "not-compacted"],
)
def test_a_wrong_changelog_is_refused(
    secured: Secured, changelog_partitions: int, policy: str, want: str
) -> None:
    s = secured.settings("worker", create_topics=False)
    admin = secured.as_user(s, "admin")
    create_topics(admin, changelog_partitions=changelog_partitions, policy=policy)
    secured.grant(worker_acls(s, "worker"))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    changelog = f"{s.app_id}-state-changelog"
    assert line.startswith(f"chunkfold worker: changelog {changelog} {want.format(input=s.input_topic)}")


def test_an_output_topic_too_small_for_a_keyed_output_is_refused(secured: Secured) -> None:
    s = secured.settings("worker", create_topics=False)
    create_topics(secured.as_user(s, "admin"), done_limit=8192)
    secured.grant(worker_acls(s, "worker"))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    assert line == (
        f"chunkfold worker: output topic {s.done_topic} has max.message.bytes=8192: chunkfold needs "
        "at least 16384 (room for every output with its key)"
    )


def test_exactly_once_without_the_transactional_id_acl_stops_before_processing(secured: Secured) -> None:
    """The transactional ids cannot be asked about: the first InitProducerId (when partitions
    are assigned, before any record is processed) is refused, and the worker stops with the line."""
    s = secured.settings("worker", processing_guarantee="exactly_once", create_topics=False)
    admin = secured.as_user(s, "admin")
    create_topics(admin)
    secured.grant([acl for acl in worker_acls(s, "worker") if acl[1] != "TRANSACTIONAL_ID"])
    records, _ = recorded_records()
    asyncio.run(publish(admin, records))
    code, line = failing_worker(s)
    assert code == STARTUP_FAILED
    assert line == (
        f"chunkfold worker: not authorized: the ACLs deny WRITE on transactional id "
        f"{s.app_id}-{s.input_topic}-* (exactly_once: a PREFIXED ACL on that transactional id prefix)"
    )
    outputs = [s.events_topic, s.done_topic, s.deadletter_topic, f"{s.app_id}-state-changelog"]
    assert end_offsets(admin, outputs) == 0, "nothing written"
    assert committed_offsets(admin) == {}, "nothing consumed"
