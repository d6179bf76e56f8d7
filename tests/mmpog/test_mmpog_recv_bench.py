"""The receive-path benchmark measures what it says: every update it feeds is handled, not dropped."""

from mmpog import recv_bench, wire


def test_bench_stream_reaches_the_game_whole():
    updates = 3000
    datagrams = recv_bench.build_stream(updates, bundle=14, loss=0.05, payload=64, seed=3)
    assert all(len(d) <= wire.MAX_DATAGRAM for d in datagrams)
    endpoint = recv_bench.stage_endpoint(datagrams, recv_bench._times(updates, datagrams))
    stats = endpoint.stats
    assert stats["malformed"] == stats["duplicates"] == stats["unrecoverable"] == 0
    assert stats["bundles"] == len(datagrams)
    # the lost reliable updates were noticed, asked for, and arrived as retransmissions
    assert stats["missing_detected"] > 0 and stats["nacks_sent"] > 0
    assert stats["retransmissions_received"] == stats["missing_detected"]
    assert stats["received_reliable"] == stats["seqs_accounted"]
    assert 0.93 * updates < stats["received"] < updates
