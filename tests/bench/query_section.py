"""Queries section: one worker's query listener (issue 15) answering a query load while the
worker folds, and what that load costs the worker.

Measures (a) ``GET /completions/{id}`` latency and (b) resume time to the first event of
``GET /completions/{id}/events?from_seq=k``, both from a query client process of their own
(``tests.bench.query_client``) while the worker takes the kafka section's latency workload at
``LATENCY_RATE``; (c) the worker's event latency and CPU at that rate without queries, with
snapshot queries only and with snapshots and resumes, and its backlog drain rate without and with
a query load during the drain. Every run is
the kafka section's own (``latency_run``, ``worker_throughput``) with the listener turned on.
The issue sets no target for these figures: the section prints them and gives no verdict.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunkfold.config import Settings
from chunkfold.core.records import SEQ_HEADER
from tests.bench.context import BenchContext, SectionResult
from tests.bench.kafka_section import (
    KEPT_UP_S,
    LATENCY_RATE,
    LATENCY_S,
    PARTITIONS,
    THROUGHPUT_CAP_S,
    THROUGHPUT_CHUNKS,
    WARMUP_S,
    Latency,
    Throughput,
    Workload,
    bench_broker,
    build_workload,
    completion_templates,
    cpu_seconds,
    free_port,
    latency_run,
    send_schedule,
    worker_throughput,
)
from tests.bench.query_client import DRAIN_S, Completion, QueryPlan, QueryTimings
from tests.harness import ROOT


@dataclass(frozen=True)
class QueryRates:
    """Requests per second of a query load."""

    snapshots: float
    """GET /completions/{id}, for completions in flight by the send schedule."""
    live_resumes: float = 0.0
    """Resumes of completions in flight, from a seq already published."""
    finished_resumes: float = 0.0
    """Resumes of finished completions (their tombstone still lives)."""

    @property
    def name(self) -> str:
        resumes = self.live_resumes + self.finished_resumes
        return f"{self.snapshots:g} snapshots/s" + (f" + {resumes:g} resumes/s" if resumes else "")


FULL_LOAD = QueryRates(snapshots=50.0, live_resumes=5.0, finished_resumes=2.0)
SNAPSHOT_LOAD = QueryRates(snapshots=50.0)
"""The snapshots of the full load alone: what the resumes add is the difference."""
LATENCY_RUNS = 2
"""Latency runs without queries, with the snapshot load and with the full load take turns, this
many times each."""
THROUGHPUT_RUNS = 2
"""Drains without and with the query load alternate, this many times each."""
DRAIN_BACKLOGS = 2
"""The drained backlog, in the kafka section's backlogs: the worker drains one in about a second,
during which the query load sends only some 60 requests."""


# -- the query client process ----------------------------------------------------------------


def workload_completions(workload: Workload, due: Sequence[float] | None) -> list[Completion]:
    """Every completion of ``workload``, with its send schedule when ``due`` gives one (the
    first event each chunk yields, from ``Workload.first_event``)."""
    indexes: dict[bytes, list[int]] = {}
    for i, record in enumerate(workload.records):
        indexes.setdefault(record.key, []).append(i)
    events: dict[bytes, list[tuple[float, int]]] = {}
    if due is not None:
        for (key, seq), i in workload.first_event.items():
            events.setdefault(key, []).append((due[i], seq))
    return [
        Completion(
            key.decode(),
            due[positions[0]] if due is not None else math.nan,
            due[positions[-1]] if due is not None else math.nan,
            tuple(sorted(events.get(key, []))),
        )
        for key, positions in indexes.items()
    ]


def record_schedule(workload: Workload, due: Sequence[float]) -> dict[tuple[bytes, int], float]:
    """(key, chunkfold.seq header) -> due of every record: how the query client tells, from the
    first records on the input topic, when the load generator started."""
    schedule: dict[tuple[bytes, int], float] = {}
    for record, at in zip(workload.records, due, strict=True):
        position = next(int(v) for k, v in record.headers if k == SEQ_HEADER)
        schedule[(record.key, position)] = at
    return schedule


class QueryLoad:
    """The query client process run alongside one worker measurement (``during``): its plan
    is the workload (with the send schedule of a latency run, without for a backlog drain) and
    the worker's listener URL; ``timings`` and ``cpu_share`` once the measurement ended."""

    def __init__(
        self,
        workload: Workload,
        due: Sequence[float] | None,
        rates: QueryRates,
        workdir: Path,
        name: str,
        seed: int,
    ):
        self.rates = rates
        self.completions = workload_completions(workload, due)
        self.schedule = {} if due is None else record_schedule(workload, due)
        self.workdir = workdir
        self.name = name
        self.seed = seed
        self.timings = QueryTimings()
        self.cpu_share = math.nan
        """The client's CPU time over its wall time, of one core."""

    @contextlib.contextmanager
    def during(self, settings: Settings) -> Iterator[None]:
        plan_path, out_path = (
            self.workdir / f"queries-{self.name}.json",
            self.workdir / f"timings-{self.name}.json",
        )
        log_path = self.workdir / f"query-client-{self.name}.log"
        QueryPlan(
            url=settings.query_url(),
            completions=self.completions,
            snapshot_rate=self.rates.snapshots,
            live_resume_rate=self.rates.live_resumes,
            finished_resume_rate=self.rates.finished_resumes,
            seed=self.seed,
            bootstrap_servers=settings.bootstrap_servers,
            input_topic=settings.input_topic,
            input_partitions=PARTITIONS,
            record_due=self.schedule,
        ).dump(plan_path)
        with log_path.open("ab") as log:
            client = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.query_client", str(plan_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        started = time.time()
        try:
            yield
        finally:
            cpu, wall = cpu_seconds(client.pid), time.time() - started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, signal.SIGTERM)
            try:
                client.wait(DRAIN_S + 15)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
                client.wait(10)
        if client.returncode != 0 or not out_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the query client failed (exit {client.returncode}):\n{tail}")
        self.timings = QueryTimings.from_json(out_path.read_bytes())
        self.cpu_share = cpu / wall


