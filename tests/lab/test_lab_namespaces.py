"""booster-lab: topologies really pass traffic between namespaces, and down leaves nothing."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from boxcore import lab as labmod
from boxcore.lab import Lab, down, list_labs

pytestmark = pytest.mark.root

LAB_CLI = [sys.executable, "-m", "boxcore.lab"]


def lab_name(tag: str) -> str:
    return f"t{tag}-{secrets.token_hex(3)}"


def leftovers(name: str) -> list[str]:
    """Everything of lab ``name`` still on the machine: namespaces, root veths, state file."""
    found = [ns for ns in os.listdir("/run/netns") if ns.startswith(f"bb{name}_")] if os.path.isdir("/run/netns") else []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    prefix = labmod._tmp_prefix(name)
    found += [line.split(":")[1].strip() for line in links.splitlines() if f" {prefix}" in line]
    if (labmod.STATE_DIR / f"{name}.json").exists():
        found.append("state file")
    return found


def udp_exchange(lab: Lab, src: str, dst: str, count: int = 20, src_ip: str | None = None,
                 dst_ip: str | None = None, port: int = 9000) -> list[tuple[bytes, str]]:
    """Send ``count`` datagrams from node src to node dst; return what dst received (payload, source)."""
    dst_ip = dst_ip or lab.addr(dst)
    rx = lab.socket(dst)
    tx = lab.socket(src)
    try:
        rx.bind((dst_ip, port))
        rx.settimeout(0.5)
        if src_ip:
            tx.bind((src_ip, 0))
        for i in range(count):
            tx.sendto(b"ping %d" % i, (dst_ip, port))
        got = []
        while len(got) < count:
            try:
                data, peer = rx.recvfrom(2048)
            except TimeoutError:
                break
            got.append((data, peer[0]))
        return got
    finally:
        rx.close()
        tx.close()


def test_transparent_passes_traffic_through_the_box_and_down_cleans_up():
    name = lab_name("tr")
    with Lab.up("transparent", name=name) as lab:
        assert lab.ns("box") == f"bb{name}_box"
        assert lab.addr("server") == "10.2.0.2" and lab.addr("box", "cli") == "10.1.0.1"
        assert lab.iface("box", "server") == "srv"
        got = udp_exchange(lab, "client", "server")
        assert [d for d, _ in got] == [b"ping %d" % i for i in range(20)]
        assert {peer for _, peer in got} == {"10.1.0.2"}   # routed, not NATed
        assert lab.run("box", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
        assert lab.run("client", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
        # the box forwards: the server's reply comes back through it too
        back = udp_exchange(lab, "server", "client", count=5)
        assert len(back) == 5
        assert any(e["name"] == name for e in list_labs())
    assert leftovers(name) == []


async def test_async_context_manager_and_popen():
    name = lab_name("as")
    async with Lab.up("transparent", name=name) as lab:
        proc = lab.popen("server", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
                         stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=10)
        assert "10.2.0.2/24" in out
    assert leftovers(name) == []


def test_three_clusters_route_between_clusters_with_rate_limits():
    name = lab_name("3c")
    with Lab.up("three-clusters", name=name) as lab:
        assert len(lab.addrs("c1a")) == 3
        # a secondary servent address in cluster 1 to one in cluster 3, through edge1-core-edge3
        got = udp_exchange(lab, "c1a", "c3c", src_ip="10.11.0.12", dst_ip="10.13.0.33")
        assert len(got) == 20 and {peer for _, peer in got} == {"10.11.0.12"}
        # inside one cluster, across the switch
        got = udp_exchange(lab, "c2a", "c2b", dst_ip="10.12.0.22")
        assert len(got) == 20
        qdisc = lab.run("core", ["tc", "qdisc", "show", "dev", "e1"]).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        assert "tbf" not in lab.run("c1a", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert leftovers(name) == []


def test_loss_emulation_with_iptables_statistic():
    name = lab_name("ls")
    with Lab.up("transparent", name=name) as lab:
        lab.set_loss("box", 1.0, iface="cli")
        assert udp_exchange(lab, "client", "server", count=10) == []
        lab.set_loss("box", 0.5, iface="cli")
        got = udp_exchange(lab, "client", "server", count=400)
        assert 100 < len(got) < 300      # binomial(400, 0.5): outside this range p < 1e-20
        lab.set_loss("box", 0.0, iface="cli")
        assert len(udp_exchange(lab, "client", "server", count=10)) == 10
        rules = lab.run("box", ["iptables", "-t", "raw", "-S"]).stdout
        assert rules.count("-j BB-LOSS-cli") == 1        # set_loss is idempotent


def test_down_after_a_crash_finds_leftovers_by_prefix():
    name = lab_name("cr")
    # A process that builds a lab and dies without tearing it down, plus a stray veth in the
    # root namespace as if it had died in the middle of creating a link.
    code = ("import os, signal; from boxcore.lab import Lab; "
            f"lab = Lab.up('transparent', name={name!r}); "
            f"lab.popen('server', ['sleep', '60']); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert child.returncode == -9
    stray = labmod._tmp_prefix(name) + "fa"
    subprocess.run(["ip", "link", "add", stray, "type", "veth", "peer", "name", stray[:-1] + "b"], check=True)
    assert len(leftovers(name)) >= 5
    assert any(e["name"] == name for e in list_labs())
    out = subprocess.run([*LAB_CLI, "down", name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert leftovers(name) == []
    assert down(name) == 0


def test_cli_up_exec_ls_down():
    name = lab_name("cli")
    up = subprocess.run([*LAB_CLI, "up", "transparent", "--name", name, "--json"],
                        capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["nodes"]["server"]["addrs"] == ["10.2.0.2"]
        ex = subprocess.run([*LAB_CLI, "exec", name, "client", "--", "ip", "-4", "-o", "addr"],
                            capture_output=True, text=True, timeout=30)
        assert "10.1.0.2/24" in ex.stdout
        ls = subprocess.run([*LAB_CLI, "ls"], capture_output=True, text=True, timeout=30)
        assert name in ls.stdout
        again = subprocess.run([*LAB_CLI, "up", "transparent", "--name", name],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "already up" in again.stderr
        bad = subprocess.run([*LAB_CLI, "exec", name, "nobody", "--", "true"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "no node" in bad.stderr
    finally:
        subprocess.run([*LAB_CLI, "down", name], timeout=60)
    assert leftovers(name) == []


def test_cli_names_a_lab_after_its_topology(tmp_path):
    topo = tmp_path / "t.toml"
    name = lab_name("own")
    topo.write_text(f'name = "{name}"\n[nodes.a]\nkind = "host"\n')
    try:
        first = subprocess.run([*LAB_CLI, "up", str(topo)], capture_output=True, text=True, timeout=60)
        second = subprocess.run([*LAB_CLI, "up", str(topo)], capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and first.stdout.splitlines()[0] == name
        assert second.returncode == 0 and second.stdout.splitlines()[0].startswith(f"{name}-")
    finally:
        for out in (first, second):
            if out.returncode == 0:
                subprocess.run([*LAB_CLI, "down", out.stdout.splitlines()[0]], timeout=60)
    assert leftovers(name) == []


def test_failed_build_leaves_nothing(tmp_path):
    name = lab_name("fb")
    # valid syntax, but the route's gateway is unreachable: the kernel refuses it mid-build
    topo = {"nodes": {"a": {"kind": "host", "routes": [{"dst": "default", "via": "10.9.9.9"}]},
                      "b": {"kind": "host"}},
            "links": [{"a": {"node": "a", "addr": "10.1.0.1/24"}, "b": {"node": "b", "addr": "10.1.0.2/24"}}]}
    with pytest.raises(Exception):
        Lab.up(topo, name=name)
    assert leftovers(name) == []
