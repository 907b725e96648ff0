#!/usr/bin/env bash
# Build TEST STAND-INs for NVIDIA's container toolkit packages. NVIDIA's apt repository
# (nvidia.github.io/libnvidia-container) is unreachable from gpulab's test network and the test machines
# have no GPU; these packages carry the real package names, versions, relations and file paths, so that the
# nvidia_runtime role's "install from NVIDIA's repository" path runs for real against a local signed
# repository (see README.md). They contain small scripts, not NVIDIA's software:
#
#   nvidia-container-toolkit-base  /usr/bin/nvidia-container-runtime (hands over to runc: `exec runc "$@"`),
#                                  /usr/bin/nvidia-ctk (answers --version, refuses everything else),
#                                  /usr/bin/nvidia-cdi-hook, /etc/nvidia-container-runtime/config.toml
#   nvidia-container-toolkit       /usr/bin/nvidia-container-runtime-hook; depends on -base (= same version)
#   nvidia-docker2                 /usr/bin/nvidia-docker and the /etc/docker/daemon.json conffile of NVIDIA's
#                                  last nvidia-docker2 (2.14.0); depends on nvidia-container-toolkit
#   legacy/nvidia-docker           nvidia-docker 1.0 (2017): a Docker volume plugin service (nvidia-docker.service,
#                                  volume driver "nvidia-docker") and the nvidia-docker wrapper. Written to
#                                  OUTDIR/legacy/, since NVIDIA's current repository no longer carries it: tests
#                                  install it with dpkg to play a stale install.
#
# Usage: build-nvidia-container-toolkit-standin.sh [--toolkit-version V] OUTDIR
#   OUTDIR              receives nvidia-container-toolkit-base_*.deb, nvidia-container-toolkit_*.deb,
#                       nvidia-docker2_*.deb, and legacy/nvidia-docker_*.deb (older stand-ins there are removed)
#   --toolkit-version V version of the two toolkit packages (default 1.17.8-1)
# Runs on Debian or Ubuntu (inside the test instance); needs dpkg-deb and md5sum, not root.
# Output is reproducible (SOURCE_DATE_EPOCH, default a fixed date). Prints the built .deb paths on stdout.
set -euo pipefail
umask 022

log() { printf '\033[1;34m[nvidia-standin]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[nvidia-standin] error:\033[0m %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "$0")" && pwd)"
toolkit_version="1.17.8-1" outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --toolkit-version) [ $# -ge 2 ] || die "$1 needs a value"; toolkit_version="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"; outdir="$1"; shift ;;
    esac
done
[ -n "$outdir" ] || die "usage: $0 [--toolkit-version V] OUTDIR"
for tool in dpkg-deb dpkg md5sum; do command -v "$tool" >/dev/null || die "'$tool' is missing"; done
[ -f "$here/nvidia-docker-plugin.py" ] || die "$here/nvidia-docker-plugin.py is missing"

arch="$(dpkg --print-architecture)"
toolkit_upstream="${toolkit_version%-*}"
nvidia_docker2_version="2.14.0-1"     # NVIDIA's last nvidia-docker2 (published until toolkit 1.15)
legacy_version="1.0.1-1"              # the last nvidia-docker 1.0
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}"   # 2025-01-01: byte-identical rebuilds

mkdir -p "$outdir/legacy"
outdir="$(cd "$outdir" && pwd)"
find "$outdir" "$outdir/legacy" -maxdepth 1 -type f \( -name 'nvidia-container-toolkit*_*.deb' \
    -o -name 'nvidia-docker2_*.deb' -o -name 'nvidia-docker_*.deb' \) -delete
work="$(mktemp -d "${TMPDIR:-/var/tmp}/gpulab-nvidia-standin.XXXXXX")"
trap 'rm -rf "$work"' EXIT

put_text() {  # put_text MODE DEST_IN_PKG <<content   (package root in $pkg)
    mkdir -p "$(dirname "$pkg$2")"
    cat > "$pkg$2"
    chmod "$1" "$pkg$2"
}

