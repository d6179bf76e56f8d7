"""Booster-side receivers, one per delivery kind.

When boxd installs a rule it answers with a :class:`~boxcore.engines.base.Delivery`;
the booster library looks the delivery's ``kind`` up here and starts a receiver
that brings the rule's packets (or connections) to the booster's handler.  The
library itself never names an engine.

A receiver is a class registered with ``@register("kind")`` and built with no
arguments; the library then calls::

    await receiver.start(ctx, delivery, handler)
    ...
    await receiver.stop()

and, if the receiver has it, ``receiver.abandon()`` (synchronous) as soon as
the connection to boxd is lost, to release what boxd handed over.

``ctx`` is a :class:`boxcore.booster.ReceiverContext`, the rule's view of the
booster and the only part of it a receiver touches: ``ctx.rule`` (cookie set;
``ctx.redirect`` says a verdict is expected, else the result of a copy handler
is ignored), ``ctx.listen_on_channel(handler)`` / ``ctx.accept_streams(handler)``
(boxd brings the packets / connections), ``ctx.counter.add(nbytes, packets=1)``
for packets the engine cannot count itself (reported to boxd with the
heartbeats), ``ctx.run_handler`` / ``ctx.handler_failed`` / ``ctx.verdict(handler,
result)`` (the user's handler never stops the booster: its errors are logged and
counted), ``ctx.finish_in_task(finish, awaitable, name=...)`` (the rest of a
coroutine handler's work on one packet, bounded per booster: False when the bound
is reached, and the receiver decides the packet at once, failing open),
``ctx.spawn(coro, name=...)`` (supervised per-connection work, cancelled when the
booster closes), ``ctx.send(pkt)``.

What differs between deliveries is offered to applications as capabilities of
the subscription, each an optional member of the receiver:
``delegated_socket`` (the box's own socket, or None), ``connect_onward(conn, *,
spoof_client, timeout)`` (TCP receivers: the booster's connection to where an
intercepted connection was going), ``set_batch_handler(fn, max_batch)`` (batch
reads), ``undelegate()`` (boxd takes a delegated socket back).

Modules holding receivers are imported on first lookup, so a receiver kind
whose module is missing (or cannot load here) fails only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

__all__ = ["Receiver", "register", "get_receiver", "RECEIVER_MODULES"]


class Receiver(Protocol):
    async def start(self, ctx: Any, delivery: Any, handler: Any) -> None: ...

    async def stop(self) -> None: ...

    # optional: ``def abandon(self) -> None`` - called (synchronously) when the
    # control connection to boxd is lost; release anything boxd handed over.


_REGISTRY: dict[str, type] = {}

# kind -> module that registers it when imported
RECEIVER_MODULES: dict[str, str] = {
    "channel": "boxcore.receivers.user",
    "socket": "boxcore.receivers.user",
    "stream": "boxcore.receivers.user",
    "nfqueue": "boxcore.receivers.linux",
    "nflog": "boxcore.receivers.linux",
    "tproxy": "boxcore.receivers.linux",
}


def register(kind: str):
    """Class decorator: make the class the receiver for delivery ``kind``."""

    def decorate(cls: type) -> type:
        _REGISTRY[kind] = cls
        return cls

    return decorate


def get_receiver(kind: str) -> type:
    """The receiver class for ``kind`` (imports its module on first use)."""
    if kind not in _REGISTRY:
        module = RECEIVER_MODULES.get(kind)
        if module is None:
            raise LookupError(f"no receiver for delivery kind {kind!r}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise LookupError(f"receiver for {kind!r} unavailable: {exc}") from None
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise LookupError(f"module {RECEIVER_MODULES[kind]} registers no receiver for {kind!r}") from None
