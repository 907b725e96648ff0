#!/usr/bin/env bash
# Build TEST STAND-INs for Docker's packages containerd.io, docker-ce-cli and docker-ce, named, versioned
# and laid out like Docker's real ones, by repacking the real binaries of Debian's docker.io, containerd,
# runc and tini packages. Docker's apt repository is unreachable from gpulab's test network; these let
# the "install from Docker's repository" code path run for real (see README.md).
#
# Usage: build-docker-ce-standin.sh [--cache DIR] [--docker-version V] [--containerd-version V] OUTDIR
#   OUTDIR                  receives containerd.io_*.deb, docker-ce-cli_*.deb, docker-ce_*.deb
#                           (its older stand-in .debs are removed first)
#   --cache DIR             Debian source .debs: used when present, else downloaded there with
#                           `apt-get download` (default /var/cache/gpulab-aptrepo/debian-debs).
#                           Pre-fill it (docker cp) to skip the ~65 MB download.
#   --docker-version V      version of docker-ce/docker-ce-cli (default 5:<docker.io upstream>-1~debian.<N>~<codename>)
#   --containerd-version V  version of containerd.io (default <containerd upstream>-1)
# Env: GPULAB_STANDIN_COMPRESSION=gzip|xz|zstd|none (dpkg-deb -Z, default gzip, level 1: fast).
# Runs on Debian as root (inside the test instance); needs apt-get, dpkg-deb, md5sum.
# Prints the built .deb paths on stdout.
set -euo pipefail
umask 022

log() { printf '\033[1;34m[standin]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[standin] error:\033[0m %s\n' "$*" >&2; exit 1; }

cache="/var/cache/gpulab-aptrepo/debian-debs" docker_version="" containerd_version="" outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cache|--docker-version|--containerd-version)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --cache) cache="$2" ;; --docker-version) docker_version="$2" ;;
                --containerd-version) containerd_version="$2" ;;
            esac
            shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"; outdir="$1"; shift ;;
    esac
done
[ -n "$outdir" ] || die "usage: $0 [--cache DIR] OUTDIR"
for tool in apt-get dpkg-deb dpkg md5sum; do command -v "$tool" >/dev/null || die "'$tool' is missing"; done
grep -qi '^ID=debian' /etc/os-release 2>/dev/null || die "this builds from Debian's packages: run it on Debian (the test instance)"

os_field() { sed -n "s/^$1=//p" /etc/os-release | tr -d '"'; }
codename="$(os_field VERSION_CODENAME)"
os_version="$(os_field VERSION_ID)"
{ [ -n "$codename" ] && [ -n "$os_version" ]; } || die "cannot read VERSION_CODENAME/VERSION_ID from /etc/os-release"
arch="$(dpkg --print-architecture)"
compression="${GPULAB_STANDIN_COMPRESSION:-gzip}"
case "$compression" in gzip|xz|zstd|none) ;; *) die "GPULAB_STANDIN_COMPRESSION must be gzip, xz, zstd or none" ;; esac

mkdir -p "$outdir" "$cache"
outdir="$(cd "$outdir" && pwd)"
cache="$(cd "$cache" && pwd)"
work="$(mktemp -d /var/tmp/gpulab-standin.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# ---- Debian's source packages ------------------------------------------------------------------------
# Newest cached NAME_*.deb of this architecture (or all), by dpkg's version order.
newest_cached() {
    local name="$1" best="" bestv="" f v a
    for f in "$cache/${name}"_*.deb; do
        [ -e "$f" ] || continue
        a="$(dpkg-deb -f "$f" Architecture)"
        [ "$a" = "$arch" ] || [ "$a" = all ] || continue
        v="$(dpkg-deb -f "$f" Version)"
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$bestv"; then best="$f" bestv="$v"; fi
    done
    echo "$best"
}

