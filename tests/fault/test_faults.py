"""Faults injected for real while hundreds of completions stream: worker kill -9, rebalance,
broker restart, and abandoned streams. Each scenario writes its figures to
``.cache/reliability/<scenario>.json`` (the README's reliability table)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord
from tests.conftest import kafka_module
from tests.harness import (
    ROOT,
    BackgroundProducer,
    Collected,
    WorkerProcess,
    assert_matches_reference,
    collect,
    done_count,
    fresh_settings,
    offline_reference,
    recorded_records,
    start_workers,
    wait_for,
    wait_group_stable,
)
from tests.prometheus import http_get, scrape

pytestmark = pytest.mark.fault
GUARANTEES = ("at_least_once", "exactly_once")
MODES = [
    pytest.param("direct", "at_least_once", id="direct-at_least_once"),
    pytest.param("direct", "exactly_once", id="direct-exactly_once"),
    pytest.param("faust", "at_least_once", id="faust-at_least_once"),
]
"""Driver and guarantee of the kill -9 and rebalance scenarios (the Faust driver's batched
agent holds acknowledgements as the direct driver does: both must lose and repeat nothing)."""
REPORT_DIR = ROOT / ".cache" / "reliability"
METRIC_FAMILIES = (
    "chunkfold_records_in_total",
    "chunkfold_chunks_in_total",
    "chunkfold_replayed_skipped_total",
    "chunkfold_events_out_total",
    "chunkfold_completions_out_total",
    "chunkfold_deadletters_total",
    "chunkfold_open_completions",
    "chunkfold_state_bytes",
    "chunkfold_consumer_lag",
    "chunkfold_processing_latency_seconds",
    "chunkfold_end_to_end_latency_seconds",
    "chunkfold_time_to_first_token_seconds",
    "chunkfold_tokens_per_second",
)


def write_report(name: str, **figures: Any) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / f"{name}.json").write_text(json.dumps({"scenario": name, **figures}, indent=2))


MIN_IN_FLIGHT = 200
"""Completions started but not finished publishing at the moment of each fault ("hundreds")."""
MAX_RECOVERY_S = 60.0
SHAPES = 10
"""Generated completions per repeat of the recordings, with every field shape the engine
accumulates (legacy function_call, audio, annotations, reasoning, n>1 ...): a restore that lost
any of them would change a final completion."""


def completion_delays(got: Collected, producer: BackgroundProducer, since: float) -> list[float]:
    """For each completion whose last record was published at ``since`` (epoch s) or later: the
    time from that record's publication to its first completion-done."""
    return [got.first_done_at[k] - t for k, t in producer.last_sent.items() if t >= since]


def check_and_report(
    name: str,
    settings: Settings,
    got: Collected,
    records: list[GatewayRecord],
    completions: int,
    producer: BackgroundProducer,
    faults: list[tuple[str, float]],
) -> None:
    """The checks every fault scenario shares, then its row of the reliability table.

    Recovery is how long the faults held completions up: the longest time from a completion's
    last record being published to its completion-done, over the completions whose last record
    went out from 2 s before the first fault on (a completion finishing with its partition
    stalled waits for the whole stall). With ``exactly_once`` nothing may repeat at all (the
    collector reads committed records only)."""
    in_flight = [producer.in_flight_at(at) for _, at in faults]
    assert min(in_flight) >= MIN_IN_FLIGHT, f"only {in_flight} completions in flight at the faults"
    assert_matches_reference(got, offline_reference(records))
    first_fault = min(at for _, at in faults)
    recovery = max(completion_delays(got, producer, first_fault - 2))
    assert recovery < MAX_RECOVERY_S, f"completions held up {recovery:.1f} s by the fault"
    done_repeats, event_repeats = got.repeats()
    if settings.processing_guarantee == "exactly_once":
        assert (done_repeats, event_repeats) == (0, 0), "exactly_once repeated records"
        name += " [exactly_once]"
    if settings.driver == "faust":
        name += " [faust]"
    write_report(
        name,
        completions=completions,
        in_flight=in_flight,
        faults=[what for what, _ in faults],
        bad_records=0,
        lost=completions - len(got.done_by_id()),
        repeated_done_before_dedup=done_repeats,
        repeated_events_before_dedup=event_repeats,
        duplicated_after_dedup=got.duplicates_after_dedup(),
        recovery_s=round(recovery, 2),
    )


