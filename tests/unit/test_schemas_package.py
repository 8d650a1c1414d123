"""``chunkfold_schemas`` as a distribution of its own: ``chunkfold-schemas``
(``schemas/pyproject.toml``) builds and installs into a fresh virtualenv that gets nothing else
but pydantic, and there it parses what the engine publishes, runs the example consumer's parsing
and de-duplication, and cannot import the worker, Faust or aiokafka. ``chunkfold`` and
``chunkfold-schemas`` build wheels whose only top-level packages are their own, and neither
owns a file of the other."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from chunkfold.config import Settings
from chunkfold.core.records import KIND_HEADER
from chunkfold.gateway import GatewayRecord, capture_records
from chunkfold.processor import Processor
from chunkfold.state.memory import MemoryStore
from chunkfold_schemas import generate
from chunkfold_schemas.events import parse_event
from tests.harness import feed
from tests.recorded import recordings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
EXAMPLE = ROOT / "examples" / "consumer.py"
# A structured output, a strict tool call, a refusal and a stream cut by max_tokens.
STREAMS = (
    "parse_pydantic_model",
    "parse_strict_tools",
    "parse_pydantic_model_refusal",
    "parse_max_tokens_reached",
)
ABSENT = ("chunkfold", "worker", "schemas", "faust", "aiokafka", "mode", "orjson", "jiter")

# Runs in the fresh virtualenv (python -I, outside the repository): prints what it found as JSON.
PROBE = """
import importlib.metadata, importlib.resources, importlib.util, json, sys

