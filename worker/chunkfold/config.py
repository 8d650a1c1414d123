"""Settings shared by every command: topic names, partitions, timeouts, limits.

Each setting reads ``CHUNKFOLD_<NAME>`` from the environment (``bootstrap_servers`` reads
``KAFKA_BOOTSTRAP_SERVERS``); CLI flags override it. The environment is read by
``Settings.from_env`` only: ``Settings(partitions=1)`` is exactly its arguments over the defaults.
A value that does not parse, or a ``CHUNKFOLD_`` variable that names no setting (a typo would
otherwise be ignored silently), is a ``SettingsError`` with a one-line message.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "CHUNKFOLD_"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
OTHER_VARIABLES = frozenset({"CHUNKFOLD_KAFKA_PORT"})
"""``CHUNKFOLD_`` variables that are no settings but no typos either: read by other tools of the
project (the development broker's port, ``deploy/kafka/kafka.py``)."""

Driver = Literal["direct", "faust"]
ProcessingGuarantee = Literal["at_least_once", "exactly_once"]


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

    @field_validator("snapshots", "partial_parse", mode="before")
    @classmethod
    def _strip_flag(cls, value: Any) -> Any:
        """Blanks around a flag's value are ignored, as they always were (``" true "`` is true)."""
        return value.strip() if isinstance(value, str) else value

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
        name = str(error["loc"][0]) if error["loc"] else ""
        where = name if name in overrides else Settings.env_name(name)
        problems.append(f"{where}={error['input']!r}: {error['msg']}")
    return "; ".join(problems)
