"""``make run`` (``python -m tests.demo`` from the checkout): a local broker (unless
``KAFKA_BOOTSTRAP_SERVERS`` is set), a worker, and a demo producer that replays recorded and
generated streams at a realistic pace, with live progress. The worker's query listener is on
(loopback, a free port unless ``CHUNKFOLD_QUERY_PORT`` says otherwise; 0 turns it off), and the
demo prints one ``curl`` line that follows a completion live.

Development only, never packaged: it needs the checkout (``deploy/kafka/`` for the broker, the
recorded fixtures under ``tests/fixtures``) and runs the installed ``chunkfold worker``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from chunkfold.config import Settings
from chunkfold.gateway import GatewayRecord, capture_records, load_captures
from chunkfold.kafka_io import KafkaClients, ensure_topics, make_producer, output_consumer
from tests.demo import synthetic
from tests.recorded import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
"""The checkout (tests/demo/__main__.py is two levels down)."""
CHUNK_GAP_S = 0.025
CONCURRENT = 24
QUERY_PORT_VARIABLE = "CHUNKFOLD_QUERY_PORT"
LISTENER_WAIT_S = 90.0
"""How long the demo waits for the worker's query listener to know the watched completion."""


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def start_broker() -> tuple[str, bool]:
    """The configured broker, or a local one started by ``deploy/kafka/kafka.py up``."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        return configured, False
    script = ROOT / "deploy" / "kafka" / "kafka.py"
    _log("no KAFKA_BOOTSTRAP_SERVERS: starting a local Kafka broker (first run downloads the jars)")
    status = subprocess.run([sys.executable, str(script), "status"], capture_output=True, text=True)
    already = status.returncode == 0
    up = subprocess.run([sys.executable, str(script), "up"], stdout=subprocess.PIPE, text=True)
    if up.returncode != 0:
        raise SystemExit("[demo] could not start Kafka (see the lines above)")
    return up.stdout.strip().splitlines()[-1], not already


def demo_streams() -> list[list[GatewayRecord]]:
    """The recorded API streams plus generated ones."""
    streams: list[list[GatewayRecord]] = []
    for _, text, request in load_captures([FIXTURES]):
        streams += capture_records(text, request).values()
    for n, kind in enumerate(synthetic.KINDS * 4):
        stream = synthetic.make_stream(kind, 48 + 40 * n, seed=n)
        streams += capture_records(synthetic.capture(stream), stream.request).values()
    return streams


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.produced_chunks = 0
        self.started_completions = 0
        self.done: Counter[str] = Counter()
        self.events = 0
        self.deadletters = 0
        self.sample: dict[str, Any] | None = None
        self.sample_shown = False

    def line(self, rate: float) -> str:
        finished = sum(self.done.values())
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.done.items()))
        return (
            f"[{time.monotonic() - self.started:6.1f}s] completions finished {finished} ({statuses or '-'})  "
            f"open {self.started_completions - finished}  chunks/s {rate:7.1f}  events {self.events}  "
            f"dead letters {self.deadletters}"
        )


def longest_first(streams: list[list[GatewayRecord]]) -> list[list[GatewayRecord]]:
    """``streams`` with the one of the most records moved to the front: the producer starts it
    first, under the id ``watched_id`` gives, and it streams longest (the one to watch)."""
    longest = max(range(len(streams)), key=lambda i: len(streams[i]))
    return [streams[longest], *streams[:longest], *streams[longest + 1 :]]


def completion_id(template: list[GatewayRecord], started: int, templates: int) -> str:
    """The id of the ``started``-th completion the producer starts (from 0): its template's id
    and how many times the templates were cycled through before."""
    return f"{template[0].key.decode()}-{started // templates}"


def watched_id(templates: list[list[GatewayRecord]]) -> str:
    """The id of the first completion ``produce_forever`` starts."""
    return completion_id(templates[0], 0, len(templates))


async def produce_forever(
    settings: Settings, templates: list[list[GatewayRecord]], progress: Progress, stop: asyncio.Event
) -> None:
    producer = make_producer(KafkaClients.of(settings))
    await producer.start()
    _log(
        f"producing {len(templates)} distinct streams, {CONCURRENT} at a time, ~{1 / CHUNK_GAP_S:.0f} chunks/s each"
    )

    async def one(template: list[GatewayRecord], new_id: str) -> None:
        rewritten = capture_records_with_key(template, new_id)
        progress.started_completions += 1
        for record in rewritten:
            if stop.is_set():
                return
            await producer.send(
                settings.input_topic,
                record.value,
                key=record.key,
                headers=record.headers,
                timestamp_ms=int(time.time() * 1000),
            )
            progress.produced_chunks += 1
            await asyncio.sleep(CHUNK_GAP_S)

    try:
        running: set[asyncio.Task[None]] = set()
        started = 0
        while not stop.is_set():
            while len(running) < CONCURRENT:
                template = templates[started % len(templates)]
                running.add(
                    asyncio.create_task(one(template, completion_id(template, started, len(templates))))
                )
                started += 1
            _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await producer.stop()


def capture_records_with_key(template: list[GatewayRecord], completion_id: str) -> list[GatewayRecord]:
    old = template[0].key.decode()
    out = []
    for record in template:
        value = record.value
        if value.startswith(b"{") and f'"{old}"'.encode() in value:
            value = value.replace(f'"id":"{old}"'.encode(), f'"id":"{completion_id}"'.encode(), 1)
        out.append(GatewayRecord(completion_id.encode(), value, record.headers))
    return out


async def watch(settings: Settings, progress: Progress, stop: asyncio.Event) -> None:
    consumer = output_consumer(settings, from_beginning=False)
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=250)
            for tp, messages in batch.items():
                for m in messages:
                    if tp.topic == settings.events_topic:
                        progress.events += 1
                    elif tp.topic == settings.done_topic:
                        done = orjson.loads(m.value)
                        progress.done[done["status"]] += 1
                        if progress.sample is None and done["status"] == "completed" and done["request"]:
                            progress.sample = done
                    else:
                        progress.deadletters += 1
    finally:
        await consumer.stop()


async def announce_watch(settings: Settings, watched: str) -> None:
    """Once the worker's query listener answers for ``watched`` (it is streaming), print the one
    line that follows it live: ``curl`` on its events, and ``chunkfold watch``."""
    url = settings.query_url()
    token = settings.query_bearer_token()
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    path = f"/completions/{quote(watched, safe='')}"
    deadline = time.monotonic() + LISTENER_WAIT_S
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + path) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                _log(f"the query listener at {url} did not answer for {watched} (see the worker log)")
                return
            await asyncio.sleep(0.2)
    _log(
        f"watch a live completion: curl -N{_curl_authorization(settings)} {shlex.quote(url + path + '/events')}"
        f"   (or: {_chunkfold_command()} watch {shlex.quote(watched)} --url {url})"
    )


def _curl_authorization(settings: Settings) -> str:
    """curl's option for the query token, naming where it is kept rather than printing it."""
    if settings.query_token_file is not None:
        return f' -H "Authorization: Bearer $(cat {shlex.quote(str(settings.query_token_file))})"'
    if settings.query_token is not None:
        return ' -H "Authorization: Bearer $CHUNKFOLD_QUERY_TOKEN"'
    return ""


