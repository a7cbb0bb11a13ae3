#!/usr/bin/env bash
# Says what is missing, and how to install it, before a long build fails halfway.
set -euo pipefail
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
