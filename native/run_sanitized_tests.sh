#!/usr/bin/env bash
# Builds native/tests/test_native.cpp twice, under ASan+UBSan and under TSan,
# and runs both. Used by CI; run from anywhere.
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
echo "sanitized native tests passed"
