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


async def test_bot_reads_its_socket_and_every_update_reaches_the_game():
    """The socket stages: each of the bot's read paths gets the whole stream, each datagram with its
    kernel stamp; recvmmsg in fewer system calls than datagrams, the read-one-first path (fresh
    datagrams) in exactly one per datagram, recvmsg in one per datagram plus one per wake-up."""
    updates = 2000
    datagrams = recv_bench.build_stream(updates, bundle=2, loss=0.05, payload=64, seed=5)
    expected = recv_bench.stage_endpoint(datagrams, recv_bench._times(updates, datagrams)).stats["received"]
    syscalls = {}
    for stage, (recvmmsg, read_one_first) in recv_bench.READ_PATHS.items():
        bot, sock = await recv_bench._joined_bot(recvmmsg, read_one_first)
        try:
            joined_with = bot.client.datagrams                  # the join's WELCOME
            syscalls_before = bot.client.batch_receiver.syscalls
            recv_bench.stage_socket(bot, datagrams, wakeup=8)
            assert len(bot.got) == expected
            assert len(bot.arrived) == expected            # every datagram carried its arrival stamp
            assert all(0 <= latency for latency in bot.arrived.values())
            receiver = bot.client.batch_receiver
            assert receiver.truncated == receiver.control_truncated == 0
            assert bot.client.datagrams - joined_with == len(datagrams)
            syscalls[stage] = receiver.syscalls - syscalls_before
        finally:
            await bot.client.close()
            sock.close()
    assert syscalls["socket_recvmmsg"] < len(datagrams) / 4
    # a busy test host may make a datagram late: then recvmmsg takes the rest of its wake-up and one
    # more call finds the socket empty, so at most one call per wake-up beyond one per datagram
    wakeups = -(-len(datagrams) // 8)
    assert len(datagrams) / 4 < syscalls["socket"] <= len(datagrams) + wakeups
    assert syscalls["socket_recvmsg"] > len(datagrams)


async def test_loop_stage_counts_cpu_while_every_bot_gets_the_whole_stream():
    """The loop stage: bots on this event loop, the stream from another process; each bot reads every
    datagram (the stage raises if any is missing), and the CPU it reports is this process's."""
    datagrams = recv_bench.build_stream(300, bundle=1, loss=0.05, payload=64, seed=7)
    group = [await recv_bench._joined_bot(*recv_bench.READ_PATHS["socket"]) for _ in range(3)]
    try:
        before = [bot.client.datagrams for bot, _ in group]
        spent = await recv_bench.stage_loop([bot for bot, _ in group], datagrams, rate=3000.0)
        assert [bot.client.datagrams - b for (bot, _), b in zip(group, before)] == [len(datagrams)] * 3
        assert 0 < spent
        expected = recv_bench.stage_endpoint(datagrams, recv_bench._times(300, datagrams)).stats["received"]
        assert all(len(bot.got) == len(bot.arrived) == expected for bot, _ in group)
    finally:
        for bot, sock in group:
            await bot.client.close()
            sock.close()


def test_send_stage_sends_every_update_and_gets_every_echo():
    """The send stage times a sender's endpoint: every update leaves it, every reliable one is
    echoed (none left pending, none resent: the bench's clock never reaches a timeout)."""
    spent, endpoint = recv_bench.stage_send(400, seed=3, chunk=50)
    stats = endpoint.stats
    assert spent >= 0
    assert stats["sent"] == 400 and 0 < stats["sent_reliable"] < 400
    assert stats["delivered"] == stats["sent_reliable"] and endpoint.pending_count == 0
    assert stats["retransmitted"] == stats["timeouts"] == 0


def test_reflector_stage_fans_out_every_update_to_the_whole_location():
    """The reflector stage: 64 members bound in one location, every update (and copy) accepted and
    fanned out to the location, none refused or malformed."""
    updates = 640
    spent, core = recv_bench.stage_reflector(updates, seed=3)
    assert spent >= 0
    assert len(core.members(recv_bench.LOCATION)) == recv_bench.SENDERS + 1
    stats = core.location_stats(recv_bench.LOCATION)
    assert stats["reliable"] + stats["unreliable"] == updates
    assert stats["fanout_datagrams"] >= updates * recv_bench.SENDERS
    assert core.stats["malformed"] == core.stats["not_member"] == core.stats["unexpected_kind"] == 0


def test_modules_report_says_python_or_compiled():
    modules = recv_bench.compiled_modules()
    assert set(modules) == {"mmpog.wire", "mmpog.reliability", "mmpog.client"}
    assert set(modules.values()) <= {"python", "compiled"}
