"""Runs last (tests/xdp sorts after tests/linux, and this file after the others here): the
kernel-engine tests left nothing in the host's kernel - no boxd BPF program or map still loaded,
no pin under a bpffs, no bpffs mount, no clsact qdisc, XDP program, multicast veth or
policy-routing rule in the host's namespace, and no namespace of any lab they brought up."""

import pytest

from tests.linux.engine_lab import left_behind
from tests.xdp.conftest import AT_START

pytestmark = pytest.mark.root


def test_the_engine_tests_left_nothing_behind():
    assert left_behind(AT_START) == {}
