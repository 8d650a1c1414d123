"""Settings shared by every command: topic names, partitions, timeouts, limits.

Each setting reads ``CHUNKFOLD_<NAME>`` from the environment (``bootstrap_servers`` reads
``KAFKA_BOOTSTRAP_SERVERS``); CLI flags override it. The environment is read by
``Settings.from_env`` only: ``Settings(partitions=1)`` is exactly its arguments over the defaults.
A value that does not parse, or a ``CHUNKFOLD_`` variable that names no setting (a typo would
otherwise be ignored silently), is a ``SettingsError`` with a one-line message.

The Kafka security settings (``security_protocol``, ``ssl_*``, ``sasl_*``) are turned into the
clients' options by ``chunkfold.kafka_security``; secrets are ``SecretStr`` (shown as
``**********`` in a repr, a log line or an error) and can come from files instead.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "CHUNKFOLD_"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
OTHER_VARIABLES = frozenset({"CHUNKFOLD_KAFKA_PORT"})
"""``CHUNKFOLD_`` variables that are no settings but no typos either: read by other tools of the
project (the development broker's port, ``deploy/kafka/kafka.py``)."""

Driver = Literal["direct", "faust"]
ProcessingGuarantee = Literal["at_least_once", "exactly_once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
SECRETS = frozenset({"sasl_password", "ssl_key_password"})
"""Settings whose values are never shown, not even in an error about them."""


class SettingsError(ValueError):
    """The environment or an override holds a value no setting accepts; the message is one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    bootstrap_servers: str = Field(default_factory=lambda: os.environ.get(BOOTSTRAP_ENV, ""))
    """``host:port[,host:port]`` of the Kafka brokers: ``KAFKA_BOOTSTRAP_SERVERS``, the name
    Kafka tools share (``CHUNKFOLD_BOOTSTRAP_SERVERS`` is refused, so only it is read)."""
    app_id: str = "chunkfold"
    driver: Driver = "direct"
    processing_guarantee: ProcessingGuarantee = "at_least_once"
    """``at_least_once`` (idempotent, de-duplicable outputs) or ``exactly_once`` (direct driver:
    Kafka transactions; consumers read with ``isolation.level=read_committed``)."""
    input_topic: str = "completion-chunks"
    events_topic: str = "completion-events"
    done_topic: str = "completion-done"
    deadletter_topic: str = "completion-deadletter"
    partitions: int = 8
    replication_factor: int = 1
    idle_timeout_s: float = 600.0
    tombstone_s: float = 600.0
    commit_interval_s: float = 1.0
    max_record_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 20
    """The largest output record: topics chunkfold creates get this ``max.message.bytes``; an
    existing output topic with a lower limit lowers it for that topic. Larger values are cut to
    fit (the size policy, ``chunkfold.core.fit``)."""
    max_clock_skew_s: float = 10.0
    """How far ahead of this worker's clock a record timestamp may move stream time."""
    store: str = "memory://"
    data_dir: str = ".cache/chunkfold-data"
    snapshots: bool = False
    partial_parse: bool = False
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    """The address the metrics and health server listens on (both drivers). Loopback by
    default, so a worker run on a host shares nothing; the container image sets ``0.0.0.0``,
    where probes and Prometheus reach it through the pod's or container's own address."""

    create_topics: bool = True
    """Create missing topics (input, outputs, state changelog). ``false``: never ask for
    ``CreateTopics``; every topic must exist, and the worker refuses to start when one is missing."""

    security_protocol: SecurityProtocol = "PLAINTEXT"
    """Kafka's ``security.protocol`` for every client chunkfold creates."""
    ssl_cafile: str = ""
    """PEM file of the CA(s) that signed the brokers' certificates; empty: the system's CAs."""
    ssl_certfile: str = ""
    """PEM client certificate (mutual TLS), optionally with its key."""
    ssl_keyfile: str = ""
    """PEM private key of ``ssl_certfile`` when that file does not hold it."""
    ssl_key_password: SecretStr | None = None
    """Password of an encrypted ``ssl_keyfile`` (or ``ssl_key_password_file``)."""
    ssl_key_password_file: str = ""
    ssl_check_hostname: bool = True
    """Check that a broker's certificate names the host connected to (leave on)."""
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str = ""
    sasl_password: SecretStr | None = None
    """The SASL password; or ``sasl_password_file`` (a mounted Secret), not both."""
    sasl_password_file: str = ""
    sasl_oauth_token_file: str = ""
    """OAUTHBEARER: a file holding the current access token, read again for every
    authentication (a sidecar or the platform refreshes it)."""

    @field_validator("snapshots", "partial_parse", mode="before")
    @classmethod
    def _strip_flag(cls, value: Any) -> Any:
        """Blanks around a flag's value are ignored, as they always were (``" true "`` is true)."""
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        """Settings that contradict each other, or that a protocol needs and lacks."""
        for secret, file in (
            ("sasl_password", "sasl_password_file"),
            ("ssl_key_password", "ssl_key_password_file"),
        ):
            if getattr(self, secret) is not None and getattr(self, file):
                raise ValueError(f"set one of {self.env_name(secret)} and {self.env_name(file)}, not both")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError(f"{self.env_name('ssl_keyfile')} needs {self.env_name('ssl_certfile')}")
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism == "OAUTHBEARER":
                if not self.sasl_oauth_token_file:
                    raise ValueError(f"OAUTHBEARER needs {self.env_name('sasl_oauth_token_file')}")
            elif not self.sasl_username or (self.sasl_password is None and not self.sasl_password_file):
                raise ValueError(
                    f"{self.security_protocol} with {self.sasl_mechanism} needs {self.env_name('sasl_username')} "
                    f"and {self.env_name('sasl_password')} or {self.env_name('sasl_password_file')}"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Construction takes its arguments only, so that a test's ``Settings(...)`` never
        depends on the environment it runs in; ``from_env`` reads the environment."""
        return (init_settings,)

    @classmethod
    def env_name(cls, name: str) -> str:
        """The environment variable of setting ``name``."""
        return BOOTSTRAP_ENV if name == "bootstrap_servers" else f"{ENV_PREFIX}{name.upper()}"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """The environment's settings with ``overrides`` on top (``None`` overrides nothing).

        Raises ``SettingsError`` for an unknown ``CHUNKFOLD_`` variable or a value that does not parse.
        """
        known = OTHER_VARIABLES | {cls.env_name(name) for name in cls.model_fields}
        unknown = sorted(
            name for name in os.environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
        )
        if unknown:
            raise SettingsError(f"{', '.join(unknown)}: no such setting (see README, Configuration)")
        given = {name: value for name, value in overrides.items() if value is not None}
        environment = EnvSettingsSource(cls)()
        try:
            return cls(**{**environment, **given})
        except ValidationError as exc:
            raise SettingsError(_describe(exc, given)) from None


def check_environment() -> None:
    """Raise ``SettingsError`` unless the environment's settings are all valid."""
    Settings.from_env()


def _describe(exc: ValidationError, overrides: dict[str, Any]) -> str:
    """One line naming each value that failed: its variable, or the override's name."""
    problems = []
    for error in exc.errors(include_url=False):
        if not error["loc"]:  # a check of several settings (its input is all of them: not shown)
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        name = str(error["loc"][0])
        where = name if name in overrides else Settings.env_name(name)
        shown = "(secret)" if name in SECRETS else repr(error["input"])
        problems.append(f"{where}={shown}: {error['msg']}")
    return "; ".join(problems)
