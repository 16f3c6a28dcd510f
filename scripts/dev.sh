#!/usr/bin/env bash
# podtrace developer entry point.
#   scripts/dev.sh setup   install what is missing (Debian packages, headers link, tracefs, venv)
#   scripts/dev.sh demo    setup, then build the lab and trace a cross-node flow
#   scripts/dev.sh test    setup, then run the whole test suite
# Idempotent: a second run changes nothing and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
# gcc and python3 (a system interpreter user nobody may run) are for the test suite; the
# second line is what the runbooks' commands and the lab's hints run (tests/integration/
# test_runbook_commands.py runs every one of them against the lab).
APT_PKGS=(python3-bpfcc iproute2 iptables iperf3 bpftool kmod conntrack gcc python3
          iputils-ping iputils-tracepath curl tcpdump ethtool procps nftables
          ipvsadm ipset)
HEADERS_PKG=linux-headers-cloud-amd64
changed=0
say() { echo "setup: $*"; changed=1; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "podtrace setup must run as root (it installs packages and mounts tracefs): sudo $0 $*" >&2
    exit 1
  fi
}

apt_missing() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

setup_packages() {
  local pkgs=("${APT_PKGS[@]}")
  local kver; kver=$(uname -r)
  if [ ! -e "/lib/modules/$kver/build/include" ] || [ -L "/lib/modules/$kver/build" ]; then
    pkgs+=("$HEADERS_PKG")
  fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then pkgs+=(python3-venv); fi
  local missing; missing=$(apt_missing "${pkgs[@]}")
  if [ -n "$missing" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    say "installed Debian packages: $missing"
  fi
}

setup_headers() {
  # BCC refuses to compile without a headers tree. Where the running kernel has none, link
  # Debian's cloud headers as a substitute: used only for BCC's helper macros, never for a
  # kernel struct layout (offsets come from BTF, see tracer/btf.py).
  local kver; kver=$(uname -r)
  local dir=/lib/modules/$kver
  if [ -e "$dir/build/include/linux" ] || { [ -e "$dir/build" ] && [ ! -L "$dir/build" ]; }; then
    return
  fi
  local arch common
  arch=$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  if [ -z "$arch" ] || [ -z "$common" ]; then
    echo "setup: no substitute kernel headers found under /usr/src; install $HEADERS_PKG" >&2
    exit 1
  fi
  mkdir -p "$dir"
  if [ "$(readlink "$dir/build" 2>/dev/null)" != "$arch" ] || [ "$(readlink "$dir/source" 2>/dev/null)" != "$common" ]; then
    ln -sfn "$arch" "$dir/build"
    ln -sfn "$common" "$dir/source"
    say "linked substitute kernel headers $(basename "$arch") as $dir/build (BCC needs a tree; layouts come from BTF)"
  fi
}

setup_mounts() {
  if ! mountpoint -q /sys/kernel/tracing; then
    mkdir -p /sys/kernel/tracing
    mount -t tracefs tracefs /sys/kernel/tracing
    say "mounted tracefs on /sys/kernel/tracing"
  fi
  if ! mountpoint -q /sys/kernel/debug; then
    mkdir -p /sys/kernel/debug
    mount -t debugfs debugfs /sys/kernel/debug
    say "mounted debugfs on /sys/kernel/debug"
  fi
}

setup_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    say "created virtual environment $VENV"
  fi
  # Make Debian's bcc package (and only it) importable: a private folder holding one symlink.
  local site; site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  local link_dir=$VENV/debian-bcc
  local bcc_src=/usr/lib/python3/dist-packages/bcc
  if [ "$(readlink "$link_dir/bcc" 2>/dev/null)" != "$bcc_src" ] || [ ! -f "$site/debian-bcc.pth" ]; then
    mkdir -p "$link_dir"
    ln -sfn "$bcc_src" "$link_dir/bcc"
    echo "$link_dir" > "$site/debian-bcc.pth"
    say "made Debian's bcc package importable in the venv ($link_dir)"
  fi
  local stamp=$VENV/.podtrace-installed
  local want; want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" > "$stamp"
    say "installed podtrace and its Python dependencies into $VENV"
  fi
  # The editable install leaves podtrace's own modules uncompiled, and a shell with
  # PYTHONDONTWRITEBYTECODE set would compile them again in every process (the coordinator and
  # each agent): about 0.05 s of start-up each. Written here once; a changed file is compiled
  # again here, or when imported.
  "$VENV/bin/python" -m compileall -q tracer
}

setup() {
  need_root "$@"
  setup_packages
  setup_headers
  setup_mounts
  setup_venv
  [ "$changed" = 1 ] || echo "setup: nothing to change; everything is in place"
}

cmd=${1:-setup}
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    "$VENV/bin/podtrace" lab up
    "$VENV/bin/podtrace" lab status
    "$VENV/bin/podtrace" flow default/pod-1-1 default/pod-2-1
    ;;
  test)
    setup
    shift || true
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *) echo "usage: $0 setup|demo|test [pytest args]" >&2; exit 2 ;;
esac