def _chunkfold_command() -> str:
    """``chunkfold`` as this checkout runs it: the script next to this interpreter."""
    script = Path(sys.executable).parent / "chunkfold"
    with contextlib.suppress(ValueError):
        return str(script.relative_to(Path.cwd()))
    return str(script)


def free_port() -> int:
    """A loopback port free right now (for the worker's query listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def report(progress: Progress, stop: asyncio.Event) -> None:
    last_chunks, last_time = 0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(2)
        now = time.monotonic()
        rate = (progress.produced_chunks - last_chunks) / (now - last_time)
        last_chunks, last_time = progress.produced_chunks, now
        print(progress.line(rate), flush=True)
        if progress.sample is not None and not progress.sample_shown:
            progress.sample_shown = True
            sample = {
                k: progress.sample[k] for k in ("completion_id", "status", "usage", "timing", "chunk_count")
            }
            message = progress.sample["completion"]["choices"][0]["message"]
            sample["message"] = {k: message[k] for k in ("content", "parsed", "tool_calls") if message.get(k)}
            print(
                "[demo] a finished completion-done record:\n"
                + orjson.dumps(sample, option=orjson.OPT_INDENT_2).decode()
            )


async def run(settings: Settings) -> None:
    topics = (settings.input_topic, settings.events_topic, settings.done_topic, settings.deadletter_topic)
    if settings.create_topics:
        await ensure_topics(KafkaClients.of(settings), topics, settings.partitions)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    progress = Progress()
    templates = longest_first(demo_streams())
    tasks = [
        asyncio.create_task(produce_forever(settings, templates, progress, stop)),
        asyncio.create_task(watch(settings, progress, stop)),
        asyncio.create_task(report(progress, stop)),
    ]
    if settings.query_port > 0:
        tasks.append(asyncio.create_task(announce_watch(settings, watched_id(templates))))
    await stop.wait()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    bootstrap, started_broker = start_broker()
    _log(f"Kafka at {bootstrap}")
    settings = Settings.from_env(
        bootstrap_servers=bootstrap,
        app_id=os.environ.get("CHUNKFOLD_APP_ID", "chunkfold-demo"),
        query_port=None if QUERY_PORT_VARIABLE in os.environ else free_port(),
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CHUNKFOLD_APP_ID": settings.app_id,
        QUERY_PORT_VARIABLE: str(settings.query_port),
    }
    log_path = ROOT / ".cache" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _log(f"starting the worker (log: {log_path.relative_to(ROOT)}); Ctrl-C stops the demo")
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "chunkfold.cli", "worker", "--loglevel", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        asyncio.run(run(settings))
    finally:
        _log("stopping the worker")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if started_broker:
            _log("stopping the local Kafka broker")
            subprocess.run([sys.executable, str(ROOT / "deploy" / "kafka" / "kafka.py"), "down"], check=False)
        _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