missing=()
for name in docker.io containerd runc tini; do
    [ -n "$(newest_cached "$name")" ] || missing+=("$name")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        log "apt has no package lists: apt-get update"
        apt-get update -qq || die "apt-get update failed"
    fi
    log "downloading Debian's ${missing[*]} into $cache"
    # _apt downloads into a folder it owns (no "unsandboxed" warning); the files end up in the cache.
    dl="$work/download"
    mkdir -p "$dl"
    if getent passwd _apt >/dev/null; then chown _apt "$dl"; fi
    (cd "$dl" && apt-get download -q "${missing[@]}" >"$work/download.log" 2>&1) || {
        cat "$work/download.log" >&2
        die "apt-get download ${missing[*]} failed (does apt reach Debian's archive? run apt-get update)"
    }
    mv "$dl"/*.deb "$cache/"
fi

declare -A src ver root
pids=()
for name in docker.io containerd runc tini; do
    src[$name]="$(newest_cached "$name")"
    ver[$name]="$(dpkg-deb -f "${src[$name]}" Version)"
    root[$name]="$work/src/$name"
    mkdir -p "${root[$name]}"
    log "source: $(basename "${src[$name]}")"
    dpkg-deb -x "${src[$name]}" "${root[$name]}" & pids+=("$!")   # unpack in parallel (xz is the slow part)
done
for pid in "${pids[@]}"; do wait "$pid" || die "could not unpack a Debian source package (see above)"; done
# Reproducible output: every file of the stand-ins gets the mtime of docker.io's Debian changelog.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y "${root[docker.io]}/usr/share/doc/docker.io/changelog.Debian.gz" 2>/dev/null || date +%s)}"

need_file() { [ -e "$1" ] || die "expected $1 in Debian's $2 package (${ver[$2]}); its layout changed?"; }
# First existing path among the arguments (Debian moved binaries between /usr/bin and /usr/sbin over time).
first_of() { local p; for p in "$@"; do if [ -e "$p" ]; then echo "$p"; return 0; fi; done; return 1; }

# Upstream version: no epoch, no Debian revision, no +dfsg/~ds repack suffix.
upstream() { echo "$1" | sed -E 's/^[0-9]+://; s/-[^-]*$//; s/[+~](dfsg|ds)[0-9]*$//'; }
docker_upstream="$(upstream "${ver[docker.io]}")"
containerd_upstream="$(upstream "${ver[containerd]}")"
docker_version="${docker_version:-5:${docker_upstream}-1~debian.${os_version}~${codename}}"
containerd_version="${containerd_version:-${containerd_upstream}-1}"

# The lib* entries of a Debian package's Depends (dpkg-shlibdeps computed them from what its
# binaries link against), optionally only those for the given library package names.
lib_depends() {
    local deb="$1"; shift
    dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/^ *//; s/ *$//' | grep '^lib' | {
        if [ $# -gt 0 ]; then grep -E "^($(IFS='|'; echo "$*"))( |$)"; else cat; fi
    } || true
}
join_depends() { awk '!seen[$1]++' | paste -sd, - | sed 's/,/, /g'; }

# ---- helpers to lay out a package tree -----------------------------------------------------------------
put() {  # put MODE SRC DEST_IN_PKG  (pkg root in $pkg)
    install -D -m "$1" "$2" "$pkg$3"
}
put_text() {  # put_text MODE DEST_IN_PKG <<content
    mkdir -p "$(dirname "$pkg$2")"
    cat > "$pkg$2"
    chmod "$1" "$pkg$2"
}
standin_note() {  # standin_note PKGNAME → /usr/share/doc/PKG/README.gpulab
    put_text 0644 "/usr/share/doc/$1/README.gpulab" <<EOF
gpulab TEST STAND-IN for Docker's "$1" package.

This is NOT Docker's package. gpulab's tests cannot reach Docker's apt repository
(download.docker.com), so tests/harness/aptrepo/build-docker-ce-standin.sh repackaged the
binaries of Debian's own packages under Docker's package name, version scheme and file layout:

$(for n in docker.io containerd runc tini; do printf '  %s %s\n' "$n" "${ver[$n]}"; done)

The binaries are Debian's; their copyright and licenses are in copyright.* next to this file.
EOF
}
copyrights() {  # copyrights PKGNAME SRCNAME...
    local p="$1" n; shift
    for n in "$@"; do
        put 0644 "${root[$n]}/usr/share/doc/$n/copyright" "/usr/share/doc/$p/copyright.$n"
    done
}
copy_glob() {  # copy_glob SRCNAME DIR_IN_SRC PATTERN: copy matching files to the same dir in $pkg
    local n="$1" d="$2" pat="$3" f
    for f in "${root[$n]}$d"/$pat; do
        [ -f "$f" ] || continue
        put 0644 "$f" "$d/$(basename "$f")"
    done
}

