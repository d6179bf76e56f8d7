"""Netfilter plumbing for the ``linux`` engine, declared once.

* Translating a :class:`~boxcore.rules.Match` to iptables match arguments (payload patterns
  become ``-m u32`` word tests).
* Rendering the box's rule set as ``iptables-restore --noflush`` input, so every change is one
  atomic transaction into our own chains; reading counters back from ``iptables-save -c``.
* Finding and removing stale state (chains, jumps) left by a crashed boxd.
* The nfnetlink wire formats the engine and receivers speak directly: NFQUEUE queue
  configuration (the fail-open flag netfilterqueue does not expose), NFLOG binding and NFLOG
  packet messages, and ``/proc/net/netfilter/nfnetlink_queue`` (the watchdog's view of queues).

Chains (per network namespace; the box's namespace when boxd runs in a lab)::

    filter FORWARD -> BOOSTER-FWD      transit traffic
    filter INPUT   -> BOOSTER-IN       traffic to the box itself
    filter OUTPUT  -> BOOSTER-OUT      traffic from the box (only with the output hook enabled)
    mangle PREROUTING -> BOOSTER-TPROXY   transparent TCP interception
    BR-<cookie as 16 hex digits>       one per rule, holding its target (and its counters)

Packets carrying :data:`MARK_INJECTED` (sent by boosters or boxd) never re-enter the booster
chains, so an injected packet cannot loop back into the queue of the booster that sent it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from boxcore.rules import Action, Match, PayloadPattern, Rule
from cliruntime.supervisor import within

PROTO_TCP, PROTO_UDP = 6, 17

CHAIN_FWD = "BOOSTER-FWD"
CHAIN_IN = "BOOSTER-IN"
CHAIN_OUT = "BOOSTER-OUT"
CHAIN_TPROXY = "BOOSTER-TPROXY"
RULE_CHAIN_PREFIX = "BR-"
#: built-in chain -> our chain, per table
HOOKS = {
    "forward": ("filter", "FORWARD", CHAIN_FWD),
    "input": ("filter", "INPUT", CHAIN_IN),
    "output": ("filter", "OUTPUT", CHAIN_OUT),
}
TPROXY_HOOK = ("mangle", "PREROUTING", CHAIN_TPROXY)
OUR_CHAIN_RE = re.compile(r"^(BOOSTER-(FWD|IN|OUT|TPROXY)|BR-[0-9a-f]{16})$")

MARK_INJECTED = 0x10000000
MARK_TPROXY = 0x20000000
TPROXY_TABLE = 176           # policy-routing table for TPROXY'd packets (local route)
TPROXY_RULE_PRIORITY = 176   # ``ip rule`` priority of the fwmark rule
RT_PROTO_BOOSTER = 176       # route protocol tag of routes boxd installs (found again at start)


class NetfilterError(RuntimeError):
    """iptables refused a rule set (the message carries iptables' own words)."""


def rule_chain(cookie: int) -> str:
    return f"{RULE_CHAIN_PREFIX}{cookie:016x}"


# ---------------------------------------------------------------- match translation

def _ports(port: int | tuple[int, int]) -> str:
    return str(port) if isinstance(port, int) else f"{port[0]}:{port[1]}"


def _u32_payload_tests(proto: int | None, patterns: tuple[PayloadPattern, ...]) -> str:
    """A u32 expression testing payload patterns (offsets relative to the transport payload).

    Each pattern is split into 4-byte words read at the payload offset; a short tail is read
    as the word ending at the pattern's end (other bytes masked out), so the test never reads
    past the bytes the pattern needs; the last word is always read, which is what requires
    the payload to be long enough.  For TCP the payload start is found from the TCP data
    offset and a word cannot start before it: a TCP payload shorter than 4 bytes never
    matches a payload pattern (documented limitation).
    """
    if proto == PROTO_UDP:
        base, fixed = "0>>22&0x3C@", 8            # IP header length, then the UDP header
    elif proto == PROTO_TCP:
        base, fixed = "0>>22&0x3C@12>>26&0x3C@", 0  # IP header length, then the TCP data offset
    else:
        base, fixed = "0>>22&0x3C@", 0
    tests = []
    for pattern in patterns:
        mask = pattern.mask or b"\xff" * len(pattern.value)
        length = len(pattern.value)
        for start in range(0, length, 4):
            end = min(start + 4, length)
            word_start = start
            if end - start < 4:
                # a short tail: read the word ending at the pattern's end, so the read never
                # needs bytes past what the pattern needs; for TCP it cannot start before the
                # payload (u32 offsets are unsigned), so there it needs 4 payload bytes
                absolute = pattern.offset + end - 4
                if not fixed:
                    absolute = max(absolute, 0)
                word_start = absolute - pattern.offset
            word_value = word_mask = 0
            for i in range(word_start, word_start + 4):
                v, m = (pattern.value[i], mask[i]) if start <= i < end else (0, 0)
                word_value = (word_value << 8) | (v & m)
                word_mask = (word_mask << 8) | m
            # Words that test no bit are skipped, except the last one: reading it is what
            # requires the payload to be long enough (u32 fails on reads past the end).
            if word_mask or end == length:
                tests.append(f"{base}{pattern.offset + word_start + fixed}&0x{word_mask:08X}=0x{word_value:08X}")
    return " && ".join(tests)


def match_args(match: Match) -> list[list[str]]:
    """iptables arguments for ``match``: one list per protocol needed.

    Ports and payload patterns need a protocol; a match that has them but no protocol is
    expanded to a UDP and a TCP rule (other protocols have no ports: port 0 semantics are
    not reproduced in the kernel).
    """
    needs_proto = match.src_port is not None or match.dst_port is not None or bool(match.payload)
    protos: list[int | None] = [match.proto] if match.proto is not None or not needs_proto else [PROTO_UDP, PROTO_TCP]
    out = []
    for proto in protos:
        args: list[str] = []
        if proto is not None:
            args += ["-p", {PROTO_UDP: "udp", PROTO_TCP: "tcp"}.get(proto, str(proto))]
        if match.src is not None:
            args += ["-s", match.src]
        if match.dst is not None:
            args += ["-d", match.dst]
        if proto in (PROTO_UDP, PROTO_TCP):
            if match.src_port is not None:
                args += ["--sport", _ports(match.src_port)]
            if match.dst_port is not None:
                args += ["--dport", _ports(match.dst_port)]
        elif match.src_port not in (None, 0) or match.dst_port not in (None, 0):
            continue  # no packet of this protocol carries that port
        if match.payload:
            args += ["-m", "u32", "--u32", _u32_payload_tests(proto, match.payload)]
        out.append(args)
    return out


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or "&" in arg) else arg


