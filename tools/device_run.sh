#!/usr/bin/env bash
# One device call for the GPU tests: build here (nvcc, no GPU), carry a small bundle, run there.
#
#   tools/device_run.sh pack          # here: build the GPU test targets and fill build-dev/
#   -> run tool: command "tools/device_run.sh run", carry ["build-dev"]
#   tools/device_run.sh run           # there: ldd check, ctest -L gpu, optional memcheck; logs to $OUT
#
# pack: IEVO_BUILD_DIR (default build-cuda, configured with IEVO_CUDA=ON; a Release build keeps
#   the bundle small), IEVO_PACK_TESTS="test_gpu_a test_gpu_b" only those tests (each binary is
#   ~12 MB: all of them and the bench no longer fit one carry), IEVO_PACK_IEVO=1 also bundles the
#   ievo binary, IEVO_PACK_BENCH=1 bench/bench_gpu_kernels (run it with IEVO_BENCH=1),
#   IEVO_PACK_TRACE=1 the CUPTI tracer with its libcupti (tools/cupti_trace.sh; 4 MB),
#   IEVO_PACK_NOBUILD=1 bundles what is already built. The bundle mirrors the build tree: the
#   gpu-labelled test executables (debug info stripped), every CTestTestfile.cmake, the non-system
#   shared libraries they need that the device image may lack (build-dev/lib-all; run links in
#   only those ldd reports missing there), and the configure-time paths (build-dev/paths.env). The
#   working tree plus the bundle must stay under the device tool's 64 MiB carry limit; pack prints
#   the total.
# run:  IEVO_SKIP_CTEST=1 skips the ctest pass (e.g. for IEVO_DEVICE_EXTRA=tools/device_checks.sh,
#   which runs its own tests); IEVO_MEMCHECK=1 adds compute-sanitizer memcheck over test_gpu_ops
#   (filter with IEVO_MEMCHECK_FILTER, a gtest filter; time limit IEVO_MEMCHECK_TIMEOUT seconds,
#   default 240); IEVO_GTEST_FILTER restricts the gpu tests; failed cases are rerun one per
#   process with IEVO_CUDA_SYNC=1; IEVO_DEVICE_EXTRA is a command run at the end with the same
#   library path, e.g.
#   IEVO_DEVICE_EXTRA='build-dev/ievo train configs/tinyllama-1.1b.yaml --set train.steps=6'.
#   Logs: $OUT/device.log, ctest.log, summary.txt ([gpu] error lines), memcheck.log, bench.log.
# Seen on the device (H100, 2026-11-25): Ubuntu 24.04, CUDA 13 in /usr/local/cuda, cuDNN 9 in
#   /lib/x86_64-linux-gnu, OpenBLAS, HDF5 and the gcc runtime present: of ievo's and the tests'
#   libraries only libbenchmark was missing.
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=build-dev

