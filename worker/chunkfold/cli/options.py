"""What the ``chunkfold`` commands share: each option defined once, and the settings they override.

An option that overrides a setting stores under the setting's name (``--idle-timeout`` as
``idle_timeout_s``) and defaults to ``None``, "not given": ``settings(args)`` then lays every
given value over the environment's settings. Command modules call these helpers from their
``register(subcommands)``; ``UsageError`` is how a command reports bad input (one line, exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, TypeAlias

from chunkfold.config import Settings

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns: each command module's ``register`` adds its parser to it
(for annotations only: the class is not subscriptable at run time)."""

TopicSetting = Literal["input_topic", "events_topic", "done_topic", "deadletter_topic"]
LOG_FORMATS = ("json", "text")


class UsageError(Exception):
    """A problem with the command's input or arguments; printed as one line."""


def default(name: str) -> Any:
    """The default of setting ``name`` (for help texts)."""
    return Settings.model_fields[name].default


def add_bootstrap_servers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)"
    )


def add_topic(parser: argparse.ArgumentParser, setting: TopicSetting, flag: str = "", what: str = "") -> None:
    """``--<setting>`` (``--done-topic``), or ``flag``, overriding the topic setting ``setting``;
    ``what`` says what the command does with the topic."""
    name = flag or "--" + setting.replace("_", "-")
    label = f"{what} " if what else ""
    parser.add_argument(name, dest=setting, metavar="TOPIC", help=f"{label}(default {default(setting)})")


def add_partitions(parser: argparse.ArgumentParser, what: str) -> None:
    """``--partitions``: ``what`` says which topics get them."""
    parser.add_argument("--partitions", type=int, help=f"{what} (default {default('partitions')})")


def add_delta_extras(parser: argparse.ArgumentParser, scope: str = "") -> None:
    """``--snapshots`` and ``--partial-parse``; ``scope`` prefixes their help (where they apply)."""
    parser.add_argument(
        "--snapshots", action="store_true", default=None, help=f"{scope}snapshots on delta events"
    )
    parser.add_argument(
        "--partial-parse", action="store_true", default=None, help=f"{scope}partial parses on delta events"
    )


def add_logging(parser: argparse.ArgumentParser) -> None:
    """``--loglevel`` and ``--log-format`` (read by ``chunkfold.logs.logging_config``)."""
    parser.add_argument("--loglevel", default="info")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="json", help="log lines as JSON (default) or text"
    )


def settings(args: argparse.Namespace) -> Settings:
    """The environment's settings with every setting option given in ``args`` on top.

    Raises ``chunkfold.config.SettingsError`` (one line) for a bad or unknown variable.
    """
    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings.from_env(**overrides)
