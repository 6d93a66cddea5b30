#!/usr/bin/env bash
# Build the pinned vegeta (open-model HTTP load generator, used by `make bench`)
# from its Go module with the machine's Go toolchain.
#
# `go install` writes into a temporary GOBIN; the binary then moves into the
# cache outside the work tree (~/.cache/meshctl/bin/vegeta-<version>) and is
# linked into .venv/bin, where the lab's PATH finds it. A second run only
# checks the cached binary and the link.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
: "${VEGETA_VERSION:?VEGETA_VERSION is not set in scripts/versions.env}"
cache=${MESHCTL_CACHE:-$HOME/.cache/meshctl}
out="$cache/bin/vegeta-$VEGETA_VERSION"
link="$root/.venv/bin/vegeta"

link_it() {
    if [ -d "$root/.venv/bin" ]; then
        ln -sfn "$out" "$link"
    else
        echo "note: $root/.venv does not exist yet (run 'make deps'); vegeta is at $out" >&2
    fi
}

if [ -x "$out" ] && grep -qx "Version: $VEGETA_VERSION" <<<"$("$out" -version 2>/dev/null || true)"; then
    link_it
    echo "vegeta $VEGETA_VERSION: cached at $out"
    exit 0
fi
# A Go installed from go.dev's tarball lives in /usr/local/go, often not on a CI PATH.
command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }
command -v go >/dev/null || {
    echo "error: Go toolchain not found; install Go (https://go.dev/dl/) to build vegeta $VEGETA_VERSION, or place a vegeta binary at $out" >&2
    exit 1
}
mkdir -p "$cache/bin"
gobin=$(mktemp -d "$cache/bin/.vegeta-build.XXXXXX")
trap 'rm -rf "$gobin"' EXIT
echo "vegeta $VEGETA_VERSION: building with $(go version | cut -d' ' -f3) (go install)"
CGO_ENABLED=0 GOBIN="$gobin" GOFLAGS=-mod=mod \
    go install -trimpath -ldflags "-s -w -X main.Version=$VEGETA_VERSION" \
    "github.com/tsenart/vegeta/v12@v$VEGETA_VERSION"
grep -qx "Version: $VEGETA_VERSION" <<<"$("$gobin/vegeta" -version)" || {
    echo "error: go install produced no working vegeta $VEGETA_VERSION binary" >&2; exit 1; }
mv "$gobin/vegeta" "$out.tmp"
mv "$out.tmp" "$out"
link_it
echo "vegeta $VEGETA_VERSION: built at $out"
