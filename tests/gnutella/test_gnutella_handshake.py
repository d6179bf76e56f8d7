import pytest

from gnutella.handshake import (ConnectRequest, Decision, Established, Handshake, HandshakeError, Headers,
                                Identity, Refused, Response, SlotState, check_outgoing, decide_incoming,
                                identity_headers, listen_address, remote_guid)

ME_UP = Identity(b"\xaa" * 16, "10.0.0.1", 6346, ultrapeer=True)
ME_LEAF = Identity(b"\xbb" * 16, "10.0.0.2", 6346, ultrapeer=False)


def server_sees(raw: bytes) -> ConnectRequest:
    hs = Handshake("server")
    (event,) = hs.receive_data(raw)
    assert isinstance(event, ConnectRequest)
    return event


# ---------------------------------------------------------------- gtk-gnutella's side

@pytest.mark.parametrize("mode", ["leaf", "ultrapeer"])
def test_gtk_gnutella_connect_is_parsed(gtk_connect, mode):
    req = server_sees(gtk_connect(mode))
    assert req.version == "0.6"
    assert req.headers.flag("X-Ultrapeer") is (mode == "ultrapeer")
    assert remote_guid(req.headers).hex() == "ed143102bc64576afa3e39759516c129"
    assert listen_address(req.headers) == ("10.44.0.2", 6346)      # gtk-gnutella's "Node" header


def test_our_ultrapeer_accepts_gtk_leaf_and_meets_its_demands(gtk_connect):
    hs = Handshake("server")
    (req,) = hs.receive_data(gtk_connect("leaf"))
    decision = decide_incoming(req, SlotState(ultrapeer=True, my_guid=ME_UP.guid))
    assert decision.accepted and decision.as_leaf
    reply, est = hs.respond(decision.code, decision.reason, identity_headers(ME_UP, "10.44.0.2"))
    assert est is None and reply.startswith(b"GNUTELLA/0.6 200 OK\r\n") and reply.endswith(b"\r\n\r\n")
    answer = Handshake("client")
    answer.connect(Headers())
    (resp,) = answer.receive_data(reply)
    # gtk-gnutella as a leaf refuses an ultrapeer without X-Degree >= 16 and X-Dynamic-Querying
    assert resp.headers.flag("X-Ultrapeer") is True
    assert resp.headers.int("X-Degree") >= 16
    assert "X-Dynamic-Querying" in resp.headers
    # ... and its final 200 completes the three-way handshake, with messages right behind it
    (done,) = hs.receive_data(b"GNUTELLA/0.6 200 OK\r\n\r\n" + b"\x01" * 7)
    assert isinstance(done, Established) and done.leftover == b"\x01" * 7


def test_our_connect_meets_gtk_demands():
    hs = Handshake("client")
    raw = hs.connect(identity_headers(ME_LEAF))
    assert raw.startswith(b"GNUTELLA CONNECT/0.6\r\n") and raw.endswith(b"\r\n\r\n")
    req = server_sees(raw)
    assert req.headers.get("X-Ultrapeer") in ("True", "False")    # without it: 403 Normal nodes refused
    assert remote_guid(req.headers) == ME_LEAF.guid


@pytest.mark.parametrize("mode", ["ultra", "leaf"])
def test_gtk_gnutella_server_replies_are_accepted_by_our_leaf(captures, mode):
    reply = next(raw for m, kind, raw in captures if m == mode and kind == "handshake_reply")
    hs = Handshake("client")
    hs.connect(identity_headers(ME_LEAF))
    (resp,) = hs.receive_data(reply)
    assert isinstance(resp, Response) and resp.code == 200
    assert remote_guid(resp.headers).hex() == "87833102068709f204bee6a34d31f3f1"
    assert check_outgoing(resp, ME_LEAF).accepted
    final, est = hs.confirm(identity_headers(ME_LEAF))
    assert final.startswith(b"GNUTELLA/0.6 200 OK\r\n") and est.version == "0.6"


# ---------------------------------------------------------------- our acceptance rules

