#!/usr/bin/env bash
# Build the agent image's root filesystem without Docker, by interpreting manifests/Dockerfile
# itself (scripts/image_rootfs.py), and run commands in it the way manifests/daemonset.yaml
# runs the container. Needs root, debootstrap (installed when missing) and network.
#
#   scripts/image-rootfs.sh [ROOTFS]             build (default /var/tmp/podtrace-image/rootfs)
#   scripts/image-rootfs.sh --check              parse the Dockerfile, check COPY sources; changes nothing
#   scripts/image-rootfs.sh --run [ROOTFS] [--all-caps] [--rw] -- CMD [ARG...]
#                                                run CMD (default: the image's CMD) chrooted in ROOTFS
#                                                with the DaemonSet's host mounts (read-only), env,
#                                                emptyDirs, read-only root and capabilities
#
# Idempotent: the debootstrap of FROM and the tree after every RUN step are cached under
# $PODTRACE_IMAGE_CACHE (default /var/tmp/podtrace-image/cache), keyed by everything before
# them, so a second build with nothing changed does nothing and a changed step reruns from
# there. Mounts live in a private mount namespace and are unmounted on any exit; none is left
# under ROOTFS (`findmnt | grep podtrace-image` is empty afterwards).
#
# Examples:
#   sudo scripts/image-rootfs.sh
#   printf '%s\n' '{"version": 1, ...}' | sudo scripts/image-rootfs.sh --run -- podtrace agent
#   sudo scripts/image-rootfs.sh --run -- podtrace doctor
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_ROOTFS=/var/tmp/podtrace-image/rootfs
PY=(python3 scripts/image_rootfs.py)

usage() { sed -n '5,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

leftovers() {  # belt and braces: nothing may stay mounted under the rootfs
  local root=$1 t
  findmnt -rn -o TARGET | awk -v r="$root" '$0 == r || index($0, r "/") == 1' | sort -r |
    while read -r t; do umount -R -l "$t" 2>/dev/null || true; done
}

case "${1:-}" in
  -h|--help) usage ;;
  --check)
    shift
    exec "${PY[@]}" check "$@"
    ;;
  --run)
    shift
    root=$DEFAULT_ROOTFS
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then root=$1; shift; fi
    opts=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    [ -f "$root.image.json" ] || { echo "image-rootfs: $root is not built; run $0 $root first" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "image-rootfs: must run as root" >&2; exit 1; }
    root=$(realpath "$root")
    trap 'leftovers "$root"' EXIT
    rc=0
    "${PY[@]}" run "${opts[@]}" "$root" -- "$@" || rc=$?
    exit $rc
    ;;
  -*) usage ;;
esac

root=${1:-$DEFAULT_ROOTFS}
[ "$(id -u)" = 0 ] || { echo "image-rootfs: must run as root (debootstrap, chroot, mounts): sudo $0 $*" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  echo "image-rootfs: installed debootstrap" >&2
fi
mkdir -p "$(dirname "$root")"
root=$(realpath -m "$root")
trap 'leftovers "$root"' EXIT
"${PY[@]}" build "$root"
echo "image-rootfs: $root ($(du -sh --one-file-system "$root" | cut -f1))" >&2
