"""mmpog: massive multiplayer games over booster boxes (paper section III-C).

* :mod:`mmpog.reliability` - the sans-IO reliability protocol (client endpoint, reflector core);
  the library game developers import.
* :mod:`mmpog.wire` - the data-path header, declared once.
* :mod:`mmpog.testing` - a seeded in-memory lossy network for tests.
* :mod:`mmpog.reflector` - ``mmpog-reflector``, the multicast reflector booster.
* :mod:`mmpog.server`, :mod:`mmpog.client`, :mod:`mmpog.bots` - the game's control plane, the
  asyncio client adapter, the bots of ``mmpog-bots`` (the experiment around them: tools.mmpog_experiment).

See docs/mmpog.md for the protocol, its delivery semantics and how to run each role.
"""
