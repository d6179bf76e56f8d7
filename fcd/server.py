"""``fcd-server``: the FCD back end.

- an aiohttp HTTP server with an XML-RPC endpoint (``POST /RPC2``, stdlib marshalling,
  ``system.multicall``) where booster boxes deliver aggregated road reports over long-lived
  keep-alive connections (``fcd.report``, ``fcd.box_stats``, ``fcd.status``);
- a raw UDP ingest for cars and lights not behind a box: the same map matching and aggregation
  as a box (:class:`fcd.aggregate.Ingest`);
- both feed one model; a report is identified by (road, light-change time), so a road reported by
  a box and again from raw data (or resent after a reconnect) is counted once;
- every light cycle (of the data's own time; or every ``--model-interval`` wall seconds) the
  prediction model runs and its traverse times go to the tuplespace: ``("fcd.traverse", road, run, [T_0, ..., T_H])`` and ``("fcd.run", run, t, cycle)``,
  leased so stale predictions disappear;
- ``GET /status`` (JSON counters) and ``GET /predictions`` (JSON).

With ``--store redis://...`` the server is the *front* of workers on Redis streams (``fcd.stream``):
it validates and appends box reports and raw probes to the partitions' streams, and runs the model
on the reports the workers applied; ``fcd-server --worker --store ...`` processes (or ``--workers N``
children) aggregate.  Without ``--store`` everything happens in this one process, as before.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import socket
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCDispatcher
from typing import Any

import numpy as np
from aiohttp import web

from cliruntime import ConfigError, host_port, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import Supervisor, first_of, within
from fcd.aggregate import Ingest, RoadReport
from fcd.city import City, CityError, load_city
from fcd.model import Model
from fcd.rpc import FAULT_BACKLOG, MAX_BODY
from boxcore.udpbatch import BatchReceiver, kernel_drops
from fcd.wire import DEFAULT_MAX_SKEW, LIGHT_SIZE, PROBE_SIZE, DataClock

log = logging.getLogger("fcd.server")
RAW_KEEP = max(PROBE_SIZE, LIGHT_SIZE)    # bytes kept of each raw datagram: the largest FCD message


def _xmlrpc_safe(value: Any) -> Any:
    """XML-RPC ints are 32-bit: larger counters travel as doubles; keys become strings."""
    if isinstance(value, dict):
        return {str(k): _xmlrpc_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_xmlrpc_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
        return float(value)
    return value


@dataclass
class HttpLimits:
    """What one HTTP client may hold of the server (issue 11's probes are the tests)."""

    max_body: int = MAX_BODY          # the uplink never sends more (fcd.rpc cuts its batches to it)
    max_calls: int = 1000             # calls in one system.multicall (the boxes send --rpc-batch, 500)
    max_concurrent: int = 4           # XML-RPC bodies read and dispatched at once
    max_connections: int = 256
    header_timeout: float = 10.0      # a new connection must have sent a whole request head by then
    body_timeout: float = 30.0        # a request body must arrive within this
    idle_timeout: float = 30.0        # between requests (the boxes' uplink talks every second)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class HttpFront:
    """aiohttp's server for an application, behind a connection cap and a first-request timeout.

    aiohttp closes connections idle between requests (``keepalive_timeout``) and bounds request
    heads and bodies; what it lacks is done here: connections over the cap are closed as they
    arrive, and a connection whose first request head is not complete within
    ``header_timeout`` (slowloris) is closed.  Both counted in ``stats``.
    """

    def __init__(self, app: web.Application, limits: HttpLimits, stats: collections.Counter) -> None:
        self.limits, self.stats = limits, stats
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout,
                                    handle_signals=False)
        # connections still waiting for their first whole request head (each leaves by its check)
        self.awaiting_head: set = set()
        self.listener: asyncio.base_events.Server | None = None

        @web.middleware
        async def mark_served(request: web.Request, handler):
            self.awaiting_head.discard(request.protocol)
            return await handler(request)

        app.middlewares.append(mark_served)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.runner.setup()
        self.listener = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, reuse_address=True)
        return self.listener.sockets[0].getsockname()[:2]

    def _protocol(self) -> asyncio.Protocol:
        server = self.runner.server
        if len(server.connections) >= self.limits.max_connections:
            self.stats["http_refused_connections"] += 1
            return _Refused()
        handler = server()
        self.awaiting_head.add(handler)
        asyncio.get_running_loop().call_later(self.limits.header_timeout, self._check_head, handler)
        return handler

    def _check_head(self, handler) -> None:
        if handler not in self.awaiting_head:
            return
        self.awaiting_head.discard(handler)
        if handler.transport is not None:
            self.stats["http_header_timeouts"] += 1
            handler.force_close()

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()


MAX_NAME = 64             # characters of a box name and of a box's stats key
MAX_BOX_KEYS = 64         # stats keys kept per box
FAULT_TOO_LARGE = 7       # a multicall of too many calls, or a reply over the budget
ECHO_CHARS = 64           # of a caller's method name repeated in a fault


