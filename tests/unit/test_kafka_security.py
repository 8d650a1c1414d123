"""The Kafka security settings and what they become: aiokafka's client options, Faust's
``broker_credentials``, one-line errors, and secrets that never show."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from chunkfold.config import OTHER_VARIABLES, Settings, SettingsError
from chunkfold.kafka_checks import StartupError, TopicAccess, check_access, describe_failure
from chunkfold.kafka_security import FileTokenProvider, client_options, faust_options

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55word"


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*(Settings.env_name(name) for name in Settings.model_fields), *OTHER_VARIABLES]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> object:
    from tests.conftest import kafka_module

    return kafka_module().make_tls(tmp_path_factory.mktemp("tls"), ["client"])


def sasl(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "bootstrap_servers": "broker:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "worker",
    }
    return Settings(**{**base, **overrides})


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    settings = Settings()
    assert (settings.security_protocol, settings.ssl_check_hostname, settings.create_topics) == (
        "PLAINTEXT",
        True,
        True,
    )
    assert client_options(settings) == {"security_protocol": "PLAINTEXT"}


def test_secrets_never_show_in_a_repr_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sasl(sasl_password=SECRET, ssl_key_password=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert settings.sasl_password is not None and settings.sasl_password.get_secret_value() == SECRET
    monkeypatch.setenv("CHUNKFOLD_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CHUNKFOLD_SASL_USERNAME", "worker")
    monkeypatch.setenv("CHUNKFOLD_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("CHUNKFOLD_SASL_PASSWORD_FILE", "/run/secrets/password")
    with pytest.raises(SettingsError) as refused:
        Settings.from_env()
    assert str(refused.value) == (
        "set one of CHUNKFOLD_SASL_PASSWORD and CHUNKFOLD_SASL_PASSWORD_FILE, not both"
    )
    assert SECRET not in str(refused.value)


def test_sasl_scram_with_a_password_file(tmp_path: Path, tls: object) -> None:
    password = tmp_path / "password"
    password.write_text(SECRET + "\n")  # a trailing newline, as `kubectl create secret --from-file` keeps
    options = client_options(sasl(sasl_password_file=str(password), ssl_cafile=str(tls.ca)))  # type: ignore[attr-defined]
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": SECRET,
    }


def test_sasl_plaintext_plain_takes_the_password_from_the_environment() -> None:
    options = client_options(
        sasl(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_password=SECRET)
    )
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "worker",
        "sasl_plain_password": SECRET,
    }


def test_mutual_tls_loads_the_client_certificate(tls: object) -> None:
    settings = Settings(
        security_protocol="SSL",
        ssl_cafile=str(tls.ca),  # type: ignore[attr-defined]
        ssl_certfile=str(tls.client_cert("client")),  # type: ignore[attr-defined]
        ssl_keyfile=str(tls.client_key("client")),  # type: ignore[attr-defined]
        ssl_check_hostname=False,
    )
    options = client_options(settings)
    assert set(options) == {"security_protocol", "ssl_context"}
    assert options["security_protocol"] == "SSL"
    assert options["ssl_context"].check_hostname is False
    # the key does not belong to the certificate: refused in one line, naming no secret
    wrong = settings.model_copy(update={"ssl_keyfile": str(tls.broker)})  # type: ignore[attr-defined]
    with pytest.raises(SettingsError, match=r"^the TLS files cannot be used: "):
        client_options(wrong)


def test_oauthbearer_reads_the_token_file_at_every_authentication(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    settings = sasl(sasl_mechanism="OAUTHBEARER", sasl_username="", sasl_oauth_token_file=str(token))
    options = client_options(settings)
    provider = options["sasl_oauth_token_provider"]
    assert isinstance(provider, FileTokenProvider)
    assert options["sasl_mechanism"] == "OAUTHBEARER" and "sasl_plain_password" not in options
    assert asyncio.run(provider.token()) == "first"
    token.write_text("refreshed")
    assert asyncio.run(provider.token()) == "refreshed"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sasl_username": ""}, "SASL_SSL with SCRAM-SHA-512 needs CHUNKFOLD_SASL_USERNAME and "),
        ({}, "SASL_SSL with SCRAM-SHA-512 needs CHUNKFOLD_SASL_USERNAME and CHUNKFOLD_SASL_PASSWORD or "),
        ({"sasl_mechanism": "OAUTHBEARER"}, "OAUTHBEARER needs CHUNKFOLD_SASL_OAUTH_TOKEN_FILE"),
        (
            {"sasl_password": "x", "ssl_keyfile": "k.pem"},
            "CHUNKFOLD_SSL_KEYFILE needs CHUNKFOLD_SSL_CERTFILE",
        ),
        ({"sasl_mechanism": "GSSAPI", "sasl_password": "x"}, "sasl_mechanism='GSSAPI': Input should be "),
    ],
)
def test_incomplete_or_contradicting_security_settings_are_one_line(
    overrides: dict[str, object], message: str
) -> None:
    given: dict[str, object] = {
        "bootstrap_servers": "b:1",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "worker",
        **overrides,
    }
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(**given)
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_an_unreadable_secret_file_is_one_line_naming_its_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SettingsError) as refused:
        client_options(sasl(security_protocol="SASL_PLAINTEXT", sasl_password_file=str(missing)))
    assert (
        str(refused.value)
        == f"CHUNKFOLD_SASL_PASSWORD_FILE={str(missing)!r}: cannot read it (No such file or directory)"
    )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="the file is empty"):
        client_options(sasl(security_protocol="SASL_PLAINTEXT", sasl_password_file=str(empty)))
    with pytest.raises(SettingsError, match=r"^CHUNKFOLD_SSL_CAFILE="):
        client_options(sasl(sasl_password="x", ssl_cafile=str(missing)))


def test_faust_gets_the_same_credentials(tmp_path: Path, tls: object) -> None:
    from faust.auth import SASLCredentials, SSLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = sasl(sasl_password=SECRET, ssl_cafile=str(tls.ca))  # type: ignore[attr-defined]
    credentials = faust_options(settings)["broker_credentials"]
    assert isinstance(credentials, SASLCredentials)
    mapped = credentials_to_aiokafka_auth(credentials)
    assert mapped["security_protocol"] == "SASL_SSL"
    assert (mapped["sasl_mechanism"], mapped["sasl_plain_username"], mapped["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "worker",
        SECRET,
    )
    assert isinstance(mapped["ssl_context"], ssl.SSLContext)
    assert SECRET not in repr(credentials)
    mtls = Settings(security_protocol="SSL", ssl_cafile=str(tls.ca))  # type: ignore[attr-defined]
    ssl_credentials = faust_options(mtls)["broker_credentials"]
    assert isinstance(ssl_credentials, SSLCredentials)
    assert credentials_to_aiokafka_auth(ssl_credentials)["security_protocol"] == "SSL"
    assert faust_options(Settings()) == {}


def test_the_faust_app_declares_no_topic_when_creation_is_off() -> None:
    from chunkfold.drivers.faust import create_app
    from chunkfold.drivers.partitions import KeyPartitions
    from chunkfold.kafka_io import KafkaClients

    settings = Settings(bootstrap_servers="127.0.0.1:1", create_topics=False, web_port=0)
    app, _ = create_app(settings, KeyPartitions(), KafkaClients.of(settings))
    assert app.conf.topic_allow_declare is False
    assert app.conf.topic_disable_leader is True


def test_check_access_names_missing_topics_and_denied_operations() -> None:
    ok = TopicAccess(exists=True, described=True, partitions=2, allowed=frozenset({"READ", "DESCRIBE"}))
    hidden = TopicAccess(exists=False, described=False, partitions=0, allowed=None)
    absent = TopicAccess(exists=False, described=True, partitions=0, allowed=None)
    check_access({"in": ok}, {"in": ["READ", "DESCRIBE"]}, create_topics=False)
    with pytest.raises(StartupError) as refused:
        check_access(
            {"in": ok, "out": hidden},
            {"in": ["READ", "DESCRIBE_CONFIGS"], "out": ["WRITE"]},
            create_topics=True,
        )
    assert (
        str(refused.value) == "not authorized: the ACLs deny WRITE on topic out; DESCRIBE_CONFIGS on topic in"
    )
    with pytest.raises(StartupError, match=r"^missing topic\(s\) a, b \(CHUNKFOLD_CREATE_TOPICS=false"):
        check_access({"b": absent, "a": absent}, {"b": ["READ"], "a": ["READ"]}, create_topics=False)


def test_failures_are_described_without_secrets() -> None:
    from aiokafka import errors

    settings = sasl(sasl_password=SECRET)
    line = describe_failure(errors.SaslAuthenticationFailed("bad"), settings)
    assert (
        line
        == "authentication failed as worker with SCRAM-SHA-512: check CHUNKFOLD_SASL_USERNAME and the password"
    )
    wrapped = errors.KafkaConnectionError("Unable to bootstrap")
    wrapped.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert (describe_failure(wrapped, settings) or "").startswith(
        "TLS: the broker's certificate is not trusted"
    )
    eos = settings.model_copy(update={"app_id": "app", "input_topic": "in"})
    assert describe_failure(errors.TransactionalIdAuthorizationFailed(), eos) == (
        "not authorized: the ACLs deny WRITE on transactional id app-in-* "
        "(exactly_once: a PREFIXED ACL on that transactional id prefix)"
    )
    assert describe_failure(ValueError("other"), settings) is None


def test_the_worker_command_exits_2_with_one_line_for_an_unreadable_password_file(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "CHUNKFOLD_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CHUNKFOLD_SASL_USERNAME": "worker",
        "CHUNKFOLD_SASL_PASSWORD_FILE": str(tmp_path / "missing"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "chunkfold.cli", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"chunkfold worker: CHUNKFOLD_SASL_PASSWORD_FILE={str(tmp_path / 'missing')!r}: "
        "cannot read it (No such file or directory)"
    )


def test_no_secret_is_logged_by_the_clients(caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka logs its clients' configuration at debug level; the password must not be in it."""
    from chunkfold.kafka_io import KafkaClients

    caplog.set_level(logging.DEBUG)
    kafka = KafkaClients.of(sasl(security_protocol="SASL_PLAINTEXT", sasl_password=SECRET))
    assert SECRET not in repr(kafka)

    async def build() -> None:
        producer = kafka.producer()
        consumer = kafka.consumer("t", group_id=None)
        await consumer.stop()
        del producer

    asyncio.run(build())
    assert SECRET not in caplog.text
