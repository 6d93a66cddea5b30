#!/usr/bin/env bash
# Choose the consul that the lab, the tests and the demo run, and link it where
# the lab looks first (MESHCTL_CONSUL_LINK, default .venv/bin/consul):
#
#   CONSUL=/path/to/consul   the user's own binary, if its version is supported;
#   else a consul on PATH of the pinned minor version;
#   else the pinned MPL-2.0 release, built from its Go module (build-consul.sh).
#
# A version outside CONSUL_SUPPORTED_MIN..MAX (scripts/versions.env) is refused
# with a message saying which versions are supported.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
link=${MESHCTL_CONSUL_LINK:-$here/../.venv/bin/consul}
say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
mkdir -p "$(dirname "$link")"
# (Outputs are captured, never piped into head/grep -q: under pipefail that is a
# SIGPIPE exit 141.)
consul_version_of() {  # prints "1.14.11" for a consul binary, or nothing
    local out
    out=$("$1" version 2>/dev/null || true)
    out=${out%%$'\n'*}
    [[ $out =~ ^Consul\ v([0-9]+\.[0-9]+\.[0-9]+) ]] && echo "${BASH_REMATCH[1]}"
    return 0
}
supported() {  # is version $1 within CONSUL_SUPPORTED_MIN..CONSUL_SUPPORTED_MAX (minor versions)?
    local v=$1 lo=$CONSUL_SUPPORTED_MIN hi=$CONSUL_SUPPORTED_MAX
    [ "$(printf '%s\n%s\n' "$lo" "${v%.*}" | sort -V | sed -n 1p)" = "$lo" ] &&
        [ "$(printf '%s\n%s\n' "${v%.*}" "$hi" | sort -V | sed -n 2p)" = "$hi" ]
}
want_minor=${CONSUL_VERSION%.*}
consul_bin=""
if [ -n "${CONSUL:-}" ]; then
    [ -x "$CONSUL" ] || die "CONSUL=$CONSUL is not an executable file: name a consul binary, or unset CONSUL to build the pinned $CONSUL_VERSION"
    v=$(consul_version_of "$CONSUL")
    [ -n "$v" ] || die "CONSUL=$CONSUL did not print a version ('consul version' should start with 'Consul vX.Y.Z')"
    supported "$v" || die "CONSUL=$CONSUL is Consul $v; meshctl supports Consul $CONSUL_SUPPORTED_MIN to $CONSUL_SUPPORTED_MAX (the suite is pinned to $CONSUL_VERSION): name a supported consul, or unset CONSUL to build the pinned one"
    consul_bin=$(cd "$(dirname "$CONSUL")" && pwd)/$(basename "$CONSUL")
    say "consul: using CONSUL=$consul_bin (Consul v$v)"
elif command -v consul >/dev/null && [[ $(consul_version_of "$(command -v consul)") == "$want_minor."* ]] \
        && [ "$(readlink -f "$(command -v consul)")" != "$(readlink -f "$link" 2>/dev/null)" ]; then
    consul_bin=$(command -v consul)
    say "consul: using $consul_bin (Consul v$(consul_version_of "$consul_bin"))"
else
    bash "$here/build-consul.sh"
    consul_bin="${MESHCTL_CACHE:-$HOME/.cache/meshctl}/bin/consul-$CONSUL_VERSION"
fi
ln -sfn "$consul_bin" "$link"
echo "consul: $link -> $consul_bin"
