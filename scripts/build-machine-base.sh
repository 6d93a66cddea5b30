#!/usr/bin/env bash
# The machine lab's base root filesystem: Debian bookworm with systemd, sshd,
# Python (and what the Ansible role's modules need) and both proxies,
# debootstrapped once from the Debian mirror this machine's apt uses and cached
# outside the work tree (like Consul). Each lab machine boots an overlay of it.
#
#   scripts/build-machine-base.sh        # prints the cached path, builds it if missing
#
# Cached by the package list: changing MACHINE_PACKAGES builds a new base.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
. scripts/versions.env
cache=${MESHCTL_CACHE:-$HOME/.cache/meshctl}/machines
pkgs=systemd,systemd-sysv,dbus,python3,python3-apt,python3-packaging,python3-venv,openssh-server,iproute2,procps,curl,ca-certificates,nginx,libnginx-mod-http-lua,libnginx-mod-stream,lua-cjson,haproxy,sudo
key=$(printf '%s %s' "$MACHINE_SUITE" "$pkgs" | sha256sum | cut -c1-12)
base=$cache/$MACHINE_SUITE-$key
# The wheels of meshctl's dependencies, for an offline install on the machines
# (the target has no internet; the role installs from a wheel and these).
wkey=$(sed -n '/^dependencies = \[/,/^]/p' pyproject.toml | sha256sum | cut -c1-12)
wheels=$cache/wheels-$wkey
if [ ! -d "$wheels" ]; then
    echo "==> building the machines' wheelhouse into $wheels" >&2
    mkdir -p "$cache"
    wtmp=$(mktemp -d "$cache/.wheels-XXXXXX")
    py=${PYTHON:-python3}
    [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -m pip wheel -q --disable-pip-version-check --wheel-dir "$wtmp" . >&2
    rm -f "$wtmp"/meshctl-*.whl  # meshctl itself is built fresh by each lab
    mv "$wtmp" "$wheels"
fi
if [ -d "$base" ]; then
    echo "$base"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root: run 'make deps' as root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap missing: apt-get install debootstrap systemd-container" >&2; exit 1; }
# The mirror apt already uses (deb822 or one-line sources), so no other network is needed.
mirror=$(grep -hvE '^\s*#' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?( |$)' | sed -n 1p | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "==> debootstrapping $MACHINE_SUITE from $mirror into $base (a few minutes, once)" >&2
debootstrap --variant=minbase --include="$pkgs" "$MACHINE_SUITE" "$tmp/root" "$mirror" >"$tmp/log" 2>&1 \
    || { tail -20 "$tmp/log" >&2; exit 1; }
root=$tmp/root
# Nothing starts by itself but what the lab enables: the packaged proxies stay off.
rm -f "$root"/etc/systemd/system/multi-user.target.wants/{nginx,haproxy}.service
rm -f "$root"/etc/ssh/ssh_host_*  # each machine makes its own at first boot
chroot "$root" apt-get clean
: > "$root/etc/machine-id"
mv "$root" "$base"
echo "$base"