# debhelper-style maintainer scripts (what dh_installsystemd generates for Docker's real packages):
# enable on install, (re)start when systemd runs, stop on remove, mask/purge state on remove/purge.
write_maint_scripts() {  # write_maint_scripts "EXTRA_POSTINST_CONFIGURE" UNIT...
    local extra="$1"; shift
    local units="$*" quoted="" u
    for u in "$@"; do quoted="$quoted '$u'"; done
    cat > "$pkg/DEBIAN/postinst" <<EOF
#!/bin/sh
# gpulab TEST STAND-IN maintainer script (debhelper-style, like Docker's packages).
set -e
if [ "\$1" = configure ]; then
${extra}
	:
fi
if [ "\$1" = configure ] || [ "\$1" = abort-upgrade ] || [ "\$1" = abort-deconfigure ] || [ "\$1" = abort-remove ]; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		for unit in${quoted}; do
			deb-systemd-helper unmask "\$unit" >/dev/null || true
			# was-enabled defaults to true, so new installations run enable.
			if deb-systemd-helper --quiet was-enabled "\$unit"; then
				deb-systemd-helper enable "\$unit" >/dev/null || true
			else
				deb-systemd-helper update-state "\$unit" >/dev/null || true
			fi
		done
	elif command -v systemctl >/dev/null 2>&1; then
		systemctl enable${quoted} >/dev/null 2>&1 || true
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "\$2" ]; then _dh_action=restart; else _dh_action=start; fi
		if command -v deb-systemd-invoke >/dev/null 2>&1; then
			deb-systemd-invoke "\$_dh_action"${quoted} >/dev/null \\
				|| echo "$(basename "$pkg") postinst: warning: could not \$_dh_action ${units}" >&2
		else
			systemctl "\$_dh_action"${quoted} >/dev/null \\
				|| echo "$(basename "$pkg") postinst: warning: could not \$_dh_action ${units}" >&2
		fi
	fi
fi
exit 0
EOF
    cat > "$pkg/DEBIAN/prerm" <<EOF
#!/bin/sh
# gpulab TEST STAND-IN maintainer script (debhelper-style).
set -e
if [ -d /run/systemd/system ] && [ "\$1" = remove ]; then
	if command -v deb-systemd-invoke >/dev/null 2>&1; then
		deb-systemd-invoke stop${quoted} >/dev/null || true
	else
		systemctl stop${quoted} >/dev/null || true
	fi
fi
exit 0
EOF
    cat > "$pkg/DEBIAN/postrm" <<EOF
#!/bin/sh
# gpulab TEST STAND-IN maintainer script (debhelper-style).
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if command -v deb-systemd-helper >/dev/null 2>&1; then
	if [ "\$1" = remove ]; then
		deb-systemd-helper mask${quoted} >/dev/null || true
	fi
	if [ "\$1" = purge ]; then
		deb-systemd-helper purge${quoted} >/dev/null || true
		deb-systemd-helper unmask${quoted} >/dev/null || true
	fi
fi
exit 0
EOF
    chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"
}

# control file + md5sums + conffiles, then dpkg-deb --build into OUTDIR.
build_pkg() {  # build_pkg <<control-fields (without Installed-Size)
    local size name
    size="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
    mkdir -p "$pkg/DEBIAN"
    { cat; echo "Installed-Size: $size"; } > "$pkg/DEBIAN/control"
    name="$(sed -n 's/^Package: //p' "$pkg/DEBIAN/control")"
    (cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
        | xargs -d '\n' md5sum) > "$pkg/DEBIAN/md5sums"
    if [ -d "$pkg/etc" ]; then
        (cd "$pkg" && find etc -type f | sed 's|^|/|' | LC_ALL=C sort) > "$pkg/DEBIAN/conffiles"
    fi
    find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    local level=()
    if [ "$compression" = gzip ]; then level=(-z1); fi
    # In the background (the caller waits): the three packages compress in parallel.
    { dpkg-deb --build --root-owner-group -Z"$compression" "${level[@]}" "$pkg" "$outdir/" >"$work/build-$name.log" 2>&1 \
        || { cat "$work/build-$name.log" >&2; exit 1; }; } &
    build_pids+=("$!")
}
build_pids=()

find "$outdir" -maxdepth 1 -type f \( -name 'containerd.io_*.deb' -o -name 'docker-ce_*.deb' -o -name 'docker-ce-cli_*.deb' \) -delete

stand_in_text() {  # the Description body shared by the three packages
    cat <<EOF
 gpulab TEST STAND-IN, NOT Docker's package. It repackages binaries of
 Debian's docker.io, containerd, runc and tini packages, because Docker's apt
 repository (download.docker.com) is unreachable from gpulab's test network.
 Name, version scheme, file layout, systemd units and maintainer scripts
 follow Docker's real package. Never install this outside gpulab's tests.
 .
 Built from: docker.io ${ver[docker.io]}, containerd ${ver[containerd]},
 runc ${ver[runc]}, tini ${ver[tini]}.
EOF
}