def _with_listener() -> Mapping[str, Any]:
    """A worker's settings overrides: its query listener on a free loopback port."""
    return {"query_port": free_port()}


# -- figures ---------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (as the kafka section's latencies); nan when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "never"
    return f"{value:,.1f}"


def _row(ctx: BenchContext, name: str, values: Sequence[float]) -> None:
    ctx.out(
        f"  {name:<34}{len(values):>6,}  {_ms(quantile(values, 0.5)):>8}  {_ms(quantile(values, 0.99)):>8}"
        f"  {_ms(max(values, default=math.nan)):>8}"
    )


def _statuses(statuses: Sequence[int]) -> str:
    counts = Counter(statuses)
    return ", ".join(f"{status or 'no answer'} {count:,}" for status, count in sorted(counts.items()))


def _query_table(ctx: BenchContext, loads: Sequence[QueryLoad]) -> None:
    """The answers' latencies over every run of ``loads`` taken together."""
    snapshots = [snapshot for load in loads for snapshot in load.timings.snapshots]
    resumes = [resume for load in loads for resume in load.timings.resumes]
    kinds = sorted({r.kind for r in resumes}, key=lambda kind: (kind != "live", kind))
    ctx.out(f"  {'request':<34}{'n':>6}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}")
    for status in sorted({s for _, s, _ in snapshots}):
        _row(ctx, f"snapshot, {status or 'no answer'}", [ms for ms, s, _ in snapshots if s == status])
    for kind in kinds:
        answered = [r for r in resumes if r.kind == kind and r.status == 200]
        _row(ctx, f"resume {kind}: first event", [r.first_event_ms for r in answered])
        _row(ctx, f"resume {kind}: to the end", [r.total_ms for r in answered])
        _row(ctx, f"resume {kind}: last event -> end", [r.total_ms - r.last_event_ms for r in answered])
    states = Counter(state for _, status, state in snapshots if status == 200)
    ctx.out(
        f"  snapshot answers: {_statuses([s for _, s, _ in snapshots])}; of the 200s: "
        + (", ".join(f"{state} {count:,}" for state, count in sorted(states.items())) or "-")
    )
    for kind in kinds:
        of_kind = [r for r in resumes if r.kind == kind]
        answered = [r for r in of_kind if r.status == 200]
        ctx.out(
            f"  resume {kind} answers: {_statuses([r.status for r in of_kind])}; exact streams "
            f"{sum(r.exact for r in answered)}/{len(answered)}, {_events([r.events for r in answered])}"
        )
    ctx.out(
        f"  query client CPU: {', '.join(_pct(load.cpu_share) + '%' for load in loads)} of one core (per run)"
    )


def _events(counts: Sequence[int]) -> str:
    if not counts:
        return "no stream"
    return f"{sum(counts) / len(counts):,.0f} events per stream on average ({min(counts)}-{max(counts)})"


def _pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.0f}"


def _effect_table(ctx: BenchContext, rows: Sequence[tuple[str, Latency]]) -> None:
    ctx.out(
        f"  {'query load':<30}{'offered/s':>9}  {'chunks':>7}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}"
        f"  {'kept up':>7}  {'CPU %':>5}  {'load 1m':>7}"
    )
    for name, row in rows:
        ctx.out(
            f"  {name:<30}{row.offered:>9,.0f}  {row.chunks:>7,}  {_ms(row.quantile(0.5)):>8}"
            f"  {_ms(row.quantile(0.99)):>8}  {_ms(row.quantile(1.0)):>8}  {'yes' if row.kept_up else 'NO':>7}"
            f"  {_pct(row.cpu_share):>5}  {row.load:>7.2f}"
        )


