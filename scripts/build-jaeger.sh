#!/usr/bin/env bash
# Build the pinned Jaeger (the lab's trace backend: all-in-one with in-memory
# storage and an OTLP receiver) from its Go module with the machine's Go.
#
# `cmd/jaeger` is a program inside the module github.com/jaegertracing/jaeger;
# it is built as a tool of a throw-away module (`go get -tool`), so the module
# graph is the one the release's go.mod requires. Only Apache-2.0 releases are
# built (the script checks the module's LICENSE). The binary is cached outside
# the work tree (~/.cache/meshctl/bin/jaeger-<version>, its LICENSE beside it)
# and linked into .venv/bin; a second run only checks the cache and the link.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
: "${JAEGER_VERSION:?JAEGER_VERSION is not set in scripts/versions.env}"
cache=${MESHCTL_CACHE:-$HOME/.cache/meshctl}
out="$cache/bin/jaeger-$JAEGER_VERSION"
link="$root/.venv/bin/jaeger"
mod=github.com/jaegertracing/jaeger

link_it() {
    if [ -d "$root/.venv/bin" ]; then
        ln -sfn "$out" "$link"
    else
        echo "note: $root/.venv does not exist yet (run 'make deps'); jaeger is at $out" >&2
    fi
}

# The version is stamped into the binary at build time (below) and read back
# here; output is captured, never piped into grep -q (SIGPIPE under pipefail).
if [ -x "$out" ] && [[ $("$out" version 2>/dev/null || true) == *"v$JAEGER_VERSION"* ]]; then
    link_it
    echo "jaeger $JAEGER_VERSION: cached at $out"
    exit 0
fi
command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }
command -v go >/dev/null || {
    echo "error: Go toolchain not found; install Go (https://go.dev/dl/) to build jaeger $JAEGER_VERSION, or place a binary at $out" >&2
    exit 1
}
mkdir -p "$cache/bin" "$cache/src"
work=$(mktemp -d "$cache/src/jaeger-build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
go mod init meshctl.invalid/jaeger-build >/dev/null 2>&1
echo "jaeger $JAEGER_VERSION: resolving the module graph (go get -tool)"
GOFLAGS=-mod=mod go get -tool "$mod/cmd/jaeger@v$JAEGER_VERSION"
dir=$(GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' "$mod")
[ -n "$dir" ] && [ -f "$dir/LICENSE" ] || { echo "error: could not download $mod@v$JAEGER_VERSION" >&2; exit 1; }
[[ $(cat "$dir/LICENSE") == *"Apache License"*"Version 2.0"* ]] || {
    echo "error: jaeger $JAEGER_VERSION is not under the Apache-2.0 (see its LICENSE); meshctl builds open-source releases only" >&2; exit 1; }
echo "jaeger $JAEGER_VERSION: building (a few minutes the first time; later runs use the cache)"
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$out.tmp" \
    -ldflags "-s -w -X $mod/internal/version.latestVersion=v$JAEGER_VERSION -X $mod/internal/version.commitSHA=meshctl-build -X $mod/internal/version.date=1970-01-01T00:00:00Z" \
    "$mod/cmd/jaeger"
[[ $("$out.tmp" version 2>/dev/null || true) == *"v$JAEGER_VERSION"* ]] || {
    "$out.tmp" version >&2 || true
    rm -f "$out.tmp"; echo "error: the build produced no working jaeger $JAEGER_VERSION binary" >&2; exit 1; }
cp "$dir/LICENSE" "$out.LICENSE"
mv "$out.tmp" "$out"
link_it
echo "jaeger $JAEGER_VERSION: built at $out"
