#!/usr/bin/env bash
# Make this checkout runnable on a fresh Debian/Ubuntu machine: the system packages the suite
# needs (through apt-get when root and missing), a virtual environment in .venv, and the
# package with its test extra.  Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v python3 >/dev/null || need_pkgs+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v tc >/dev/null || need_pkgs+=(iproute2)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)   # the distributed stores (issue 15) and their tests
[ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || need_pkgs+=(libnetfilter-queue-dev)
[ -e /usr/include/libnfnetlink/libnfnetlink.h ] || need_pkgs+=(libnfnetlink-dev)
python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
  || need_pkgs+=(python3-dev)
command -v chromium >/dev/null || need_pkgs+=(chromium)              # browser tests of the dashboard
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing system packages: ${need_pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages (${need_pkgs[*]}); install them or run as root" >&2
  fi
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: Python >= 3.11 is needed, this is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.boosterbox-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" >&2 || true
  # SUMO for fcd-validate and its tests (the sumo extra); the RESCO city cuts are sumo-rl's data files
  .venv/bin/python -m pip install -q -e '.[sumo]' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q --no-deps 'sumo-rl>=1.4' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c 'import boxcore, uvloop, msgpack, aiohttp, pytest' \
    || { echo "bootstrap: installing the package failed" >&2; exit 1; }
  touch "$stamp"
fi
