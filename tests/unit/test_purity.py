"""``worker/core`` is pure: it imports no Kafka client, no Faust and no asyncio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
CORE = Path(__file__).resolve().parents[2] / "worker" / "core"
FORBIDDEN = ("faust", "mode", "aiokafka", "asyncio", "kafka", "rocksdict")


def test_core_sources_import_nothing_with_io() -> None:
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_the_core_loads_no_io_module() -> None:
    code = (
        "import sys, worker.core.engine, worker.core.inputs, worker.core.outputs, worker.replay;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