def req(ultrapeer: bool | None, guid: bytes | None = None, version: str = "0.6") -> ConnectRequest:
    h = Headers()
    if ultrapeer is not None:
        h["X-Ultrapeer"] = "True" if ultrapeer else "False"
    if guid is not None:
        h["GUID"] = guid.hex()
    return ConnectRequest(version, h)


def test_ultrapeer_takes_leaves_until_full_then_503():
    slots = SlotState(ultrapeer=True, my_guid=ME_UP.guid, leaves=29, max_leaves=30)
    assert decide_incoming(req(False), slots) == Decision(200, "OK", as_leaf=True)
    slots.leaves = 30
    assert decide_incoming(req(False), slots).code == 503


def test_ultrapeer_takes_ultrapeers_until_full():
    slots = SlotState(ultrapeer=True, my_guid=ME_UP.guid, peers=7, max_peers=8)
    assert decide_incoming(req(True), slots).accepted
    slots.peers = 8
    assert decide_incoming(req(True), slots) == Decision(503, "Too many ultrapeers")


def test_leaf_refuses_leaves_and_caps_ultrapeers():
    slots = SlotState(ultrapeer=False, my_guid=ME_LEAF.guid, ultrapeers=2, max_ultrapeers=3)
    assert decide_incoming(req(False), slots).code == 503
    assert decide_incoming(req(True), slots).accepted
    slots.ultrapeers = 3
    assert decide_incoming(req(True), slots).code == 503


def test_duplicate_guid_and_self_are_409():
    other = b"\x42" * 16
    slots = SlotState(ultrapeer=True, my_guid=ME_UP.guid, connected_guids={other})
    assert decide_incoming(req(True, other), slots).code == 409
    assert decide_incoming(req(True, ME_UP.guid), slots).code == 409
    assert decide_incoming(req(True, b"\x43" * 16), slots).accepted


def test_04_peers_are_flat_peers_when_allowed():
    assert decide_incoming(req(None, version="0.4"), SlotState(ultrapeer=True, my_guid=b"x" * 16)).accepted
    assert not decide_incoming(req(None, version="0.4"),
                               SlotState(ultrapeer=True, my_guid=b"x" * 16, allow_04=False)).accepted


def test_refusal_carries_try_ultrapeers_and_client_sees_refused():
    server = Handshake("server")
    client = Handshake("client")
    (request,) = server.receive_data(client.connect(identity_headers(ME_LEAF)))
    headers = identity_headers(ME_UP)
    headers["X-Try-Ultrapeers"] = "10.0.0.7:6346,10.0.0.8:6346"
    reply, _ = server.respond(503, "Too many leaves", headers)
    (refused,) = client.receive_data(reply)
    assert isinstance(refused, Refused) and refused.code == 503
    assert refused.headers.get("x-try-ultrapeers") == "10.0.0.7:6346,10.0.0.8:6346"


def test_leaf_refuses_a_leaf_in_the_third_step():
    hs = Handshake("client")
    hs.connect(identity_headers(ME_LEAF))
    (resp,) = hs.receive_data(b"GNUTELLA/0.6 200 OK\r\nX-Ultrapeer: False\r\n\r\n")
    decision = check_outgoing(resp, ME_LEAF)
    assert decision.code == 503
    assert hs.refuse_final(decision.code, decision.reason).startswith(b"GNUTELLA/0.6 503 ")


def test_three_way_between_two_of_ours_byte_by_byte():
    client, server = Handshake("client"), Handshake("server")
    events = []
    for b in client.connect(identity_headers(ME_LEAF)):
        events += server.receive_data(bytes([b]))
    (request,) = events
    reply, _ = server.respond(200, "OK", identity_headers(ME_UP))
    (resp,) = client.receive_data(reply)
    final, client_est = client.confirm(identity_headers(ME_LEAF))
    (server_est,) = server.receive_data(final + b"MSG")
    assert server_est.leftover == b"MSG" and server_est.headers.flag("X-Ultrapeer") is False
    assert client_est.headers.flag("X-Ultrapeer") is True