records = json.load(open(sys.argv[1]))
spec = importlib.util.spec_from_file_location("consumer", sys.argv[2])
consumer = sys.modules["consumer"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(consumer)

import chunkfold_schemas
from chunkfold_schemas.abort import parse_abort
from chunkfold_schemas.chunk import parse_chunk
from chunkfold_schemas.done import DoneRecord

report = {
    "schemas_file": chunkfold_schemas.__file__,
    "version": importlib.metadata.version("chunkfold-schemas"),
    "requires": importlib.metadata.requires("chunkfold-schemas"),
    "package_data": sorted(
        str(p.relative_to(importlib.resources.files("chunkfold_schemas")))
        for p in importlib.resources.files("chunkfold_schemas").rglob("*")
        if p.suffix in (".json", ".yaml", ".typed")
    ),
    "importable": {name: importlib.util.find_spec(name) is not None for name in sys.argv[3].split(",")},
    "inputs": [type(parse_chunk(v.encode())).__name__ for v in records["chunks"]]
    + [repr(parse_abort(v.encode())) for v in records["aborts"]],
    "done": {},
    "events": [],
    "lines": [],
    "repeats": 0,
}
seen = consumer.Deduplicator()
for delivery in range(2):  # at least once: every record twice
    for out in records["outputs"]:
        record = consumer.parse_record(out["topic"], out["value"].encode())
        if not seen.first_time(record):
            report["repeats"] += 1
            continue
        line = consumer.describe(record)
        if line:
            report["lines"].append(line)
        if isinstance(record, DoneRecord):
            choice = record.completion.choices[0] if record.completion and record.completion.choices else None
            calls = choice.message.tool_calls if choice and choice.message else None
            report["done"][record.completion_id] = {
                "status": record.status,
                "error": record.error.type if record.error else None,
                "content": choice.message.content if choice and choice.message else None,
                "parsed": choice.message.parsed if choice and choice.message else None,
                "refusal": choice.message.refusal if choice and choice.message else None,
                "arguments": [c.function.parsed_arguments for c in calls or () if c.function],
                "total_tokens": record.usage.total_tokens if record.usage else None,
            }
        else:
            report["events"].append([type(record).__name__, record.type, record.completion_id, record.seq])
print(json.dumps(report))
"""


def _records() -> tuple[list[GatewayRecord], list[tuple[str, bytes]]]:
    """The gateway's records for STREAMS plus one stream aborted after three records, and the
    ``(topic, value bytes)`` the worker's record processor publishes for them."""
    by_name = {rec.name: rec for rec in recordings()}
    inputs: list[GatewayRecord] = []
    for name in STREAMS:
        rec = by_name[name]
        for stream in capture_records(rec.sse.read_text(), rec.request).values():
            inputs += stream
    rec = by_name[STREAMS[0]]
    cut = next(iter(capture_records(rec.sse.read_text(), rec.request, key_suffix="-cut").values()))
    inputs += [*cut[:3], GatewayRecord(cut[0].key, b'{"reason": "client gone"}', [(KIND_HEADER, b"abort")])]
    processor = Processor(Settings(), MemoryStore())
    processor.assign([0])
    outputs = [(o.topic, o.value) for out in feed(processor, inputs, base_ms=1_700_000_000_000) for o in out]
    return inputs, outputs


def _kind(record: GatewayRecord) -> bytes | None:
    return dict(record.headers).get(KIND_HEADER)


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chunkfold_example_consumer_here", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, (
        f"{args[:4]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_the_versions_agree() -> None:
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = tomllib.loads((SCHEMAS / "pyproject.toml").read_text())["project"]
    assert own["name"] == "chunkfold-schemas"
    assert own["version"] == main["version"]
    assert [d.split(">")[0].split("=")[0].strip() for d in own["dependencies"]] == ["pydantic"]


def test_chunkfold_schemas_installs_and_works_alone(tmp_path: Path) -> None:
    inputs, outputs = _records()
    chunks = [r.value.decode() for r in inputs if _kind(r) is None and r.value != b"[DONE]"]
    aborts = [r.value.decode() for r in inputs if _kind(r) == b"abort"]
    records = {
        "chunks": chunks,
        "aborts": [*aborts, ""],
        "outputs": [{"topic": topic, "value": value.decode()} for topic, value in outputs],
    }
    (tmp_path / "records.json").write_text(json.dumps(records))
    (tmp_path / "probe.py").write_text(PROBE)

    # A fresh virtualenv, nothing from this one: pydantic comes from the package index (pinned to
    # the version here so that the installed JSON files can be checked against the models).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CHUNKFOLD_"))}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    pydantic_pin = f"pydantic=={version('pydantic')}"
    _run(
        [python, "-m", "pip", "install", "-q", "--no-input", str(SCHEMAS), pydantic_pin],
        env=env,
        cwd=tmp_path,
    )

    probe = _run(
        [
            python,
            "-I",
            str(tmp_path / "probe.py"),
            str(tmp_path / "records.json"),
            str(EXAMPLE),
            ",".join(ABSENT),
        ],
        env=env,
        cwd=tmp_path,
    )
    report = json.loads(probe.stdout)

    # Installed from the distribution, with its data, and alone.
    assert Path(report["schemas_file"]).is_relative_to(venv), report["schemas_file"]
    assert report["version"] == tomllib.loads((SCHEMAS / "pyproject.toml").read_text())["project"]["version"]
    assert [r.split(">")[0].split("<")[0].split("=")[0] for r in report["requires"]] == ["pydantic"]
    assert report["package_data"] == sorted(
        ["asyncapi.yaml", "py.typed", *(f"json/{name}" for name in generate.generated())]
    )
    assert report["importable"] == dict.fromkeys(ABSENT, False)
    _run([python, "-I", "-m", "chunkfold_schemas.generate", "--check"], env=env, cwd=tmp_path)

    # Input records: every chunk a ChatCompletionChunk, the abort's reason, an empty abort.
    assert report["inputs"] == ["ChatCompletionChunk"] * len(chunks) + [
        "AbortRecord(reason='client gone')",
        "None",
    ]

    # Output records: typed as they are here, each handled once although delivered twice.
    done_values = [json.loads(value) for topic, value in outputs if topic == "completion-done"]
    event_values = [json.loads(value) for topic, value in outputs if topic == "completion-events"]
    assert report["repeats"] == len(outputs)
    assert report["events"] == [
        [type(parse_event(json.dumps(e))).__name__, e["type"], e["completion_id"], e["seq"]]
        for e in event_values
    ]
    assert {"ContentDelta", "ContentDone", "RefusalDone", "ToolArgumentsDone"} <= {
        e[0] for e in report["events"]
    }
    assert len(report["done"]) == len(done_values) == len(STREAMS) + 1
    for value in done_values:
        got = report["done"][value["completion_id"]]
        message = value["completion"]["choices"][0]["message"]
        assert got == {
            "status": value["status"],
            "error": value["error"] and value["error"]["type"],
            "content": message["content"],
            "parsed": message["parsed"],
            "refusal": message["refusal"],
            "arguments": [c["function"]["parsed_arguments"] for c in message["tool_calls"] or ()],
            "total_tokens": value["usage"] and value["usage"]["total_tokens"],
        }
    statuses = sorted(d["status"] for d in report["done"].values())
    assert statuses == ["aborted", "completed", "completed", "completed", "length"]
    assert any(d["parsed"] for d in report["done"].values())
    assert any(d["arguments"] and d["arguments"][0] for d in report["done"].values())
    assert any(d["refusal"] for d in report["done"].values())
    assert [d["error"] for d in report["done"].values() if d["status"] == "aborted"] == ["Aborted"]

    # The example's lines there are the lines it prints here.
    example = _load_example()
    seen = example.Deduplicator()
    expected_lines = [
        line for topic, value in outputs if (line := example.handle(topic, value, seen)) is not None
    ]
    assert report["lines"] == expected_lines
    assert any(": call " in line for line in expected_lines)
    assert any(": refused: " in line for line in expected_lines)
    assert sum(line.endswith(" tokens") for line in expected_lines) == len(done_values)

    # ... and so does the example as a program reading `chunkfold replay` lines (twice over),
    # where aiokafka is not installed.
    replay_lines = "".join(
        json.dumps(
            {"topic": topic, "key": json.loads(value).get("completion_id"), "value": json.loads(value)}
        )
        + "\n"
        for topic, value in outputs
    )
    cli = _run([python, "-I", str(EXAMPLE), "-"], env=env, cwd=tmp_path, input=replay_lines * 2)
    assert cli.stdout.splitlines() == expected_lines


def _top_levels(wheel: Path) -> set[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist() if ".dist-info/" not in name}


def test_each_distribution_owns_its_own_files_only(tmp_path: Path) -> None:
    """``pip wheel``: chunkfold's wheel holds ``chunkfold`` only, chunkfold-schemas' wheel
    ``chunkfold_schemas`` only; both installed into one fresh virtualenv, either can be
    uninstalled and the other still imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CHUNKFOLD_"))}
    wheels = tmp_path / "wheels"
    # Built from clean copies of the sources: setuptools builds in a build/ directory beside
    # pyproject.toml, and one left over from an earlier tree would add its stale files.
    sources = tmp_path / "sources"
    shutil.copytree(SCHEMAS, sources / "schemas", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, sources / name)
    shutil.copytree(
        ROOT / "worker", sources / "worker", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for source in (sources / "schemas", sources):
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
            env=env,
            cwd=tmp_path,
        )
    by_name = {w.name.split("-")[0]: w for w in wheels.glob("*.whl")}
    assert _top_levels(by_name["chunkfold"]) == {"chunkfold"}
    assert _top_levels(by_name["chunkfold_schemas"]) == {"chunkfold_schemas"}

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "-q", "--no-input"]
    install = [*pip, "install", "--no-deps", str(by_name["chunkfold"]), str(by_name["chunkfold_schemas"])]
    _run([*pip, "install", f"pydantic=={version('pydantic')}"], env=env, cwd=tmp_path)
    _run(install, env=env, cwd=tmp_path)
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"
    _run([*pip, "uninstall", "-y", "chunkfold"], env=env, cwd=tmp_path)
    _run([python, "-I", "-c", "import chunkfold_schemas.done"], env=env, cwd=tmp_path)
    assert subprocess.run([python, "-I", "-c", probe, "chunkfold"], env=env, cwd=tmp_path).returncode == 3
    _run(install, env=env, cwd=tmp_path)
    _run([*pip, "uninstall", "-y", "chunkfold-schemas"], env=env, cwd=tmp_path)
    _run([python, "-I", "-c", probe, "chunkfold.core.engine"], env=env, cwd=tmp_path)
    assert (
        subprocess.run([python, "-I", "-c", probe, "chunkfold_schemas"], env=env, cwd=tmp_path).returncode
        == 3
    )
