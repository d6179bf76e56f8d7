"""The gnutella vertical end to end on the user engine, over loopback, in about ten seconds.

A remote servent R sits "outside"; a cluster of three servents reaches it only through a
booster box (boxd --engine user relaying to R, with gnutella-booster intercepting those
connections).  The booster impersonates R, answers pings with the cluster's own peers, and
keeps a query inside the cluster: L1's search for a song that both L3 (inside) and R
(outside) share is answered by L3, R never sees it, and L1 downloads the file from L3 with
its SHA-1 checked.  A second search, for a file only R has, goes out (over the booster's own
connection to R) once the local attempt found nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import base64
import json
import time
from pathlib import Path
from typing import Callable

from boxcore.procs import ProcessGroup, free_port, script

SONG = "free software song.ogg"


def _song_bytes() -> bytes:
    # a deterministic 256 KiB "recording"
    block = hashlib.sha256(b"free software song").digest()
    return (block * (256 * 1024 // len(block)))[: 256 * 1024]


def _servent(procs: ProcessGroup, name: str, port: int, share: Path, peers: list[int], extra: list[str] = ()):
    argv = [script("gnutella-servent"), "serve", "--listen", f"127.0.0.1:{port}", "--share", str(share),
            "--connections", "3", "--seed", str(port), "--log-level", "info", *extra]
    for peer in peers:
        argv += ["--peer", f"127.0.0.1:{peer}"]
    return procs.start(name, argv)


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    song = _song_bytes()
    song_sha1 = base64.b32encode(hashlib.sha1(song).digest()).decode()
    shares = {}
    for name, files in {"R": {SONG: song, "outside only.txt": b"far away\n"},
                        "L1": {}, "L2": {"notes.txt": b"notes\n"}, "L3": {SONG: song}}.items():
        shares[name] = workdir / "shares" / name
        shares[name].mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            (shares[name] / fname).write_bytes(data)
    ports = {name: free_port() for name in ("R", "L1", "L2", "L3", "box")}
    control = workdir / "boxd.sock"
    queries = workdir / "L1.queries.jsonl"
    results = workdir / "L1.results.jsonl"
    queries.write_text(json.dumps({"at": 4.0, "query": "free software song", "download": True}) + "\n"
                       + json.dumps({"at": 7.0, "query": "outside only", "download": True}) + "\n")
    (workdir / "downloads").mkdir(exist_ok=True)
    procs = ProcessGroup(workdir / "roles")
    try:
        remote = _servent(procs, "R", ports["R"], shares["R"], [])
        boxd = procs.start("boxd", [script("boxd"), "--engine", "user", "--control", str(control),
                                    "--state", str(workdir / "boxd-state"),
                                    "--listen", f"tcp:127.0.0.1:{ports['box']}=127.0.0.1:{ports['R']}"])
        await procs.wait_path(boxd, control)
        booster = procs.start("booster", [script("gnutella-booster"), "--control", str(control), "--name", "edge",
                                          "--cluster", "127.0.0.0/8", "--port", str(ports["R"]),
                                          "--local-wait", "0.5", "--upstream", "1", "--log-level", "info"])
        await procs.wait_for_log(booster, "ready on engine")
        say(f"remote servent R on :{ports['R']} shares {SONG!r} and 'outside only.txt'; box :{ports['box']} relays "
            f"to R, gnutella-booster intercepts those connections (user engine) and peers with R itself")
        # every cluster servent was told of R only through the box (and L1 of L2, L2 of L3)
        _servent(procs, "L3", ports["L3"], shares["L3"], [ports["box"]])
        _servent(procs, "L2", ports["L2"], shares["L2"], [ports["box"], ports["L3"]])
        l1 = _servent(procs, "L1", ports["L1"], shares["L1"], [ports["box"], ports["L2"]],
                      ["--queries", str(queries), "--results", str(results), "--wait-hits", "2",
                       "--downloads", str(workdir / "downloads")])
        say("cluster servents L1, L2, L3 started; each dials R through the box and is met by the booster")
        deadline = time.monotonic() + 30
        while not (results.exists() and len(results.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or l1.proc.poll() is not None:
                raise RuntimeError(f"L1 produced no search result: {l1.tail()}")
            await asyncio.sleep(0.1)
        record, outside = (json.loads(line) for line in results.read_text().splitlines()[:2])
        say(f"L1 searched 'free software song': {record['hits']} hit(s), first after {record['first_hit_ms']} ms, "
            f"from {', '.join(record['sources'])} (L3 is :{ports['L3']})")
        dl = record.get("download") or {}
        verified = bool(dl.get("ok")) and dl.get("sha1") == song_sha1
        say(f"downloaded {dl.get('size', 0)} bytes from {dl.get('source')}: SHA-1 {dl.get('sha1')} "
            f"{'verified' if verified else 'NOT verified'}")
        out_dl = outside.get("download") or {}
        say(f"L1 searched 'outside only': no local QRP table may hold it, so the booster sent it at once "
            f"to R: {outside['hits']} hit(s) after {outside['first_hit_ms']} ms from {', '.join(outside['sources'])}; "
            f"download {'verified' if out_dl.get('ok') else 'FAILED'}")
        await procs.stop(l1)
        await procs.stop_all()
        b = booster.read_stats()
        r = remote.read_stats()
        remote_queries = r.get("rx_query", 0)
        say(f"booster: {b.get('intercepted', 0)} connections intercepted, {b.get('pings_answered', 0)} pings "
            f"answered as R, {b.get('steered_away', 0)} steered to local peers, {b.get('local_queries', 0)} "
            f"local queries, {b.get('probes_sent', 0)} local probes, "
            f"{b.get('forwarded_by_count', 0) + b.get('forwarded_by_timeout', 0) + b.get('forwarded_by_tables', 0)} "
            f"sent outside; "
            f"R received {remote_queries} query (the one the cluster could not answer)")
        inside = bool(record["sources"]) and all(src.endswith(f":{ports['L3']}") for src in record["sources"])
        return {
            "hits": record["hits"],
            "answered_inside": inside,
            "first_hit_ms": record["first_hit_ms"],
            "download_verified": verified,
            "remote_queries_received": remote_queries,
            "outside_query_hits": outside["hits"],
            "outside_first_hit_ms": outside["first_hit_ms"],
            "forwarded_at_once": b.get("forwarded_by_tables", 0),
            "outside_download_verified": bool(out_dl.get("ok")),
            "intercepted_connections": b.get("intercepted", 0),
            "pings_answered_by_booster": b.get("pings_answered", 0),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    finally:
        await procs.stop_all()


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run_demo(Path(tmp), print)), indent=2))
