#!/usr/bin/env python3
"""Local Apache Kafka 4.x KRaft brokers from Maven Central jars, no Docker.

CLI (run from anywhere; state lives in <repo>/.cache/kafka-run/cli):
    python deploy/kafka/kafka.py up       # start or reuse; last stdout line is 127.0.0.1:PORT
    python deploy/kafka/kafka.py status   # exit 0 and print the address if running and reachable
    python deploy/kafka/kafka.py down     # SIGTERM, then SIGKILL; idempotent
Env: CHUNKFOLD_KAFKA_PORT (default 19092, controller on PORT+1); KAFKA_BOOTSTRAP_SERVERS, if set, is printed by
`up`/`status` and nothing is started or stopped.

Python API (stdlib only; aiokafka is imported lazily for the readiness check):
    ensure_libs() -> Path
    Broker(port=0, cport=0, run_dir=None): start(), stop(), kill(), restart(), wait_ready(), close(), .bootstrap
    Cluster(size=3, port=0): start(), kill(i), stop(i), restart(i), wait_for_brokers(n), close(), .bootstrap
    make_tls(dir, clients) -> TlsFiles (needs `cryptography`); SecuredBroker(tls, users, admin_password):
    a Broker with ACLs, SASL_SSL/SCRAM-SHA-512 (.sasl_bootstrap) and mTLS (.mtls_bootstrap) listeners
    create_acls(bootstrap, [(principal, resource type, name, LITERAL|PREFIXED, operation), ...])
Port 0 picks free ports. Brokers started through the API are stopped at interpreter exit unless keep_running=True.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache"
LIBS = CACHE / "kafka-libs"
RUNS = CACHE / "kafka-run"
CLI_DIR = RUNS / "cli"
POM = HERE / "pom.xml"
LOG4J2 = HERE / "log4j2.properties"
SINGLE_TEMPLATE = HERE / "server.properties.in"
CLUSTER_TEMPLATE = HERE / "cluster-node.properties.in"

DEFAULT_PORT = 19092
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
JVM_OPTS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:TieredStopAtLevel=1",
)
"""Kafka's own launcher GC settings (G1, 20 ms pause goal) in a small heap. The serial
collector stopped the broker for 22-36 ms every ~3 s at 5,000 records/s on this 2-core
machine (G1: 8-13 ms every ~2 s), which showed up directly in every client's p99."""
TOOL_JVM_OPTS: tuple[str, ...] = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
MAIN_CLASS = "kafka.Kafka"

T = TypeVar("T")


class KafkaError(RuntimeError):
    """One-line reason in str(); the broker log tail, if any, in .log_tail."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def _say(message: str) -> None:
    print(f"kafka: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_libs() -> Path:
    """Copy the broker's runtime jars into .cache/kafka-libs once per pom.xml content; returns that folder."""
    stamp = hashlib.sha256(POM.read_bytes()).hexdigest()
    ok = LIBS / ".ok"
    if ok.is_file() and ok.read_text() == stamp:
        return LIBS
    with _locked(CACHE / "kafka-libs.lock"):
        if ok.is_file() and ok.read_text() == stamp:
            return LIBS
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaError("mvn not found on PATH (needed once to resolve the Kafka jars)")
        tmp = Path(tempfile.mkdtemp(prefix="kafka-libs.", dir=CACHE))
        _say(f"resolving Kafka jars with Maven into {LIBS} ...")
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            raise KafkaError(
                f"maven dependency resolution failed (exit {done.returncode})",
                "\n".join(done.stdout.splitlines()[-40:]),
            )
        shutil.rmtree(LIBS, ignore_errors=True)
        tmp.rename(LIBS)
        ok.write_text(stamp)
    return LIBS


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    exe = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not exe or not os.access(exe, os.X_OK):
        raise KafkaError("java not found (set JAVA_HOME or put java on PATH)")
    return exe


