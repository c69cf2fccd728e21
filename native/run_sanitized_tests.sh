#!/usr/bin/env bash
# Builds native/tests/test_native.cpp under ASan+UBSan and under TSan and runs
# both; then once more under ASan+UBSan without -march=native, which exercises
# the portable kernels, table CRC-32C and software f16 that ARM builds use.
# Used by CI; run from anywhere. SKIP_PORTABLE=1 skips the third build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="${JOBS:-2}"

run() {  # name, cmake flags...
  local name="$1"; shift
  local dir="$root/build/native-$name"
  echo "== $name"
  cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" > "$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
  cmake --build "$dir" -j "$jobs"
  "$dir/native_tests"
}

mkdir -p "$root/build"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  run asan -DEDGEMOE_SANITIZE=ON
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
  run tsan -DEDGEMOE_TSAN=ON
if [[ "${SKIP_PORTABLE:-0}" != 1 ]]; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run asan-portable -DEDGEMOE_SANITIZE=ON -DEDGEMOE_NATIVE_ARCH=OFF
fi
echo "sanitized native tests passed"
