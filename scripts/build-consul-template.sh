#!/usr/bin/env bash
# Build the pinned consul-template (the benchmark's peer for convergence and
# reload counts: consul-template + nginx) from its Go module with the
# machine's Go toolchain.
#
# The module source comes from the module proxy (`go mod download`); it is
# built in a writable copy with GOFLAGS=-mod=mod, so that a go.sum that lags
# its go.mod does not stop the build. Only the MPL-2.0 releases are built
# (v0.33.0 is one; the script checks the module's LICENSE). The binary is
# cached outside the work tree (~/.cache/meshctl/bin/consul-template-<version>)
# and linked into .venv/bin, where the lab's PATH finds it; a second run only
# checks the cached binary and the link.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
: "${CONSUL_TEMPLATE_VERSION:?CONSUL_TEMPLATE_VERSION is not set in scripts/versions.env}"
cache=${MESHCTL_CACHE:-$HOME/.cache/meshctl}
out="$cache/bin/consul-template-$CONSUL_TEMPLATE_VERSION"
link="$root/.venv/bin/consul-template"
mod=github.com/hashicorp/consul-template

link_it() {
    if [ -d "$root/.venv/bin" ]; then
        ln -sfn "$out" "$link"
    else
        echo "note: $root/.venv does not exist yet (run 'make deps'); consul-template is at $out" >&2
    fi
}

# Output is captured, never piped into grep -q (SIGPIPE under pipefail).
if [ -x "$out" ] && [[ $("$out" -version 2>&1 || true) == *"v$CONSUL_TEMPLATE_VERSION"* ]]; then
    link_it
    echo "consul-template $CONSUL_TEMPLATE_VERSION: cached at $out"
    exit 0
fi
# A Go installed from go.dev's tarball lives in /usr/local/go, often not on a CI PATH.
command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }
command -v go >/dev/null || {
    echo "error: Go toolchain not found; install Go (https://go.dev/dl/) to build consul-template $CONSUL_TEMPLATE_VERSION, or place a binary at $out" >&2
    exit 1
}
mkdir -p "$cache/bin" "$cache/src"
echo "consul-template $CONSUL_TEMPLATE_VERSION: downloading module source (go mod download)"
dir=$(cd "$cache/src" && GOFLAGS=-mod=mod go mod download -json "$mod@v$CONSUL_TEMPLATE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "error: could not download $mod@v$CONSUL_TEMPLATE_VERSION" >&2; exit 1; }
work=$(mktemp -d "$cache/src/consul-template-build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$dir/." "$work/"
chmod -R u+w "$work"
cd "$work"
[[ $(cat LICENSE) == *"Mozilla Public License"* ]] || {
    echo "error: consul-template $CONSUL_TEMPLATE_VERSION is not under the MPL-2.0 (see its LICENSE); meshctl builds open-source releases only" >&2; exit 1; }
echo "consul-template $CONSUL_TEMPLATE_VERSION: building"
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$out.tmp" \
    -ldflags "-s -w -X $mod/version.Name=consul-template -X $mod/version.GitCommit=meshctl-build" .
[[ $("$out.tmp" -version 2>&1 || true) == *"v$CONSUL_TEMPLATE_VERSION"* ]] || {
    rm -f "$out.tmp"; echo "error: the build produced no working consul-template $CONSUL_TEMPLATE_VERSION binary" >&2; exit 1; }
cp LICENSE "$out.LICENSE"
mv "$out.tmp" "$out"
link_it
echo "consul-template $CONSUL_TEMPLATE_VERSION: built at $out"