# ---- containerd.io -------------------------------------------------------------------------------------
pkg="$work/pkg/containerd.io"
mkdir -p "$pkg/DEBIAN"
for b in containerd containerd-shim containerd-shim-runc-v1 containerd-shim-runc-v2 ctr; do
    f="${root[containerd]}/usr/bin/$b"
    if [ "$b" = containerd ] || [ "$b" = containerd-shim-runc-v2 ] || [ "$b" = ctr ]; then need_file "$f" containerd; fi
    if [ -e "$f" ]; then put 0755 "$f" "/usr/bin/$b"; fi
done
runc_bin="$(first_of "${root[runc]}/usr/sbin/runc" "${root[runc]}/usr/bin/runc")" || die "no runc binary in Debian's runc ${ver[runc]}"
if [ -L "$runc_bin" ]; then runc_bin="$(readlink -f "$runc_bin")"; fi
put 0755 "$runc_bin" /usr/bin/runc   # Docker's containerd.io ships runc as /usr/bin/runc
put_text 0644 /lib/systemd/system/containerd.service <<'EOF'
# Copyright The containerd Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

[Unit]
Description=containerd container runtime
Documentation=https://containerd.io
After=network.target local-fs.target

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/bin/containerd

Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5

# Having non-zero Limit*s causes performance problems due to accounting overhead
# in the kernel. We recommend using cgroups to do container-local accounting.
LimitNPROC=infinity
LimitCORE=infinity

# Comment TasksMax if your systemd version does not supports it.
# Only systemd 226 and above support this version.
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
EOF
put_text 0644 /etc/containerd/config.toml <<'EOF'
#   Copyright 2018-2022 Docker Inc.

#   Licensed under the Apache License, Version 2.0 (the "License");
#   you may not use this file except in compliance with the License.
#   You may obtain a copy of the License at

#       http://www.apache.org/licenses/LICENSE-2.0

#   Unless required by applicable law or agreed to in writing, software
#   distributed under the License is distributed on an "AS IS" BASIS,
#   WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#   See the License for the specific language governing permissions and
#   limitations under the License.

disabled_plugins = ["cri"]

#root = "/var/lib/containerd"
#state = "/run/containerd"
#subreaper = true
#oom_score = 0

#[grpc]
#  address = "/run/containerd/containerd.sock"
#  uid = 0
#  gid = 0

