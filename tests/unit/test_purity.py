"""``worker/chunkfold/core`` is pure: it imports no Kafka client, no Faust and no asyncio."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
CORE = Path(__file__).resolve().parents[2] / "worker" / "chunkfold" / "core"
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


def _imported(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_core_imports_nothing_of_the_project_but_itself_and_the_schemas() -> None:
    for path in sorted(CORE.glob("*.py")):
        for name in _imported(path):
            top = name.split(".")[0]
            assert top not in ("worker", "schemas", "tests"), f"{path.name} imports {name}"
            if top == "chunkfold":
                assert name == "chunkfold.core" or name.startswith("chunkfold.core."), (
                    f"{path.name} imports {name}"
                )


def test_importing_the_core_loads_no_io_module() -> None:
    code = (
        "import sys, chunkfold.core.engine, chunkfold.core.inputs, chunkfold.core.outputs, chunkfold.replay;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