@pytest.mark.parametrize(("driver", "guarantee"), MODES)
def test_worker_kill_9_and_restart(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str, guarantee: str
) -> None:
    """kill -9, restart; once the restarted worker owns the partitions again (the group has
    dropped the dead member), kill -9 it again and restart."""
    settings = fresh_settings(kafka, driver=driver, processing_guarantee=guarantee)
    records, completions = recorded_records(repeat=24, shapes=SHAPES)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1200)
    producer.start()
    faults = []
    time.sleep(3)
    for n in range(2):
        assert producer.is_alive(), "every completion was published before the fault"
        members = wait_group_stable(settings, 1)
        faults.append(("kill -9 worker", time.time()))
        workers[-1].kill()
        workers.append(WorkerProcess(settings, tmp_path / f"worker-restart-{n}.log").start())
        wait_group_stable(settings, 1, timeout=60, without=frozenset(members))
        time.sleep(3)
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    check_and_report("worker kill -9 (x2)", settings, got, records, completions, producer, faults)


@pytest.mark.parametrize(("driver", "guarantee"), MODES)
def test_rebalance_1_to_3_to_1(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess], driver: str, guarantee: str
) -> None:
    settings = fresh_settings(kafka, partitions=6, driver=driver, processing_guarantee=guarantee)
    records, completions = recorded_records(repeat=16, shapes=SHAPES)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=700)
    producer.start()
    time.sleep(3)
    faults = [("grow group 1 -> 3", time.time())]
    for n in range(2):
        workers.append(WorkerProcess(settings, tmp_path / f"worker-extra-{n}.log").start())
    wait_group_stable(settings, 3, timeout=120)
    time.sleep(2)
    assert producer.is_alive(), "the group grew only after every completion was published"
    faults.append(("shrink group 3 -> 1", time.time()))
    for worker in workers[1:]:
        worker.stop()
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert workers[0].alive
    check_and_report("rebalance 1 -> 3 -> 1 workers", settings, got, records, completions, producer, faults)


