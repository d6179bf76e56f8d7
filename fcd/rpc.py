"""XML-RPC over one persistent HTTP/1.1 connection, batched with ``system.multicall``.

Marshalling is the standard library's (``xmlrpc.client.dumps``/``loads``); HTTP is aiohttp's
client on a connector limited to one keep-alive connection (request after request, no
pipelining), so framing, status lines and headers are aiohttp's, bounded here by
:data:`MAX_BODY` both ways.

:class:`ReliableUplink` queues calls (bounded; overflow drops the oldest and counts it), sends
them in batches no larger than :data:`MAX_BODY` (the server's request limit), and removes them
only when the server's multicall response acknowledges them.  If the connection fails, it
reconnects with backoff and resends every unacknowledged call, so a server restart loses nothing
(the server treats repeated reports idempotently).  A call the server answers with
:data:`FAULT_BACKLOG` (its backlog is full: the reports were refused) is sent again after a
backoff, at most ``max_resends`` times; refusals are logged once per burst, and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import xmlrpc.client
from typing import Any

import aiohttp

from cliruntime.supervisor import Supervisor, within

log = logging.getLogger("fcd.rpc")

# The largest XML-RPC body either side accepts.  Uplink batches are cut to fit it, so it is
# also the largest legitimate request the server has to take (fcd-server's body limit).
MAX_BODY = 1024 * 1024
# fcd.report's fault when the server refused reports at its workers' backlog bound: worth sending again
FAULT_BACKLOG = 6


class RpcError(Exception):
    """The HTTP exchange failed (connection, framing or status)."""


class CallTooLarge(ValueError):
    """One call whose request alone exceeds the body limit: it can never be sent."""


class KeepAliveClient:
    """One HTTP/1.1 connection (aiohttp), reopened only when it breaks."""

    def __init__(self, host: str, port: int, path: str = "/RPC2", timeout: float = 10.0,
                 max_body: int = MAX_BODY) -> None:
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.max_body = max_body
        self.url = f"http://{host}:{port}{path}"
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task | None = None
        self._closer = Supervisor("fcd-rpc-client", logger=log)
        self.connections = 0
        self.requests = 0

    def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(self._on_connection)
            # one connection, kept alive well below the server's idle timeout
            connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=5.0, force_close=False)
            self._session = aiohttp.ClientSession(
                connector=connector, trace_configs=[trace], auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Content-Type": "text/xml"})
        return self._session

    async def _on_connection(self, session, ctx, params) -> None:
        self.connections += 1

    def close(self) -> None:
        """Drop the connection (the next call opens a new one); :meth:`aclose` waits for it."""
        if self._session is not None and not self._session.closed:
            # supervised (a failure is logged and counted), and chained after the previous
            # close: awaiting the last one (aclose) awaits them all
            self._closing = self._closer.spawn(self._close_after(self._closing, self._session),
                                               name="close-session", critical=False)
        self._session = None

    @staticmethod
    async def _close_after(previous: asyncio.Task | None, session: aiohttp.ClientSession) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await session.close()

    async def aclose(self) -> None:
        self.close()
        if self._closing is not None:
            await self._closing
            self._closing = None

    async def post(self, body: bytes) -> bytes:
        if len(body) > self.max_body:
            raise CallTooLarge(f"request of {len(body)} bytes exceeds the {self.max_body}-byte limit")
        session = self._ensure()
        self.requests += 1
        try:
            async with session.post(self.url, data=body) as resp:
                if resp.content_length is not None and resp.content_length > self.max_body:
                    raise RpcError(f"response body of {resp.content_length} bytes refused")
                # read(n) returns what has arrived (up to n): read on to the end or the limit
                chunks, size = [], 0
                while chunk := await resp.content.read(self.max_body + 1 - size):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.max_body:
                        raise RpcError("response body exceeds the limit")
                data = b"".join(chunks)
                if resp.status != 200:
                    raise RpcError(f"HTTP status {resp.status}")
                return data
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            self.close()
            raise RpcError(f"HTTP exchange with {self.host}:{self.port} failed: {exc!r}") from None
        except RpcError:
            self.close()
            raise

    @staticmethod
    def encode(method: str, *params: Any) -> bytes:
        return xmlrpc.client.dumps(params, methodname=method, allow_none=True).encode()

    async def call(self, method: str, *params: Any) -> Any:
        return await self.call_encoded(self.encode(method, *params))

    async def call_encoded(self, body: bytes) -> Any:
        data = await self.post(body)
        try:
            (result,), _ = xmlrpc.client.loads(data, use_builtin_types=True)
        except xmlrpc.client.Fault:
            raise
        except Exception as exc:  # expat and friends: a broken answer, retry on a new connection
            self.close()
            raise RpcError(f"malformed XML-RPC response: {exc}") from None
        return result

    @staticmethod
    def encode_multicall(calls: list[tuple[str, tuple]]) -> bytes:
        return KeepAliveClient.encode("system.multicall",
                                      [{"methodName": m, "params": list(p)} for m, p in calls])

    async def multicall(self, calls: list[tuple[str, tuple]], body: bytes | None = None) -> list[Any]:
        """Results in order; a failed call gives an ``xmlrpc.client.Fault`` in its place."""
        results = await self.call_encoded(body if body is not None else self.encode_multicall(calls))
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
                 interval: float | None = 0.25, backoff: tuple[float, float] = (0.05, 2.0),
                 max_resends: int = 5) -> None:
        """``interval``: seconds of wall clock a batch may grow; ``None``: batches are cut only by
        :meth:`mark_due` (data time), a full batch, or the stop.  ``backoff``: first and largest
        delay before reconnecting, and before sending a refused call again (doubling per attempt);
        ``max_resends``: how often a refused call is sent again before it is given up."""
        self.client, self.max_queue, self.batch, self.interval = client, max_queue, batch, interval
        self.backoff = backoff
        self.max_resends = max_resends
        self._resends: dict[int, int] = {}    # seq -> times this call was refused and sent again
        self._waiting_resend = 0              # refused calls waiting for their backoff
        self._refusal_burst = 0               # refusals since the server last took a batch whole
        self.queue: collections.deque[tuple[int, str, tuple]] = collections.deque()
        self._seq = 0
        self._sizes: dict[int, int] = {}      # encoded size of queued calls already measured
        self._marks: collections.deque[int] = collections.deque()   # last seq of each due batch
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.failing = asyncio.Event()    # set while the server cannot be reached, cleared on success
        self.stats = {"queued": 0, "acked": 0, "dropped": 0, "faults": 0, "batches": 0, "failures": 0,
                      "unmarshallable": 0, "batches_split": 0, "refused": 0, "resent": 0, "refused_given_up": 0}
        self.last_fault = ""

    def put(self, method: str, *params: Any) -> None:
        self.stats["queued"] += 1
        self._enqueue(method, params)

    def _enqueue(self, method: str, params: tuple) -> int:
        if len(self.queue) >= self.max_queue:
            seq = self.queue.popleft()[0]
            self._sizes.pop(seq, None)
            self._resends.pop(seq, None)
            self.stats["dropped"] += 1
        self._seq += 1
        self.queue.append((self._seq, method, params))
        self.idle.clear()
        if len(self.queue) == 1 or len(self.queue) >= self.batch:
            self.wakeup.set()      # start the wall-clock interval, or send a full batch
        return self._seq

    def _refused(self, refused: list[tuple[int, str, tuple]]) -> None:
        """Calls the server refused (its backlog was full): each goes back to the queue after its
        backoff, or is given up after ``max_resends``; logged once per burst of refusals."""
        if not self._refusal_burst:
            log.warning("uplink: the server refuses reports (its backlog is full: %s); sending them again "
                        "with backoff", self.last_fault)
        self._refusal_burst += len(refused)
        self.stats["refused"] += len(refused)
        loop = asyncio.get_running_loop()
        for seq, method, params in refused:
            attempt = self._resends.pop(seq, 0) + 1
            if attempt > self.max_resends:
                self.stats["refused_given_up"] += 1
                log.error("uplink: giving up a %s call refused %d times", method, attempt)
                continue
            self._waiting_resend += 1
            delay = min(self.backoff[0] * 2 ** (attempt - 1), self.backoff[1])
            loop.call_later(delay, self._resend, method, params, attempt)

    def _resend(self, method: str, params: tuple, attempt: int) -> None:
        self._waiting_resend -= 1
        self._resends[self._enqueue(method, params)] = attempt
        self.stats["resent"] += 1
        self.mark_due()                 # due now, whatever the batching

    def mark_due(self) -> None:
        """Data-time batching (``interval=None``): every call queued so far forms one batch, due
        now.  The caller marks the end of each data-time interval, so the number of requests
        follows the data, not the wall clock or the replay speed."""
        if self.queue and (not self._marks or self._marks[-1] < self._seq):
            self._marks.append(self._seq)
            self.wakeup.set()

    async def _wait(self, stop: asyncio.Event, timeout: float | None) -> bool:
        """Until woken by a put, a mark, a stop (True), or ``timeout`` (False)."""
        if stop.is_set():
            return True
        waiters = [asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(stop.wait())]
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        self.wakeup.clear()
        return bool(done)

    def _sendable(self, stop: asyncio.Event) -> int:
        """How many calls from the head of the queue may go now (0: wait)."""
        queue = self.queue
        if not queue:
            return 0
        head = queue[0][0]
        while self._marks and self._marks[0] < head:
            self._marks.popleft()
        if stop.is_set() or len(queue) >= self.batch:
            return min(len(queue), self.batch)
        if self._marks:                  # seqs in the queue are consecutive: up to the first mark
            return min(self._marks[0] - head + 1, self.batch)
        return 0

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set and the queue is empty (the caller bounds the drain time)."""
        delay = self.backoff[0]
        while not (stop.is_set() and not self.queue and not self._waiting_resend):
            n = self._sendable(stop)
            if n == 0:
                if not self.queue and not self._waiting_resend:
                    self.idle.set()
                if stop.is_set():       # only refused calls are left, back when their backoff ends
                    try:
                        await within(self.wakeup.wait(), self.backoff[1])
                    except asyncio.TimeoutError:
                        pass
                    self.wakeup.clear()
                    continue
                # wall-clock batching: a batch may grow for ``interval`` after its first call
                grow = self.interval if (self.queue and self.interval is not None) else None
                if not await self._wait(stop, grow):
                    self.mark_due()
                continue
            batch = [self.queue[i] for i in range(n)]
            try:
                batch, body = self._fit(batch)
                results = await self.client.multicall([(m, p) for _, m, p in batch], body)
            except (TypeError, OverflowError, ValueError, xmlrpc.client.Fault) as exc:
                # a call that cannot be marshalled (or that the server refuses whole) never succeeds
                bad = batch[:1] if isinstance(exc, CallTooLarge) else batch   # _fit: the first call alone
                self.stats["unmarshallable"] += len(bad)
                log.error("uplink: dropping %d calls that cannot be sent: %s", len(bad), exc)
                self._ack(bad[-1][0])
                continue
            except RpcError as exc:
                self.stats["failures"] += 1
                self.failing.set()
                log.warning("uplink: %s; resending %d calls in %.2fs", exc, len(self.queue), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            self.failing.clear()
            refused = []
            for call, r in zip(batch, results):
                if isinstance(r, xmlrpc.client.Fault):
                    self.stats["faults"] += 1
                    self.last_fault = r.faultString
                    if r.faultCode == FAULT_BACKLOG:
                        refused.append(call)
            if refused:
                self._refused(refused)    # before the ack forgets how often each was sent again
            self._ack(batch[-1][0])       # the server answered every call of the batch
            self.stats["batches"] += 1
            self.stats["acked"] += len(batch)
            if not refused and self._refusal_burst:
                log.info("uplink: the server takes reports again (%d calls refused meanwhile)", self._refusal_burst)
                self._refusal_burst = 0
        self.idle.set()

    def _fit(self, batch: list[tuple[int, str, tuple]]) -> tuple[list[tuple[int, str, tuple]], bytes]:
        """The longest head of ``batch`` whose multicall body fits the size limit, and that body.

        Each call's encoded size is measured once (calls left over wait for the next batch);
        a single call too large on its own raises :class:`CallTooLarge`."""
        limit = self.client.max_body
        envelope = len(self.client.encode_multicall([]))
        total, cut = envelope, 0
        for seq, method, params in batch:
            size = self._sizes.get(seq)
            if size is None:
                size = self._sizes[seq] = len(self.client.encode_multicall([(method, params)])) - envelope
            if total + size > limit and cut:
                break
            total += size
            cut += 1
        if cut < len(batch):
            self.stats["batches_split"] += 1
        batch = batch[:cut]
        while True:                                # the estimate is close; the real body decides
            body = self.client.encode_multicall([(m, p) for _, m, p in batch])
            if len(body) <= limit:
                return batch, body
            if len(batch) == 1:
                raise CallTooLarge(f"one call of {len(body)} bytes exceeds the {limit}-byte limit")
            batch = batch[:len(batch) // 2]

    def _ack(self, last: int) -> None:
        while self.queue and self.queue[0][0] <= last:
            seq = self.queue.popleft()[0]
            self._sizes.pop(seq, None)
            self._resends.pop(seq, None)
