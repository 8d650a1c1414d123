"""Node validators for the unit tests, installed from the npm registry into ``.cache/npm``.

``tests/unit/npm/`` holds a ``package.json`` with pinned validators (the official AsyncAPI
parser and JSON schemas, KEDA's CRD schemas compiled by ``@kubernetes-models/keda``), its
``package-lock.json`` and the small scripts the tests run. ``node_dir()`` copies them to
``.cache/npm`` (gitignored) and runs ``npm ci`` there whenever the lock file changed, so a
clean clone installs them on its first test run. Needs ``node`` and ``npm`` on PATH: without
them the tests that need them fail with that message (nothing is skipped).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "npm"
CACHE = ROOT / ".cache" / "npm"
INSTALL_TIMEOUT_S = 600


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: the contract and deployment tests need node and npm")
    return path


def node_dir() -> Path:
    """``.cache/npm`` with ``node_modules`` installed from the committed lock file."""
    npm = _tool("npm")
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE.parent / "npm.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = hashlib.sha256(
            (SOURCE / "package.json").read_bytes() + (SOURCE / "package-lock.json").read_bytes()
        ).hexdigest()
        for source in SOURCE.iterdir():
            target = CACHE / source.name
            if source.is_file() and (not target.exists() or target.read_bytes() != source.read_bytes()):
                shutil.copyfile(source, target)
        stamp = CACHE / ".installed"
        if not (CACHE / "node_modules").is_dir() or not stamp.exists() or stamp.read_text() != digest:
            proc = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefix", str(CACHE)],
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            if proc.returncode != 0:
                pytest.fail(f"npm ci in {CACHE} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            stamp.write_text(digest)
    return CACHE


def run_node(script: str, *args: str, stdin: str | None = None, timeout: float = 180) -> Any:
    """Run ``tests/unit/npm/<script>`` with node and return its JSON output."""
    node = _tool("node")
    directory = node_dir()
    proc = subprocess.run(
        [node, str(directory / script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=directory,
    )
    if proc.returncode != 0:
        pytest.fail(f"node {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def package_version(name: str) -> str:
    """The installed version of an npm package (for reports and assertions)."""
    manifest = node_dir() / "node_modules" / name / "package.json"
    version: str = json.loads(manifest.read_text())["version"]
    return version