# ---------------------------------------------------------------- rule sets

@dataclass(frozen=True, slots=True)
class Target:
    """What a rule's own chain does.  ``kind``: nfqueue | nflog | tproxy | drop | return."""

    kind: str
    number: int = 0          # queue number, nflog group or tproxy port

    def args(self) -> list[str]:
        if self.kind == "nfqueue":
            # --queue-bypass: with no listener bound, the packet passes (fail-open)
            return ["-j", "NFQUEUE", "--queue-num", str(self.number), "--queue-bypass"]
        if self.kind == "nflog":
            return ["-j", "NFLOG", "--nflog-group", str(self.number), "--nflog-size", "65535",
                    "--nflog-threshold", "1"]
        if self.kind == "tproxy":
            return ["-p", "tcp", "-j", "TPROXY", "--on-port", str(self.number), "--on-ip", "0.0.0.0",
                    "--tproxy-mark", f"0x{MARK_TPROXY:x}/0x{MARK_TPROXY:x}"]
        if self.kind == "drop":
            return ["-j", "DROP"]
        if self.kind == "return":
            return ["-j", "RETURN"]
        raise ValueError(f"unknown target kind {self.kind!r}")

    @property
    def table(self) -> str:
        return "mangle" if self.kind == "tproxy" else "filter"


