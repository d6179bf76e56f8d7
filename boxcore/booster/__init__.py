"""The booster library: write a booster as an asyncio program.

::

    from boxcore.booster import Booster, Verdict, run_booster
    from boxcore.rules import Match

    async def on_probe(pkt):                 # plain function or coroutine
        return Verdict.PASS                  # or Verdict.CONSUME (also: None), Verdict.modify(b"...")

    async def serve(booster):
        sub = await booster.redirect(Match(proto="udp", dst_port=7000), on_probe)
        await booster.copy(Match(proto="udp", dst_port=7001), on_copy)      # return value ignored
        await booster.intercept_tcp(Match(proto="tcp", dst_port=6346), on_connection)
        booster.send(Packet(...))
        booster.call_every(1.0, tick)
        booster.spawn(background_loop(), name="loop")                       # supervised
        await booster.directory.put("key", {"any": "msgpack value"})

    async def amain(args, ctx):              # a cliruntime console script
        return await run_booster("fcd-booster", serve, control=args.control, stop=ctx.stop)

The library connects to boxd (:mod:`boxcore.wire`), registers, sends heartbeats, and for each
installed rule starts the receiver that boxd's Delivery names (:mod:`boxcore.receivers`), so the
same booster runs on every engine: what differs between deliveries is offered as capabilities of
the :class:`Subscription` (``delegated_socket``, ``connect_onward``, ``receive_batches``), never
as an engine name.  Handler exceptions are logged and counted in
``booster.stats["handler_errors"]``; the booster keeps running.

Parts: :mod:`.core` (:class:`Booster`), :mod:`.control` (the control session with boxd),
:mod:`.dispatch` (the data channel, verdicts, intercepted connections, per-rule counters),
:mod:`.context` (what a receiver may use), :mod:`.timers`, :mod:`.directory`,
:mod:`.subscription`, :mod:`.run` (:func:`run_booster`), :mod:`.errors`, :mod:`.verdict`.
"""

from boxcore.booster.context import ReceiverContext
from boxcore.booster.core import DEFAULT_CONTROL, Booster
from boxcore.booster.directory import DirectoryClient
from boxcore.booster.dispatch import RuleCounter
from boxcore.booster.errors import BoosterError, BoxdGone, Conflict, InvalidRequest, PermissionDenied
from boxcore.booster.run import add_booster_options, run_booster
from boxcore.booster.sockets import UdpEndpoint
from boxcore.booster.subscription import InterceptedConnection, Subscription
from boxcore.booster.timers import Timer
from boxcore.booster.verdict import Verdict, VerdictCode

__all__ = ["Booster", "Verdict", "VerdictCode", "Subscription", "InterceptedConnection", "Timer",
           "BoosterError", "PermissionDenied", "Conflict", "InvalidRequest", "BoxdGone", "UdpEndpoint",
           "DirectoryClient", "ReceiverContext", "RuleCounter", "run_booster", "add_booster_options",
           "DEFAULT_CONTROL"]
