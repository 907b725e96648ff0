#!/usr/bin/env bash
# Serve DIR over plain HTTP on 127.0.0.1:PORT (python3 -m http.server), for apt inside a test instance.
# Usage: serve.sh DIR PORT          serve.sh --stop PORT
# With systemd running (PID 1): a transient unit gpulab-aptrepo-PORT.service (systemd-run), so it
# survives the calling shell and shows up in `systemctl status`. Otherwise: setsid in the background,
# pid in /run/gpulab-aptrepo-PORT.pid, log in /var/log/gpulab-aptrepo-PORT.log.
# Idempotent: already serving DIR on PORT → nothing. Serving another folder there → restarted on DIR.
# Waits until the server answers (10 s at most).
set -euo pipefail

log() { printf '\033[1;34m[aptrepo]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[aptrepo] error:\033[0m %s\n' "$*" >&2; exit 1; }

stop=0
if [ "${1:-}" = --stop ]; then stop=1; shift; set -- "" "${1:-}"; fi
[ $# -eq 2 ] || die "usage: $0 DIR PORT   |   $0 --stop PORT"
dir="$1" port="$2"
case "$port" in ''|*[!0-9]*) die "PORT must be a number, got '$port'" ;; esac
unit="gpulab-aptrepo-${port}"
pidfile="/run/${unit}.pid"
python="$(command -v python3)" || die "python3 is missing"

use_systemd=0
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then use_systemd=1; fi

answers() {
    "$python" - "$port" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen("http://127.0.0.1:%s/" % sys.argv[1], timeout=1).read(1)
EOF
}

# The folder the current server (ours) serves, or nothing.
current_dir() {
    if [ "$use_systemd" = 1 ]; then
        if systemctl is-active --quiet "$unit.service"; then
            systemctl show -p Description --value "$unit.service" | sed -n 's/^gpulab apt repository \(.*\) on 127\.0\.0\.1:[0-9]*$/\1/p'
        fi
    elif [ -s "$pidfile" ] && kill -0 "$(head -1 "$pidfile")" 2>/dev/null; then
        sed -n 2p "$pidfile"
    fi
}

stop_server() {
    if [ "$use_systemd" = 1 ]; then
        systemctl stop "$unit.service" 2>/dev/null || true
        systemctl reset-failed "$unit.service" 2>/dev/null || true
    elif [ -s "$pidfile" ]; then
        kill "$(head -1 "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    fi
}

if [ "$stop" = 1 ]; then
    stop_server
    log "stopped the server on 127.0.0.1:$port (if any)"
    exit 0
fi

[ -d "$dir" ] || die "no such folder: $dir"
dir="$(cd "$dir" && pwd)"

cur="$(current_dir)"
if [ "$cur" = "$dir" ] && answers; then
    log "already serving $dir on http://127.0.0.1:$port"
    exit 0
fi
if [ -n "$cur" ]; then
    log "restarting the server on port $port (was serving ${cur})"
    stop_server
elif answers; then
    die "something else already answers on 127.0.0.1:$port (not a gpulab-aptrepo server)"
fi

if [ "$use_systemd" = 1 ]; then
    systemctl reset-failed "$unit.service" 2>/dev/null || true
    systemd-run --quiet --unit "$unit" --description "gpulab apt repository $dir on 127.0.0.1:$port" \
        --property Restart=on-failure \
        "$python" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" \
        || die "systemd-run failed to start $unit"
else
    logfile="/var/log/${unit}.log"
    setsid "$python" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >"$logfile" 2>&1 </dev/null &
    printf '%s\n%s\n' "$!" "$dir" > "$pidfile"
fi

for _ in $(seq 1 50); do
    if answers; then
        log "serving $dir on http://127.0.0.1:$port"
        exit 0
    fi
    sleep 0.2
done
if [ "$use_systemd" = 1 ]; then
    journalctl -u "$unit" --no-pager -n 20 >&2 2>/dev/null || systemctl status "$unit" --no-pager >&2 || true
else
    tail -20 "/var/log/${unit}.log" >&2 || true
fi
die "the server on 127.0.0.1:$port did not answer within 10 s"
