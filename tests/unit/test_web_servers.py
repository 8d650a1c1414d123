"""The workers' web servers, both drivers, started for real without Kafka: health and metrics
only (none of Faust's own views), listening on ``CHUNKFOLD_WEB_HOST``; and the deployments set
the address their probes need."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chunkfold.config import Settings
from tests.postgres import free_port
from tests.unit.test_deploy import settings_from, worker_environments

pytestmark = pytest.mark.unit

OUR_PAGES = {"/healthz", "/readyz", "/metrics"}
FAUST_VIEWS = ("/router/", "/table/", "/table/state/", "/graph/", "/performance/", "/assignment/")

Served = tuple[list[Any], set[str]]
"""The listening socket addresses and the paths of the routes served."""


@asynccontextmanager
async def faust_server(settings: Settings) -> AsyncIterator[Served]:
    from chunkfold.drivers.faust import create_app
    from chunkfold.drivers.partitions import KeyPartitions
    from chunkfold.kafka_io import KafkaClients

    app, _ = create_app(settings, KeyPartitions(), KafkaClients.of(settings))
    server: Any = app.web  # Faust's aiohttp driver
    server.init_server()  # what `faust worker` does before starting the web service
    await server.start_server()
    try:
        yield server._runner.addresses, paths(server.web_app)
    finally:
        await server.stop_server()


@asynccontextmanager
async def direct_server(settings: Settings) -> AsyncIterator[Served]:
    from chunkfold.drivers.direct.recovery import Recovery
    from chunkfold.drivers.direct.worker import serve_web
    from chunkfold.processor import Processor
    from chunkfold.state.changelog import ChangelogStore, changelog_topic

    store = ChangelogStore()
    recovery = Recovery(settings, store, changelog_topic(settings), local_copy=None)
    runner = await serve_web(settings, Processor(settings, store), recovery)
    try:
        yield runner.addresses, paths(runner.app)
    finally:
        await runner.cleanup()


def paths(app: web.Application) -> set[str]:
    return {route.resource.canonical for route in app.router.routes() if route.resource is not None}


SERVERS: dict[str, Callable[[Settings], AbstractAsyncContextManager[Served]]] = {
    "faust": faust_server,
    "direct": direct_server,
}


def statuses(port: int, wanted: tuple[str, ...]) -> Callable[[], Awaitable[dict[str, int]]]:
    async def get() -> dict[str, int]:
        async with aiohttp.ClientSession() as session:
            found = {}
            for path in wanted:
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    found[path] = response.status
            return found

    return get


def test_the_default_address_is_loopback() -> None:
    assert Settings().web_host == "127.0.0.1"


@pytest.mark.parametrize("driver", sorted(SERVERS))
def test_only_health_and_metrics_are_served_on_the_configured_address(
    driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("CHUNKFOLD_WEB_HOST", "127.0.0.1")
    monkeypatch.setenv("CHUNKFOLD_WEB_PORT", str(port))
    settings = Settings.from_env(bootstrap_servers="unused:9092")

    async def serve() -> tuple[Served, dict[str, int]]:
        async with SERVERS[driver](settings) as served:
            return served, await statuses(port, (*sorted(OUR_PAGES), *FAUST_VIEWS))()

    (addresses, served_paths), found = asyncio.run(serve())
    assert [address[:2] for address in addresses] == [("127.0.0.1", port)]
    # Faust keeps one page of its own: "/", a constant {"status": "OK"} (its production index).
    assert served_paths - {"/"} == OUR_PAGES
    assert found["/healthz"] == found["/metrics"] == 200
    assert found["/readyz"] == 503  # nothing assigned
    assert {found[path] for path in FAUST_VIEWS} == {404}


def test_the_direct_driver_listens_where_it_is_told() -> None:
    port = free_port()
    settings = Settings(bootstrap_servers="unused:9092", web_port=port, web_host="0.0.0.0")

    async def serve() -> list[Any]:
        async with direct_server(settings) as (addresses, _):
            return addresses

    assert [address[:2] for address in asyncio.run(serve())] == [("0.0.0.0", port)]


def test_every_deployment_listens_on_all_interfaces_for_its_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes and Prometheus reach a container through its own address, not its loopback."""
    for where, env in worker_environments().items():
        assert settings_from(env, monkeypatch).web_host == "0.0.0.0", where
