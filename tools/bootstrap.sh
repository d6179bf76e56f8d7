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
# the xdp engine: BPF programs compiled with clang against libbpf's headers, loaded through
# libbpf1; trafgen (netsniff-ng) is its benchmark's packet generator
command -v clang >/dev/null || need_pkgs+=(clang)
command -v llc >/dev/null || need_pkgs+=(llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need_pkgs+=(libbpf-dev)
command -v bpftool >/dev/null || need_pkgs+=(bpftool)
command -v trafgen >/dev/null || need_pkgs+=(netsniff-ng)
python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
  || need_pkgs+=(python3-dev)
command -v chromium >/dev/null || need_pkgs+=(chromium)              # browser tests of the dashboard
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
command -v firefox-esr >/dev/null || need_pkgs+=(firefox-esr)        # the same tests in Firefox (WebDriver BiDi)

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
  .venv/bin/python -m pip install -q -e '.[test,compare]' 2>&1 | grep -v "is ignored" >&2 || true
  # SUMO for fcd-validate and its tests (the sumo extra); the RESCO city cuts are sumo-rl's data files
  .venv/bin/python -m pip install -q -e '.[sumo]' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q --no-deps 'sumo-rl>=1.4' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c 'import boxcore, uvloop, msgpack, aiohttp, pytest' \
    || { echo "bootstrap: installing the package failed" >&2; exit 1; }
  touch "$stamp"
fi

# BPF objects of the xdp engine: compiled only when missing or older than their source
# (build products, not committed)
if command -v clang >/dev/null && [ -e /usr/include/bpf/bpf_helpers.h ]; then
  for src in boxcore/engines/bpf/*.bpf.c; do
    [ -e "$src" ] || continue
    obj="${src%.c}.o"
    if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ]; then
      clang -O2 -g -Wall -target bpf -I"/usr/include/$(uname -m)-linux-gnu" -c "$src" -o "$obj.tmp" \
        && mv "$obj.tmp" "$obj" \
        || { rm -f "$obj.tmp"; echo "bootstrap: compiling $src failed (the xdp engine will not load)" >&2; }
    fi
  done
else
  echo "bootstrap: clang or libbpf-dev missing: the xdp engine's BPF programs are not built" >&2
fi
