#!/usr/bin/env bash
# Sets up dicomnode on a fresh Debian machine with Python 3.11: system packages, a virtual
# environment in .venv, torch 2.13.0, the project with its test extra, and the default model.
# Safe to run again: every step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(dcmtk dicom3tools orthanc pixelmed-apps python3-venv)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing system packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip_install() {
    # this machine's pip configuration names local indexes that may be absent; keep those warnings out
    .venv/bin/python -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
echo "== installing torch 2.13.0 and the project"
pip_install torch==2.13.0
pip_install -e ".[test]"

echo "== installing the default model"
.venv/bin/dicomnode models install-default
echo "== ready: .venv/bin/dicomnode serve   (tests: .venv/bin/python -m pytest)"
