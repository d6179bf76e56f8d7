"""Helpers of the security tests: a world-traversable work directory, and code run as another
uid (``setpriv``) that speaks boxd's control protocol by hand, like a hostile local user would."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path

NOBODY = 65534

# Imported by the code run as another uid: a raw control client.
CLIENT = '''
import json, socket, sys, time
from boxcore import wire

class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.decoder = wire.FrameDecoder(64 << 20)
        self.ids = iter(range(1, 1 << 30))
        self.events = []

    def request(self, msg):
        rid = next(self.ids)
        self.sock.sendall(wire.encode(dict(msg, id=rid)))
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return {"closed": True}
            for m in self.decoder.feed(data):
                if isinstance(m, dict) and m.get("t") == "reply" and m.get("id") == rid:
                    return m
                self.events.append(m)

def emit(obj):
    print(json.dumps(obj, default=str))
'''


@contextmanager
def shared_dir():
    """A directory every uid may traverse (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="bbsec"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_uid(code: str, uid: int = NOBODY, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` (with :data:`CLIENT` in scope) as ``uid``/``gid`` with no other groups."""
    return subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                           sys.executable, "-c", CLIENT + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def outputs(proc: subprocess.CompletedProcess) -> list:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
