"""Gnutella: a real 0.6 servent and the booster that clusters the overlay (paper section III-B).

Sans-IO protocol core: :mod:`gnutella.wire`, :mod:`gnutella.handshake`, :mod:`gnutella.qrp`,
:mod:`gnutella.routing`, :mod:`gnutella.node`, :mod:`gnutella.boostercore`, :mod:`gnutella.b2b`.
asyncio roles: :mod:`gnutella.servent` (``gnutella-servent``), :mod:`gnutella.booster`
(``gnutella-booster``).  See docs/gnutella.md.
"""
