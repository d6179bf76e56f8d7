"""What a receiver may do with the booster it serves: :class:`ReceiverContext`.

A receiver (see :mod:`boxcore.receivers`) is started with one context per rule and touches
nothing else of the booster.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

from boxcore.booster.dispatch import DataDispatch, HandlerGuard, RuleCounter, guard_streams
from boxcore.booster.subscription import InterceptedConnection
from boxcore.booster.verdict import Verdict
from boxcore.packet import Packet
from boxcore.rules import Action, Rule

__all__ = ["ReceiverContext"]


class ReceiverContext:
    """One rule's view of the booster, for the receiver that brings the rule's packets.

    * ``rule`` (cookie set), ``cookie``, ``redirect`` (True: a verdict is expected; False: a copy,
      the result is ignored), ``loop``, ``stats`` (the booster's counters; a receiver may add a
      section with ``stats.providers[name] = snapshot``);
    * :meth:`listen_on_channel` / :meth:`stop_listening`: boxd pushes this rule's packets on the
      booster's data channel, to ``handler``; the library answers the verdicts;
    * :meth:`accept_streams`: boxd hands over this rule's intercepted TCP connections;
    * :attr:`counter`: the rule's :class:`RuleCounter`, for packets only the booster sees
      (reported to boxd with the heartbeats); :meth:`forget_counter` when the rule is gone;
    * :meth:`run_handler`, :meth:`handler_failed`, :meth:`verdict`: call the user's handler so
      that its errors are logged and counted and never stop the booster;
    * :meth:`serve_connection`: run a connection handler, errors isolated, connection closed after;
    * :meth:`finish_in_task`: the rest of a coroutine handler's work on one packet, bounded per
      booster (beyond the bound the packet is decided at once, failing open);
    * :meth:`spawn`: supervised per-connection work (cancelled when the booster closes; a failure
      is logged and counted);
    * :meth:`send`: inject a packet into the data path through boxd.
    """

    def __init__(self, rule: Rule, *, stats: Any, guard: HandlerGuard, dispatch: DataDispatch,
                 spawn: Callable[..., asyncio.Task], send: Callable[[Packet], bool],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.rule = rule
        self.cookie = rule.cookie
        self.redirect = rule.action is Action.REDIRECT
        self.stats = stats
        self.loop = loop
        self._guard = guard
        self._dispatch = dispatch
        self._spawn = spawn
        self._send = send

    # ---------------------------------------------------------------- delivery
    def listen_on_channel(self, handler: Callable) -> None:
        """This rule's packets arrive on the data channel, to ``handler``."""
        self._dispatch.channel_handlers[self.cookie] = (handler, self.redirect)

    def stop_listening(self) -> None:
        self._dispatch.channel_handlers.pop(self.cookie, None)

    def accept_streams(self, handler: Callable) -> None:
        """This rule's intercepted connections arrive from boxd, to ``handler(reader, writer, conn)``."""
        self._dispatch.stream_handlers[self.cookie] = handler

    def stop_streams(self) -> None:
        self._dispatch.stream_handlers.pop(self.cookie, None)

    @property
    def counter(self) -> RuleCounter:
        """The rule's counter (``counter.add(nbytes, packets=1)``), reported with heartbeats."""
        return self._dispatch.counter(self.cookie)

    def forget_counter(self) -> None:
        """The rule is gone: stop reporting its counter."""
        self._dispatch.counters.pop(self.cookie, None)

    # ---------------------------------------------------------------- handlers
    async def run_handler(self, handler: Callable, *args: Any) -> Any:
        """``handler(*args)`` (plain or coroutine); an exception is logged, counted, and gives None."""
        return await self._guard.run(handler, *args)

    def handler_failed(self, handler: Callable) -> None:
        """Log and count the exception being handled (call from an ``except`` block)."""
        self._guard.failed(handler)

    def verdict(self, handler: Callable, result: Any) -> Verdict:
        """``handler``'s result as a :class:`Verdict` (a result that is none counts as a failure
        and consumes)."""
        return self._guard.verdict(handler, result)

    def intercepted(self, client: tuple[str, int], original_dst: tuple[str, int]) -> InterceptedConnection:
        """The description of a connection this rule intercepted."""
        return InterceptedConnection(tuple(client), tuple(original_dst), self.cookie)

    async def serve_connection(self, handler: Callable, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, conn: InterceptedConnection) -> None:
        """``handler(reader, writer, conn)`` with its errors isolated; the connection is closed after."""
        await guard_streams(self._guard, handler, reader, writer, conn)

    # ---------------------------------------------------------------- work and output
    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task:
        """Per-packet or per-connection work as a supervised task (a failure is logged and counted;
        the booster goes on)."""
        return self._spawn(coro, name=f"rule {self.cookie} {name}", critical=False)

    def finish_in_task(self, finish: Coroutine[Any, Any, Any], awaitable: Any, *, name: str) -> bool:
        """Run ``finish``, which awaits ``awaitable`` (what a coroutine handler returned for one
        packet), as a supervised task; False (counted in ``handlers_refused``, neither run) when the
        booster already runs its bound of handlers: decide the packet at once, failing open."""
        return self._dispatch.finish_in_task(finish, awaitable, name=f"rule {self.cookie} {name}")

    def send(self, pkt: Packet) -> bool:
        """Inject ``pkt`` into the data path (False, counted, if the channel is full or gone)."""
        return self._send(pkt)
