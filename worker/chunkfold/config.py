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
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from chunkfold.core.fit import MIN_OUTPUT_BYTES

ENV_PREFIX = "CHUNKFOLD_"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
OTHER_VARIABLES = frozenset({"CHUNKFOLD_KAFKA_PORT", "CHUNKFOLD_QUERY_URL"})
"""``CHUNKFOLD_`` variables that are no settings but no typos either: read by other tools of the
project (the development broker's port, ``deploy/kafka/kafka.py``; the query listener
``chunkfold watch`` asks when no ``--url`` is given)."""

Driver = Literal["direct", "faust"]
ProcessingGuarantee = Literal["at_least_once", "exactly_once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
SECRETS = frozenset({"sasl_password", "ssl_key_password", "query_token"})
"""Settings whose values are never shown, not even in an error about them."""


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
"""Bind addresses that name every interface, none another host could connect to."""


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
    max_message_bytes: int = Field(1 << 20, ge=MIN_OUTPUT_BYTES)
    """The largest output record: topics chunkfold creates get this ``max.message.bytes``; an
    existing output topic with a lower limit lowers it for that topic. Larger values are cut to
    fit (the size policy, ``chunkfold.core.fit``). At least ``MIN_OUTPUT_BYTES`` (16 KiB)."""
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

    query_port: int = Field(default=0, ge=0, le=65535)
    """The query listener's port (live completion snapshots and event resume,
    ``chunkfold.query``); 0, the default, runs no query listener. Never the metrics port."""
    query_host: str = "127.0.0.1"
    """The address the query listener binds to: loopback by default."""
    query_advertised_url: str = ""
    """``http(s)://host:port`` at which the other members of the group reach this worker's query
    listener (what they forward to); empty: ``http://<query_host>:<query_port>``."""
    query_token: SecretStr | None = None
    """A bearer token every query must carry (``Authorization: Bearer <token>``); or
    ``query_token_file``, not both. None: the listener answers anyone who reaches it."""
    query_token_file: Path | None = None

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
        self._check_query()
        return self

    def _check_query(self) -> None:
        """The query listener's settings: its address is one the other members can reach, and
        its token can be read."""
        if self.query_token is not None and self.query_token_file is not None:
            raise ValueError(
                f"set one of {self.env_name('query_token')} and {self.env_name('query_token_file')}, not both"
            )
        if self.query_token is not None and not self.query_token.get_secret_value().strip():
            raise ValueError(f"{self.env_name('query_token')} is empty")
        if self.query_token_file is not None:
            self.query_bearer_token()
        if self.query_advertised_url:
            parts = urlsplit(self.query_advertised_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(
                    f"{self.env_name('query_advertised_url')}={self.query_advertised_url!r}: "
                    "not an http(s)://host:port URL"
                )
        if self.query_port == 0:
            return
        if self.query_port == self.web_port:
            raise ValueError(
                f"{self.env_name('query_port')} and {self.env_name('web_port')} are both {self.query_port}: "
                "the query listener is separate from the metrics one"
            )
        if not self.query_advertised_url and self.query_host in WILDCARD_HOSTS:
            raise ValueError(
                f"{self.env_name('query_host')}={self.query_host!r} is no address other members can reach: "
                f"set {self.env_name('query_advertised_url')}"
            )

    def query_url(self) -> str:
        """Where the other members reach this worker's query listener (no trailing slash)."""
        host = f"[{self.query_host}]" if ":" in self.query_host else self.query_host
        return (self.query_advertised_url or f"http://{host}:{self.query_port}").rstrip("/")

    def query_bearer_token(self) -> str | None:
        """The token queries must carry, read from ``query_token_file`` (again on every call)
        when that is set; None when no token is required. Raises ``SettingsError`` (one line)
        for a file that cannot be read or is empty."""
        if self.query_token is not None:
            return self.query_token.get_secret_value().strip()
        if self.query_token_file is None:
            return None
        setting = f"{self.env_name('query_token_file')}={str(self.query_token_file)!r}"
        try:
            token = self.query_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise SettingsError(f"{setting}: cannot read it ({reason})") from None
        if not token:
            raise SettingsError(f"{setting}: the file is empty")
        return token

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
