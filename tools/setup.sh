#!/usr/bin/env bash
# Installs what ievo needs (Debian packages; the cuDNN frontend headers from PyPI when CUDA is
# present) and builds it into build/. Idempotent: a second run only rebuilds what changed.
#   IEVO_BUILD_DIR=build  IEVO_CUDA=AUTO|ON|OFF  IEVO_BUILD_TYPE=RelWithDebInfo
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ninja-build pkg-config git python3
      libopenblas-dev libyaml-cpp-dev libhdf5-dev libopenmpi-dev openmpi-bin
      libcli11-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev
      libsentencepiece-dev sentencepiece)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The GCIDE dictionary for the real-text example and tests/test_slow_gcide (14.8 MB .deb,
# unpacked into .cache/gcide; skipped when already there).
tools/gcide_example.sh fetch || echo "setup: dict-gcide not fetched (test_slow_gcide will fail until it is)"

BUILD_DIR=${IEVO_BUILD_DIR:-build}
CUDA_OPT=${IEVO_CUDA:-AUTO}
if [ "$CUDA_OPT" != "OFF" ] && command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
  # cuDNN frontend (header-only C++ API) ships in a PyPI package; install once.
  if [ "$CUDA_OPT" != "OFF" ] && ! python3 -c "import cudnn, os, sys" >/dev/null 2>&1 && \
     ! [ -f tools/.cudnn_frontend_include ]; then
    python3 -m pip install -q nvidia-cudnn-frontend >/dev/null 2>&1 || echo "setup: nvidia-cudnn-frontend not installed (cuDNN attention off)"
  fi
fi

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${IEVO_BUILD_TYPE:-RelWithDebInfo}" \
        -DIEVO_CUDA="$CUDA_OPT" ${IEVO_CMAKE_ARGS:-}
fi
cmake --build "$BUILD_DIR" -j"$(nproc)"
