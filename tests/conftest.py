"""Suite-wide test policy.

Tests marked ``root`` need root and network namespaces.  Outside CI they skip
with a reason when that is missing; in CI (``CI=true``) a missing privilege is
an error, never a skip, so kernel and namespace tests always run there.
"""

import os
import shutil

import pytest

from cliruntime import in_ci


def _root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None:
        return
    problem = _root_problem()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"root test cannot run in CI: {problem}", pytrace=False)
    pytest.skip(problem)
