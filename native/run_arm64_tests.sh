#!/usr/bin/env bash
# Cross-builds native/tests/test_native.cpp and the core for aarch64 once (Debian's
# g++-aarch64-linux-gnu, cmake/aarch64-linux-gnu.cmake) and runs it under qemu-aarch64
# as three CPUs: a Cortex-A72 (Pi 4: plain NEON), a Cortex-A76 (Pi 5: dotprod) and
# qemu's max (dotprod and i8mm). Each run checks the NEON kernels against the portable
# ones and that the run-time dispatch picked the level that CPU has.
# Used by CI; run from anywhere. Needs: apt-get install g++-aarch64-linux-gnu qemu-user
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="${JOBS:-2}"
dir="$root/build/native-arm64"

for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
  command -v "$tool" > /dev/null || { echo "$tool not found: apt-get install g++-aarch64-linux-gnu qemu-user"; exit 1; }
done
mkdir -p "$root/build"
echo "== cross-build for aarch64"
cmake -S "$root" -B "$dir" -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DEDGEMOE_NATIVE_ARCH=OFF -DCMAKE_BUILD_TYPE=Release > "$dir.configure.log" 2>&1 \
  || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" -j "$jobs" --target native_tests

export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu  # the target's dynamic loader and libc
for cpu_level in cortex-a72:neon cortex-a76:neon+dotprod max:neon+dotprod+i8mm; do
  cpu="${cpu_level%%:*}" level="${cpu_level#*:}"
  echo "== qemu-aarch64 -cpu $cpu (has $level)"
  EDGEMOE_EXPECT_SIMD="$level" qemu-aarch64 -cpu "$cpu" "$dir/native_tests"
done
echo "arm64 native tests passed"