@dataclass(frozen=True, slots=True)
class Entry:
    """One installed rule as netfilter sees it."""

    rule: Rule
    target: Target
    hooks: tuple[str, ...]   # "forward" / "input" / "output" (ignored for tproxy)

    @property
    def chain(self) -> str:
        return rule_chain(self.rule.cookie)


def order(entries: Iterable[Entry]) -> list[Entry]:
    """Chain order: non-terminating COPY rules first (they all see the packet), then the
    terminating rules by priority, highest first (ties: oldest cookie first)."""
    return sorted(entries, key=lambda e: (e.rule.action is not Action.COPY, -e.rule.priority, e.rule.cookie))


def render(entries: Iterable[Entry], *, new: Iterable[int] = (), gone: Iterable[int] = (),
           gone_tables: dict[int, str] | None = None, hooks: Iterable[str] = ("forward", "input")) -> str:
    """``iptables-restore --noflush`` input that rebuilds our dispatch chains from ``entries``.

    The dispatch chains (BOOSTER-*) are flushed and refilled in one transaction; a rule's own
    chain is (re)created only when it is ``new`` (so its counters survive other changes), and
    the chains of rules that are ``gone`` are flushed and deleted after the jumps to them.
    """
    entries = order(entries)
    new = set(new)
    gone_tables = gone_tables or {}
    hooks = tuple(hooks)
    by_table: dict[str, list[str]] = {"filter": [], "mangle": []}
    decl: dict[str, list[str]] = {"filter": [], "mangle": []}
    tail: dict[str, list[str]] = {"filter": [], "mangle": []}

    for hook in hooks:
        table, _builtin, chain = HOOKS[hook]
        decl[table].append(f":{chain} - [0:0]")
        by_table[table].append(f"-A {chain} -m mark --mark 0x{MARK_INJECTED:x}/0x{MARK_INJECTED:x} -j RETURN")
    decl["mangle"].append(f":{CHAIN_TPROXY} - [0:0]")
    # Packets of connections a transparent socket already owns (both directions, including
    # replies to a spoofed client address) go straight to that socket.
    by_table["mangle"] += [
        f"-A {CHAIN_TPROXY} -p tcp -m socket --transparent -j MARK --set-xmark 0x{MARK_TPROXY:x}/0x{MARK_TPROXY:x}",
        f"-A {CHAIN_TPROXY} -m mark --mark 0x{MARK_TPROXY:x}/0x{MARK_TPROXY:x} -j ACCEPT",
    ]
    for entry in entries:
        table = entry.target.table
        if entry.rule.cookie in new:
            decl[table].append(f":{entry.chain} - [0:0]")
            by_table[table].append(f"-A {entry.chain} " + " ".join(_quote(a) for a in entry.target.args()))
        for args in match_args(entry.rule.match):
            text = " ".join(_quote(a) for a in args)
            if entry.target.kind == "tproxy":
                if "-p tcp" not in text and "-p" not in args:
                    text = ("-p tcp " + text).strip()
                elif "-p tcp" not in text:
                    continue   # a TPROXY rule only ever sees TCP
                by_table["mangle"].append(f"-A {CHAIN_TPROXY} {text} -j {entry.chain}".replace("  ", " "))
                continue
            for hook in entry.hooks:
                if hook in hooks:
                    by_table["filter"].append(f"-A {HOOKS[hook][2]} {text} -j {entry.chain}".replace("  ", " "))
    for cookie in gone:
        table = gone_tables.get(cookie, "filter")
        decl[table].append(f":{rule_chain(cookie)} - [0:0]")
        tail[table].append(f"-X {rule_chain(cookie)}")
    out = []
    for table in ("filter", "mangle"):
        out.append(f"*{table}")
        out += decl[table] + by_table[table] + tail[table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_setup(hooks: Iterable[str]) -> str:
    """Create our dispatch chains and jump to them first thing from the built-in chains."""
    lines: dict[str, list[str]] = {"filter": [], "mangle": []}
    for hook in hooks:
        table, builtin, chain = HOOKS[hook]
        lines[table] += [f":{chain} - [0:0]", f"-I {builtin} 1 -j {chain}"]
    table, builtin, chain = TPROXY_HOOK
    lines[table] += [f":{chain} - [0:0]", f"-I {builtin} 1 -j {chain}"]
    out = []
    for table in ("filter", "mangle"):
        out += [f"*{table}", *lines[table], "COMMIT"]
    return "\n".join(out) + "\n"


COUNTER_PREFIX_RE = re.compile(r"^\[\d+:\d+\] ")


def render_cleanup(saved: str) -> str | None:
    """Restore input removing every trace of boxd from an ``iptables-save`` dump, or None.

    Jumps from built-in chains to our chains are deleted, then our chains flushed and deleted:
    what a crashed boxd left behind, or what a stopping one installed.
    """
    table = None
    ours: dict[str, list[str]] = {}
    jumps: dict[str, list[str]] = {}
    for line in saved.splitlines():
        line = COUNTER_PREFIX_RE.sub("", line)   # dumps taken with -c prefix rules with [pkts:bytes]
        if line.startswith("*"):
            table = line[1:].strip()
            ours.setdefault(table, [])
            jumps.setdefault(table, [])
        elif line.startswith(":") and table:
            name = line[1:].split()[0]
            if OUR_CHAIN_RE.match(name):
                ours[table].append(name)
        elif line.startswith("-A ") and table:
            parts = line.split()
            chain = parts[1]
            if not OUR_CHAIN_RE.match(chain) and "-j" in parts:
                target = parts[parts.index("-j") + 1]
                if OUR_CHAIN_RE.match(target):
                    jumps[table].append("-D" + line[2:])
    if not any(ours.values()) and not any(jumps.values()):
        return None
    out = []
    for tbl in ours:
        if not ours[tbl] and not jumps[tbl]:
            continue
        out.append(f"*{tbl}")
        out += jumps[tbl]
        out += [f":{name} - [0:0]" for name in ours[tbl]]
        out += [f"-X {name}" for name in ours[tbl]]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


COUNTER_LINE_RE = re.compile(r"^\[(\d+):(\d+)\] -A (BR-[0-9a-f]{16}) ")


def parse_counters(saved: str) -> dict[int, tuple[int, int]]:
    """cookie -> (packets, bytes) from ``iptables-save -c``: the counters of each rule's own
    chain (summed over its lines)."""
    counts: dict[int, tuple[int, int]] = {}
    for line in saved.splitlines():
        m = COUNTER_LINE_RE.match(line)
        if m:
            cookie = int(m.group(3)[len(RULE_CHAIN_PREFIX):], 16)
            pkts, nbytes = counts.get(cookie, (0, 0))
            counts[cookie] = (pkts + int(m.group(1)), nbytes + int(m.group(2)))
    return counts


# ---------------------------------------------------------------- running iptables

async def run_tool(*argv: str, stdin: str | None = None, timeout: float = 10.0) -> str:
    """Run an iptables tool; its stdout, or NetfilterError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await within(proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise NetfilterError(f"{argv[0]} timed out after {timeout}s") from None
    if proc.returncode != 0:
        raise NetfilterError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def restore(text: str) -> None:
    """Apply ``text`` atomically (``iptables-restore --noflush``)."""
    await run_tool("iptables-restore", "--noflush", stdin=text)


async def save(counters: bool = False) -> str:
    return await run_tool("iptables-save", *(["-c"] if counters else []))


CAP_NET_ADMIN = 12


def missing_privilege() -> str | None:
    """Why this process cannot drive netfilter, or None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                if not int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
                    return "the linux engine needs CAP_NET_ADMIN (run boxd as root or with that capability)"
                break
    except OSError as exc:
        return f"cannot read capabilities: {exc}"
    for tool in ("iptables", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            return f"the linux engine needs {tool} (apt-get install iptables)"
    return None


# ---------------------------------------------------------------- nfnetlink wire formats

NETLINK_NETFILTER = 12
NLMSG = struct.Struct("=IHHII")          # len, type, flags, seq, pid
NFGEN = struct.Struct("!BBH")            # family, version, res_id (big-endian)
NLA = struct.Struct("=HH")               # attribute len, type
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3

NFNL_SUBSYS_QUEUE, NFNL_SUBSYS_ULOG = 3, 4
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_FAIL_OPEN = 0x1

NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR, NFULA_MARK, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 2, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NFULA_CFG_MODE_BODY = struct.Struct("!IBx")   # copy range, copy mode, pad


class NetlinkDecodeError(ValueError):
    """A netlink message that does not follow its declared layout."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def nla(kind: int, payload: bytes) -> bytes:
    body = NLA.pack(NLA.size + len(payload), kind) + payload
    return body + b"\0" * (_align4(len(body)) - len(body))


def nfnl_message(subsys: int, msg: int, res_id: int, attrs: bytes, *, family: int = socket.AF_UNSPEC,
                 seq: int = 0, flags: int = NLM_F_REQUEST) -> bytes:
    body = NFGEN.pack(family, 0, res_id) + attrs
    return NLMSG.pack(NLMSG.size + len(body), (subsys << 8) | msg, flags, seq, 0) + body


def nfqueue_fail_open(queue: int, enable: bool = True) -> bytes:
    """NFQUEUE config: when the queue is full, accept packets instead of dropping them."""
    flags = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN if enable else 0)
    return nfnl_message(NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, queue,
                        nla(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)) + nla(NFQA_CFG_FLAGS, flags))


def nflog_bind(group: int, copy_range: int = 0xFFFF, *, seq: int = 1) -> list[bytes]:
    """Messages binding NFLOG ``group`` in copy-packet mode, delivering each packet at once."""
    return [
        nfnl_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, group,
                     nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), family=socket.AF_INET,
                     seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK),
        nfnl_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, group,
                     nla(NFULA_CFG_MODE, NFULA_CFG_MODE_BODY.pack(copy_range, NFULNL_COPY_PACKET))
                     + nla(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
                     + nla(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)),
                     family=socket.AF_UNSPEC, seq=seq + 1, flags=NLM_F_REQUEST | NLM_F_ACK),
    ]


def parse_attrs(data: bytes | memoryview) -> dict[int, bytes]:
    """Netlink attributes (type -> payload; nested/byte-order flag bits stripped)."""
    attrs: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + NLA.size <= end:
        length, kind = NLA.unpack_from(data, pos)
        if length < NLA.size or pos + length > end:
            raise NetlinkDecodeError(f"attribute at {pos} claims {length} bytes, {end - pos} left")
        attrs[kind & 0x3FFF] = bytes(data[pos + NLA.size:pos + length])
        pos += _align4(length)
    return attrs


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    kind: int            # nlmsg type
    flags: int
    seq: int
    body: bytes          # after the netlink header


def split_messages(datagram: bytes | memoryview) -> Iterator[NetlinkMessage]:
    """The netlink messages in one received datagram."""
    pos, end = 0, len(datagram)
    while pos + NLMSG.size <= end:
        length, kind, flags, seq, _pid = NLMSG.unpack_from(datagram, pos)
        if length < NLMSG.size or pos + length > end:
            raise NetlinkDecodeError(f"netlink message at {pos} claims {length} bytes, {end - pos} left")
        yield NetlinkMessage(kind, flags, seq, bytes(datagram[pos + NLMSG.size:pos + length]))
        pos += _align4(length)
    if pos < end and end - pos >= NLMSG.size:
        raise NetlinkDecodeError(f"{end - pos} trailing bytes after the last message")


def netlink_error(msg: NetlinkMessage) -> int:
    """The (positive) errno of an NLMSG_ERROR message, 0 for an ACK."""
    if len(msg.body) < 4:
        raise NetlinkDecodeError("NLMSG_ERROR shorter than its error code")
    return -struct.unpack_from("=i", msg.body)[0]


@dataclass(frozen=True, slots=True)
class NflogPacket:
    group: int
    payload: bytes       # the IPv4 datagram
    mark: int = 0
    indev: int = 0
    outdev: int = 0
    prefix: str = ""


def parse_nflog(msg: NetlinkMessage) -> NflogPacket | None:
    """An NFLOG packet from a netlink message; None for other message types."""
    if msg.kind != (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
        return None
    if len(msg.body) < NFGEN.size:
        raise NetlinkDecodeError(f"NFLOG message of {len(msg.body)} bytes has no nfgenmsg header")
    _family, _version, group = NFGEN.unpack_from(msg.body)
    attrs = parse_attrs(memoryview(msg.body)[NFGEN.size:])
    if NFULA_PAYLOAD not in attrs:
        raise NetlinkDecodeError("NFLOG packet without a payload attribute (copy mode not set?)")

    def u32(kind: int) -> int:
        raw = attrs.get(kind)
        if raw is None:
            return 0
        if len(raw) != 4:
            raise NetlinkDecodeError(f"NFLOG attribute {kind} is {len(raw)} bytes, expected 4")
        return struct.unpack("!I", raw)[0]

    return NflogPacket(group, attrs[NFULA_PAYLOAD], u32(NFULA_MARK), u32(NFULA_IFINDEX_INDEV),
                       u32(NFULA_IFINDEX_OUTDEV), attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace"))


# ---------------------------------------------------------------- /proc queue status

@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One line of /proc/net/netfilter/nfnetlink_queue (per network namespace)."""

    queue: int
    portid: int          # netlink port of the bound listener
    total: int           # packets waiting for a verdict now
    copy_mode: int
    copy_range: int
    dropped: int         # dropped because the queue was full
    user_dropped: int    # dropped because the listener's socket buffer was full
    id_sequence: int     # packets queued so far (the last packet id)


QUEUE_STATUS_PATH = "/proc/net/netfilter/nfnetlink_queue"


def parse_queue_status(text: str) -> dict[int, QueueStatus]:
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            numbers = [int(f) for f in fields[:8]]
        except ValueError:
            continue
        out[numbers[0]] = QueueStatus(*numbers)
    return out


def read_queue_status(path: str = QUEUE_STATUS_PATH) -> dict[int, QueueStatus]:
    try:
        with open(path) as f:
            return parse_queue_status(f.read())
    except FileNotFoundError:
        return {}


TCP_LISTEN = 0x0A
TCP_TABLE_PATH = "/proc/net/tcp"


def parse_tcp_listeners(text: str) -> dict[int, int]:
    """Listening TCP port -> connections waiting to be accepted, from /proc/net/tcp.

    For a listening socket the ``rx_queue`` column is its accept backlog.
    """
    out: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        try:
            port = int(fields[1].rsplit(":", 1)[1], 16)
            state = int(fields[3], 16)
            backlog = int(fields[4].split(":")[1], 16)
        except (IndexError, ValueError):
            continue
        if state == TCP_LISTEN:
            out[port] = max(out.get(port, 0), backlog)
    return out


def read_tcp_listeners(path: str = TCP_TABLE_PATH) -> dict[int, int]:
    try:
        with open(path) as f:
            return parse_tcp_listeners(f.read())
    except FileNotFoundError:
        return {}


def mark_injected(sock: socket.socket) -> None:
    """Mark everything ``sock`` sends so it bypasses the booster chains (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_INJECTED)


def raw_injector() -> socket.socket:
    """A raw IPv4 socket for injecting whole datagrams (IP_HDRINCL), marked as injected."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    mark_injected(sock)
    sock.setblocking(False)
    return sock


__all__ = [name for name in dir() if not name.startswith("_") and name not in {"annotations", "os"}]
