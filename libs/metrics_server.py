"""The small HTTP endpoint of services that have no HTTP API of their own (tokenizer, router, workers,
kv-index): GET /metrics (Prometheus text, or OpenMetrics when the scraper asks for it) and GET /health
(200 once the service is attached to NATS and connected, 503 before and while disconnected).

It runs on the service's own event loop (asyncio.start_server): no thread, nothing to stop but the
server. Rendering the registry takes about a millisecond, every scrape interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT_S = 5.0


class MetricsServer:
    def __init__(self, port: int, host: str = "0.0.0.0", registry=REGISTRY) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        # What /health reports; `attached(bus)` makes it "connected to NATS".
        self.healthy: Callable[[], bool] = lambda: False
        self._server: asyncio.Server | None = None

    async def start(self) -> MetricsServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when asked for port 0
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def attached(self, bus) -> None:
        """The service has attached its handlers to `bus`: healthy while NATS is connected."""
        self.healthy = lambda: bus.nc.is_connected

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = self._respond(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        except Exception:
            log.exception("metrics endpoint failed")
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            accept = next(
                (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")),
                "",
            )
            encoder, ctype = choose_encoder(accept)
            body = encoder(self.registry)
            return "200 OK", ctype, body if method == "GET" else b""
        if path == "/health":
            if self.healthy():
                return "200 OK", "application/json", b'{"status":"ok"}'
            return "503 Service Unavailable", "application/json", b'{"status":"unavailable"}'
        return "404 Not Found", "text/plain", b"not found: try /metrics or /health\n"


async def start_metrics_server(port: int, host: str = "0.0.0.0") -> MetricsServer | None:
    """A started MetricsServer, or None when `port` is 0 (metrics off)."""
    if not port:
        return None
    return await MetricsServer(port, host).start()
