#!/usr/bin/env bash
# Build (or rebuild) a signed apt repository from folders of .deb files, in one of two real layouts:
#
#   --layout docker   Docker's download.docker.com layout (suite + component, pool under dists/):
#       ROOT/PREFIX/dists/SUITE/{Release,InRelease,Release.gpg}
#       ROOT/PREFIX/dists/SUITE/COMPONENT/binary-ARCH/{Packages,Packages.gz,Release}
#       ROOT/PREFIX/dists/SUITE/pool/COMPONENT/ARCH/*.deb
#       ROOT/PREFIX/gpg                       (ASCII-armored public key, like .../linux/debian/gpg)
#     apt: URIs: <base>/PREFIX  Suites: SUITE  Components: COMPONENT  Signed-By: <keyring>
#
#   --layout flat     NVIDIA's libnvidia-container layout (flat repository, suite "/"):
#       ROOT/PREFIX/{*.deb,Packages,Packages.gz,Release,InRelease,Release.gpg}
#       ROOT/KEY_PATH                         (ASCII-armored public key, like .../libnvidia-container/gpgkey)
#     apt: deb [signed-by=<keyring>] <base>/PREFIX /
#
# Usage:
#   make-repo.sh --layout docker --root DIR [--debs DEBDIR]... [--prefix linux/debian]
#                [--suite bookworm] [--component stable] [--arch amd64] [--key-path PATH]
#   make-repo.sh --layout flat --root DIR [--debs DEBDIR]... [--prefix stable/deb/amd64] [--key-path gpgkey]
# Common options:
#   --debs DEBDIR   folder of .deb files (repeatable); the pool then holds exactly these .debs.
#                   Without --debs the pool is kept and only the indexes and signatures are regenerated.
#   --origin O --label L --description D   Release fields (defaults mimic the real repository)
#   --workdir DIR   private state (GNUPGHOME with the throwaway signing key); default ROOT.work,
#                   a sibling of ROOT so the secret key is never served. The key is kept across rebuilds,
#                   so clients that already trust it keep working; --new-key makes a fresh one.
# Prints on stdout (KEY=VALUE, one a line): repo_path, key_path (URL paths below the server root),
# suite, components, sources (a one-line example), fingerprint, root. Logs go to stderr.
set -euo pipefail
umask 022

log() { printf '\033[1;34m[aptrepo]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[aptrepo] error:\033[0m %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-2}"; }

layout="" root="" prefix="" suite="" component="" arch="" key_path="" origin="" label="" description=""
workdir="" new_key=0
debdirs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --layout|--root|--prefix|--suite|--component|--arch|--key-path|--origin|--label|--description|--workdir|--debs)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --layout) layout="$2" ;; --root) root="$2" ;; --prefix) prefix="$2" ;;
                --suite) suite="$2" ;; --component) component="$2" ;; --arch) arch="$2" ;;
                --key-path) key_path="$2" ;; --origin) origin="$2" ;; --label) label="$2" ;;
                --description) description="$2" ;; --workdir) workdir="$2" ;;
                --debs) debdirs+=("$2") ;;
            esac
            shift 2 ;;
        --new-key) new_key=1; shift ;;
        -h|--help) usage 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ -n "$layout" ] || die "--layout docker|flat is required"
[ -n "$root" ] || die "--root DIR is required"
case "$layout" in docker|flat) ;; *) die "unknown --layout '$layout' (docker or flat)" ;; esac
for d in "${debdirs[@]}"; do
    [ -d "$d" ] || die "--debs $d: no such folder"
