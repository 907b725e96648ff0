# Shared helpers for gpulab's harness scripts (sourced, not executed).
# shellcheck shell=bash

GPULAB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export GPULAB_ROOT
# Every Docker object the harness makes carries this label, so `make clean` finds them.
export GPULAB_LABEL="io.gpulab.harness=1"
GPULAB_BASE_IMAGE_PREFIX="${GPULAB_BASE_IMAGE_PREFIX:-gpulab-test/debian}"
GPULAB_DL_IMAGE="${GPULAB_DL_IMAGE:-gpulab-test/dl-notebook:latest}"
GPULAB_CACHE="${GPULAB_CACHE:-${GPULAB_ROOT}/.cache}"

log() { printf '\033[1;34m[gpulab]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[gpulab] error:\033[0m %s\n' "$*" >&2; exit 1; }

# The Debian mirror this machine's apt already uses (debootstrap and images use the same one);
# GPULAB_DEBIAN_MIRROR overrides it.
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri="$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)"
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list)"
    fi
    uri="${GPULAB_DEBIAN_MIRROR:-$uri}"
    [ -n "$uri" ] || die "no Debian mirror found in this machine's apt sources: set GPULAB_DEBIAN_MIRROR to one"
    echo "$uri"
}

docker_answers() { docker info >/dev/null 2>&1; }

# Start a Docker engine when none answers: install Debian's docker.io if needed (Debian, root only).
ensure_docker_engine() {
    if docker_answers; then
        return 0
    fi
    if [ "${GPULAB_NO_ENGINE_INSTALL:-0}" = 1 ]; then
        die "no Docker engine answers and GPULAB_NO_ENGINE_INSTALL=1: start one and try again"
    fi
    [ "$(id -u)" = 0 ] || die "no Docker engine answers; start one (or run as root on Debian to let gpulab start one)"
    grep -qi '^ID=debian' /etc/os-release || die "no Docker engine answers; on this system, install and start one yourself"
    if ! command -v dockerd >/dev/null 2>&1; then
        log "no Docker engine found: installing Debian's docker.io on this machine"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl start docker || true
    fi
    if ! docker_answers; then
        log "starting dockerd (log: /var/log/gpulab-dockerd.log)"
        setsid dockerd >/var/log/gpulab-dockerd.log 2>&1 < /dev/null &
    fi
    for _ in $(seq 1 60); do
        docker_answers && return 0
        sleep 1
    done
    die "dockerd did not answer within 60 s; see /var/log/gpulab-dockerd.log"
}

# Command-line tools the harness uses on this machine (zstd: the archive tests compress docker save archives).
# Arguments: programs, or program=package where Debian's package has another name (ssh=openssh-client).
ensure_host_tools() {
    local missing=() tool
    for tool in "$@"; do
        command -v "${tool%%=*}" >/dev/null 2>&1 || missing+=("${tool#*=}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && grep -qi '^ID=debian' /etc/os-release; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        die "missing on this machine: ${missing[*]}; install them and try again"
    fi
}

# A Python virtual environment with the pinned requirements, reused while requirements.txt is unchanged.
ensure_venv() {
    local venv="${GPULAB_VENV:-${GPULAB_ROOT}/.venv}"
    local stamp="${venv}/.requirements.sha256"
    local want
    want="$(sha256sum "${GPULAB_ROOT}/requirements.txt" | cut -d' ' -f1)"
    if [ ! -x "${venv}/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "creating the virtual environment ${venv} (pinned requirements.txt)"
        python3 -m venv "$venv"
        "${venv}/bin/pip" install -q --upgrade pip >/dev/null
        "${venv}/bin/pip" install -q -r "${GPULAB_ROOT}/requirements.txt"
        echo "$want" > "$stamp"
    fi
    # shellcheck disable=SC1091
    . "${venv}/bin/activate"
}
