"""The ``chunkfold`` command: ``replay``, ``worker``, ``produce``, ``tail``, ``watch``, ``audit-sink``.

Each command is a module of this package with ``register(subcommands)``; the options they
share are defined once in ``chunkfold.cli.options``. Bad input (arguments, files, or a
``CHUNKFOLD_`` variable) ends a command with one line on stderr and exit status 2, never a traceback;
a Kafka cluster it cannot use (unreachable, authentication or an ACL refused, topics missing or
wrong: ``chunkfold.kafka_checks.StartupError``) with one line and exit status 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chunkfold.cli.options import UsageError
from chunkfold.config import SettingsError, check_environment
from chunkfold.core.inputs import InputError
from chunkfold.kafka_checks import StartupError

# relative: inside its own __init__, mypy finds the package's submodules only so
from . import audit_sink, produce, replay, tail, watch, worker

STARTUP_FAILED = 3
"""Exit status when the Kafka cluster refuses or lacks what a command needs."""

COMMANDS = (replay, worker, produce, tail, watch, audit_sink)
"""In the order ``chunkfold --help`` lists them. Every dependency of these is declared: an
ImportError is a broken install and must show, not silently remove a command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkfold", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_environment()
        code: int = args.func(args)
        return code
    except (UsageError, InputError, SettingsError) as exc:
        print(f"chunkfold {args.command}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"chunkfold {args.command}: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
