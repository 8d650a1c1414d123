"""The worker's HTTP pages, for both drivers: ``/metrics``, ``/healthz`` and ``/readyz`` only.

``Pages`` builds each page's status, content type and body; the direct driver serves them on
its own aiohttp server (``serve``), the Faust driver registers the same pages on Faust's web
server (``chunkfold.drivers.faust``). Either listens on ``CHUNKFOLD_WEB_HOST`` (loopback by
default) and ``CHUNKFOLD_WEB_PORT``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import web

from chunkfold.metrics import METRICS_CONTENT_TYPE, exposition
from chunkfold.processor import Processor

JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class Page(NamedTuple):
    status: int
    content_type: str
    body: bytes


def _json_page(body: object, status: int = 200) -> Page:
    return Page(status, JSON_CONTENT_TYPE, json.dumps(body).encode())


class Pages:
    """The three pages of one worker: its ``processor``'s metrics and readiness;
    ``recovering()`` tells whether the driver is restoring state (not ready meanwhile)."""

    def __init__(self, processor: Processor, recovering: Callable[[], bool]) -> None:
        self.processor = processor
        self.recovering = recovering

    def metrics(self) -> Page:
        """Prometheus text: the processor's registry (with whatever the driver registered)."""
        return Page(200, METRICS_CONTENT_TYPE, exposition(self.processor.registry))

    def healthz(self) -> Page:
        """Liveness: answering at all is the answer."""
        return _json_page({"status": "alive"})

    def readyz(self) -> Page:
        """200 once partitions are assigned and not being recovered, else 503."""
        body = self.processor.readiness(recovering=self.recovering())
        return _json_page(body, 200 if body["ready"] else 503)

    def routes(self) -> dict[str, Callable[[], Page]]:
        """Path: page, every page a worker serves."""
        return {"/metrics": self.metrics, "/healthz": self.healthz, "/readyz": self.readyz}


def _handler(page: Callable[[], Page]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_request: web.Request) -> web.Response:
        status, content_type, body = page()
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    return handle


async def serve(pages: Pages, host: str, port: int) -> web.AppRunner:
    """Serve ``pages`` on ``host``:``port`` (the direct driver); ``cleanup()`` the runner to stop."""
    app = web.Application()
    for path, page in pages.routes().items():
        app.router.add_get(path, _handler(page))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
