"""A client -- card -- server lab with the card's host interfaces in a box namespace.

    client 10.1.0.2 --eth0|p0-- [card] --p1|eth0-- server 10.2.0.2
                                h0|h1|cp
                                 |  |  |
                    box: np0 10.1.0.1, np1 10.2.0.1, npc (control)

Built with ``np4gs3-emu --create`` so the emulator's own topology code is what runs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cliruntime.procs import ProcessGroup, Role, script
from npdrv import netns

VENV_BIN = Path(sys.executable).parent
MARKER = b"bb-marker: everything sent before me has arrived"


@dataclass
class CardLab:
    prefix: str
    card: str
    client: str
    box: str
    server: str
    group: ProcessGroup     # the emulator, and whatever a test starts in the box (boxd, boosters)
    emu: Role
    ready: dict

    def mac(self, ns: str, ifname: str) -> str:
        return netns.link_mac(ifname, ns)

    def socket(self, ns: str, family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=0) -> socket.socket:
        with netns.inside(ns):
            return socket.socket(family, type, proto)

    def udp(self, ns: str, bind: tuple[str, int] | None = None, timeout: float = 2.0) -> socket.socket:
        sock = self.socket(ns)
        sock.settimeout(timeout)
        if bind:
            sock.bind(bind)
        return sock

    def run(self, ns: str, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def start_in_box(self, name: str, argv: Sequence[str], **options) -> Role:
        return self.group.start(name, ["ip", "netns", "exec", self.box, *argv], **options)

    def stop_box_roles(self) -> None:
        """Stop what the test started in the box (boosters before boxd); the card keeps running."""
        for role in reversed(self.group.roles):
            if role is not self.emu:
                self.group.stop_sync(role)

    def stop_emulator(self) -> dict:
        self.group.stop_sync(self.emu)
        return self.emu.read_stats()


def receive_until_marker(sock: socket.socket) -> list[bytes]:
    """What ``sock`` receives before :data:`MARKER`, sent last on the same path: once the marker is
    in, whatever was going to arrive has (the sockets' timeouts bound the wait)."""
    got = []
    while (data := sock.recv(2048)) != MARKER:
        got.append(data)
    return got


@contextlib.contextmanager
def card_lab(tmp_path: Path, *, box_forwards: bool = True, emu_args: tuple[str, ...] = ()):
    prefix = f"bbnp{secrets.token_hex(3)}"
    names = {role: f"{prefix}{role}" for role in ("client", "box", "server")}
    card = f"{prefix}card"
    made = []
    group = ProcessGroup(tmp_path / "roles")
    try:
        for ns in names.values():
            netns.ip("netns", "add", ns)
            made.append(ns)
        emu = group.start("card", [script("np4gs3-emu"), "--name", card, "--create", "--box-netns", names["box"],
                                   "--port0", f"{names['client']}:eth0", "--port1", f"{names['server']}:eth0",
                                   "--log-level", "warning", *emu_args])
        group.wait_for_log_sync(emu, '"ready": true')
        ready = next(json.loads(line) for line in emu.output().splitlines() if line.startswith("{"))
        c, b, s = names["client"], names["box"], names["server"]
        for ns in (c, b, s):
            netns.ip("link", "set", "lo", "up", netns=ns)
        netns.ip("addr", "add", "10.1.0.2/24", "dev", "eth0", netns=c)
        netns.ip("route", "add", "default", "via", "10.1.0.1", netns=c)
        netns.ip("addr", "add", "10.2.0.2/24", "dev", "eth0", netns=s)
        netns.ip("route", "add", "default", "via", "10.2.0.1", netns=s)
        netns.ip("addr", "add", "10.1.0.1/24", "dev", "np0", netns=b)
        netns.ip("addr", "add", "10.2.0.1/24", "dev", "np1", netns=b)
        with netns.inside(b):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1" if box_forwards else "0")
        yield CardLab(prefix, card, c, b, s, group, emu, ready)
    finally:
        group.stop_all_sync(grace=10)
        for ns in made:
            with contextlib.suppress(netns.NetnsError):
                netns.ip("netns", "delete", ns)
        netns.destroy_card(card)