def free_ports(count: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def new_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _count_brokers(bootstrap: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
        return len(cluster["brokers"])
    finally:
        await admin.close()


def count_brokers(bootstrap: str) -> int:
    """Live brokers in the cluster's metadata (protocol-level round trip); raises if unreachable."""
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return _run_sync(lambda: _count_brokers(bootstrap))
    finally:
        quiet.setLevel(level)


def wait_for_brokers(bootstrap: str, want: int, timeout: float, watch: Iterable[Broker] = ()) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for broker in watch:
            if not broker.alive():
                code = broker.returncode
                raise KafkaError(
                    f"broker node {broker.node_id} exited during startup (exit {code})", broker.log_tail()
                )
        try:
            seen = count_brokers(bootstrap)
            if seen >= want:
                return
            last = f"{seen} of {want} brokers registered"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            tail = "\n".join(f"--- node {b.node_id}: {b.log_path}\n{b.log_tail(30)}" for b in watch)
            raise KafkaError(f"Kafka not ready at {bootstrap} after {timeout:.0f}s ({last})", tail)
        time.sleep(0.3)


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and marker.encode() in cmdline


_atexit_brokers: set[Broker] = set()


@atexit.register
def _stop_leftovers() -> None:
    leftovers = list(_atexit_brokers)
    for broker in leftovers:
        broker.signal(signal.SIGTERM)
    for broker in leftovers:
        broker.stop(timeout=10)
        if broker.owns_run_dir:
            shutil.rmtree(broker.run_dir, ignore_errors=True)


class Broker:
    """One KRaft node (broker+controller) with its own run_dir: server.properties, data/, broker.log, broker.pid."""

    def __init__(
        self,
        port: int = 0,
        cport: int = 0,
        run_dir: Path | None = None,
        *,
        node_id: int = 1,
        voters: str | None = None,
        template: Path = SINGLE_TEMPLATE,
        jvm_opts: Iterable[str] = JVM_OPTS,
        keep_running: bool = False,
    ) -> None:
        if not port or not cport:
            picked = iter(free_ports(2))
            port, cport = port or next(picked), cport or next(picked)
        self.port, self.cport, self.node_id = port, cport, node_id
        self.voters = voters or f"{node_id}@127.0.0.1:{cport}"
        self.template = template
        self.jvm_opts = tuple(jvm_opts)
        self.keep_running = keep_running
        self.owns_run_dir = run_dir is None
        self.run_dir = (
            run_dir or Path(tempfile.mkdtemp(prefix=f"broker-{port}-", dir=_mkdir(RUNS)))
        ).resolve()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def props(self) -> Path:
        return self.run_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "broker.log"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "broker.pid"

    @classmethod
    def attach(cls, run_dir: Path) -> Broker | None:
        """The broker a previous process started in run_dir, if it is still running."""
        try:
            pid = int((run_dir / "broker.pid").read_text())
            text = (run_dir / "server.properties").read_text()
        except (OSError, ValueError):
            return None
        ports = re.search(r"^listeners=PLAINTEXT://[^:]+:(\d+),CONTROLLER://[^:]+:(\d+)", text, re.M)
        node = re.search(r"^node\.id=(\d+)", text, re.M)
        if not ports or not node:
            return None
        broker = cls(int(ports[1]), int(ports[2]), run_dir, node_id=int(node[1]), keep_running=True)
        broker.pid = pid
        return broker if broker.alive() else None

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid, str(self.props))

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def template_values(self) -> dict[str, str]:
        """What ``configure`` fills into the template."""
        return {
            "@NODE_ID@": str(self.node_id),
            "@PORT@": str(self.port),
            "@CPORT@": str(self.cport),
            "@VOTERS@": self.voters,
            "@DATA@": str(self.data_dir),
        }

    def format_args(self) -> list[str]:
        """Extra StorageTool ``format`` arguments (none for a plain broker)."""
        return []

    def configure(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = self.template.read_text()
        for key, value in self.template_values().items():
            text = text.replace(key, value)
        self.props.write_text(text)

    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def format(self, cluster_id: str | None = None) -> subprocess.Popen[bytes]:
        """Start StorageTool format (static quorum); returns the process, see _check_format."""
        self.configure()
        cmd = [
            java(),
            *TOOL_JVM_OPTS,
            f"-Dlog4j2.configurationFile={LOG4J2}",
            "-cp",
            f"{ensure_libs()}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id or new_cluster_id(),
            "-c",
            str(self.props),
            *self.format_args(),
        ]
        with open(self.log_path, "ab") as out:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def _check_format(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.wait() != 0 or not self.formatted():
            raise KafkaError(
                f"StorageTool format failed for node {self.node_id} (exit {proc.returncode})", self.log_tail()
            )

    def launch(self) -> None:
        """Start the JVM in its own session without waiting for readiness; never formats."""
        if self.alive():
            return
        if not self.formatted():
            raise KafkaError(f"{self.data_dir} is not formatted")
        busy = [port for port in (self.port, self.cport) if port_in_use(port)]
        if busy:
            raise KafkaError(
                f"node {self.node_id}: 127.0.0.1 port(s) {busy} already in use by another process"
            )
        cmd = [
            java(),
            *self.jvm_opts,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2}",
            "-cp",
            f"{ensure_libs()}/*",
            MAIN_CLASS,
            str(self.props),
        ]
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self.pidfile.write_text(f"{self.pid}\n")
        if not self.keep_running:
            _atexit_brokers.add(self)

    def start(self, timeout: float = READY_TIMEOUT, cluster_id: str | None = None) -> str:
        """Format run_dir if needed, launch and wait until ready; returns the bootstrap address."""
        if not self.alive():
            if not self.formatted():
                self._check_format(self.format(cluster_id))
            self.launch()
        self._ready_or_kill(timeout)
        return self.bootstrap

    def restart(self, timeout: float = READY_TIMEOUT) -> str:
        """Stop if running, then start again on the same ports and data (no format)."""
        self.stop()
        self.launch()
        self._ready_or_kill(timeout)
        return self.bootstrap

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        wait_for_brokers(self.bootstrap, 1, timeout, watch=[self])

    def _ready_or_kill(self, timeout: float) -> None:
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def signal(self, sig: signal.Signals) -> None:
        if self.alive() and self.pid is not None:
            os.kill(self.pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful SIGTERM, SIGKILL after timeout seconds."""
        self.signal(signal.SIGTERM)
        if not self._wait_exit(timeout):
            self.kill()
        self._forget()

    def kill(self) -> None:
        """Crash the node (SIGKILL)."""
        self.signal(signal.SIGKILL)
        self._wait_exit(10)
        self._forget()

    def _forget(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        _atexit_brokers.discard(self)

    def close(self) -> None:
        """Stop and delete run_dir."""
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Cluster:
    """size combined KRaft nodes (ids 1..size) sharing one quorum. port=0: free ports; else node i uses
    i*10000+port for PLAINTEXT and the next port for CONTROLLER (port=9092 -> 19092/19093, 29092/29093, ...)."""

    def __init__(
        self, size: int = 3, port: int = 0, run_dir: Path | None = None, jvm_opts: Iterable[str] = JVM_OPTS
    ) -> None:
        if port:
            ports = [(i * 10000 + port, i * 10000 + port + 1) for i in range(1, size + 1)]
        else:
            flat = free_ports(2 * size)
            ports = list(zip(flat[::2], flat[1::2], strict=True))
        self.run_dir = (run_dir or Path(tempfile.mkdtemp(prefix="cluster-", dir=_mkdir(RUNS)))).resolve()
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, 1))
        self.nodes: dict[int, Broker] = {
            i: Broker(
                p,
                c,
                self.run_dir / f"node{i}",
                node_id=i,
                voters=voters,
                template=CLUSTER_TEMPLATE,
                jvm_opts=jvm_opts,
            )
            for i, (p, c) in enumerate(ports, 1)
        }

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    def node(self, node_id: int) -> Broker:
        return self.nodes[node_id]

    def start(self, timeout: float = 180.0) -> str:
        """Format every node with one cluster id, launch all together and wait for all brokers."""
        cluster_id = new_cluster_id()
        pending = [(node, node.format(cluster_id)) for node in self.nodes.values() if not node.formatted()]
        for node, proc in pending:
            node._check_format(proc)
        try:
            for node in self.nodes.values():
                node.launch()
            self.wait_for_brokers(len(self.nodes), timeout)
        except BaseException:
            self.stop_all(timeout=5)
            raise
        return self.bootstrap

    def wait_for_brokers(self, count: int, timeout: float = READY_TIMEOUT) -> None:
        wait_for_brokers(self.bootstrap, count, timeout, watch=[n for n in self.nodes.values() if n.alive()])

    def kill(self, node_id: int) -> None:
        self.nodes[node_id].kill()

    def stop(self, node_id: int, timeout: float = STOP_TIMEOUT) -> None:
        self.nodes[node_id].stop(timeout)

    def restart(self, node_id: int, timeout: float = READY_TIMEOUT) -> None:
        """Start a stopped or killed node again on its existing data (no format) and wait until it serves."""
        self.nodes[node_id].restart(timeout)

    def stop_all(self, timeout: float = 15.0) -> None:
        """Graceful stop of every node (about 6 s: the last Raft leader times out waiting for its peers)."""
        for node in self.nodes.values():
            node.signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop(timeout)

    def close(self) -> None:
        """SIGKILL every node and delete run_dir (no graceful shutdown: the data goes anyway)."""
        for node in self.nodes.values():
            node.signal(signal.SIGKILL)
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


SECURED_TEMPLATE = HERE / "secured-server.properties.in"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SUPER_USER = "admin"


class TlsFiles:
    """The PEM files ``make_tls`` writes into ``directory``: a CA, the broker's key and chain
    (``broker.pem``, what the broker's PEM keystore reads), a key and certificate per client (the
    certificate's CN is the client's name, its principal on the mTLS listener) and a second,
    unrelated CA (``other-ca.pem``) whose trust fails the handshake."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def other_ca(self) -> Path:
        return self.directory / "other-ca.pem"

    @property
    def broker(self) -> Path:
        return self.directory / "broker.pem"

    def client_cert(self, name: str) -> Path:
        return self.directory / f"client-{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.directory / f"client-{name}.key"


def make_tls(directory: Path, clients: Iterable[str] = ()) -> TlsFiles:
    """Generate a CA, a broker certificate for 127.0.0.1 and localhost, and a client certificate
    per name in ``clients`` (CN=name), as PEM files in ``directory``. Needs the ``cryptography``
    package (the test extra), imported here only."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def pem_cert(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    def authority(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    ca_key, ca_cert = authority("chunkfold test CA")
    _, other_cert = authority("chunkfold unrelated CA")

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return pem_key(k), pem_cert(builder.sign(ca_key, hashes.SHA256()))

    import ipaddress

    files = TlsFiles(directory)
    files.ca.write_bytes(pem_cert(ca_cert))
    files.other_ca.write_bytes(pem_cert(other_cert))
    broker_key, broker_cert = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    files.broker.write_bytes(broker_key + broker_cert + pem_cert(ca_cert))
    for client in clients:
        client_key, client_cert = leaf(client, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        files.client_key(client).write_bytes(client_key)
        files.client_cert(client).write_bytes(client_cert)
    for path in directory.iterdir():
        path.chmod(0o600)
    return files


class SecuredBroker(Broker):
    """A single KRaft node (``secured-server.properties.in``) with ACLs (``StandardAuthorizer``,
    nothing allowed without one), a SASL_SSL listener with SCRAM-SHA-512 (``sasl_bootstrap``) and
    an SSL listener that requires a client certificate (``mtls_bootstrap``). ``users`` are the
    SCRAM users (name: password), created when the storage is formatted; ``admin`` (password
    ``admin_password``) is a super user. The PLAINTEXT listener (``bootstrap``, loopback) serves
    inter-broker traffic, the readiness check and ``create_acls``: there the principal is
    ``ANONYMOUS``, a super user too. ``tls`` holds the PEM files (``make_tls``)."""

    def __init__(
        self,
        tls: TlsFiles,
        users: dict[str, str],
        admin_password: str,
        run_dir: Path | None = None,
        **options: Any,
    ) -> None:
        port, cport, self.sasl_port, self.mtls_port = free_ports(4)
        super().__init__(port, cport, run_dir, template=SECURED_TEMPLATE, **options)
        self.tls = tls
        self.users = {**users, SUPER_USER: admin_password}

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def mtls_bootstrap(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    def template_values(self) -> dict[str, str]:
        return {
            **super().template_values(),
            "@SASL_PORT@": str(self.sasl_port),
            "@MTLS_PORT@": str(self.mtls_port),
            "@TLS@": str(self.tls.directory),
        }

    def format_args(self) -> list[str]:
        args: list[str] = []
        for user, password in self.users.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", user + password):
                raise KafkaError(f"SCRAM user {user!r}: names and passwords are [A-Za-z0-9_.-] here")
            args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        return args


ACL_RESOURCE_TYPES = {"TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
ACL_PATTERN_TYPES = {"LITERAL": 3, "PREFIXED": 4}
ACL_OPERATIONS = {
    "ALL": 2,
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "ALTER": 7,
    "DESCRIBE": 8,
    "CLUSTER_ACTION": 9,
    "DESCRIBE_CONFIGS": 10,
    "ALTER_CONFIGS": 11,
    "IDEMPOTENT_WRITE": 12,
}
ALLOW = 3


async def _create_acls(bootstrap: str, acls: list[tuple[str, str, str, str, str]]) -> None:
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        node = client.get_random_node()
        for principal, resource_type, resource, pattern, operation in acls:
            response = await client.send(
                node,
                CreateAclsRequest(
                    ACL_RESOURCE_TYPES[resource_type],
                    resource,
                    ACL_PATTERN_TYPES[pattern],
                    principal,
                    "*",
                    ACL_OPERATIONS[operation],
                    ALLOW,
                ),
            )
            for error_code, message in response.creation_responses:
                if error_code:
                    raise KafkaError(
                        f"CreateAcls {operation} {resource_type}:{resource}: {error_code} {message}"
                    )
        # The broker answers once the controller committed them; wait until its authorizer has them.
        deadline = time.monotonic() + 30
        principals = {acl[0] for acl in acls}
        while True:
            seen = 0
            for principal in principals:
                response = await client.send(node, DescribeAclsRequest(1, None, 1, principal, None, 1, 1))
                seen += sum(len(resource[-1]) for resource in response.resources)
            if seen >= len(acls) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def create_acls(bootstrap: str, acls: Iterable[tuple[str, str, str, str, str]]) -> None:
    """Allow each ``(principal, resource type, resource name, pattern type, operation)`` from any
    host, e.g. ``("User:worker", "TOPIC", "completion-done", "LITERAL", "WRITE")``; through
    ``bootstrap``, a listener whose principal may (a super user's: a ``SecuredBroker``'s
    ``bootstrap``). Returns once the broker's authorizer has them."""
    acls = list(acls)
    for _, resource_type, _, pattern, operation in acls:
        if resource_type not in ACL_RESOURCE_TYPES or pattern not in ACL_PATTERN_TYPES:
            raise KafkaError(f"unknown ACL resource type or pattern {resource_type} {pattern}")
        if operation not in ACL_OPERATIONS:
            raise KafkaError(f"unknown ACL operation {operation}")
    _run_sync(lambda: _create_acls(bootstrap, acls))


def _cli_up() -> int:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        _say("KAFKA_BOOTSTRAP_SERVERS is set; starting nothing")
        print(external)
        return 0
    port = int(os.environ.get("CHUNKFOLD_KAFKA_PORT", DEFAULT_PORT))
    with _locked(RUNS / "cli.lock"):
        running = Broker.attach(CLI_DIR)
        if running is not None and running.port == port:
            try:
                running.wait_ready(15)
                _say(f"already running (pid {running.pid})")
                print(running.bootstrap)
                return 0
            except KafkaError as exc:
                _say(f"running broker is not answering ({exc}); restarting it")
        if running is not None:
            running.stop()
        ensure_libs()
        shutil.rmtree(CLI_DIR, ignore_errors=True)
        broker = Broker(port, port + 1, CLI_DIR, keep_running=True)
        began = time.monotonic()
        _say(f"formatting {broker.data_dir} and starting broker on {broker.bootstrap} ...")
        broker.start()
        _say(f"ready in {time.monotonic() - began:.1f}s (pid {broker.pid}, log {broker.log_path})")
        print(broker.bootstrap)
        return 0


def _cli_down() -> int:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        _say("KAFKA_BOOTSTRAP_SERVERS is set; nothing to stop")
        return 0
    with _locked(RUNS / "cli.lock"):
        running = Broker.attach(CLI_DIR)
        if running is None:
            (CLI_DIR / "broker.pid").unlink(missing_ok=True)
            _say("not running")
            return 0
        _say(f"stopping pid {running.pid} ...")
        running.stop()
        _say("stopped")
        return 0


def _cli_status() -> int:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        print(external)
        return 0
    running = Broker.attach(CLI_DIR)
    if running is None:
        _say("not running")
        return 1
    try:
        brokers = count_brokers(running.bootstrap)
    except Exception as exc:
        _say(f"pid {running.pid} running but not reachable: {type(exc).__name__}: {exc}")
        return 1
    _say(f"running (pid {running.pid}, {brokers} broker(s), log {running.log_path})")
    print(running.bootstrap)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local single-node Kafka KRaft broker for chunkfold.")
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[], int]] = {"up": _cli_up, "down": _cli_down, "status": _cli_status}
    try:
        return commands[args.command]()
    except KafkaError as exc:
        if exc.log_tail:
            print(exc.log_tail, file=sys.stderr)
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
