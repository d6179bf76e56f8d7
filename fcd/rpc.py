"""XML-RPC over one persistent HTTP/1.1 connection, batched with ``system.multicall``.

Marshalling is the standard library's (``xmlrpc.client.dumps``/``loads``).  The HTTP part is a
minimal keep-alive client: one TCP connection carries request after request (no pipelining);
``Content-Length`` framing both ways; the response head is bounded.

:class:`ReliableUplink` queues calls (bounded; overflow drops the oldest and counts it), sends
them in batches, and removes them only when the server's multicall response acknowledges them.
If the connection fails, it reconnects with backoff and resends every unacknowledged call, so a
server restart loses nothing (the server treats repeated reports idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import xmlrpc.client
from typing import Any

log = logging.getLogger("fcd.rpc")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024 * 1024


class RpcError(Exception):
    """The HTTP exchange failed (connection, framing or status)."""


class KeepAliveClient:
    """One HTTP/1.1 connection, reopened only when it breaks."""

    def __init__(self, host: str, port: int, path: str = "/RPC2", timeout: float = 10.0) -> None:
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connections = 0
        self.requests = 0

    async def _ensure(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
            self.connections += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, body: bytes) -> bytes:
        try:
            await self._ensure()
            head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: keep-alive\r\n\r\n").encode()
            self.writer.write(head + body)
            self.requests += 1
            return await asyncio.wait_for(self._response(), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise RpcError(f"HTTP exchange with {self.host}:{self.port} failed: {exc!r}") from None
        except RpcError:
            self.close()
            raise

    async def _response(self) -> bytes:
        head = await self.reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise RpcError("response head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise RpcError(f"bad status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            raise RpcError("response without a valid Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise RpcError(f"response body of {length} bytes refused")
        body = await self.reader.readexactly(length)
        if headers.get("connection", "").lower() == "close":
            self.close()
        if parts[1] != "200":
            raise RpcError(f"HTTP status {parts[1]}")
        return body

    async def call(self, method: str, *params: Any) -> Any:
        body = xmlrpc.client.dumps(params, methodname=method, allow_none=True).encode()
        data = await self.post(body)
        try:
            (result,), _ = xmlrpc.client.loads(data, use_builtin_types=True)
        except xmlrpc.client.Fault:
            raise
        except Exception as exc:  # expat and friends: a broken answer, retry on a new connection
            self.close()
            raise RpcError(f"malformed XML-RPC response: {exc}") from None
        return result

    async def multicall(self, calls: list[tuple[str, tuple]]) -> list[Any]:
        """Results in order; a failed call gives an ``xmlrpc.client.Fault`` in its place."""
        payload = [{"methodName": m, "params": list(p)} for m, p in calls]
        results = await self.call("system.multicall", payload)
        if not isinstance(results, list) or len(results) != len(calls):
            raise RpcError("multicall answer does not match the calls")
        out = []
        for item in results:
            if isinstance(item, dict) and "faultCode" in item:
                out.append(xmlrpc.client.Fault(item["faultCode"], item.get("faultString", "")))
            elif isinstance(item, list) and len(item) == 1:
                out.append(item[0])
            else:
                raise RpcError(f"malformed multicall entry {item!r}")
        return out


class ReliableUplink:
    """Queue of calls sent in multicall batches over one keep-alive connection; at-least-once."""

    def __init__(self, client: KeepAliveClient, max_queue: int = 100_000, batch: int = 500,
                 interval: float = 0.25, backoff: tuple[float, float] = (0.05, 2.0)) -> None:
        self.client, self.max_queue, self.batch, self.interval = client, max_queue, batch, interval
        self.backoff = backoff
        self.queue: collections.deque[tuple[int, str, tuple]] = collections.deque()
        self._seq = 0
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.stats = {"queued": 0, "acked": 0, "dropped": 0, "faults": 0, "batches": 0, "failures": 0,
                      "unmarshallable": 0}
        self.last_fault = ""

    def put(self, method: str, *params: Any) -> None:
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self.stats["dropped"] += 1
        self._seq += 1
        self.queue.append((self._seq, method, params))
        self.stats["queued"] += 1
        self.idle.clear()
        if len(self.queue) == 1 or len(self.queue) >= self.batch:
            self.wakeup.set()

    async def _wait(self, stop: asyncio.Event, timeout: float | None) -> None:
        """Until woken by a put, a stop, or ``timeout``."""
        if stop.is_set():
            return
        waiters = [asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        self.wakeup.clear()

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set and the queue is empty (the caller bounds the drain time)."""
        delay = self.backoff[0]
        while not (stop.is_set() and not self.queue):
            if not self.queue:
                self.idle.set()
                await self._wait(stop, None)          # idle costs nothing
                if self.queue and not stop.is_set() and len(self.queue) < self.batch:
                    await self._wait(stop, self.interval)   # let the batch grow: fewer, larger requests
                continue
            batch = [self.queue[i] for i in range(min(self.batch, len(self.queue)))]
            try:
                results = await self.client.multicall([(m, p) for _, m, p in batch])
            except (TypeError, OverflowError, ValueError, xmlrpc.client.Fault) as exc:
                # a call that cannot be marshalled (or that the server refuses whole) never succeeds
                self.stats["unmarshallable"] += len(batch)
                log.error("uplink: dropping %d calls that cannot be sent: %s", len(batch), exc)
                self._ack(batch[-1][0])
                continue
            except RpcError as exc:
                self.stats["failures"] += 1
                log.warning("uplink: %s; resending %d calls in %.2fs", exc, len(self.queue), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            self._ack(batch[-1][0])       # the server answered every call of the batch
            self.stats["batches"] += 1
            self.stats["acked"] += len(batch)
            for r in results:
                if isinstance(r, xmlrpc.client.Fault):
                    self.stats["faults"] += 1
                    self.last_fault = r.faultString
            if self.queue and len(self.queue) < self.batch and not stop.is_set():
                await self._wait(stop, self.interval)
        self.idle.set()

    def _ack(self, last: int) -> None:
        while self.queue and self.queue[0][0] <= last:
            self.queue.popleft()
