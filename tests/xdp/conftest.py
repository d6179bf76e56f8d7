"""Fixtures of the xdp engine tests: a loaded BPF data path (root, BPF, the compiled object)."""

import os

import pytest

from tests.linux.engine_lab import kernel_objects

# what the host's kernel held before any test ran (collection comes first): the last test of the
# suite (test_zz_nothing_left_behind.py) checks nothing was added and left
AT_START = kernel_objects() if os.geteuid() == 0 else {}


def bpf_problem() -> str | None:
    from boxcore.engines import libbpf
    from boxcore.engines.xdp_maps import object_problem

    if os.geteuid() != 0:
        return "needs root (BPF)"
    return libbpf.available() or object_problem()


@pytest.fixture
def datapath():
    from boxcore.engines.xdp_maps import Datapath

    problem = bpf_problem()
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    dp = Datapath()
    dp.set_config(lease_until_ns=2**64 - 1)
    try:
        yield dp
    finally:
        dp.close()
