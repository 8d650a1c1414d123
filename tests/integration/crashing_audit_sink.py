"""``python -m tests.integration.crashing_audit_sink N [audit-sink options]``: ``chunkfold
audit-sink`` (same options, configuration and logging) that exits with status 137, as after
SIGKILL, right after its N-th database commit and before that batch's Kafka offset commit: the
crash the exactly-once test must survive. The sink takes the crash as its injected
``after_database_commit``; nothing in the installed command can crash on purpose."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from chunkfold.audit import sink
from chunkfold.audit.sink import DatabaseCommitHook
from chunkfold.cli import audit_sink

log = logging.getLogger("chunkfold.audit")


def crash_after(commits: int) -> DatabaseCommitHook:
    """Exit 137 once the sink has made ``commits`` database commits."""

    def after_database_commit(done: int) -> None:
        if done >= commits:
            log.error("exiting after database commit %d, before the Kafka offset commit", done)
            logging.shutdown()
            os._exit(137)

    return after_database_commit


def main(argv: Sequence[str]) -> int:
    commits, *audit_sink_options = argv
    parser = argparse.ArgumentParser(prog="crashing_audit_sink")
    audit_sink.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit-sink", *audit_sink_options])
    config = audit_sink.sink_config(args)
    audit_sink.configure_logging(args)
    return sink.run(config, after_database_commit=crash_after(int(commits)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
