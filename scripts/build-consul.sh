#!/usr/bin/env bash
# Build a pinned Consul release from its Go module with the machine's Go toolchain.
#
# Consul's go.mod replaces its own submodules (api, sdk, proto-public) with
# local directories, which makes `go install github.com/hashicorp/consul@vX`
# refuse to build.  We take the module source from the module proxy, drop
# every replace directive that points into the module's own tree so the
# submodules resolve at the versions go.mod requires, and build that.
#
# Only MPL-2.0 releases are built (1.14.x: its LICENSE is MPL-2.0 and it needs
# neither envoyextensions nor troubleshoot, whose releases are not open source).
# The build refuses to finish if a module outside the open-licence allow list
# appears in its module graph (tests/integration/test_consul_build.py checks
# the same on the cached build's module list).
# The binary is cached outside the work tree; a second run takes no time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${MESHCTL_CACHE:-$HOME/.cache/meshctl}
out="$cache/bin/consul-$CONSUL_VERSION"
# Output is captured, never piped into head or grep -q: with pipefail, a reader
# that stops early kills the writer with SIGPIPE and fails the script (exit 141).
# A Go installed from go.dev's tarball lives in /usr/local/go, often not on a CI PATH.
command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH="$PATH:/usr/local/go/bin"; }

# Modules that must never be compiled into the Consul meshctl builds or tests
# against: their published releases are not under an open-source licence.
forbidden=(github.com/hashicorp/consul/envoyextensions github.com/hashicorp/consul/troubleshoot)

# Beside the binary: the module's LICENSE and the modules linked into it (from
# the binary's own build info), which tests/integration/test_consul_build.py reads.
record_build() {
    if [ ! -s "$out.LICENSE" ]; then
        local d
        d=$(cd "$cache/src" && GOFLAGS=-mod=mod go mod download -json "github.com/hashicorp/consul@v$CONSUL_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        [ -n "$d" ] && cp "$d/LICENSE" "$out.LICENSE.tmp" && mv "$out.LICENSE.tmp" "$out.LICENSE"
    fi
    go version -m "$1" > "$out.modules.tmp"
    local m
    for m in "${forbidden[@]}"; do
        if [[ $'\n'$(cat "$out.modules.tmp") == *$'\tdep\t'"$m"$'\t'* ]]; then
            rm -f "$out.modules.tmp"
            echo "error: consul $CONSUL_VERSION links $m, whose releases are not open source; meshctl does not build it" >&2
            return 1
        fi
    done
    mv "$out.modules.tmp" "$out.modules"
}

if [ -x "$out" ] && [[ $("$out" version 2>/dev/null || true) == *"v$CONSUL_VERSION"* ]]; then
    if command -v go >/dev/null && { [ ! -s "$out.modules" ] || [ ! -s "$out.LICENSE" ]; }; then
        record_build "$out"
    fi
    echo "consul $CONSUL_VERSION: cached at $out"
    exit 0
fi
command -v go >/dev/null || { echo "error: Go toolchain not found; install Go >= 1.25 or name a consul with CONSUL=/path/to/consul" >&2; exit 1; }
mkdir -p "$cache/bin" "$cache/src"
echo "consul $CONSUL_VERSION: downloading module source (go mod download)"
dir=$(cd "$cache/src" && GOFLAGS=-mod=mod go mod download -json "github.com/hashicorp/consul@v$CONSUL_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "error: could not download github.com/hashicorp/consul@v$CONSUL_VERSION" >&2; exit 1; }
work=$(mktemp -d "$cache/src/consul-build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$dir/." "$work/"
chmod -R u+w "$work"
cd "$work"
grep -q 'Mozilla Public License' LICENSE || { echo "error: consul $CONSUL_VERSION is not under the MPL-2.0 (see its LICENSE); meshctl builds open-source releases only" >&2; exit 1; }
# Every `replace github.com/hashicorp/consul/X => ./X` goes; anything else stays.
for sub in $(awk '$0 ~ /github\.com\/hashicorp\/consul\/[a-z-]+ => \.\// { for (i = 1; i <= NF; i++) if ($i ~ /^github\.com\/hashicorp\/consul\//) print $i }' go.mod); do
    go mod edit -dropreplace="$sub"
done
echo "consul $CONSUL_VERSION: building (several minutes the first time; later runs use the cache)"
# Some of Consul's own submodule releases are served by the module proxy but
# missing from the checksum database; skip the sumdb for those alone.
CGO_ENABLED=0 GOFLAGS=-mod=mod GONOSUMDB=github.com/hashicorp/consul/* go build -trimpath -o "$out.tmp" \
    -ldflags "-s -w -X github.com/hashicorp/consul/version.GitCommit=meshctl-build -X github.com/hashicorp/consul/version.BuildDate=1970-01-01T00:00:00Z" .
cp LICENSE "$out.LICENSE"
record_build "$out.tmp"
mv "$out.tmp" "$out"
built=$("$out" version)
echo "${built%%$'\n'*}"
echo "consul $CONSUL_VERSION: built at $out"
