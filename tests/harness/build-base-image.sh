#!/usr/bin/env bash
# Build (or reuse) the systemd Debian base image that stands in for a freshly installed GPU server.
# Usage: build-base-image.sh [12|13] ...   Never pulls: debootstrap from Debian's archive + docker import.
set -euo pipefail
# shellcheck source=tests/harness/lib.sh
. "$(dirname "$0")/lib.sh"

declare -A SUITE=([12]=bookworm [13]=trixie)
INCLUDE="systemd,systemd-sysv,python3,iproute2,ca-certificates,gnupg,procps"

build_one() {
    local version="$1" suite="${SUITE[$1]:-}"
    [ -n "$suite" ] || die "unknown Debian version '$version' (known: ${!SUITE[*]})"
    local image="${GPULAB_BASE_IMAGE_PREFIX}:${version}"
    if docker image inspect "$image" >/dev/null 2>&1; then
        log "base image $image is cached"
        return 0
    fi
    command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    local mirror rootfs
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d /var/tmp/gpulab-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' RETURN
    log "debootstrap $suite from $mirror (a few minutes, once)"
    debootstrap --variant=minbase --include="$INCLUDE" "$suite" "$rootfs" "$mirror" >"${rootfs}.log" 2>&1 \
        || { tail -20 "${rootfs}.log" >&2; die "debootstrap failed"; }
    rm -f "${rootfs}.log"
    # A server image, not a build image: apt keeps its defaults; no machine-id so systemd makes one per boot.
    : > "$rootfs/etc/machine-id"
    rm -f "$rootfs/var/lib/dbus/machine-id"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c 'CMD ["/lib/systemd/systemd"]' \
        -c "LABEL ${GPULAB_LABEL}" -c "LABEL io.gpulab.base=debian-${version}" \
        - "$image" >/dev/null
    log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

ensure_docker_engine
for v in "${@:-12}"; do build_one "$v"; done
