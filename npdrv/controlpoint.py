"""The card's control point, sans-IO: guided request frames in, reply frames out.

It executes each command against a :class:`npdrv.card.Card` and answers with a
status per command.  Replies are kept in a bounded cache keyed by (requester
MAC, correlator), so a request the driver resent because the reply was lost is
answered again without being executed twice.
"""

from __future__ import annotations

import collections
import ipaddress

from npdrv import wire
from npdrv.card import ACTION_SETS, Card, FwdEntry
from npdrv.tables import TableFull
from npdrv.wire import Cmd, Command, Scope, Status, Table


class CommandFailed(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ControlPoint:
    def __init__(self, card: Card, mac: bytes, *, reply_cache: int = 256) -> None:
        self.card = card
        self.mac = wire.mac_bytes(mac)
        self.reply_cache_limit = reply_cache
        self._replies: collections.OrderedDict[tuple[bytes, int], list[bytes]] = collections.OrderedDict()
        self.stats: collections.Counter[str] = collections.Counter()
        self.last_error = ""

    def handle_frame(self, data: bytes) -> list[bytes]:
        """Reply frames for one frame received on the control interface."""
        try:
            _, src, message = wire.parse_frame(data)
        except wire.GuidedFrameDecodeError as exc:
            self.stats["malformed"] += 1
            self.last_error = str(exc)
            return []
        if message.reply:
            self.stats["ignored_replies"] += 1
            return []
        key = (src, message.correlator)
        cached = self._replies.get(key)
        if cached is not None:
            self.stats["duplicate_requests"] += 1
            self._replies.move_to_end(key)
            return list(cached)
        self.stats["requests"] += 1
        replies: list[Command] = []
        for command in message.commands:
            self.stats[f"cmd_{command.type.name.lower()}"] += 1
            try:
                body, entries = self.execute(command)
                replies.append(Command(command.type, body))
                replies.extend(Command(Cmd.ENTRY, wire.Entry(rec)) for rec in entries)
            except CommandFailed as exc:
                self.stats[f"status_{exc.status.name.lower()}"] += 1
                replies.append(Command(command.type, wire.Reason(exc.reason), exc.status))
        frames = [wire.frame(src, self.mac, msg) for msg in wire.reply_messages(message.correlator, replies)]
        self._replies[key] = frames
        if len(self._replies) > self.reply_cache_limit:
            self._replies.popitem(last=False)
            self.stats["reply_cache_evicted"] += 1
        return frames

    # ------------------------------------------------------------ commands
    def execute(self, command: Command) -> tuple[wire.Body, list[wire.Body]]:
        handler = getattr(self, f"_do_{command.type.name.lower()}")
        return handler(command.body)

    def _port(self, port: int):
        if not 0 <= port < len(self.card.ports):
            raise CommandFailed(Status.BAD_PORT, f"no port {port} (the card has {len(self.card.ports)})")
        return self.card.ports[port]

    def _do_echo(self, body: wire.Echo):
        return body, []

    def _do_port_config(self, body: wire.PortConfig):
        self._port(body.port).config = body
        return body, []

    def _do_fwd_add(self, body: wire.FwdAdd):
        if body.port != wire.PORT_HOST:
            self._port(body.port)
        try:
            self.card.fwd.add(body.prefix, FwdEntry(body.port, body.next_hop, body))
        except TableFull as exc:
            raise CommandFailed(Status.TABLE_FULL, str(exc)) from None
        return wire.Empty(), []

    def _do_fwd_delete(self, body: wire.FwdDelete):
        net = ipaddress.IPv4Network(body.network)
        if not self.card.fwd.delete((int(net.network_address), net.prefixlen)):
            raise CommandFailed(Status.NOT_FOUND, f"no forwarding entry {body.network}")
        return wire.Empty(), []

    def _do_rule_insert(self, rule: wire.NpRule):
        allowed = ACTION_SETS[self.card.code]
        if rule.action not in allowed:
            raise CommandFailed(Status.UNSUPPORTED,
                                f"action {rule.action.name} needs other code than {self.card.code!r}")
        existing = self.card.rules.rules.get(rule.rule_id)
        if existing is not None:
            if existing.rule == rule:
                return wire.Empty(), []          # the same insert again: idempotent
            raise CommandFailed(Status.EXISTS, f"rule {rule.rule_id} exists with other fields")
        try:
            self.card.rules.insert(rule)
        except TableFull as exc:
            raise CommandFailed(Status.TABLE_FULL, str(exc)) from None
        return wire.Empty(), []

    def _do_rule_delete(self, body: wire.RuleRef):
        if not self.card.rules.delete(body.rule_id):
            raise CommandFailed(Status.NOT_FOUND, f"no rule {body.rule_id}")
        return wire.Empty(), []

    def _do_rule_read(self, body: wire.RuleRef):
        rule = self.card.rules.rules.get(body.rule_id)
        if rule is None:
            raise CommandFailed(Status.NOT_FOUND, f"no rule {body.rule_id}")
        return wire.RuleRecord(rule.rule, rule.packets, rule.bytes), []

    def _do_mcast_set(self, body: wire.McastSet):
        groups = self.card.groups
        if not body.members:
            groups.pop(body.group, None)
            return wire.Empty(), []
        if body.group not in groups and len(groups) >= self.card.config.group_limit:
            raise CommandFailed(Status.TABLE_FULL, f"the card holds {self.card.config.group_limit} groups")
        groups[body.group] = tuple((wire.ip_int(ip), port) for ip, port in body.members)
        return wire.Empty(), []

    def _counter_pairs(self, ref: wire.CounterRef) -> tuple[int, int]:
        if ref.scope is Scope.RULE:
            rule = self.card.rules.rules.get(ref.ident)
            if rule is None:
                raise CommandFailed(Status.NOT_FOUND, f"no rule {ref.ident}")
            return rule.packets, rule.bytes
        port = self._port(ref.ident)
        return {
            Scope.PORT_RX: (port.rx_packets, port.rx_bytes),
            Scope.PORT_TX: (port.tx_packets, port.tx_bytes),
            Scope.PORT_DROP: (port.drops, 0),
            Scope.PORT_TO_HOST: (port.to_host_packets, port.to_host_bytes),
        }[ref.scope]

    def _do_counters_read(self, ref: wire.CounterRef):
        packets, nbytes = self._counter_pairs(ref)
        return wire.Counters(ref.scope, ref.ident, packets, nbytes), []

    def _do_counters_clear(self, ref: wire.CounterRef):
        if ref.scope is Scope.RULE:
            if ref.ident == wire.ALL:
                targets = list(self.card.rules.rules.values())
            else:
                rule = self.card.rules.rules.get(ref.ident)
                if rule is None:
                    raise CommandFailed(Status.NOT_FOUND, f"no rule {ref.ident}")
                targets = [rule]
            for rule in targets:
                rule.packets = rule.bytes = 0
            return wire.Empty(), []
        # Port counters are cleared together, whichever port scope is named.
        ports = self.card.ports if ref.ident == wire.ALL else [self._port(ref.ident)]
        for port in ports:
            port.clear()
        return wire.Empty(), []

    def _do_code_load(self, body: wire.CodeLoad):
        if body.name not in ACTION_SETS:
            raise CommandFailed(Status.NOT_FOUND,
                                f"no code {body.name!r} (have {', '.join(sorted(ACTION_SETS))})")
        self.card.code = body.name
        self.card.rules.clear()
        self.card.groups.clear()
        return body, []

    def _do_table_dump(self, body: wire.DumpRequest):
        card = self.card
        records: list[wire.Body]
        if body.table is Table.RULES:
            records = [wire.RuleRecord(r.rule, r.packets, r.bytes) for r in card.rules]
        elif body.table is Table.FORWARDING:
            records = [entry.record for _, entry in card.fwd.items()]
        elif body.table is Table.MULTICAST:
            records = [wire.McastSet(group, tuple((wire.ip_text(a), p) for a, p in members))
                       for group, members in sorted(card.groups.items())]
        else:
            records = [port.record() for port in card.ports]
        return wire.DumpHead(body.table, len(records)), records
