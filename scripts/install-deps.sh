#!/usr/bin/env bash
# Install the Debian packages convsplit builds and tests with, when any is missing.
#
# libtorch-dev is the C++ libtorch 1.13.1 that the shim links against. python3-torch and
# python3-torchvision make the TorchScript fixtures and run the reference checks under
# /usr/bin/python3. cmake, g++ and make build the shim. Installing needs root; when every
# package is present the script only queries dpkg and exits 0.
# Recommended packages are kept on purpose: libtorch1.13 recommends OpenBLAS, and without
# it libtorch falls back to the slow reference BLAS.
set -euo pipefail

PACKAGES=(libtorch-dev python3-torch python3-torchvision cmake g++ make)

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != installed ]]; then
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all present: ${PACKAGES[*]}"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing ${missing[*]}. Run this script as root to install them" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
echo "install-deps: apt-get update"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
