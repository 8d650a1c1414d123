"""``python -m tests.bench``: chunkfold's benchmarks, printed as plain text for the README.

Sections run in order; ``--only NAME`` picks some, ``--quick`` shortens every section.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from tests.bench import engine_section, kafka_section, query_section, replay_section
from tests.bench.context import BenchContext, SectionResult

Section = Callable[[BenchContext], SectionResult]

SECTIONS: dict[str, Section] = {
    "engine": engine_section.run,
    "kafka": kafka_section.run,
    "queries": query_section.run,
    "replay": replay_section.run,
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _header(ctx: BenchContext, names: Sequence[str]) -> None:
    budget = ctx.budget
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ctx.out("chunkfold benchmarks" + (" (--quick)" if ctx.quick else ""))
    ctx.out(f"date      : {now}")
    ctx.out(
        f"machine   : {platform.system()} {platform.machine()}, {os.cpu_count()} cores "
        f"({_usable_cores()} usable), {_cpu_model()}"
    )
    ctx.out(f"python    : {platform.python_implementation()} {platform.python_version()}")
    ctx.out(
        "packages  : "
        + ", ".join(
            f"{name} {_version(name)}"
            for name in ("chunkfold", "openai", "pydantic", "orjson", "jiter", "faust-streaming", "aiokafka")
        )
    )
    ctx.out(f"sections  : {', '.join(names)}; seed {ctx.seed}")
    if "engine" not in names:
        return
    clock = "time.process_time (--clock cpu)" if budget.cpu_clock else "time.perf_counter"
    ctx.out(
        f"timing    : {clock}; best of >= {budget.repeat} runs (>= {budget.min_total:g} s in all), each "
        f"looping the call for\n            >= {budget.run_min * 1000:.0f} ms, after a warm-up call; "
        f"a call of >= {budget.run_cap:g} s is a run on its own, repeated\n"
        f"            only while the measurement stays within {budget.max_total:g} s. gc enabled; "
        "the pre-built inputs are gc.freeze()d."
    )
    ctx.out(
        "chunkfold : decode_record(key, value bytes, headers) + engine.fold(KAFKA_OPTIONS) for the request\n"
        "            record, every chunk and [DONE] (final completion built, parsed and validated)"
    )
    ctx.out(
        "openai    : orjson.loads + construct_type(ChatCompletionChunk) + ChatCompletionStreamState\n"
        "            (response_format=pydantic model / input_tools=strict tools).handle_chunk per chunk,\n"
        "            then get_final_completion()"
    )
    ctx.out(
        "streams   : text; structured (json_schema, JSON content); tools (3 parallel strict calls);\n"
        "            logprobs (top_logprobs=5); n=2 (choices interleaved). N counts every chunk (role,\n"
        "            deltas, finish, usage), each pre-encoded to JSON bytes once; chunks/s = N / time"
    )


def _summary(ctx: BenchContext, results: Sequence[SectionResult]) -> bool:
    ctx.out("\n== summary ==")
    verdicts = [v for result in results for v in result.verdicts]
    for verdict in verdicts:
        ctx.out(f"[{'pass' if verdict.ok else 'FAIL'}] {verdict.text}")
    passed = sum(v.ok for v in verdicts)
    ok = passed == len(verdicts)
    ctx.out(f"SUMMARY: {'PASS' if ok else 'FAIL'} ({passed}/{len(verdicts)} targets met)")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="chunkfold's benchmarks, printed as plain text for the README.",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SECTIONS),
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter timings; skip openai-python at N > 1024"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="rank runs by time.perf_counter (default) or by process CPU time (on a shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated streams")
    args = parser.parse_args(argv)
    names = [name for name in SECTIONS if not args.only or name in args.only]
    ctx = BenchContext(quick=args.quick, seed=args.seed, cpu_clock=args.clock == "cpu")
    _header(ctx, names)
    results = [SECTIONS[name](ctx) for name in names]
    _summary(ctx, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
