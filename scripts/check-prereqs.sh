#!/usr/bin/env bash
# Usage: scripts/check-prereqs.sh [--tests]
#
# Says what is missing, and how to install it, before a long build fails halfway. With --tests
# it also makes sure of uv, which the test suite needs (core.python builds with uv when the host
# has it, and the tests cover both ways): when uv is not on PATH it is installed into
# target/tools (a venv of its own; the system's Python is not touched), which scripts/test.sh
# puts first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v cargo >/dev/null || missing+=("cargo (Rust toolchain: https://rustup.rs)")
command -v python3 >/dev/null || missing+=("python3 with venv (apt-get install python3 python3-venv)")
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=("python3's venv and ensurepip modules (apt-get install python3-venv)")
fi
command -v node >/dev/null || missing+=("node (apt-get install nodejs)")
command -v npm >/dev/null || missing+=("npm (apt-get install npm)")
if [[ -z ${DATABASE_URL:-} ]]; then
    command -v psql >/dev/null || missing+=("psql (apt-get install postgresql-client)")
fi
if ((${#missing[@]})); then
    echo "packenvd needs these, which are missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

# As root, packenvd runs steps as an unprivileged build id of its own (packenvd-build, else
# 64900; DESIGN §6), which must be able to run the interpreters found on PATH. pyenv keeps them
# under root's home, often mode 0700: let others search it (not list it), as an operator of a
# root daemon must too (docs/operations.md, "The build user").
if [[ $(id -u) -eq 0 ]] && command -v python3 >/dev/null; then
    build_id=$(id -u packenvd-build 2>/dev/null || echo 64900)
    real=$(python3 -c 'import sys; print(sys.executable)')
    if ! setpriv --reuid="$build_id" --regid="$build_id" --clear-groups -- test -x "$real" 2>/dev/null; then
        echo "==> steps run as uid $build_id, which cannot run $real: chmod o+x ${HOME:-/root} (search only)" >&2
        chmod o+x "${HOME:-/root}"
    fi
fi

if [[ ${1:-} == --tests ]] && ! command -v uv >/dev/null; then
    tools=$PWD/target/tools
    if [[ ! -x $tools/bin/uv ]]; then
        echo "==> uv is not on PATH; installing it into $tools (a venv of its own, from PyPI)" >&2
        rm -rf "$tools/uv-venv"
        mkdir -p "$tools/bin"
        if python3 -m venv "$tools/uv-venv" && "$tools/uv-venv/bin/pip" install --quiet uv; then
            ln -sf ../uv-venv/bin/uv "$tools/bin/uv"
        else
            cat >&2 <<'MSG'
packenvd's tests need uv, and it could not be installed from PyPI here. Install it yourself,
without touching the system's Python, then run the tests again:
  pipx install uv
  # or: python3 -m venv ~/.local/uv && ~/.local/uv/bin/pip install uv && ln -s ~/.local/uv/bin/uv ~/.local/bin/uv
  # or: https://docs.astral.sh/uv/getting-started/installation/
MSG
            exit 1
        fi
    fi
    echo "==> using $("$tools/bin/uv" --version) from $tools/bin" >&2
fi
