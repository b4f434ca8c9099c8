#!/usr/bin/env bash
# Install the Debian 12 packages headwise needs to build, test and benchmark, if missing.
# Safe to run repeatedly: does nothing (and needs no root) when everything is installed.
# With arguments, installs those packages instead (scripts/fuzz.sh: clang and its runtimes).
set -euo pipefail

packages=(cmake g++ make libxsimd-dev libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev pkg-config)
if [ $# -gt 0 ]; then packages=("$@"); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-deps: not root and no passwordless sudo; please run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