def _echo(text: Any, limit: int = ECHO_CHARS) -> str:
    """A caller's text for a fault, cut: a fault never repeats what a stranger sent at length."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class DtdRefused(ValueError):
    """An XML-RPC body with a DTD or an entity declaration (XML-RPC has neither)."""


def loads_without_dtd(body: bytes) -> tuple[tuple, str | None]:
    """``xmlrpc.client.loads`` that refuses a document type or entity declaration as expat
    meets it (whatever the body's encoding): entities are never expanded, so a small body cannot
    become a large request or a large echoed fault."""
    parser, unmarshaller = xmlrpc.client.getparser(use_builtin_types=True)
    expat = parser._parser         # the stdlib ExpatParser's pyexpat parser

    def refuse(*_):
        raise DtdRefused("a DTD or entity declaration is refused (XML-RPC has none)")

    expat.StartDoctypeDeclHandler = refuse
    expat.EntityDeclHandler = refuse
    parser.feed(body)
    parser.close()
    return unmarshaller.close(), unmarshaller.getmethodname()


class _Dispatcher(SimpleXMLRPCDispatcher):
    """The stdlib dispatcher (``system.multicall``, ``system.listMethods``) with typed faults:
    unknown methods and bad parameters are faults that say so, and a multicall may not nest.

    A multicall holds at most ``max_calls`` calls, and its results at most ``reply_budget``
    bytes of XML: a small request cannot make a large reply (both refusals are faults, counted)."""

    def __init__(self, stats: collections.Counter, max_calls: int = 1000, reply_budget: int = MAX_BODY) -> None:
        super().__init__(allow_none=True, use_builtin_types=True)
        self.stats = stats
        self.max_calls, self.reply_budget = max_calls, reply_budget
        self.register_introspection_functions()
        self.register_multicall_functions()

    # entries the stdlib loop would choke on become calls of these names, which fault
    _REFUSED = {"\0nested": (3, "recursive system.multicall refused"),
                "\0malformed": (2, "multicall entry needs methodName and params (an array)")}

    def system_multicall(self, call_list):
        if not isinstance(call_list, list):
            raise xmlrpc.client.Fault(2, "system.multicall takes one array of calls")
        if len(call_list) > self.max_calls:
            self.stats["rpc_refused_calls"] += 1
            raise xmlrpc.client.Fault(FAULT_TOO_LARGE, f"system.multicall of {len(call_list)} calls refused "
                                                       f"(at most {self.max_calls})")
        self.stats["rpc_calls"] += len(call_list)
        results, size = [], 0
        for call in call_list:
            entry = self._entry(call)
            try:
                result = [self._dispatch(entry["methodName"], entry["params"])]
            except xmlrpc.client.Fault as fault:
                result = {"faultCode": fault.faultCode, "faultString": fault.faultString}
            except Exception as exc:
                result = {"faultCode": 1, "faultString": f"{type(exc).__name__}: {_echo(str(exc), 200)}"}
            # what this result adds to the reply, measured as it is built: the budget stops the
            # building, not only the sending
            size += len(xmlrpc.client.dumps((result,), allow_none=True))
            if size > self.reply_budget:
                self.stats["rpc_refused_reply"] += 1
                raise xmlrpc.client.Fault(FAULT_TOO_LARGE, f"multicall reply over {self.reply_budget} bytes refused "
                                                           f"(after {len(results)} of {len(call_list)} calls)")
            results.append(result)
        return results

    @staticmethod
    def _entry(call: Any) -> dict:
        if not isinstance(call, dict) or not isinstance(call.get("params", []), list):
            return {"methodName": "\0malformed", "params": []}
        if call.get("methodName") == "system.multicall":
            return {"methodName": "\0nested", "params": []}
        return {"methodName": call.get("methodName"), "params": call.get("params", [])}

    def _dispatch(self, method, params):
        if method in self._REFUSED:
            raise xmlrpc.client.Fault(*self._REFUSED[method])
        if not isinstance(method, str) or method not in self.funcs:
            raise xmlrpc.client.Fault(1, f"unknown method {_echo(method)}")
        try:
            return self.funcs[method](*params)
        except TypeError as exc:
            raise xmlrpc.client.Fault(2, f"bad parameters for {method}: {exc}") from None


class RoadHistory:
    """The newest ``depth`` accepted reports of every road and the newest ``depth`` model runs
    (bounded; what falls out is counted).  Reports are kept as objects, runs as the model's
    arrays: JSON is made only when read."""

    def __init__(self, n_roads: int, depth: int = 128) -> None:
        self.n_roads, self.depth = n_roads, depth
        self.reports: dict[int, collections.deque] = {}
        self.runs: collections.deque = collections.deque(maxlen=depth)
        self.stats = {"reports_evicted": 0, "runs_evicted": 0}

    def report(self, rep: RoadReport, source: str) -> None:
        queue = self.reports.get(rep.road)
        if queue is None:
            queue = self.reports[rep.road] = collections.deque(maxlen=self.depth)
        elif len(queue) == self.depth:
            self.stats["reports_evicted"] += 1
        queue.append((rep, source))

    def prediction(self, pred) -> None:
        if len(self.runs) == self.depth:
            self.stats["runs_evicted"] += 1
        self.runs.append(pred)

    def of(self, road: int, limit: int) -> dict[str, Any]:
        """The newest ``limit`` reports and predictions of ``road``, oldest first."""
        if not 0 <= road < self.n_roads:
            raise KeyError(f"unknown road {road} (roads are 0..{self.n_roads - 1})")
        limit = max(0, min(limit, self.depth))
        reports = list(self.reports.get(road, ()))[-limit:] if limit else []
        runs = list(self.runs)[-limit:] if limit else []
        return {"road": road,
                "reports": [{**rep.to_xmlrpc(), "source": source} for rep, source in reports],
                "predictions": [{"run": int(p.run), "t": float(p.t), "cycle": float(p.cycle),
                                 "cars": p.n[:, road].round(2).tolist(), "queue": p.q[:, road].round(2).tolist(),
                                 "traverse": p.traverse[:, road].round(2).tolist()} for p in runs]}


class FcdServer:
    def __init__(self, city: City, horizon: int = 5, max_keys: int = 500_000, max_cars: int = 100_000,
                 limits: HttpLimits | None = None, history: int = 128, max_skew: float = DEFAULT_MAX_SKEW,
                 max_boxes: int = 1024) -> None:
        self.city = city
        self.history = RoadHistory(city.n_roads, history)
        self.limits = limits or HttpLimits()
        self.rpc_slots = asyncio.Semaphore(self.limits.max_concurrent)
        self.http: HttpFront | None = None
        self.model = Model(city)
        # one data clock for raw datagrams and box reports: what is too far ahead is refused
        self.data_clock = DataClock(max_skew)
        self.ingest = Ingest(city, max_cars=max_cars, clock=self.data_clock)
        self.horizon = horizon
        self.max_keys = max_keys
        self.seen: collections.OrderedDict[tuple[int, float], str] = collections.OrderedDict()
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []     # received (rows, lengths) chunks
        self.pending_count = 0
        # per box name: its counters and the stats it sent (bounded: the least recently heard
        # box is forgotten, counted as boxes_evicted)
        self.boxes: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.max_boxes = max_boxes
        self.connections: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.latest = None
        self.space = None
        self.stats = collections.Counter()
        # CPU seconds (this process's, user + system) per stage of the raw path, and the whole
        # process's at the last /status: where a datagram's cost goes, measured where it is paid
        self.cpu = dict.fromkeys(("receive", "ingest", "reports", "model"), 0.0)
        self.udp_sock: socket.socket | None = None
        # datagrams processed at once in the read path.  Larger batches spread numpy's fixed costs
        # (under a 5% budget 8192 took ~25% less CPU per datagram than 2048), but nothing is read
        # while one is processed: at 5% of a core 8192 datagrams take ~0.5 s of wall time, about
        # what the 8 MiB socket buffer holds at 15k p/s.  4096 keeps that wait at ~0.25 s.  Once
        # the kernel drops datagrams anyway (the buffer overflowed since the last batch: more
        # arrive than the server can process), a longer wait loses nothing more and the cheaper
        # batch takes more of them: then ``overload_batch`` (8192: 10-15% less CPU per datagram).
        self.inline_batch = 4096
        self.overload_batch = 8192
        self.batch_now = self.inline_batch
        self._drops_seen = 0
        self.dispatcher = _Dispatcher(self.stats, max_calls=self.limits.max_calls, reply_budget=self.limits.max_body)
        self.dispatcher.register_function(self.rpc_report, "fcd.report")
        self.dispatcher.register_function(self.rpc_box_stats, "fcd.box_stats")
        self.dispatcher.register_function(lambda: _xmlrpc_safe(self.status()), "fcd.status")
        self.dispatcher.register_function(self.rpc_history, "fcd.history")
        self.front = None          # fcd.stream.StreamFront when the work is done by workers

    def use_front(self, front) -> None:
        """Append what arrives to Redis streams (``front``) instead of aggregating here."""
        self.front = front
        front.clock = self.data_clock

    # ------------------------------------------------------------ reports
    def accept(self, rep: RoadReport, source: str) -> bool:
        key = rep.key
        if key in self.seen:
            self.stats["duplicate_reports"] += 1
            return False
        self.model.observe(rep)       # first: a report it refuses is not taken as seen
        self.seen[key] = source
        if len(self.seen) > self.max_keys:
            self.seen.popitem(last=False)
            self.stats["dedup_evicted"] += 1
        self.history.report(rep, source)
        self.stats[f"reports_{source}"] += 1
        return True

    # ------------------------------------------------------------ XML-RPC
    def rpc_report(self, box: str, reports: list) -> dict[str, int]:
        if not isinstance(box, str) or not isinstance(reports, list):
            raise xmlrpc.client.Fault(2, "fcd.report(box: str, reports: array)")
        accepted = duplicates = rejected = 0
        valid: list[RoadReport] = []
        for item in reports:
            try:
                rep = RoadReport.from_xmlrpc(item, self.city.n_roads)
            except ValueError as exc:
                rejected += 1
                self.stats["reports_rejected"] += 1
                self.last_reject = str(exc)
                continue
            if not self.data_clock.admit(rep.t):
                rejected += 1
                self.stats["time_ahead"] += 1
                self.last_reject = f"report time {rep.t} is over {self.data_clock.max_skew} s past the newest data"
                continue
            if self.front is not None:
                valid.append(rep)
                continue
            try:
                taken = self.accept(rep, "box")
            except (ValueError, ArithmeticError, IndexError) as exc:   # the model refused it: this one only
                rejected += 1
                self.stats["reports_rejected"] += 1
                self.last_reject = f"report of road {rep.road} at {rep.t}: {exc}"
                continue
            if taken:
                accepted += 1
            else:
                duplicates += 1
        refused = 0
        if self.front is not None:      # queued for the workers, who find the duplicates
            accepted = self.front.reports(box, valid)
            # refused now at the front's queue bound, or earlier by the store at a backlog bound
            refused = len(valid) - accepted + self.front.refused_since(box)
        entry = self._box(box)
        entry["reports"] = entry.get("reports", 0) + accepted
        if refused:
            entry["refused"] = entry.get("refused", 0) + refused
            self.stats["reports_refused"] += refused
            # a fault, so that the box's uplink counts it, keeps the reason and sends the call
            # again after a backoff (the workers find the duplicates among what was taken)
            raise xmlrpc.client.Fault(FAULT_BACKLOG, f"{refused} reports refused: the server's backlog is full "
                                                     f"({accepted} of this call's {len(valid)} taken)")
        return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}

    def rpc_history(self, road: int, limit: int = 32) -> dict[str, Any]:
        """``fcd.history(road, limit=32)``: the road's newest reports and predictions."""
        if isinstance(road, bool) or not isinstance(road, int) or isinstance(limit, bool) or not isinstance(limit, int):
            raise xmlrpc.client.Fault(2, "fcd.history(road: int, limit: int)")
        try:
            return _xmlrpc_safe(self.history.of(road, limit))
        except KeyError as exc:
            raise xmlrpc.client.Fault(5, exc.args[0]) from None

    def _box(self, box: str) -> dict[str, Any]:
        """The entry of ``box`` (a new one may push the least recently heard out)."""
        if len(box) > MAX_NAME:
            self.stats["boxes_refused_name"] += 1
            raise xmlrpc.client.Fault(2, f"box names are at most {MAX_NAME} characters")
        entry = self.boxes.get(box)
        if entry is None:
            entry = self.boxes[box] = {}
            if len(self.boxes) > self.max_boxes:
                self.boxes.popitem(last=False)
                self.stats["boxes_evicted"] += 1
        else:
            self.boxes.move_to_end(box)
        return entry

    def rpc_box_stats(self, box: str, stats: dict) -> bool:
        """A box's own counters, kept for ``/status``: at most MAX_BOX_KEYS keys of at most
        MAX_NAME characters, finite numbers within +-2^53 (the rest refused, counted)."""
        if not isinstance(box, str) or not isinstance(stats, dict):
            raise xmlrpc.client.Fault(2, "fcd.box_stats(box: str, stats: struct)")
        entry = self._box(box)
        for k, v in stats.items():
            k = str(k)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not -2**53 <= v <= 2**53
                    or v != v or len(k) > MAX_NAME or (k not in entry and len(entry) >= MAX_BOX_KEYS)):
                self.stats["box_stats_refused"] += 1
                continue
            entry[k] = v
        return True

    def _receive_status(self) -> dict[str, Any]:
        return {"syscalls": self.udp_rx.syscalls if self.udp_sock is not None else 0, "batch": self.batch_now,
                "kernel_drops": self.stats["udp_kernel_drops"]}

    def status(self) -> dict[str, Any]:
        if self.front is not None:
            return {"udp": {**self.front.stats, **self.front.seq.snapshot(), **self._receive_status()},
                    "stream": self.front.status(), "counters": dict(self.stats), "boxes": self.boxes,
                    "http_connections": self.stats["http_connections_seen"], "history": dict(self.history.stats),
                    "model": {"runs": self.model.runs, "observed": self.model.observed,
                              "latest_t": self.model.latest_t}}
        return {
            "udp": {**self.ingest.stats, **self.ingest.seq.snapshot(), **self._receive_status()},
            "aggregator": dict(self.ingest.aggregator.stats),
            "counters": dict(self.stats),
            "boxes": self.boxes,
            "http_connections": self.stats["http_connections_seen"],
            "history": dict(self.history.stats),
            "model": {"runs": self.model.runs, "observed": self.model.observed, "latest_t": self.model.latest_t},
            "cpu_s": {**self.cpu, "process": time.process_time()},
        }

    def dispatch(self, method: str, params: tuple) -> Any:
        """One call (``system.multicall`` included) through the stdlib dispatcher."""
        return self.dispatcher._dispatch(method, params)

    async def handle_rpc(self, request: web.Request) -> web.Response:
        self.stats["http_requests"] += 1
        if request.transport is not None:
            key = id(request.transport)
            if key not in self.connections:
                self.connections[key] = None
                self.stats["http_connections_seen"] += 1
                if len(self.connections) > 10_000:      # bounded: forget the oldest
                    self.connections.popitem(last=False)
        limits = self.limits
        if request.content_length is None:
            # XML-RPC clients declare the length; an undeclared (chunked) body is refused unread
            return self._refuse(411, "http_refused_length", "Content-Length required")
        if request.content_length > limits.max_body:
            return self._refuse(413, "http_refused_body", f"body over {limits.max_body} bytes")
        if self.rpc_slots.locked():
            self.stats["rpc_waited"] += 1
        async with self.rpc_slots:        # bodies in memory at once: max_concurrent x max_body
            try:
                body = await within(request.read(), limits.body_timeout)
            except web.HTTPRequestEntityTooLarge:
                return self._refuse(413, "http_refused_body", f"body over {limits.max_body} bytes")
            except asyncio.TimeoutError:
                return self._refuse(408, "http_body_timeouts", f"body not received within {limits.body_timeout} s")
            try:
                params, method = loads_without_dtd(body)
                if method is None:
                    raise ValueError("not a method call")
                result = self.dispatch(method, params)
                if self.front is not None:
                    # a box's reports are acknowledged once they are in the store, not merely queued
                    await self.front.flush()
                out = xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True)
                if len(out) > limits.max_body:
                    self.stats["rpc_refused_reply"] += 1
                    raise xmlrpc.client.Fault(FAULT_TOO_LARGE, f"reply over {limits.max_body} bytes refused")
            except xmlrpc.client.Fault as fault:
                out = xmlrpc.client.dumps(fault, methodresponse=True)
            except DtdRefused as exc:
                self.stats["rpc_refused_dtd"] += 1
                out = xmlrpc.client.dumps(xmlrpc.client.Fault(4, str(exc)), methodresponse=True)
            except Exception as exc:  # malformed XML: stdlib raises several kinds
                self.stats["rpc_malformed"] += 1
                out = xmlrpc.client.dumps(xmlrpc.client.Fault(4, f"malformed request: {_echo(str(exc), 200)}"),
                                          methodresponse=True)
        return web.Response(body=out.encode(), content_type="text/xml")

    def _refuse(self, status: int, counter: str, reason: str) -> web.Response:
        """An error answer that closes the connection (its unread body is never read)."""
        self.stats[counter] += 1
        resp = web.Response(status=status, text=reason + "\n")
        resp.force_close()
        return resp

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def handle_history(self, request: web.Request) -> web.Response:
        """``GET /api/roads/<road>/history?limit=N``: as ``fcd.history``, in JSON."""
        try:
            road = int(request.match_info["road"])
            limit = int(request.query.get("limit", "32"))
        except ValueError:
            raise web.HTTPBadRequest(text="road and limit are integers\n") from None
        try:
            return web.json_response(self.history.of(road, limit))
        except KeyError as exc:
            raise web.HTTPNotFound(text=exc.args[0] + "\n") from None

    async def handle_predictions(self, request: web.Request) -> web.Response:
        p = self.latest
        if p is None:
            return web.json_response({"run": 0})
        return web.json_response({"run": p.run, "t": p.t, "cycle": p.cycle,
                                  "traverse": p.traverse[0].round(2).tolist()})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body)
        app.router.add_post("/RPC2", self.handle_rpc)
        app.router.add_get("/status", self.handle_status)
        app.router.add_get("/predictions", self.handle_predictions)
        app.router.add_get("/api/roads/{road}/history", self.handle_history)
        return app

    async def start_http(self, host: str, port: int) -> tuple[str, int]:
        """Serve :meth:`app` on ``host:port`` behind :class:`HttpFront`; the bound address."""
        self.http = HttpFront(self.app(), self.limits, self.stats)
        return await self.http.start(host, port)

    # ------------------------------------------------------------ raw UDP
    def open_udp(self, host: str, port: int, rcvbuf: int) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if rcvbuf:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot bind UDP {host}:{port}: {exc.strerror}") from None
        sock.setblocking(False)
        self.udp_sock = sock
        self._drops_seen = kernel_drops(sock) or 0
        self.udp_rx = BatchReceiver(sock, batch=1024)    # recvmmsg: up to 1024 datagrams per system call
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
        return sock.getsockname()[:2]

    def _take(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        self.pending.append((rows, lengths))
        self.pending_count += len(lengths)
        if self.pending_count >= self.batch_now:
            # keep up inside the read path: under overload the kernel drops, memory stays bounded
            self.process_pending()

    def _on_readable(self) -> None:
        receive, keep, clock = self.udp_rx.receive_slots, RAW_KEEP, time.process_time
        # at most one processing batch per wakeup: HTTP and timers get their turn
        for _ in range(-(-self.batch_now // self.udp_rx.batch)):
            start = clock()
            try:
                rows, lengths = receive(keep)
            except OSError as exc:
                self.stats["udp_errors"] += 1
                log.warning("raw UDP receive failed: %s", exc)
                return
            finally:
                self.cpu["receive"] += clock() - start
            if len(lengths):
                self._take(rows, lengths)
            if len(lengths) < self.udp_rx.batch:
                return                   # the socket is drained: no empty system call to find out

    def drain_udp(self) -> int:
        """Read everything the socket holds and process it (at shutdown; in tests, where
        loopback delivery is complete when ``sendto`` returns)."""
        while True:
            rows, lengths = self.udp_rx.receive_slots(RAW_KEEP)
            if not len(lengths):
                break
            self._take(rows, lengths)
        return self.process_pending()

    def _watch_overflow(self) -> None:
        """Count what the kernel dropped on the raw socket since the last batch, and choose the
        next batch's size from it (see ``overload_batch``)."""
        drops = kernel_drops(self.udp_sock)
        if drops is None:
            return
        new = (drops - self._drops_seen) % 2**32         # a 32-bit counter in the kernel
        self._drops_seen = drops
        self.stats["udp_kernel_drops"] += new
        self.batch_now = self.overload_batch if new else self.inline_batch

    def process_pending(self) -> int:
        if self.udp_sock is not None:
            self._watch_overflow()
        if not self.pending:
            return 0
        chunks, self.pending, self.pending_count = self.pending, [], 0
        if len(chunks) == 1:
            rows, lengths = chunks[0]
        else:
            rows = np.concatenate([c[0] for c in chunks])
            lengths = np.concatenate([c[1] for c in chunks])
        if self.front is not None:
            self.front.raw(rows, lengths)
            return len(lengths)
        clock = time.process_time
        start = clock()
        reports = self.ingest.ingest_slots(rows, lengths)
        ingested = clock()
        for rep in reports:
            self.accept(rep, "raw")
        self.cpu["ingest"] += ingested - start
        self.cpu["reports"] += clock() - ingested
        return len(lengths)

    async def ingest_loop(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            self.process_pending()
            await asyncio.sleep(interval)
        self.process_pending()

    async def applied_loop(self, stop: asyncio.Event, reader, interval: float = 0.2) -> None:
        """With workers: the reports they applied feed the model and the history; their counters
        are refreshed for ``/status``."""
        while not stop.is_set():
            for rep, source in await reader.read():
                self.accept(rep, source)
            await self.front.refresh_states()
            try:
                await within(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ model
    def own_view_is_complete(self) -> bool:
        """Whether this server's own aggregator saw every car the model knows of: raw probes only,
        no box's reports (whose cars it never sees) and no workers (each sees a partition)."""
        return self.front is None and self.stats["reports_raw"] > 0 and not self.stats["reports_box"]

    async def publish(self) -> None:
        start = time.process_time()
        try:
            self._run_model()
        finally:
            self.cpu["model"] += time.process_time() - start
        pred = self.latest
        if self.space is None:
            return
        lease = self._lease
        run = pred.run
        for road in range(self.city.n_roads):
            await self.space.out(("fcd.traverse", road, run, [float(x) for x in pred.traverse[:, road].round(3)]),
                                 lease=lease)
        await self.space.out(("fcd.run", run, float(pred.t), float(pred.cycle)), lease=lease)

    def _run_model(self) -> None:
        """One prediction run, kept as the latest and in the history."""
        if self.own_view_is_complete():
            # the cars, queue and moving speed on every road now, from the probes before now
            # (Model.present: the light queues start from them and the correction reads them);
            # behind boxes the model starts from the queues at the lights' last switches instead
            aggregator = self.ingest.aggregator
            now = float(aggregator.t_last[:aggregator.used].max())    # the newest probe's data time
            cars, queue, speed = aggregator.road_states(now)
            self.model.present(now, queue, cars=cars, speed=speed)
            self.stats["present_queues"] += 1
        pred = self.model.predict(self.horizon)
        self.latest = pred
        self.history.prediction(pred)

    async def model_loop(self, stop: asyncio.Event, interval: float | None) -> None:
        """Run the model every ``interval`` wall seconds, or (``None``) every light cycle of data
        time: whenever the newest report is one cycle past the previous run.  Every ``interval``:
        after the first run, only if reports or datagrams arrived since the previous one (on the
        same data a run predicts the same; its predictions then expire with their lease, as when
        data time stands still)."""
        loop = asyncio.get_running_loop()
        poll = interval if interval is not None else 0.25
        self._lease = max(3 * (interval or 1.0), 1.0)
        next_data_t = -np.inf
        last_run = loop.time()
        data_at_run = None
        while not stop.is_set():
            await asyncio.sleep(poll)
            if interval is None:
                if self.model.observed == 0 or self.model.latest_t < next_data_t:
                    continue
                next_data_t = self.model.latest_t + self.model.cycle
                # predictions live for three runs, whatever the replay speed
                self._lease = max(3 * (loop.time() - last_run), 1.0)
            else:
                data = (self.model.observed, self.ingest.stats["datagrams"])
                if data == data_at_run:
                    self.stats["model_runs_skipped"] += 1
                    continue
                data_at_run = data
            last_run = loop.time()
            try:
                await self.publish()
            except Exception as exc:  # the tuplespace may be down: keep serving
                self.stats["publish_errors"] += 1
                log.warning("publishing predictions failed: %s", exc)


def _model_interval(text: str) -> float | None:
    if text == "cycle":
        return None
    value = non_negative_float(text)
    if value <= 0:
        import argparse
        raise argparse.ArgumentTypeError("expected 'cycle' or a positive number of seconds")
    return value


def build_parser():
    p = make_parser("fcd-server", "The FCD server: XML-RPC for boxes, raw UDP for cars, model, tuplespace.", examples=[
        "fcd-server --city city.json --http 127.0.0.1:8080 --udp 127.0.0.1:7000 --tuplespace 127.0.0.1:7400",
        "fcd-server --city trace.npz --http 127.0.0.1:8080 --udp 127.0.0.1:7000 --serve-tuplespace 127.0.0.1:7400",
    ])
    p.add_argument("--city", type=Path, required=True, help="city JSON, trace (.npz) or SUMO .net.xml")
    p.add_argument("--http", type=host_port, default=("127.0.0.1", 8080), help="XML-RPC/HTTP address")
    p.add_argument("--udp", type=host_port, default=("127.0.0.1", 7000), help="raw UDP ingest address")
    p.add_argument("--rcvbuf", type=positive_int, default=4 * 1024 * 1024, help="UDP receive buffer (bytes)")
    p.add_argument("--tuplespace", help="where the predictions go: HOST:PORT of a tuplespace server, or a "
                                        "Redis URL (redis://HOST:PORT/N, unix:///path/redis.sock)")
    p.add_argument("--serve-tuplespace", type=host_port, help="also run a tuplespace server here")
    p.add_argument("--model-interval", type=_model_interval, default=None, metavar="cycle|SECONDS",
                   help="run the model every light cycle of data time (default), or every SECONDS of wall time")
    p.add_argument("--horizon", type=positive_int, default=5, help="cycles predicted ahead")
    p.add_argument("--batch-interval", type=non_negative_float, default=0.1,
                   help="seconds between raw ingest batches when fewer than 4096 datagrams wait")
    p.add_argument("--max-cars", type=positive_int, default=100_000)
    p.add_argument("--max-boxes", type=positive_int, default=1024,
                   help="boxes whose counters /status keeps (the least recently heard is forgotten)")
    p.add_argument("--max-skew", type=non_negative_float, default=DEFAULT_MAX_SKEW,
                   help="seconds of data time a probe, light or report may be ahead of the newest accepted "
                        "(further ahead: refused, counted as time_ahead)")
    p.add_argument("--history", type=positive_int, default=128,
                   help="reports and predictions kept per road for fcd.history and /api/roads/<road>/history")
    p.add_argument("--max-body", type=positive_int, default=MAX_BODY,
                   help="largest XML-RPC request body (bytes; the boxes' uplink never sends more than the default)")
    p.add_argument("--max-calls", type=positive_int, default=1000,
                   help="calls in one system.multicall (at least the boxes' --rpc-batch); its reply, like "
                        "every reply, is at most --max-body bytes")
    p.add_argument("--max-concurrent", type=positive_int, default=4, help="XML-RPC requests processed at once")
    p.add_argument("--max-connections", type=positive_int, default=256, help="HTTP connections at once")
    p.add_argument("--header-timeout", type=non_negative_float, default=10.0,
                   help="seconds a new connection has to send its first request head")
    p.add_argument("--body-timeout", type=non_negative_float, default=30.0, help="seconds to receive a request body")
    p.add_argument("--idle-timeout", type=non_negative_float, default=30.0,
                   help="seconds a connection may stay idle between requests")
    g = p.add_argument_group("workers on Redis streams (fcd.stream)")
    g.add_argument("--store", help="Redis URL (redis://HOST:PORT/N, unix:///path/redis.sock, ...?cluster=1): "
                                   "append what arrives to streams there for workers")
    g.add_argument("--worker", action="store_true",
                   help="be a worker: aggregate and apply the partitions of --store (no HTTP, no UDP)")
    g.add_argument("--workers", type=int, default=0, help="with --store: also start this many worker processes")
    g.add_argument("--partitions", type=positive_int, default=4, help="with --store: partitions (districts) of the city")
    g.add_argument("--prefix", default="fcd", help="with --store: key prefix of this deployment")
    g.add_argument("--lease", type=non_negative_float, default=3.0,
                   help="seconds a worker's partition lease lasts without renewal (a dead worker's partitions "
                        "move after this)")
    g.add_argument("--max-backlog", type=positive_int, default=200_000,
                   help="with --store: datagrams and reports waiting per partition before appends are refused")
    g.add_argument("--worker-name", help="this worker's consumer name (default: from the pid)")
    p.add_argument("--ready-file", type=Path, help="write the bound addresses as JSON here when ready")
    return p


async def worker_main(args, ctx) -> int:
    """``fcd-server --worker --store URL``: take a share of the partitions until stopped."""
    from boxcore.redisconn import open_redis
    from fcd.stream import Keys, Worker
    city = load_city(args.city)
    redis = open_redis(args.store)
    worker = Worker(redis, city, Keys(args.prefix), name=args.worker_name, lease=args.lease or 3.0,
                    max_cars=args.max_cars)
    try:
        try:
            await worker.start()
        except OSError as exc:
            raise ConfigError(f"cannot reach the store at {args.store}: {exc}") from None
        ctx.stats.providers["worker"] = worker.status
        gc.freeze()
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"worker": worker.name, "pid": __import__("os").getpid()}))
        log.info("fcd-server worker %s ready", worker.name)
        status = 0
        async with Supervisor("fcd-worker", logger=log) as tasks:
            ctx.stats.providers["tasks"] = tasks.snapshot
            balance = tasks.spawn(worker.balance(ctx.stop, tasks), name="balance")
            await first_of(ctx.stop.wait(), tasks.wait_failed())
            if tasks.failed is not None:
                log.error("stopping: %s", tasks.failed)
                status = 1
            ctx.stop.set()
            await asyncio.gather(balance, return_exceptions=True)
        return status
    finally:
        await redis.aclose()


def _start_workers(args, group) -> list:
    """``--workers N``: N ``fcd-server --worker`` processes beside this front."""
    from boxcore.procs import python_module
    roles = []
    for i in range(args.workers):
        argv = [*python_module("fcd.server"), "--worker", "--store", args.store, "--city", str(args.city),
                "--prefix", args.prefix, "--lease", str(args.lease), "--max-cars", str(args.max_cars),
                "--log-level", args.log_level]
        roles.append(group.start(f"worker{i}", argv, stats=False, new_session=False))
    return roles


async def amain(args, ctx) -> int:
    if args.worker or args.workers:
        if not args.store:
            raise ConfigError("--worker and --workers need --store redis://...")
    if args.worker:
        return await worker_main(args, ctx)
    if args.workers < 0:
        raise ConfigError("--workers takes a number >= 0")
    city = load_city(args.city)
    limits = HttpLimits(max_body=args.max_body, max_calls=args.max_calls, max_concurrent=args.max_concurrent,
                        max_connections=args.max_connections, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, idle_timeout=args.idle_timeout)
    if args.max_skew <= 0:
        raise ConfigError("--max-skew takes a positive number of seconds")
    server = FcdServer(city, horizon=args.horizon, max_cars=args.max_cars, limits=limits, history=args.history,
                       max_skew=args.max_skew, max_boxes=args.max_boxes)
    ts_server = None
    if args.serve_tuplespace:
        from fcd.tuplespace import TupleSpaceServer
        ts_server = TupleSpaceServer()
        try:
            ts_addr = await ts_server.start(*args.serve_tuplespace)
        except OSError as exc:
            raise ConfigError(f"cannot listen for the tuplespace: {exc.strerror}") from None
        from fcd.tuplespace import LocalTupleSpace
        server.space = LocalTupleSpace(driver=ts_server.driver)   # publish in-process to the served space
    elif args.tuplespace:
        from fcd.tuplespace import connect
        try:
            server.space = await connect(args.tuplespace)
        except OSError as exc:
            raise ConfigError(f"cannot reach the tuplespace at {args.tuplespace}: {exc.strerror}") from None
    redis = reader = workers = None
    if args.store:
        from boxcore.redisconn import is_redis_url, open_redis
        from fcd.stream import Keys, ReportReader, StreamFront
        if not is_redis_url(args.store):
            raise ConfigError(f"--store takes a Redis URL, not {args.store!r}")
        redis = open_redis(args.store)
        front = StreamFront(redis, city, args.partitions, Keys(args.prefix), max_backlog=args.max_backlog)
        try:
            await front.start()
        except OSError as exc:
            raise ConfigError(f"cannot reach the store at {args.store}: {exc}") from None
        server.use_front(front)
        reader = ReportReader(redis, Keys(args.prefix), args.partitions, city.n_roads)
        if args.workers:
            import tempfile
            from boxcore.procs import ProcessGroup
            workers = ProcessGroup(Path(tempfile.mkdtemp(prefix="fcd-workers-")))
            _start_workers(args, workers)
            log.info("%d workers started, their logs in %s", args.workers, workers.workdir)
    udp_addr = server.open_udp(*args.udp, args.rcvbuf)
    try:
        http_addr = await server.start_http(*args.http)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.http[0]}:{args.http[1]}: {exc.strerror}") from None
    ctx.stats.providers["server"] = server.status
    # the city graph, the model and every module loaded so far live as long as the process: a
    # full collection need not walk them again (at a 5% CPU budget a long collection stalls reads)
    gc.freeze()
    info = {"http": list(http_addr), "udp": list(udp_addr), "pid": __import__("os").getpid()}
    if ts_server is not None:
        info["tuplespace"] = list(ts_addr)
    if args.ready_file:
        args.ready_file.write_text(json.dumps(info))
    log.info("fcd-server ready: %s", info)
    status = 0
    async with Supervisor("fcd-server", logger=log) as tasks:
        ctx.stats.providers["tasks"] = tasks.snapshot
        ingest = tasks.spawn(server.ingest_loop(ctx.stop, args.batch_interval), name="ingest")
        model = tasks.spawn(server.model_loop(ctx.stop, args.model_interval), name="model")
        extra = []
        if server.front is not None:
            extra = [tasks.spawn(server.front.flush_loop(ctx.stop), name="append"),
                     tasks.spawn(server.applied_loop(ctx.stop, reader), name="applied")]
        await first_of(ctx.stop.wait(), tasks.wait_failed())
        if tasks.failed is not None:
            log.error("stopping: %s", tasks.failed)   # what the task served fails loudly
            status = 1
        ctx.stop.set()
        server.front and server.front.wakeup.set()
        await asyncio.gather(ingest, model, *extra, return_exceptions=True)   # all end at the stop
    await server.http.close()
    if workers is not None:
        await workers.stop_all()
        failed = [role.name for role in workers.roles if role.returncode not in (0, -15)]
        if failed:      # keep their logs for a look
            log.warning("workers %s did not stop cleanly; their logs are in %s", failed, workers.workdir)
        else:
            import shutil
            shutil.rmtree(workers.workdir, ignore_errors=True)
    if redis is not None:
        await redis.aclose()
    if ts_server is not None:
        await ts_server.close()
    return status


def main(argv=None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(CityError,))


if __name__ == "__main__":
    raise SystemExit(main())
