"""The suite's one process helper, :mod:`cliruntime.procs`, under the name boxcore's users know.

It lives in ``cliruntime`` because npdrv uses it too and npdrv never imports boxcore.
"""

from cliruntime.procs import BIN, POLL_INTERVAL, ProcessGroup, Role, free_port, python_module, script

__all__ = ["BIN", "POLL_INTERVAL", "ProcessGroup", "Role", "free_port", "python_module", "script"]
