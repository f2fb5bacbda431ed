#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) for Weft development, tests and the demo:
# system packages, then a virtual environment with Weft, its plugins and the test tools.
# Idempotent and quick to re-run: apt is skipped when everything is installed, pip when the
# project files have not changed since the last successful install.
#
#   WEFT_VENV   where the virtual environment goes (default: .venv in the repository)
#   WEFT_PYTHON the interpreter for it (default: the distribution's /usr/bin/python3 if >= 3.11)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${WEFT_VENV:-$ROOT/.venv}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

APT_PACKAGES=(wireguard-go wireguard-tools nftables iproute2 iputils-ping pebble iperf3 socat dnsmasq-base
              wrk nginx-light
              curl openssl procps python3-venv
              bind9-dnsutils
              gcc python3-dev)  # weft_http's compiled fast path (plugins/weft_http/setup.py)
# One binary per package above (python3-venv is checked through dpkg only).
BINARIES=(wireguard-go wg nft ip ping pebble iperf3 socat dnsmasq wrk nginx curl openssl ps dig gcc)

have_binaries() {
    local bin
    for bin in "${BINARIES[@]}"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 || return 1
    done
}

packages_installed() {
    command -v dpkg-query >/dev/null 2>&1 || return 0   # not Debian: trust the binaries
    local status
    status=$(dpkg-query -W -f='${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null) || return 1
    [ "$(grep -c '^installed$' <<<"$status")" -eq "${#APT_PACKAGES[@]}" ]
}

# --- system packages -------------------------------------------------------------------------
if have_binaries && packages_installed; then
    say "system packages already installed"
else
    [ "$(id -u)" -eq 0 ] || die "system packages are missing and we are not root: run as root"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install ${APT_PACKAGES[*]} by hand"
    say "installing system packages: ${APT_PACKAGES[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
    have_binaries || die "packages installed but some of ${BINARIES[*]} are still missing"
fi

# --- Python ----------------------------------------------------------------------------------
python_ok() {  # usage: python_ok EXECUTABLE -> true if it is Python >= 3.11 with venv
    "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# The distribution's python3 comes first: Debian builds it with profile-guided optimisation and
# link-time optimisation, linked statically, and Weft's per-request and per-datagram work is
# Python. weft_http's Python per request (bench/vhost_cpu.py) took 11.3 us on Debian's 3.11.2
# against 14.4-15.5 us on a default pyenv build of 3.11.7 (shared libpython, no PGO) on the same
# machine. WEFT_PYTHON picks another interpreter.
PYTHON=""
if [ -n "${WEFT_PYTHON:-}" ]; then
    python_ok "$WEFT_PYTHON" || die "WEFT_PYTHON=$WEFT_PYTHON is not a Python >= 3.11 with venv"
    PYTHON=$(command -v "$WEFT_PYTHON")
else
    for candidate in /usr/bin/python3 python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            PYTHON=$(command -v "$candidate")
            break
        fi
    done
fi
[ -n "$PYTHON" ] || die "no Python >= 3.11 found (install python3 and python3-venv)"

base_python() {  # usage: base_python EXECUTABLE -> the real interpreter behind it (or a venv)
    "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
}

if [ -e "$VENV" ] && ! python_ok "$VENV/bin/python"; then
    # also a venv whose interpreter is gone (a removed pyenv version leaves a dangling link)
    say "removing broken or too old virtual environment $VENV"
    rm -rf "$VENV"
elif [ -x "$VENV/bin/python" ] && [ "$(base_python "$VENV/bin/python")" != "$(base_python "$PYTHON")" ]; then
    if [ -z "${WEFT_VENV:-}" ] || [ -n "${WEFT_PYTHON:-}" ]; then
        say "re-creating $VENV on $PYTHON (it was on $(base_python "$VENV/bin/python"))"
        rm -rf "$VENV"
    else  # a virtual environment the user chose: theirs to re-create
        say "note: $VENV runs on $(base_python "$VENV/bin/python"), not $PYTHON (see WEFT_PYTHON)"
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi

# --- Weft and its plugins (editable) ---------------------------------------------------------
PIP_ARGS=(-e ".[test]" -e plugins/weft_tcp)
for plugin in plugins/weft_udp plugins/weft_http; do
    if [ -f "$plugin/pyproject.toml" ]; then
        PIP_ARGS+=(-e "$plugin")
    fi
done

# Re-install only when a pyproject.toml, setup.py or C source (or the set of packages) changed.
stamp_file="$VENV/.weft-setup-stamp"
stamp=$({ printf '%s\n' "${PIP_ARGS[@]}"; cat pyproject.toml plugins/*/pyproject.toml \
          plugins/*/setup.py plugins/*/*/*.c 2>/dev/null || true; } \
        | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$VENV/bin/weft" ]; then
    say "Python packages up to date in $VENV"
else
    say "installing Weft into $VENV: ${PIP_ARGS[*]}"
    rm -f "$stamp_file"
    # A compiled part that fails to build is optional to pip, which would then keep an old
    # in-place build: remove this interpreter's first (other interpreters' builds stay).
    ext_suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    rm -f plugins/*/*/*"$ext_suffix"
    pip_log=$(mktemp)
    trap 'rm -f "$pip_log"' EXIT
    status=0
    "$VENV/bin/python" -m pip install -q "${PIP_ARGS[@]}" 2>"$pip_log" || status=$?
    # Show pip's messages except this machine's notes about absent local package folders.
    grep -v "^WARNING: Location 'file:.*is ignored" "$pip_log" >&2 || true
    [ "$status" -eq 0 ] || die "pip install failed (exit $status)"
    if [ -f plugins/weft_http/setup.py ] && ! "$VENV/bin/python" -c 'import weft_http._h1c' 2>/dev/null; then
        say "warning: weft_http's compiled head pass was not built (is gcc or python3-dev missing?):"
        say "  HTTP works on the Python path, at more CPU per request; tests/unit/test_h1_fast.py fails"
    fi
    printf '%s\n' "$stamp" >"$stamp_file"
fi

say "ready: activate with 'source ${VENV#"$ROOT"/}/bin/activate'"