done
mkdir -p "$root"
root="$(cd "$root" && pwd)"
[ "$root" != / ] || die "--root must not be /"
arch="${arch:-$(dpkg --print-architecture)}"
codename_default="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"')"
workdir="${workdir:-${root}.work}"
case "$workdir/" in "$root"/*) die "--workdir must be outside the served root $root (it holds the secret key)" ;; esac

# Strip leading/trailing slashes from URL-ish paths.
trim() { local p="${1#/}"; echo "${p%/}"; }

if [ "$layout" = docker ]; then
    prefix="$(trim "${prefix:-linux/debian}")"
    suite="${suite:-${codename_default:-bookworm}}"
    component="${component:-stable}"
    key_path="$(trim "${key_path:-${prefix}/gpg}")"
    origin="${origin:-Docker}"
    label="${label:-Docker CE}"
    description="${description:-Docker CE packages for Debian ${suite} (gpulab TEST STAND-IN repository)}"
else
    prefix="$(trim "${prefix:-stable/deb/${arch}}")"
    [ -z "$suite$component" ] || die "--suite/--component do not apply to a flat repository (its suite is '/')"
    key_path="$(trim "${key_path:-gpgkey}")"
    flavour="${prefix%%/*}"   # stable, experimental, ... like NVIDIA's Codename field
    origin="${origin:-https://nvidia.github.io/libnvidia-container/${flavour}}"
    label="${label:-NVIDIA CORPORATION <cudatools@nvidia.com>}"
    description="${description:-NVIDIA container runtime library repository (gpulab TEST STAND-IN repository)}"
fi
[ -n "$prefix" ] || die "--prefix must not be empty"

# ---- tools -------------------------------------------------------------------------------------------
for tool in gpg dpkg-deb gzip; do
    command -v "$tool" >/dev/null || die "'$tool' is missing (install gnupg / dpkg / gzip)"
done
if ! command -v apt-ftparchive >/dev/null; then
    [ "$(id -u)" = 0 ] || die "apt-ftparchive is missing and not root: install apt-utils"
    log "installing apt-utils (apt-ftparchive)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apt-utils >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apt-utils >/dev/null \
            || die "could not install apt-utils"
    fi
fi

# ---- signing key (throwaway, kept in WORKDIR/gnupg) ----------------------------------------------------
export GNUPGHOME="$workdir/gnupg"
if [ "$new_key" = 1 ]; then rm -rf "$GNUPGHOME"; fi
mkdir -p "$GNUPGHOME"
chmod 700 "$workdir" "$GNUPGHOME"
cleanup() { gpgconf --kill gpg-agent >/dev/null 2>&1 || true; }
trap cleanup EXIT

fingerprint() { gpg --batch --with-colons --list-secret-keys 2>/dev/null | awk -F: '$1 == "fpr" {print $10; exit}'; }
fpr="$(fingerprint)"
if [ -z "$fpr" ]; then
    uid="gpulab test apt repository (${layout} layout, TEST ONLY) <gpulab-aptrepo@localhost.invalid>"
    log "generating a throwaway ${GPULAB_APTREPO_KEY_ALGO:-rsa4096} signing key in $GNUPGHOME"
    gpg --batch --quiet --passphrase '' --quick-gen-key "$uid" "${GPULAB_APTREPO_KEY_ALGO:-rsa4096}" sign never \
        2>"$workdir/keygen.log" || { cat "$workdir/keygen.log" >&2; die "gpg key generation failed"; }
    fpr="$(fingerprint)"
    [ -n "$fpr" ] || die "gpg made no key (see $workdir/keygen.log)"
fi
mkdir -p "$(dirname "$root/$key_path")"
gpg --batch --armor --export "$fpr" > "$root/$key_path.tmp"
mv -f "$root/$key_path.tmp" "$root/$key_path"

sign_release() {  # DIR holding Release → InRelease + Release.gpg
    local d="$1"
    gpg --batch --yes --quiet --local-user "$fpr" --digest-algo SHA512 --clearsign -o "$d/InRelease" "$d/Release"
    gpg --batch --yes --quiet --local-user "$fpr" --digest-algo SHA512 -abs -o "$d/Release.gpg" "$d/Release"
}

# Replace the pool's .debs with those of the --debs folders (no-op without --debs).
fill_pool() {
    local pool="$1" d f n=0
    [ "${#debdirs[@]}" -gt 0 ] || return 0
    mkdir -p "$pool"
    find "$pool" -maxdepth 1 -name '*.deb' -type f -delete
    for d in "${debdirs[@]}"; do
        for f in "$d"/*.deb; do
            [ -e "$f" ] || continue
            dpkg-deb --info "$f" >/dev/null 2>&1 || die "$f is not a valid .deb"
            cp -f "$f" "$pool/"
            n=$((n + 1))
        done
    done
    [ "$n" -gt 0 ] || die "no .deb files in: ${debdirs[*]}"
    log "pool $pool: $n package(s)"
}

# Packages, Packages.gz (and .xz where xz exists) for the .debs under POOL_REL, written into IDXDIR.
write_packages() {
    local base="$1" pool_rel="$2" idxdir="$3"
    mkdir -p "$idxdir"
    (cd "$base" && apt-ftparchive packages "$pool_rel") > "$idxdir/Packages.tmp"
    mv -f "$idxdir/Packages.tmp" "$idxdir/Packages"
    gzip -9nc "$idxdir/Packages" > "$idxdir/Packages.gz"
    rm -f "$idxdir/Packages.xz"
    if command -v xz >/dev/null; then xz -9c "$idxdir/Packages" > "$idxdir/Packages.xz"; fi
    [ -s "$idxdir/Packages" ] || log "warning: $idxdir/Packages is empty (no .debs in the pool)"
}

base="$root/$prefix"
mkdir -p "$base"
if [ "$layout" = docker ]; then
    dists="$base/dists/$suite"
    pool_rel="dists/$suite/pool/$component/$arch"
    fill_pool "$base/$pool_rel"
    mkdir -p "$base/$pool_rel"
    idx="$dists/$component/binary-$arch"
    write_packages "$base" "$pool_rel" "$idx"
    printf 'Archive: %s\nComponent: %s\nOrigin: %s\nLabel: %s\nArchitecture: %s\n' \
        "$suite" "$component" "$origin" "$label" "$arch" > "$idx/Release"
    rm -f "$dists/Release" "$dists/InRelease" "$dists/Release.gpg"
    (cd "$dists" && apt-ftparchive \
        -o APT::FTPArchive::Release::Origin="$origin" \
        -o APT::FTPArchive::Release::Label="$label" \
        -o APT::FTPArchive::Release::Suite="$suite" \
        -o APT::FTPArchive::Release::Codename="$suite" \
        -o APT::FTPArchive::Release::Architectures="$arch" \
        -o APT::FTPArchive::Release::Components="$component" \
        -o APT::FTPArchive::Release::Description="$description" \
        release .) > "$root/.Release.tmp"
    mv -f "$root/.Release.tmp" "$dists/Release"
    sign_release "$dists"
    sources="Types: deb | URIs: <base>/$prefix | Suites: $suite | Components: $component | Signed-By: <keyring>"
else
    fill_pool "$base"
    write_packages "$base" . "$base"
    rm -f "$base/Release" "$base/InRelease" "$base/Release.gpg"
    # Like NVIDIA's flat Release: Codename = flavour, Components: main, Version 1.0, SHA512 sums only.
    (cd "$base" && apt-ftparchive \
        -o APT::FTPArchive::MD5=false -o APT::FTPArchive::SHA1=false -o APT::FTPArchive::SHA256=false \
        -o APT::FTPArchive::Release::Origin="$origin" \
        -o APT::FTPArchive::Release::Label="$label" \
        -o APT::FTPArchive::Release::Codename="$flavour" \
        -o APT::FTPArchive::Release::Version=1.0 \
        -o APT::FTPArchive::Release::Architectures="$arch" \
        -o APT::FTPArchive::Release::Components=main \
        -o APT::FTPArchive::Release::Description="$description" \
        release .) > "$root/.Release.tmp"
    mv -f "$root/.Release.tmp" "$base/Release"
    sign_release "$base"
    suite="/"
    component=""
    sources="deb [signed-by=<keyring>] <base>/$prefix /"
fi

# Self-check: the signatures verify against the published (armored) key alone, as apt will check them.
verify_dir="$base"
if [ "$layout" = docker ]; then verify_dir="$base/dists/$suite"; fi
keyring="$workdir/published-key.gpg"
gpg --batch --yes --dearmor -o "$keyring" "$root/$key_path"
gpgv --keyring "$keyring" "$verify_dir/InRelease" >/dev/null 2>&1 \
    || die "$verify_dir/InRelease does not verify against $root/$key_path"
gpgv --keyring "$keyring" "$verify_dir/Release.gpg" "$verify_dir/Release" >/dev/null 2>&1 \
    || die "$verify_dir/Release.gpg does not verify against $root/$key_path"

log "$layout repository ready under $root (key ${fpr})"
printf 'root=%s\nrepo_path=/%s\nkey_path=/%s\nsuite=%s\ncomponents=%s\nfingerprint=%s\nsources=%s\n' \
    "$root" "$prefix" "$key_path" "$suite" "$component" "$fpr" "$sources"
