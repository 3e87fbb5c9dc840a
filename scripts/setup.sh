#!/usr/bin/env bash
# Sets up dicomnode on a fresh Debian machine with Python 3.11: system packages, a virtual
# environment in .venv, torch 2.13.0, the project, and the default model.
#
#   bash scripts/setup.sh          a production node: dcmtk and python3-venv only
#   bash scripts/setup.sh --test   also what the tests need: Orthanc, dicom3tools, PixelMed (and Java),
#                                  PostgreSQL (the tests start their own server), Chromium and its
#                                  driver, and the project's test extra (pytest, keras, psycopg, ...)
#
# Safe to run again: every step skips what is already done. Each step says what it installs and
# about how long it takes; a package that cannot be fetched stops the script with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }
WITH_TESTS=0
for argument in "$@"; do
    case "$argument" in
        --test) WITH_TESTS=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $argument" >&2; usage >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(dcmtk python3-venv)
# the PACS, the DICOM validators, PixelMed's SR validator (which pulls in Java), the PostgreSQL
# server the contract tests start for themselves, the headless browser of the dashboard test and
# curl as a STOW-RS client: only for the tests
TEST_APT_PACKAGES=(orthanc orthanc-dicomweb dicom3tools pixelmed-apps postgresql chromium chromium-driver curl)
[ "$WITH_TESTS" -eq 1 ] && APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
STEPS=4

step() { echo "== [$1/$STEPS] $2"; }
fail() {
    echo "setup.sh: $1" >&2
    exit 1
}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    step 1 "installing system packages: ${missing[*]} (apt-get; about 1 minute, 2-4 with --test)"
    as_root apt-get update -qq ||
        fail "apt-get update failed: check the network and the Debian mirrors in /etc/apt/sources.list, then run this again"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; then
        fail "could not install ${missing[*]} with apt-get (a package could not be fetched or does not exist in this Debian release); the lines above say which"
    fi
else
    step 1 "system packages: already installed (${APT_PACKAGES[*]})"
fi

if [ ! -x .venv/bin/python ]; then
    command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11"
    step 2 "creating .venv with $($PYTHON --version) (a few seconds)"
    "$PYTHON" -m venv .venv || fail "could not create .venv with $PYTHON (is python3-venv installed?)"
else
    step 2 ".venv: already there ($(.venv/bin/python --version))"
fi
pip_install() {
    # this machine's pip configuration names local indexes that may be absent; keep those warnings out
    .venv/bin/python -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
extra=""
[ "$WITH_TESTS" -eq 1 ] && extra="[test]"
step 3 "installing torch 2.13.0 and the project$extra with pip (torch is a large download: 2-10 minutes the first time)"
pip_install torch==2.13.0 ||
    fail "pip could not install torch==2.13.0: check the network or the package index (pip config list), then run this again"
pip_install -e ".$extra" ||
    fail "pip could not install the project's dependencies (the lines above name the package); check the network or the index, then run this again"

step 4 "installing the default model (pip install pneumonia_model_package, convert its Keras weights; about 1 minute)"
.venv/bin/dicomnode models install-default ||
    fail "the default model could not be installed (see above); the node runs without it but routes images to no model"
echo "== ready: .venv/bin/dicomnode serve   (tests: bash scripts/setup.sh --test && .venv/bin/python -m pytest -ra -q)"