#[debug]
#  address = "/run/containerd/debug.sock"
#  uid = 0
#  gid = 0
#  level = "info"
EOF
copy_glob containerd /usr/share/man/man5 'containerd*.5.gz'
copy_glob containerd /usr/share/man/man8 '*.8.gz'
copyrights containerd.io containerd runc
standin_note containerd.io
write_maint_scripts "" containerd.service
build_pkg <<EOF
Package: containerd.io
Version: ${containerd_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: $( { lib_depends "${src[containerd]}"; lib_depends "${src[runc]}"; } | join_depends)
Conflicts: containerd, runc
Replaces: containerd, runc
Provides: containerd, runc
Section: devel
Priority: optional
Homepage: https://containerd.io
Description: An open and reliable container runtime (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 Contents as in Docker's containerd.io: containerd, its shims, ctr and runc in
 /usr/bin, containerd.service, and /etc/containerd/config.toml with the CRI
 plugin disabled.
EOF

# ---- docker-ce-cli -------------------------------------------------------------------------------------
pkg="$work/pkg/docker-ce-cli"
mkdir -p "$pkg/DEBIAN"
need_file "${root[docker.io]}/usr/bin/docker" docker.io
put 0755 "${root[docker.io]}/usr/bin/docker" /usr/bin/docker
for f in /usr/share/bash-completion/completions/docker /usr/share/zsh/vendor-completions/_docker \
         /usr/share/fish/vendor_completions.d/docker.fish; do
    if [ -f "${root[docker.io]}$f" ]; then put 0644 "${root[docker.io]}$f" "$f"; fi
done
copy_glob docker.io /usr/share/man/man1 'docker*.1.gz'
copy_glob docker.io /usr/share/man/man5 '*.5.gz'
copyrights docker-ce-cli docker.io
standin_note docker-ce-cli
build_pkg <<EOF
Package: docker-ce-cli
Version: ${docker_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: $(lib_depends "${src[docker.io]}" libc6 | join_depends)
Conflicts: docker (<< 1.5~), docker-engine, docker.io
Breaks: docker-ce (<< 5:0)
Replaces: docker-ce (<< 5:0)
Section: admin
Priority: optional
Homepage: https://www.docker.com
Description: Docker CLI: the open-source application container engine (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 Contents as in Docker's docker-ce-cli: /usr/bin/docker and its completions.
EOF

# ---- docker-ce -----------------------------------------------------------------------------------------
pkg="$work/pkg/docker-ce"
mkdir -p "$pkg/DEBIAN"
dockerd="$(first_of "${root[docker.io]}/usr/sbin/dockerd" "${root[docker.io]}/usr/bin/dockerd")" \
    || die "no dockerd in Debian's docker.io ${ver[docker.io]}"
proxy="$(first_of "${root[docker.io]}/usr/sbin/docker-proxy" "${root[docker.io]}/usr/bin/docker-proxy")" \
    || die "no docker-proxy in Debian's docker.io ${ver[docker.io]}"
# docker.io's /usr/bin/docker-init is a symlink to tini's tini-static; Docker ships a static tini there.
init="$(first_of "${root[tini]}/usr/bin/tini-static" "${root[tini]}/usr/bin/tini")" || die "no tini in Debian's tini ${ver[tini]}"
put 0755 "$dockerd" /usr/bin/dockerd
put 0755 "$proxy" /usr/bin/docker-proxy
put 0755 "$init" /usr/bin/docker-init
put_text 0644 /lib/systemd/system/docker.service <<'EOF'
[Unit]
Description=Docker Application Container Engine
Documentation=https://docs.docker.com
After=network-online.target docker.socket firewalld.service containerd.service time-set.target
Wants=network-online.target containerd.service
Requires=docker.socket

[Service]
Type=notify
# the default is not to use systemd for cgroups because the delegate issues still
# exists and systemd currently does not support the cgroup feature set required
# for containers run by docker
ExecStart=/usr/bin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock
ExecReload=/bin/kill -s HUP $MAINPID
TimeoutStartSec=0
RestartSec=2
Restart=always

# Note that StartLimit* options were moved from "Service" to "Unit" in systemd 229.
# Both the old, and new location are accepted by systemd 229 and up, so using the old location
# to make them work for either version of systemd.
StartLimitBurst=3

# Note that StartLimitInterval was renamed to StartLimitIntervalSec in systemd 230.
# Both the old, and new name are accepted by systemd 230 and up, so using the old name to make
# this option work for either version of systemd.
StartLimitInterval=60s

# Having non-zero Limit*s causes performance problems due to accounting overhead
# in the kernel. We recommend using cgroups to do container-local accounting.
LimitNPROC=infinity
LimitCORE=infinity

# Comment TasksMax if your systemd version does not support it.
# Only systemd 226 and above support this option.
TasksMax=infinity

# set delegate yes so that systemd does not reset the cgroups of docker containers
Delegate=yes

# kill only the docker process, not all processes in the cgroup
KillMode=process
OOMScoreAdjust=-500

[Install]
WantedBy=multi-user.target
EOF
put_text 0644 /lib/systemd/system/docker.socket <<'EOF'
[Unit]
Description=Docker Socket for the API

[Socket]
# If /var/run is not implemented as a symlink to /run, you may need to
# specify ListenStream=/var/run/docker.sock instead.
ListenStream=/run/docker.sock
SocketMode=0660
SocketUser=root
SocketGroup=docker

[Install]
WantedBy=sockets.target
EOF
copy_glob docker.io /usr/share/man/man8 'dockerd.8.gz'
copyrights docker-ce docker.io tini
standin_note docker-ce
# Real docker-ce: create the docker group on configure (before the socket, whose group it is).
write_maint_scripts "	if ! getent group docker >/dev/null; then
		groupadd --system docker
	fi" docker.socket docker.service
build_pkg <<EOF
Package: docker-ce
Version: ${docker_version}
Architecture: ${arch}
Maintainer: gpulab test harness <gpulab-tests@localhost.invalid>
Depends: containerd.io (>= 1.6), docker-ce-cli, iptables, $(lib_depends "${src[docker.io]}" | join_depends)
Conflicts: docker (<< 1.5~), docker-engine, docker.io
Replaces: docker-engine
Section: admin
Priority: optional
Homepage: https://www.docker.com
Description: Docker: the open-source application container engine (gpulab TEST STAND-IN)
$(stand_in_text)
 .
 Contents as in Docker's docker-ce: dockerd, docker-proxy and docker-init in
 /usr/bin, Docker's docker.service and docker.socket; the postinst creates
 the docker group and enables and starts docker.socket and docker.service.
EOF

for pid in "${build_pids[@]}"; do wait "$pid" || die "dpkg-deb --build failed (see above)"; done
for f in "$outdir"/containerd.io_*.deb "$outdir"/docker-ce-cli_*.deb "$outdir"/docker-ce_*.deb; do
    log "built $(basename "$f") ($(du -h "$f" | cut -f1))"
    echo "$f"
done