def test_04_handshake():
    client, server = Handshake("client", version="0.4"), Handshake("server")
    raw = client.connect(Headers())
    assert raw == b"GNUTELLA CONNECT/0.4\n\n"
    (request,) = server.receive_data(raw)
    assert request.version == "0.4"
    reply, est = server.respond(200, "OK", Headers())
    assert reply == b"GNUTELLA OK\n\n" and est is not None
    (done,) = client.receive_data(reply + b"xyz")
    assert isinstance(done, Established) and done.leftover == b"xyz"


@pytest.mark.parametrize("raw,words", [
    (b"GET / HTTP/1.1\r\n\r\n", "not a Gnutella connect"),
    (b"GNUTELLA CONNECT/0.6\r\nno colon here\r\n\r\n", "bad header line"),
    (b"GNUTELLA CONNECT/0.6\r\n" + b"X-Pad: " + b"a" * 20000, "exceeds"),
    (b"GNUTELLA CONNECT/0.6\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(70)) + b"\r\n", "more than 64"),
    (b"GNUTELLA CONNECT/zz\r\n\r\n", "bad handshake version"),
])
def test_malformed_handshakes_say_why(raw, words):
    with pytest.raises(HandshakeError, match=words):
        Handshake("server").receive_data(raw)


def test_header_continuation_lines():
    (req,) = Handshake("server").receive_data(b"GNUTELLA CONNECT/0.6\r\nX-Features: tls/1.0,\r\n browse/1.0\r\n\r\n")
    assert req.headers["x-features"] == "tls/1.0, browse/1.0"


from hypothesis import given, settings, strategies as st


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["client", "server"]))
def test_random_bytes_only_ever_raise_handshake_errors(data, role):
    hs = Handshake(role)
    if role == "client":
        hs.connect(Headers())
    try:
        hs.receive_data(b"GNUTELLA CONNECT/0.6\r\n" + data if role == "server" and data[:1] == b"!" else data)
    except HandshakeError:
        pass


header_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
header_values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.,;/:= ", max_size=40).map(str.strip)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(header_names.map(str.lower), header_values, max_size=20))
def test_headers_survive_the_three_way_handshake(pairs):
    client, server = Handshake("client"), Handshake("server")
    (request,) = server.receive_data(client.connect(Headers(pairs)))
    for name, value in pairs.items():
        assert request.headers.get(name) == value


def test_listen_ip_only_where_something_listens():
    from gnutella.handshake import Identity, identity_headers
    assert identity_headers(Identity(b"\x01" * 16, "10.0.0.1", 16346, True)).get("Listen-IP") == "10.0.0.1:16346"
    assert "Listen-IP" not in identity_headers(Identity(b"\x01" * 16, "10.0.0.1", 0, True))


@pytest.mark.parametrize("value,expected", [
    ("10.11.0.5:6346", ("10.11.0.5", 6346)), ("10.11.0.5:99999", None), ("10.11.0.5:0", None),
    ("10.11.0.5:65535", ("10.11.0.5", 65535)), ("10.11.0.5:65536", None), ("0.0.0.0:6346", None),
    ("host.example:6346", None), ("10.11.0.256:6346", None), ("10.11.0.5:+80", None), ("10.11.0.5:٣", None),
    ("010.11.0.5:6346", None), ("[::1]:6346", None), ("10.11.0.5", None), ("", None)])
def test_addresses_in_headers_are_ipv4_with_a_port_a_socket_takes(value, expected):
    from gnutella.handshake import listen_address, parse_address
    assert parse_address(value) == expected
    assert listen_address(Headers({"Listen-IP": value})) == expected


def test_try_addresses_keep_the_valid_ones_and_count_the_rest():
    from gnutella.handshake import MAX_TRY_HOSTS, try_addresses
    hosts, refused = try_addresses(Headers({"X-Try-Ultrapeers": "10.0.0.1:6346, 1.2.3.4:99999,,",
                                            "X-Try": "10.0.0.2:6347,bogus"}))
    assert hosts == [("10.0.0.1", 6346), ("10.0.0.2", 6347)] and refused == 2
    many = ",".join(f"10.0.{i // 250}.{i % 250 + 1}:6346" for i in range(MAX_TRY_HOSTS + 5))
    hosts, refused = try_addresses(Headers({"X-Try-Ultrapeers": many}))
    assert len(hosts) == MAX_TRY_HOSTS and refused == 5