def test_switching_between_the_faust_and_direct_drivers_mid_stream(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Both drivers use the same group, committed offsets and state changelog: a deployment can
    stop one and start the other while completions are open, and they are finished unchanged."""
    settings = fresh_settings(kafka)
    records, completions = recorded_records(repeat=4, shapes=SHAPES)
    workers.append(
        WorkerProcess(
            settings.model_copy(update={"driver": "faust"}), tmp_path / "worker-faust-0.log"
        ).start()
    )
    wait_group_stable(settings, 1)
    producer = BackgroundProducer(settings, records, rate=600)
    producer.start()
    for n, driver in enumerate(("direct", "faust"), 1):
        time.sleep(3)
        switched_at = time.time()
        workers[-1].stop()
        assert producer.in_flight_at(switched_at) > 0
        workers.append(
            WorkerProcess(
                settings.model_copy(update={"driver": driver}), tmp_path / f"worker-{driver}-{n}.log"
            ).start()
        )
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert_matches_reference(got, offline_reference(records))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Any]:
    broker = kafka_module().Broker(run_dir=tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_broker_restart(
    own_broker: Any, tmp_path: Path, workers: list[WorkerProcess], guarantee: str
) -> None:
    settings = fresh_settings(own_broker.bootstrap, processing_guarantee=guarantee)
    records, completions = recorded_records(repeat=8, shapes=SHAPES)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1200)
    producer.start()
    time.sleep(3)
    faults = [("broker stop + start", time.time())]
    own_broker.stop()
    time.sleep(3)
    own_broker.restart()
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert workers[0].alive, workers[0].log_tail()
    check_and_report("broker restart", settings, got, records, completions, producer, faults)


def test_abandoned_streams_expire_and_state_stays_flat(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Streams without an end marker expire after the idle timeout and their state is deleted;
    while at least ten times more completions pass through than the worker ever holds at once,
    the open completions, the state held and the worker's memory stay flat (the second half of
    the run peaks no higher than the first, within noise)."""
    port = kafka_module().free_ports(1)[0]
    settings = fresh_settings(kafka, idle_timeout_s=1.0, tombstone_s=1.0, web_port=port)
    records, completions = abandoned_records(repeat=56)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1500)
    producer.start()
    samples = sample_gauges(port, producer, workers[0])
    producer.finish()
    status, _, served = http_get(port, "/metrics")
    assert status == 200, served
    for family in METRIC_FAMILIES:
        assert f"# TYPE {family} " in served, family
    assert 'chunkfold_completions_out_total{status="expired"}' in served
    assert "chunkfold_processing_latency_seconds_count 0" not in served
    got = collect(settings, done_count(completions), timeout=120)
    done = got.done_by_id()
    assert len(done) == completions
    assert {d["status"] for d in done.values()} == {"expired"}
    wait_for(lambda: gauges(port)["chunkfold_state_bytes"] == 0, 30, "state of expired completions deleted")
    final = gauges(port)
    assert final["chunkfold_open_completions"] == 0 and final["chunkfold_closed_tombstones"] == 0
    # The first quarter fills the pipeline; the rest is compared half against half.
    steady = samples[len(samples) // 4 :]
    assert len(steady) >= 20, f"only {len(samples)} samples"
    first, second = steady[: len(steady) // 2], steady[len(steady) // 2 :]
    peak = {name: max(s[name] for s in samples) for name in samples[0] if name != "t"}
    growth = {name: max(s[name] for s in second) / max(1.0, max(s[name] for s in first)) for name in peak}
    assert completions >= 10 * peak["chunkfold_open_completions"], (completions, peak)
    assert growth["chunkfold_open_completions"] <= 1.5, growth
    assert growth["chunkfold_state_bytes"] <= 1.5, growth
    assert growth["rss_bytes"] <= 1.25, growth
    written = final["chunkfold_state_written_bytes_total"]
    write_report(
        "abandoned streams",
        completions=completions,
        duration_s=round(samples[-1]["t"] - samples[0]["t"], 1),
        peak_open=peak["chunkfold_open_completions"],
        peak_tombstones=peak["chunkfold_closed_tombstones"],
        peak_state_bytes=peak["chunkfold_state_bytes"],
        state_bytes_written=written,
        written_per_peak_held=round(written / max(1.0, peak["chunkfold_state_bytes"]), 1),
        completions_per_peak_open=round(completions / max(1.0, peak["chunkfold_open_completions"]), 1),
        second_half_peak_over_first={k: round(v, 2) for k, v in growth.items()},
        rss_mb_first_last=[
            round(steady[0]["rss_bytes"] / 2**20, 1),
            round(samples[-1]["rss_bytes"] / 2**20, 1),
        ],
        final_state_bytes=final["chunkfold_state_bytes"],
        lost=completions - len(done),
    )


def abandoned_records(repeat: int) -> tuple[list[GatewayRecord], int]:
    records, completions = recorded_records(repeat=repeat, concurrency=10)
    return [r for r in records if r.value != b"[DONE]"], completions


def gauges(port: int) -> dict[str, float]:
    """The worker's unlabelled series."""
    return {name: series[()] for name, series in scrape(port).items() if () in series}


def rss_bytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def sample_gauges(port: int, producer: BackgroundProducer, worker: WorkerProcess) -> list[dict[str, float]]:
    """Every 0.5 s while ``producer`` runs: open completions, tombstones, state bytes held and
    the worker's resident memory."""
    assert worker.proc is not None
    names = ("chunkfold_open_completions", "chunkfold_closed_tombstones", "chunkfold_state_bytes")
    samples: list[dict[str, float]] = []
    while producer.is_alive():
        try:
            current = gauges(port)
        except OSError:
            time.sleep(0.5)
            continue
        sample = {name: current.get(name, 0.0) for name in names}
        sample.update(t=time.monotonic(), rss_bytes=rss_bytes(worker.proc.pid))
        samples.append(sample)
        time.sleep(0.5)
    return samples


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    nodes = kafka_module().Cluster(size=3, run_dir=tmp_path / "cluster")
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.close()


def leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> leading broker id."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def ask() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
            return {int(p["partition"]): int(p["leader"]) for p in described["partitions"]}
        finally:
            await admin.close()

    return asyncio.run(ask())


def test_failover_of_the_leading_broker(cluster: Any, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    settings = fresh_settings(cluster.bootstrap, replication_factor=3)
    records, completions = recorded_records(repeat=8, shapes=SHAPES)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1000)
    producer.start()
    time.sleep(3)
    inputs = leaders(cluster.bootstrap, settings.input_topic)
    states = leaders(cluster.bootstrap, f"{settings.app_id}-state-changelog")
    both = sorted(set(inputs.values()) & set(states.values()))
    assert both, f"no broker leads both an input and a state partition: {inputs} {states}"
    victim = both[0]
    led = [f"input p{p}" for p, b in inputs.items() if b == victim]
    led += [f"state p{p}" for p, b in states.items() if b == victim]
    faults = [(f"kill -9 broker {victim} (leader of {', '.join(led)})", time.time())]
    cluster.kill(victim)
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert workers[0].alive, workers[0].log_tail()
    check_and_report("broker failover (3 nodes, RF 3)", settings, got, records, completions, producer, faults)