pack() {
  set -e
  local build=${IEVO_BUILD_DIR:-build-cuda}
  [ -f "$build/CMakeCache.txt" ] || { echo "pack: $build is not configured (IEVO_CUDA=ON IEVO_BUILD_DIR=$build tools/setup.sh)"; exit 1; }
  local tests
  tests=${IEVO_PACK_TESTS:-$(cd "$build" && ninja -t targets all 2>/dev/null | grep -o '^test_gpu_[a-z0-9_]*:' | tr -d ':' | sort -u)}
  [ -n "$tests" ] || { echo "pack: no test_gpu_* targets in $build"; exit 1; }
  local targets="$tests"
  [ "${IEVO_PACK_IEVO:-0}" = 1 ] && targets="$targets ievo"
  [ "${IEVO_PACK_BENCH:-0}" = 1 ] && targets="$targets bench_gpu_kernels"
  # IEVO_PACK_NOBUILD=1: bundle what is built (e.g. while unrelated half-written files break the
  # full build; check the binaries are newer than the sources that matter).
  [ "${IEVO_PACK_NOBUILD:-0}" = 1 ] || cmake --build "$build" --target $targets -j"$(nproc)"
  rm -rf "$DEV"
  mkdir -p "$DEV/lib-all"
  (cd "$build" && find . -name CTestTestfile.cmake) | while read -r f; do
    mkdir -p "$DEV/$(dirname "$f")"
    cp "$build/$f" "$DEV/$f"
  done
  local bins=""
  for t in $tests; do bins="$bins tests/$t"; done
  [ "${IEVO_PACK_IEVO:-0}" = 1 ] && bins="$bins ievo"
  [ "${IEVO_PACK_BENCH:-0}" = 1 ] && bins="$bins bench/bench_gpu_kernels"
  for b in $bins; do
    mkdir -p "$DEV/$(dirname "$b")"
    cp "$build/$b" "$DEV/$b"
    strip --strip-debug "$DEV/$b"
  done
  if [ "${IEVO_PACK_TRACE:-0}" = 1 ]; then  # the CUPTI tracer (tools/cupti_trace.sh) and its libcupti
    mkdir -p "$DEV/tools"
    cp "$build/tools/libievo_cupti_trace.so" "$DEV/tools/"
    cp -L "$(ldd "$build/tools/libievo_cupti_trace.so" | awk '/libcupti/ {print $3}')" "$DEV/tools/"
  fi
  # Shared libraries outside glibc/libstdc++ and CUDA: the device image (Ubuntu 24.04, CUDA 13)
  # may not have them; run links in only those it lacks.
  for b in $bins; do ldd "$build/$b"; done | awk '/=> \//{print $1" "$3}' | sort -u | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*|libdl.so*|librt.so*) ;;
      libcuda.so*|libcudart*|libcublas*|libcudnn*|libnvrtc*|libnvJitLink*|libnccl*) ;;  # NCCL: PyTorch's wheel there
      # Seen present on the device image (2026-11-25): not carried (openblas alone is 36 MB).
      libopenblas.so*|libgfortran.so*|libquadmath.so*|libgomp.so*|libz.so*) ;;
      *) cp -L "$path" "$DEV/lib-all/$name" ;;
    esac
  done
  {
    echo "SRC=$(grep '^CMAKE_HOME_DIRECTORY:' "$build/CMakeCache.txt" | cut -d= -f2)"
    echo "BLD=$(cd "$build" && pwd)"
    echo "COMMIT=$(git rev-parse --short HEAD)"
  } > "$DEV/paths.env"
  local tree bundle
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  bundle=$(du -sb "$DEV" | cut -f1)
  echo "pack: $DEV = $((bundle / 1048576)) MiB, working tree = $((tree / 1048576)) MiB, total $(((bundle + tree) / 1048576)) MiB (limit 64)"
  ls -la "$DEV/lib-all"
  [ $((bundle + tree)) -lt $((63 * 1048576)) ] || { echo "pack: over the carry limit"; exit 1; }
}

# Finds a directory holding $1 on the device (CUDA toolkit, pip wheels), empty if none.
find_lib_dir() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib; do
    [ -e "$d/$1" ] && { echo "$d"; return; }
  done
  d=$(python3 - "$1" <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", sys.argv[1])):
        print(os.path.dirname(p)); sys.exit(0)
EOF
)
  echo "$d"
}