stand_in_text() {  # the Description body every package shares
    cat <<TXT
 gpulab TEST STAND-IN, NOT NVIDIA's package. gpulab's tests cannot reach
 NVIDIA's apt repository (nvidia.github.io/libnvidia-container) and run on
 machines without a GPU, so tests/harness/nvidia-standin builds this package
 with NVIDIA's package name, version, relations and file paths, but with small
 scripts inside: nvidia-container-runtime hands every call over to runc, so
 containers start without any GPU. Never install this outside gpulab's tests.
TXT
}

standin_note() {  # standin_note PKG → /usr/share/doc/PKG/README.gpulab
    put_text 0644 "/usr/share/doc/$1/README.gpulab" <<TXT
gpulab TEST STAND-IN for NVIDIA's "$1" package, built by
tests/harness/nvidia-standin/build-nvidia-container-toolkit-standin.sh.
It holds shell and Python scripts with the names and paths of NVIDIA's programs, not NVIDIA's software.
TXT
}

build_pkg() {  # build_pkg DESTDIR <<control-fields (without Installed-Size)
    local dest="$1" size name
    mkdir -p "$pkg/DEBIAN"
    size="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
    { cat; echo "Installed-Size: $size"; } > "$pkg/DEBIAN/control"
    name="$(sed -n 's/^Package: //p' "$pkg/DEBIAN/control")"
    (cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
        | xargs -d '\n' md5sum) > "$pkg/DEBIAN/md5sums"
    if [ -d "$pkg/etc" ]; then
        (cd "$pkg" && find etc -type f | sed 's|^|/|' | LC_ALL=C sort) > "$pkg/DEBIAN/conffiles"
    fi
    find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    dpkg-deb --build --root-owner-group -Zgzip -z6 "$pkg" "$dest/" >"$work/build-$name.log" 2>&1 \
        || { cat "$work/build-$name.log" >&2; die "dpkg-deb --build $name failed"; }
}

# ---- nvidia-container-toolkit-base ---------------------------------------------------------------------
pkg="$work/pkg/nvidia-container-toolkit-base"
put_text 0755 /usr/bin/nvidia-container-runtime <<SH
#!/bin/sh
# gpulab TEST STAND-IN for NVIDIA's nvidia-container-runtime ${toolkit_upstream}.
# The real runtime adds NVIDIA's hook (or CDI devices) to the OCI spec and then runs runc. Test machines have
# no GPU, so this one hands every call over to runc unchanged: containers started with --runtime=nvidia run.
PATH="\${PATH:-/usr/bin:/bin}:/usr/sbin:/usr/bin:/sbin:/bin"
if [ "\$#" -eq 1 ] && [ "\$1" = --version ]; then
    echo "NVIDIA Container Runtime version ${toolkit_upstream} (gpulab TEST STAND-IN: hands over to runc)"
    echo "commit: gpulab-test-stand-in"
    echo "spec: 1.2.0"
    echo
fi
exec runc "\$@"
SH
put_text 0755 /usr/bin/nvidia-ctk <<SH
#!/bin/sh
# gpulab TEST STAND-IN for NVIDIA's nvidia-ctk ${toolkit_upstream}: answers --version like the real one and
# refuses every other command (gpulab never runs nvidia-ctk runtime configure: it would rewrite daemon.json).
case "\${1:-}" in
    --version|-v|version)
        echo "NVIDIA Container Toolkit CLI version ${toolkit_upstream}"
        echo "commit: gpulab-test-stand-in"
        exit 0 ;;
esac
echo "nvidia-ctk (gpulab TEST STAND-IN): '\$*' is not implemented; this stand-in only answers --version" >&2
exit 1
SH
put_text 0755 /usr/bin/nvidia-cdi-hook <<'SH'
#!/bin/sh
# gpulab TEST STAND-IN for NVIDIA's nvidia-cdi-hook: nothing to do without a GPU.
exit 0
SH
put_text 0644 /etc/nvidia-container-runtime/config.toml <<'TOML'
# gpulab TEST STAND-IN of the toolkit's default configuration (nvidia-ctk config default), abridged.
#accept-nvidia-visible-devices-as-volume-mounts = false
#accept-nvidia-visible-devices-envvar-when-unprivileged = true
disable-require = false
supported-driver-capabilities = "compat32,compute,display,graphics,ngx,utility,video"

