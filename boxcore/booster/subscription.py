"""Subscriptions (installed rules) and the capabilities of their delivery."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from boxcore.engines.base import Delivery
from boxcore.rules import Rule
from cliruntime.supervisor import within

if TYPE_CHECKING:
    from boxcore.booster.core import Booster

__all__ = ["Subscription", "InterceptedConnection", "connect_directly"]


@dataclass(frozen=True, slots=True)
class InterceptedConnection:
    """An intercepted TCP connection: who connected and where it was going."""

    client: tuple[str, int]
    original_dst: tuple[str, int]
    cookie: int


async def connect_directly(conn: InterceptedConnection, *, spoof_client: bool = False, timeout: float = 10.0,
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An ordinary connection to ``conn.original_dst`` from the booster's own address.

    For deliveries where the box relays connections (``stream``): nothing steers the booster's
    own traffic back into its rules, and the client's address cannot be borrowed, so
    ``spoof_client`` has no effect.
    """
    return await within(asyncio.open_connection(*conn.original_dst), timeout)


class Subscription:
    """An installed rule whose packets keep arriving until :meth:`cancel`.

    ``cookie``, ``rule`` and ``delivery`` describe it; what a booster may do with it does not
    depend on the engine: :attr:`delegated_socket`, :meth:`connect_onward`,
    :meth:`receive_batches`.
    """

    def __init__(self, booster: "Booster", rule: Rule, delivery: Delivery, receiver: Any,
                 handler: Callable | None = None, *, tcp: bool = False) -> None:
        self.booster = booster
        self.rule = rule
        self.cookie = rule.cookie
        self.delivery = delivery
        self.receiver = receiver
        self.handler = handler          # the booster's handler (None for drop / multicast)
        self.tcp = tcp                  # intercepts TCP connections (the handler takes streams)
        self.cancelled = False
        self._batches: tuple[Callable[[list[bytes]], Any], int] | None = None   # receive_batches' wish

    async def cancel(self) -> None:
        """Stop the receiver and remove the rule from the box."""
        if self.cancelled:
            return
        self.cancelled = True
        await self.booster._forget(self)

    @property
    def delegated_socket(self) -> socket.socket | None:
        """The box's own UDP socket, handed over by boxd for a whole-port REDIRECT, or None.

        The booster may send on it (replies and fan-outs then leave from the box's address
        without a hop through boxd); the library keeps reading it.  None when the delivery has
        no such socket, after :meth:`cancel`, while boxd has taken it back (another rule came to
        share the port: ``delivery.kind`` is then ``channel``) and once boxd has gone away.  When
        the rules sharing the port are gone boxd gives the socket back (``delegate``) and this is
        the socket again.
        """
        if self.cancelled:
            return None
        return getattr(self.receiver, "delegated_socket", None)

    async def connect_onward(self, conn: InterceptedConnection | tuple[str, int], *, spoof_client: bool = False,
                             timeout: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The booster's own TCP connection to where intercepted ``conn`` was going.

        Done right for this subscription's delivery: where the box intercepts transparently the
        connection is marked so that it never re-enters the booster's own rules, and with
        ``spoof_client`` it leaves from the client's address (the server sees the client);
        where the box relays connections it is an ordinary connection from the booster's host
        (``spoof_client`` has no effect there).  ``conn`` may also be a ``(host, port)`` the
        booster dials on its own behalf past this interception (a link of its own to a server
        its rule intercepts for): it is never intercepted either.  ``timeout`` bounds the connect.
        """
        if self.receiver is None or not hasattr(self.receiver, "connect_onward"):
            raise TypeError(f"{self!r} does not intercept TCP connections")
        if isinstance(conn, tuple):
            conn, spoof_client = InterceptedConnection(("0.0.0.0", 0), (str(conn[0]), int(conn[1])), self.cookie), False
        elif conn.cookie != self.cookie:
            raise ValueError(f"connection {conn} was intercepted by rule {conn.cookie}, not {self.cookie}")
        return await self.receiver.connect_onward(conn, spoof_client=spoof_client, timeout=timeout)

    def receive_batches(self, batch_handler: Callable[[list[bytes]], Any], *, max_batch: int = 1024) -> bool:
        """Batch fast path for a REDIRECT whose handler consumes every packet.

        Where the booster reads the box's socket itself (see :attr:`delegated_socket`) the library
        then reads up to ``max_batch`` datagrams per wakeup and calls ``batch_handler(payloads)``
        once with their payloads (a plain function; what it returns is ignored, the packets are
        consumed) instead of building a Packet and calling the handler for each.  Packets are
        still counted for boxd.  Returns False, changing nothing, for any other delivery (the
        per-packet handler keeps receiving); if boxd later takes the socket back, packets go to
        the per-packet handler again, and to ``batch_handler`` once boxd gives the socket back.
        """
        setter = getattr(self.receiver, "set_batch_handler", None)
        if self.cancelled or setter is None:
            return False
        if not setter(batch_handler, max_batch):
            return False
        self._batches = (batch_handler, max_batch)
        return True

    def _receiver_replaced(self, receiver: Any, delivery: Delivery) -> None:
        """boxd changed this rule's delivery (a socket given back): ``receiver`` now serves it."""
        self.receiver, self.delivery = receiver, delivery
        setter = getattr(receiver, "set_batch_handler", None)
        if self._batches is not None and setter is not None:
            setter(*self._batches)

    def __repr__(self) -> str:
        return (f"<Subscription {self.cookie} {self.rule.action.value} {self.rule.match.describe()} "
                f"via {self.delivery.kind}>")