run() {
  local out=${OUT:-/tmp/ievo_device_out}
  mkdir -p "$out"
  exec > >(tee -a "$out/device.log") 2>&1
  [ -f "$DEV/paths.env" ] || { echo "run: $DEV/paths.env missing: pack first and carry $DEV"; exit 1; }
  # shellcheck disable=SC1091
  . "$DEV/paths.env"
  echo "== device run of commit $COMMIT at $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # CTest files name configure-time paths: point them here.
  find "$DEV" -name CTestTestfile.cmake -exec sed -i "s#$BLD#$PWD/$DEV#g; s#$SRC#$PWD#g" {} +
  local bin=$DEV/tests/test_gpu_ops
  # Libraries: CUDA ones from the toolkit or pip wheels, the rest from the bundle if missing.
  local missing extra=""
  missing=$(for b in "$bin" "$DEV/bench/bench_gpu_kernels" "$DEV/ievo"; do [ -x "$b" ] && ldd "$b"; done |
            awk '/not found/{print $1}' | sort -u)
  for lib in $missing; do
    case "$lib" in
      libcud*|libcublas*|libnvrtc*|libnvJitLink*|libnccl*)
        d=$(find_lib_dir "$lib"); [ -n "$d" ] && extra="$extra:$d" ;;
      *)
        mkdir -p "$DEV/lib"; [ -e "$DEV/lib-all/$lib" ] && ln -sf "$PWD/$DEV/lib-all/$lib" "$DEV/lib/$lib" ;;
    esac
  done
  export LD_LIBRARY_PATH="$PWD/$DEV/lib${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== ldd: missing before: ${missing:-none}"
  echo "== ldd: still missing: $(ldd "$bin" | awk '/not found/{print $1}' | tr '\n' ' ')"
  ldd "$bin" | grep -E "cudnn|cublas|cudart|nvrtc|openblas" || true
  export NCCL_NVLS_ENABLE=0
  [ -n "${IEVO_GTEST_FILTER:-}" ] && export GTEST_FILTER="$IEVO_GTEST_FILTER"
  echo "== ctest -L gpu"
  local t0=$SECONDS rc=0
  if [ "${IEVO_SKIP_CTEST:-0}" = 1 ]; then
    echo "(skipped: IEVO_SKIP_CTEST=1)"
    : > "$out/ctest.log"
  else
    ctest --test-dir "$DEV" -L gpu --output-on-failure -V --timeout "${IEVO_CTEST_TIMEOUT:-900}" 2>&1 | tee "$out/ctest.log"
    rc=${PIPESTATUS[0]}
  fi
  echo "== ctest exit $rc in $((SECONDS - t0)) s"
  grep -E "^[0-9]*: \[gpu\]|FAILED|PASSED|SKIPPED \]" "$out/ctest.log" | sed 's/^[0-9]*: //' > "$out/summary.txt" || true
  # A fault in one kernel poisons the CUDA context for the rest of the process: rerun each
  # failed case alone, synchronizing after every launch so errors name their kernel.
  if [ "$rc" != 0 ]; then
    sed -n 's/^[0-9]*: \[  FAILED  \] \([A-Za-z0-9_/.]*\).*/\1/p' "$out/ctest.log" | sort -u | head -40 |
      while read -r case_name; do
        echo "== rerun alone: $case_name"
        IEVO_CUDA_SYNC=1 timeout 120 "$bin" --gtest_filter="$case_name" 2>&1 | grep -vE "^\[ +(RUN|OK) " | tail -25
      done > "$out/reruns.log" 2>&1
    tail -c 6000 "$out/reruns.log"
  fi
  if [ "${IEVO_MEMCHECK:-0}" = 1 ]; then
    echo "== compute-sanitizer memcheck"
    t0=$SECONDS
    timeout "${IEVO_MEMCHECK_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$bin" --gtest_filter="${IEVO_MEMCHECK_FILTER:-*}" > "$out/memcheck.log" 2>&1
    local mrc=$?
    tail -n 5 "$out/memcheck.log"
    echo "== memcheck exit $mrc in $((SECONDS - t0)) s ($(grep -c 'Invalid\|Error' "$out/memcheck.log") error lines)"
  fi
  if [ "${IEVO_BENCH:-0}" = 1 ] && [ -x "$DEV/bench/bench_gpu_kernels" ]; then
    echo "== bench_gpu_kernels"
    "$DEV/bench/bench_gpu_kernels" --benchmark_counters_tabular=true --benchmark_min_time=0.2 2>&1 | tee "$out/bench.log"
  fi
  if [ -n "${IEVO_DEVICE_EXTRA:-}" ]; then
    echo "== extra: $IEVO_DEVICE_EXTRA"
    bash -c "$IEVO_DEVICE_EXTRA"
  fi
  return "$rc"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
