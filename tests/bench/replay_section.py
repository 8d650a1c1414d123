"""``chunkfold replay`` as users run it: a whole process against openai-python fed the same
lines, and its memory on inputs of very different sizes.

Speed: both commands (``chunkfold replay FILE`` and ``python -m tests.bench.sdk_replay < FILE``,
see that module) run on the same 98,304-chunk capture, alternating, several times; each is also
run on an empty input, and that start-up time is subtracted. Both print every event (and the
final completions), to /dev/null. Memory: ``tests.bench.replay_input`` pipes generated captures
of two sizes into ``chunkfold replay -``; the peak RSS of the replay process is read from the
kernel (``wait4``), and must not grow with the input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.context import BenchContext, SectionResult, Verdict
from tests.bench.replay_input import CHUNKS_PER_COMPLETION, CONCURRENT, WORKLOAD_COMPLETIONS, workload

ROOT = Path(__file__).resolve().parents[2]
RATIO_TARGET = 25.0
RUNS, QUICK_RUNS = 3, 1
MEMORY_SIZES = (256 << 20, 2 << 30)
QUICK_MEMORY_SIZES = (64 << 20, 256 << 20)
MEMORY_GROWTH_LIMIT = 1.25
"""Peak RSS on the larger input over the smaller one: bounded memory stays close to 1."""


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    max_rss_kb: int


def _peak_rss_kb(pid: int) -> int:
    """The process's peak RSS so far (``VmHWM``: since its ``exec``, unlike ``wait4``'s
    ``ru_maxrss``, which counts the benchmark's own memory copied at ``fork``); 0 once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def _run(argv: list[str], stdin_path: Path | None = None, stdin_pipe: list[str] | None = None) -> Run:
    """Run ``argv`` (stdout to /dev/null): its wall time, CPU time (``wait4``) and peak RSS
    (read every 20 ms while it runs, by a thread). ``stdin_pipe``: a command whose stdout feeds it."""
    feeder = None
    with open(os.devnull, "wb") as devnull:
        if stdin_pipe is not None:
            feeder = subprocess.Popen(stdin_pipe, stdout=subprocess.PIPE, cwd=ROOT)
            stdin = feeder.stdout
        else:
            stdin = open(stdin_path or os.devnull, "rb")  # noqa: SIM115 (closed below)
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=stdin, stdout=devnull, stderr=subprocess.PIPE, cwd=ROOT)
        assert stdin is not None
        stdin.close()
        peaks = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.02):
                peaks.append(_peak_rss_kb(proc.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        watcher.join()
        peak = max(peaks)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if feeder is not None:
            feeder.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {err.strip()[-500:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, peak)


def _chunkfold(path: str) -> list[str]:
    return [sys.executable, "-m", "chunkfold.cli", "replay", path]


SDK = [sys.executable, "-m", "tests.bench.sdk_replay"]


def _line_counts(capture: Path) -> tuple[int, int]:
    """Output lines of both commands on the capture (events plus final completions)."""
    counts = []
    for argv, stdin in ((_chunkfold(str(capture)), None), (SDK, capture)):
        with open(stdin or os.devnull, "rb") as feed:
            out = subprocess.run(argv, stdin=feed, capture_output=True, check=True, cwd=ROOT).stdout
        counts.append(out.count(b"\n"))
    return counts[0], counts[1]


def _speed(ctx: BenchContext, capture: Path, empty: Path) -> tuple[float, str]:
    runs = QUICK_RUNS if ctx.quick else RUNS
    best: dict[str, Run] = {}
    for _ in range(runs):
        for name, argv, stdin in (
            ("chunkfold", _chunkfold(str(capture)), None),
            ("chunkfold start-up", _chunkfold(str(empty)), None),
            ("openai-python", SDK, capture),
            ("openai-python start-up", SDK, empty),
        ):
            run = _run(argv, stdin_path=stdin)
            if name not in best or run.wall < best[name].wall:
                best[name] = run
    chunks = WORKLOAD_COMPLETIONS * CHUNKS_PER_COMPLETION
    net = {name: best[name].wall - best[f"{name} start-up"].wall for name in ("chunkfold", "openai-python")}
    ctx.out(f"  best of {runs} alternating runs, {chunks:,} chunks ({capture.stat().st_size / 1e6:.1f} MB):")
    ctx.out(f"  {'':24}{'process s':>10}{'start-up s':>11}{'net s':>8}{'chunks/s':>11}{'peak RSS':>10}")
    for name in ("chunkfold", "openai-python"):
        whole, start = best[name], best[f"{name} start-up"]
        ctx.out(
            f"  {name:24}{whole.wall:>10.2f}{start.wall:>11.2f}{net[name]:>8.2f}"
            f"{chunks / net[name]:>11,.0f}{whole.max_rss_kb / 1024:>8.0f} MB"
        )
    ratio = net["openai-python"] / net["chunkfold"]
    ctx.out(f"  chunkfold replay / openai-python, start-up subtracted: {ratio:.1f}x")
    return ratio, f"{chunks / net['chunkfold']:,.0f} chunks/s"


def _memory(ctx: BenchContext) -> tuple[list[tuple[int, Run]], float]:
    sizes = QUICK_MEMORY_SIZES if ctx.quick else MEMORY_SIZES
    runs = []
    for size in sizes:
        feeder = [sys.executable, "-m", "tests.bench.replay_input", str(size)]
        runs.append((size, _run(_chunkfold("-"), stdin_pipe=feeder)))
    ctx.out(
        f"\n  generated captures piped into `chunkfold replay -` ({CONCURRENT} completions open at a time):"
    )
    for size, run in runs:
        ctx.out(
            f"  {size / 2**30:>6.2f} GiB in {run.wall:6.1f} s ({size / run.wall / 1e6:5.1f} MB/s): "
            f"peak RSS {run.max_rss_kb / 1024:.0f} MB"
        )
    growth = runs[-1][1].max_rss_kb / runs[0][1].max_rss_kb
    ctx.out(
        f"  peak RSS, largest over smallest input: {growth:.2f}x for {sizes[-1] / sizes[0]:.0f}x the input"
    )
    return runs, growth


def run(ctx: BenchContext) -> SectionResult:
    ctx.out("\n== replay: chunkfold replay vs openai-python, whole processes ==")
    with tempfile.TemporaryDirectory(prefix="chunkfold-replay-bench-") as tmp:
        capture, empty = Path(tmp) / "capture.jsonl", Path(tmp) / "empty.jsonl"
        capture.write_bytes(workload(ctx.seed))
        empty.write_bytes(b"")
        ours, theirs = _line_counts(capture)
        ctx.out(
            f"  output lines: chunkfold {ours:,} records, openai-python {theirs:,} events and completions"
        )
        ratio, rate = _speed(ctx, capture, empty)
    runs, growth = _memory(ctx)
    largest = runs[-1][0]
    return SectionResult(
        "replay",
        [
            Verdict(
                f"replay vs openai-python as whole processes: {ratio:.1f}x ({rate}) (target >= {RATIO_TARGET:g}x)",
                round(ratio, 1) >= RATIO_TARGET,
            ),
            Verdict(
                f"replay memory on a {largest / 2**30:.2f} GiB input: {growth:.2f}x the peak RSS of a "
                f"{runs[0][0] / 2**30:.2f} GiB one (target <= {MEMORY_GROWTH_LIMIT:g}x)",
                growth <= MEMORY_GROWTH_LIMIT,
            ),
            Verdict(
                f"replay prints as many lines as openai-python ({ours:,} / {theirs:,})",
                ours == theirs,
            ),
        ],
    )
