#!/usr/bin/env bash
# Installs the Debian 12 packages attnkit builds with (as root, or through sudo).
set -euo pipefail
PKGS=(build-essential cmake ninja-build ccache libeigen3-dev libxsimd-dev catch2 libbenchmark-dev
      nlohmann-json3-dev libpcre2-dev libutf8proc-dev pkg-config clang libclang-rt-14-dev libomp-dev)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then echo "install-deps: all packages present"; exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