def _drain_table(ctx: BenchContext, rows: Sequence[tuple[str, Throughput]]) -> None:
    ctx.out(
        f"  {'query load':<30}{'chunks':>8}  {'span s':>7}  {'chunks/s':>9}  {'CPU s':>6}  {'CPU %':>5}"
        f"  {'chunks/CPU-s':>12}  {'load 1m':>7}"
    )
    for name, row in rows:
        ctx.out(
            f"  {name:<30}{row.chunks:>8,}  {row.span:>7.2f}  {row.rate:>9,.0f}  {row.cpu:>6.2f}"
            f"  {100 * row.cpu / row.span:>5.0f}  {row.per_cpu:>12,.0f}  {row.load:>7.2f}"
            + (f"  ({row.note})" if row.note else "")
        )


# -- the section ------------------------------------------------------------------------------


def run(ctx: BenchContext) -> SectionResult:
    started = time.perf_counter()
    # aiokafka's retried NotLeaderForPartition warnings right after topic creation are noise here
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    seconds = LATENCY_S / 2 if ctx.quick else LATENCY_S
    backlog = DRAIN_BACKLOGS * (THROUGHPUT_CHUNKS // 3 if ctx.quick else THROUGHPUT_CHUNKS)
    cap = THROUGHPUT_CAP_S / 2 if ctx.quick else THROUGHPUT_CAP_S
    templates = completion_templates(ctx.seed)
    lat = build_workload(templates, int(LATENCY_RATE * seconds), "ql", ctx.seed + 1)
    thr = build_workload(templates, backlog, "qt", ctx.seed)
    with (
        tempfile.TemporaryDirectory(prefix="chunkfold-bench-") as tmp,
        bench_broker() as (servers, started_broker),
    ):
        ctx.out("\n== queries: one worker's query listener under a query load ==")
        ctx.out(
            f"broker    : single node at {servers}"
            + (" (started for this section)" if started_broker else " (KAFKA_BOOTSTRAP_SERVERS)")
            + f"; fresh topics per run, {PARTITIONS} partitions"
        )
        _measure(ctx, servers, lat, thr, seconds, cap, Path(tmp))
    ctx.out(f"\nqueries section: {time.perf_counter() - started:.0f} s")
    return SectionResult("queries", [])


def _measure(
    ctx: BenchContext, servers: str, lat: Workload, thr: Workload, seconds: float, cap: float, workdir: Path
) -> None:
    full = FULL_LOAD
    ctx.out(
        "method: one worker (direct driver, at_least_once, memory store) with its query listener on\n"
        "        (CHUNKFOLD_QUERY_PORT, loopback, no token) takes the kafka section's latency workload at\n"
        f"        {LATENCY_RATE:,.0f} chunks/s for {seconds:g} s: without queries, with snapshot queries only, and with\n"
        f"        the full query load, in turn, {LATENCY_RUNS} times each. A query load is a client process of its own\n"
        "        (aiohttp; neither the worker nor the process timing the worker's events) sending, open loop\n"
        "        on fixed schedules:\n"
        f"        - GET /completions/{{id}} {full.snapshots:g}/s, for a completion in flight by the load generator's\n"
        "          send schedule (its first record sent 0.1 s ago or more, its last not yet; the schedule's\n"
        "          start is read off the input topic: the records' timestamps are their send times);\n"
        "        - the full load adds GET /completions/{id}/events?from_seq=k "
        f"{full.live_resumes:g}/s for a completion in flight,\n"
        "          k drawn up to the seq of the last event that its chunks sent 0.3 s ago yield (published),\n"
        f"          and {full.finished_resumes:g}/s for a finished one (last record sent 1 s ago or more), "
        "k drawn among its seqs.\n"
        "        Times: request -> whole answer (snapshot); request -> first event received whole, -> end\n"
        "        of the stream (after the completion's *.done events), and last event -> end of the stream.\n"
        "        A stream is exact when its seqs run k, k+1, ... without gap or repeat and end with a *.done\n"
        "        event. The worker's event latency and CPU % (of one core) are the kafka section's (send ->\n"
        f"        first event, the first {WARMUP_S:g} s warm-up; kept up: every event arrived, the last within "
        f"{KEPT_UP_S:g} s of\n"
        "        the last send). Then the worker drains a pre-produced backlog, without and with the full\n"
        "        load's client running from the worker's start to its stop (no send schedule there: any id of\n"
        "        the backlog, snapshots, and resumes from seq 0; 404 for ids not reached yet, 503 while the\n"
        f"        worker joins the group), alternately, {THROUGHPUT_RUNS} times each, each rated by its best run."
    )
    _latency_part(ctx, servers, lat, seconds, workdir)
    _drain_part(ctx, servers, thr, cap, workdir)
    ctx.out("no verdict: the issue sets no target for the query figures; they are printed as measured.")


def _latency_part(ctx: BenchContext, servers: str, lat: Workload, seconds: float, workdir: Path) -> None:
    due = send_schedule(lat, LATENCY_RATE)
    rows: list[tuple[str, Latency]] = []
    full_loads: list[QueryLoad] = []
    for run_index in range(LATENCY_RUNS):
        for rates in (None, SNAPSHOT_LOAD, FULL_LOAD):
            if rates is None:
                row = latency_run(
                    servers,
                    lat,
                    LATENCY_RATE,
                    worker=True,
                    workdir=workdir,
                    settings_overrides=_with_listener(),
                )
                rows.append(("none", row))
                continue
            load = QueryLoad(lat, due, rates, workdir, f"latency-{len(rows)}", run_index)
            row = latency_run(
                servers,
                lat,
                LATENCY_RATE,
                worker=True,
                workdir=workdir,
                settings_overrides=_with_listener(),
                during=load.during,
            )
            rows.append((rates.name, row))
            if rates is FULL_LOAD:
                full_loads.append(load)
    ctx.out(
        f"\n== queries: the answers to the full load ({FULL_LOAD.name}) while the worker folds "
        f"{LATENCY_RATE:,.0f} chunks/s ({LATENCY_RUNS} runs of {seconds:g} s together) =="
    )
    _query_table(ctx, full_loads)
    ctx.out(
        f"\n== queries: the worker's event latency at {LATENCY_RATE:,.0f} chunks/s, without and with the queries =="
    )
    _effect_table(ctx, rows)

    def best(name: str) -> Latency:
        """The run of lowest p99 under the query load ``name``."""
        return min((row for load, row in rows if load == name), key=lambda row: row.quantile(0.99))

    quiet = best("none")
    for rates in (SNAPSHOT_LOAD, FULL_LOAD):
        loaded = best(rates.name)
        ctx.out(
            f"  {rates.name} / none (the run of lowest p99 of each): p50 "
            f"{loaded.quantile(0.5) / quiet.quantile(0.5):.2f}x, p99 {loaded.quantile(0.99) / quiet.quantile(0.99):.2f}x; "
            f"worker CPU {_pct(quiet.cpu_share)}% -> {_pct(loaded.cpu_share)}% of one core"
        )
    for name, row in rows:
        if row.inside is not None:
            p50, p99 = row.inside
            ctx.out(f"  worker-side histogram, query load {name}: p50 <= {p50:g} ms, p99 <= {p99:g} ms")


def _drain_part(ctx: BenchContext, servers: str, thr: Workload, cap: float, workdir: Path) -> None:
    drains: list[tuple[str, Throughput]] = []
    loads: list[QueryLoad] = []
    for run_index in range(THROUGHPUT_RUNS):
        quiet, _ = worker_throughput(servers, thr, cap, workdir, settings_overrides=_with_listener())
        load = QueryLoad(thr, None, FULL_LOAD, workdir, f"drain-{run_index}", 10 + run_index)
        loaded, _ = worker_throughput(
            servers, thr, cap, workdir, settings_overrides=_with_listener(), during=load.during
        )
        drains += [("none", quiet), (FULL_LOAD.name, loaded)]
        loads.append(load)
    ctx.out(
        f"\n== queries: draining a backlog of {len(thr.records):,} records ({thr.chunks:,} chunks, "
        f"{thr.completions} completions), without and with the queries =="
    )
    _drain_table(ctx, drains)
    quiet = max((row for name, row in drains if name == "none"), key=lambda row: row.rate)
    loaded = max((row for name, row in drains if name != "none"), key=lambda row: row.rate)
    ctx.out(
        f"  with / without (best runs): {loaded.rate / quiet.rate:.2f}x chunks/s, "
        f"{loaded.per_cpu / quiet.per_cpu:.2f}x chunks per CPU-second"
    )
    for index, load in enumerate(loads, 1):
        snapshots = load.timings.snapshots
        latencies = [ms for ms, _, _ in snapshots]
        resumes = load.timings.resumes
        ctx.out(
            f"  query load of drain {index}: snapshots {_statuses([s for _, s, _ in snapshots])} "
            f"(p50 {_ms(quantile(latencies, 0.5))} ms, p99 {_ms(quantile(latencies, 0.99))} ms); resumes "
            f"{_statuses([r.status for r in resumes])}, exact {sum(r.exact for r in resumes)}; "
            f"client CPU {_pct(load.cpu_share)}%"
        )
