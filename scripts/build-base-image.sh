#!/usr/bin/env bash
# Make a local Debian base image with python3 + venv, for machines that cannot pull images.
#
#   scripts/build-base-image.sh [TAG]        (default TAG: hestia-test-base:bookworm)
#
# The rootfs comes from debootstrap (apt-get install debootstrap) and goes into Docker with
# `docker import`. Nothing is built when TAG already exists: set FORCE=1 to rebuild.
# The Debian mirror is read from this machine's apt sources, so it goes wherever apt goes;
# DEBIAN_MIRROR overrides it, DEBIAN_SUITE picks the release (default bookworm, whose
# python3 is 3.11). Needs root (debootstrap) and a running Docker engine.
set -euo pipefail

TAG="${1:-hestia-test-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"

log() { printf 'build-base-image: %s\n' "$*" >&2; }

if [[ -z "${FORCE:-}" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG exists, nothing to do (FORCE=1 rebuilds it)"
    exit 0
fi

command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
[[ $(id -u) == 0 ]] || { log "debootstrap needs root"; exit 1; }

# Print "URI SUITE..." for every enabled `deb` source, one-line (.list) and deb822 (.sources).
apt_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [options] URI suite components...
        sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+([^[:space:]]+).*/\2 \3/p' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '
            function flush() { if (deb && enabled && uris != "") { n = split(uris, u, " "); for (i = 1; i <= n; i++) print u[i], suites } deb = 0; enabled = 1; uris = ""; suites = "" }
            BEGIN { enabled = 1 }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:"   { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "enabled:" { enabled = (tolower($2) != "no") }
            tolower($1) == "uris:"    { $1 = ""; uris = $0 }
            tolower($1) == "suites:"  { $1 = ""; suites = $0 }
            END { flush() }
        ' "$f"
    done
}

find_mirror() {
    local host_suite want uri suites s
    # shellcheck source=/dev/null
    host_suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    # A source that serves the suite we want, else the one that serves the host's own release
    # (any Debian mirror carries every current suite).
    for want in "$SUITE" "$host_suite"; do
        [[ -n $want ]] || continue
        while read -r uri suites; do
            for s in $suites; do
                if [[ $s == "$want" ]]; then echo "${uri%/}"; return 0; fi
            done
        done < <(apt_sources)
    done
    return 1
}

MIRROR="${DEBIAN_MIRROR:-$(find_mirror || true)}"
if [[ -z $MIRROR ]]; then
    log "no Debian mirror serving '$SUITE' found in /etc/apt/sources*; set DEBIAN_MIRROR"
    exit 1
fi
log "building $TAG from $SUITE at $MIRROR"

ROOTFS="$(mktemp -d /var/tmp/hestia-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

debootstrap --variant=minbase --components=main --include=python3,python3-venv \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2

# Only what an image needs: no apt lists or caches, docs, man pages or translations.
rm -rf "${ROOTFS:?}"/var/lib/apt/lists/* "${ROOTFS:?}"/var/cache/apt/* "${ROOTFS:?}"/var/log/* \
    "${ROOTFS:?}"/usr/share/doc/* "${ROOTFS:?}"/usr/share/man/* "${ROOTFS:?}"/usr/share/info/* \
    "${ROOTFS:?}"/usr/share/locale/* "${ROOTFS:?}"/tmp/* "${ROOTFS:?}"/dev/*

tar --numeric-owner -C "$ROOTFS" -c . |
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap $SUITE (minbase + python3, python3-venv)" \
        - "$TAG" >/dev/null

log "built $TAG: $(docker run --rm "$TAG" python3 --version)"
