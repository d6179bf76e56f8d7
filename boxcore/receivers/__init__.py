"""Booster-side receivers, one per delivery kind.

When boxd installs a rule it answers with a :class:`~boxcore.engines.base.Delivery`;
the booster library looks the delivery's ``kind`` up here and starts a receiver
that brings the rule's packets (or connections) to the booster's handler.  The
library itself never names an engine.

A receiver is a class registered with ``@register("kind")`` and built with no
arguments; the library then calls::

    await receiver.start(booster, rule, delivery, handler)
    ...
    await receiver.stop()

and, if the receiver has it, ``receiver.abandon()`` (synchronous) as soon as
the connection to boxd is lost, to release what boxd handed over.

``rule`` is the installed :class:`~boxcore.rules.Rule` (its ``cookie`` is set and
its ``action`` says REDIRECT - a verdict is expected - or COPY - the return value
is ignored).  ``handler`` is the user's handler; receivers call it through
``await booster.run_handler(handler, *args)``, which awaits coroutines, logs and
counts exceptions (returning None) so one bad packet never stops the booster.
Receivers turn the handler's result into a verdict with
``boxcore.booster.Verdict.coerce(result)`` (redirects only) and count packets with
``booster.count_packet(rule.cookie, nbytes)`` when the engine cannot count them
itself (those counts go to boxd with the heartbeats).  Background work
belongs in ``booster.spawn(coro)`` (cancelled when the booster closes).

Modules holding receivers are imported on first lookup, so a receiver kind
whose module is missing (or cannot load here) fails only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

__all__ = ["Receiver", "register", "get_receiver", "RECEIVER_MODULES"]


class Receiver(Protocol):
    async def start(self, booster: Any, rule: Any, delivery: Any, handler: Any) -> None: ...

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