[nvidia-container-cli]
environment = []
ldconfig = "@/sbin/ldconfig.real"
load-kmods = true

[nvidia-container-runtime]
log-level = "info"
mode = "auto"
runtimes = ["runc", "crun"]

[nvidia-container-runtime-hook]
path = "nvidia-container-runtime-hook"
skip-mode-detection = false

[nvidia-ctk]
path = "nvidia-ctk"
TOML
standin_note nvidia-container-toolkit-base
build_pkg "$outdir" <<CONTROL
Package: nvidia-container-toolkit-base
Version: ${toolkit_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Breaks: nvidia-container-toolkit (<< 1.11.0~rc.1)
Replaces: nvidia-container-toolkit (<< 1.11.0~rc.1)
Section: utils
Priority: optional
Homepage: https://github.com/NVIDIA/nvidia-container-toolkit
Description: NVIDIA Container Toolkit Base (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 Contents as in NVIDIA's package: nvidia-container-runtime, nvidia-ctk and
 nvidia-cdi-hook in /usr/bin, /etc/nvidia-container-runtime/config.toml.
CONTROL

# ---- nvidia-container-toolkit --------------------------------------------------------------------------
pkg="$work/pkg/nvidia-container-toolkit"
put_text 0755 /usr/bin/nvidia-container-runtime-hook <<'SH'
#!/bin/sh
# gpulab TEST STAND-IN for NVIDIA's nvidia-container-runtime-hook (the OCI prestart hook): no GPU, nothing to do.
exit 0
SH
standin_note nvidia-container-toolkit
build_pkg "$outdir" <<CONTROL
Package: nvidia-container-toolkit
Version: ${toolkit_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: nvidia-container-toolkit-base (= ${toolkit_version})
Breaks: nvidia-container-runtime (<= 3.5.0-1), nvidia-container-runtime-hook
Replaces: nvidia-container-runtime (<= 3.5.0-1), nvidia-container-runtime-hook
Section: utils
Priority: optional
Homepage: https://github.com/NVIDIA/nvidia-container-toolkit
Description: NVIDIA Container toolkit (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 Contents as in NVIDIA's package: /usr/bin/nvidia-container-runtime-hook.
 Unlike NVIDIA's package it does not depend on libnvidia-container-tools
 (there is no stand-in of the GPU library).
CONTROL

# ---- nvidia-docker2 ------------------------------------------------------------------------------------
pkg="$work/pkg/nvidia-docker2"
put_text 0755 /usr/bin/nvidia-docker <<'SH'
#!/bin/bash
# gpulab TEST STAND-IN for NVIDIA's nvidia-docker (nvidia-docker2 2.14.0): docker, with --runtime=nvidia added
# to run and create.
args=()
added=0
for arg in "$@"; do
    args+=("$arg")
    if [ "$added" = 0 ] && { [ "$arg" = run ] || [ "$arg" = create ]; }; then
        args+=(--runtime=nvidia)
        added=1
    fi
done
exec "${NV_DOCKER:-docker}" "${args[@]}"
SH
# NVIDIA's nvidia-docker2 ships daemon.json as a conffile; dpkg keeps a file the admin already has.
put_text 0644 /etc/docker/daemon.json <<'JSON'
{
    "runtimes": {
        "nvidia": {
            "path": "nvidia-container-runtime",
            "runtimeArgs": []
        }
    }
}
JSON
standin_note nvidia-docker2
build_pkg "$outdir" <<CONTROL
Package: nvidia-docker2
Version: ${nvidia_docker2_version}
Architecture: all
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: nvidia-container-toolkit (>= 1.13.0-1)
Breaks: nvidia-docker (<< 2.0.0)
Replaces: nvidia-docker (<< 2.0.0)
Section: utils
Priority: optional
Homepage: https://github.com/NVIDIA/nvidia-docker
Description: NVIDIA Docker 2 compatibility package, LEGACY (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 NVIDIA stopped publishing nvidia-docker2 with toolkit 1.15; this stand-in
 lets tests install it as gpulab's nvidia_runtime_package: nvidia-docker2.
 Contents as in NVIDIA's 2.14.0: /usr/bin/nvidia-docker and the conffile
 /etc/docker/daemon.json registering the nvidia runtime.
CONTROL

# ---- legacy nvidia-docker 1.0 --------------------------------------------------------------------------
pkg="$work/pkg/nvidia-docker"
put_text 0755 /usr/bin/nvidia-docker-plugin < "$here/nvidia-docker-plugin.py"
put_text 0755 /usr/bin/nvidia-docker <<'SH'
#!/bin/bash
# gpulab TEST STAND-IN for nvidia-docker 1.0's wrapper: docker, with the driver volume added to run and create.
args=()
added=0
for arg in "$@"; do
    args+=("$arg")
    if [ "$added" = 0 ] && { [ "$arg" = run ] || [ "$arg" = create ]; }; then
        args+=(--volume-driver=nvidia-docker --volume=nvidia_driver_standin:/usr/local/nvidia:ro)
        added=1
    fi
done
exec "${NV_DOCKER:-docker}" "${args[@]}"
SH
put_text 0644 /lib/systemd/system/nvidia-docker.service <<'UNIT'
[Unit]
Description=NVIDIA Docker plugin (gpulab TEST STAND-IN of nvidia-docker 1.0)
Documentation=https://github.com/NVIDIA/nvidia-docker/wiki
After=local-fs.target network.target
Wants=docker.service

[Service]
Environment="SOCK_DIR=/var/lib/nvidia-docker"
Environment="SPEC_FILE=/etc/docker/plugins/nvidia-docker.spec"
User=root
ExecStart=/usr/bin/nvidia-docker-plugin -s $SOCK_DIR
ExecStartPost=/bin/sh -c '/bin/mkdir -p $( dirname $SPEC_FILE )'
ExecStartPost=/bin/sh -c '/bin/echo unix://$SOCK_DIR/nvidia-docker.sock > $SPEC_FILE'
ExecStopPost=/bin/rm -f $SPEC_FILE

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$pkg/DEBIAN"
cat > "$pkg/DEBIAN/postinst" <<'SH'
#!/bin/sh
# gpulab TEST STAND-IN maintainer script (nvidia-docker 1.0 style): state dir, enable and start the plugin.
set -e
if [ "$1" = configure ]; then
	mkdir -p /var/lib/nvidia-docker
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload >/dev/null || true
		systemctl enable nvidia-docker.service >/dev/null 2>&1 || true
		systemctl restart nvidia-docker.service || echo "nvidia-docker postinst: could not start nvidia-docker.service" >&2
	fi
fi
exit 0
SH
cat > "$pkg/DEBIAN/prerm" <<'SH'
#!/bin/sh
# gpulab TEST STAND-IN maintainer script: stop the plugin.
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	systemctl stop nvidia-docker.service >/dev/null 2>&1 || true
	systemctl disable nvidia-docker.service >/dev/null 2>&1 || true
fi
exit 0
SH
cat > "$pkg/DEBIAN/postrm" <<'SH'
#!/bin/sh
# gpulab TEST STAND-IN maintainer script: purge removes the plugin's state.
set -e
if [ "$1" = purge ]; then
	rm -rf /var/lib/nvidia-docker
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
SH
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"
standin_note nvidia-docker
build_pkg "$outdir/legacy" <<CONTROL
Package: nvidia-docker
Version: ${legacy_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: python3
Section: utils
Priority: optional
Homepage: https://github.com/NVIDIA/nvidia-docker/wiki
Description: NVIDIA Docker container tools, 1.0, LEGACY (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 This plays nvidia-docker 1.0 (2017), which NVIDIA replaced by nvidia-docker2
 and the container toolkit: the nvidia-docker-plugin service (a Docker volume
 plugin, volume driver "nvidia-docker", here a small Python server that
 keeps empty volumes) and the nvidia-docker wrapper. Depends on python3 for
 the plugin instead of Docker (the real one was a Go binary).
CONTROL

for f in "$outdir"/nvidia-container-toolkit-base_*.deb "$outdir"/nvidia-container-toolkit_*.deb \
         "$outdir"/nvidia-docker2_*.deb "$outdir"/legacy/nvidia-docker_*.deb; do
    log "built ${f#"$outdir"/} ($(du -h "$f" | cut -f1))"
    echo "$f"
done
