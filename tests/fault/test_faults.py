"""Faults injected for real while hundreds of completions stream: worker kill -9, rebalance,
broker restart, and abandoned streams. Each scenario writes its figures to
``.cache/reliability/<scenario>.json`` (the README's reliability table)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

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
from worker.gateway import GatewayRecord

pytestmark = pytest.mark.fault
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


def check_and_report(
    name: str,
    got: Collected,
    records: list[GatewayRecord],
    completions: int,
    producer: BackgroundProducer,
    faults: list[tuple[str, float]],
    bad_records: int = 0,
) -> None:
    assert_matches_reference(got, offline_reference(records))
    done_repeats, event_repeats = got.repeats()
    end = max(producer.last_sent.values()) + 5
    write_report(
        name,
        completions=completions,
        in_flight=max(producer.in_flight_at(at) for _, at in faults),
        faults=[what for what, _ in faults],
        bad_records=bad_records,
        lost=completions - len(got.done_by_id()),
        repeated_done_before_dedup=done_repeats,
        repeated_events_before_dedup=event_repeats,
        duplicated_after_dedup=0,
        recovery_s=round(max(got.longest_gap(at - 1, end) for _, at in faults), 2),
    )


def test_worker_kill_9_and_restart(kafka: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    settings = fresh_settings(kafka)
    records, completions = recorded_records(repeat=8)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1200)
    producer.start()
    faults = []
    for n in range(2):
        time.sleep(3)
        faults.append(("kill -9 worker", time.time()))
        workers[-1].kill()
        workers.append(WorkerProcess(settings, tmp_path / f"worker-restart-{n}.log").start())
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    check_and_report("worker kill -9 (x2)", got, records, completions, producer, faults)


def test_rebalance_1_to_3_to_1(kafka: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    settings = fresh_settings(kafka, partitions=6)
    records, completions = recorded_records(repeat=16)
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
    check_and_report("rebalance 1 -> 3 -> 1 workers", got, records, completions, producer, faults)


def test_switching_between_the_faust_and_direct_drivers_mid_stream(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Both drivers use the same group, committed offsets and state changelog: a deployment can
    stop one and start the other while completions are open, and they are finished unchanged."""
    settings = fresh_settings(kafka)
    records, completions = recorded_records(repeat=4)
    workers.append(WorkerProcess(replace(settings, driver="faust"), tmp_path / "worker-faust-0.log").start())
    wait_group_stable(settings, 1)
    producer = BackgroundProducer(settings, records, rate=600)
    producer.start()
    for n, driver in enumerate(("direct", "faust"), 1):
        time.sleep(3)
        switched_at = time.time()
        workers[-1].stop()
        assert producer.in_flight_at(switched_at) > 0
        workers.append(
            WorkerProcess(replace(settings, driver=driver), tmp_path / f"worker-{driver}-{n}.log").start()
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


def test_broker_restart(own_broker: Any, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    settings = fresh_settings(own_broker.bootstrap)
    records, completions = recorded_records(repeat=8)
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
    check_and_report("broker restart", got, records, completions, producer, faults)


def test_abandoned_streams_expire_and_state_stays_flat(
    kafka: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    port = kafka_module().free_ports(1)[0]
    settings = fresh_settings(kafka, idle_timeout_s=2.0, tombstone_s=2.0, web_port=port)
    records, completions = abandoned_records(repeat=20)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1500)
    producer.start()
    peaks = sample_gauges(port, producer)
    producer.finish()
    from urllib.request import urlopen

    served = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
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
    assert peaks["chunkfold_open_completions"] < completions / 4, peaks
    write_report(
        "abandoned streams",
        completions=completions,
        peak_open=peaks["chunkfold_open_completions"],
        peak_tombstones=peaks["chunkfold_closed_tombstones"],
        peak_state_bytes=peaks["chunkfold_state_bytes"],
        final_state_bytes=final["chunkfold_state_bytes"],
        lost=completions - len(done),
    )


def abandoned_records(repeat: int) -> tuple[list[GatewayRecord], int]:
    records, completions = recorded_records(repeat=repeat, concurrency=40)
    return [r for r in records if r.value != b"[DONE]"], completions


def gauges(port: int) -> dict[str, float]:
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sample_gauges(port: int, producer: BackgroundProducer) -> dict[str, float]:
    names = ("chunkfold_open_completions", "chunkfold_closed_tombstones", "chunkfold_state_bytes")
    peaks = dict.fromkeys(names, 0.0)
    while producer.is_alive():
        try:
            current = gauges(port)
        except OSError:
            time.sleep(0.5)
            continue
        for name in names:
            peaks[name] = max(peaks[name], current.get(name, 0.0))
        time.sleep(0.5)
    return peaks


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
    records, completions = recorded_records(repeat=8)
    start_workers(settings, 1, tmp_path, workers)
    producer = BackgroundProducer(settings, records, rate=1000)
    producer.start()
    time.sleep(3)
    inputs = leaders(cluster.bootstrap, settings.input_topic)
    states = leaders(cluster.bootstrap, f"{settings.app_id}-state-changelog")
    both = sorted(set(inputs.values()) & set(states.values()))
    victim = both[0] if both else inputs[0]
    led = [f"input p{p}" for p, b in inputs.items() if b == victim]
    led += [f"state p{p}" for p, b in states.items() if b == victim]
    faults = [(f"kill -9 broker {victim} (leader of {', '.join(led)})", time.time())]
    cluster.kill(victim)
    producer.finish()
    got = collect(settings, done_count(completions), timeout=240)
    assert workers[0].alive, workers[0].log_tail()
    check_and_report("broker failover (3 nodes, RF 3)", got, records, completions, producer, faults)
