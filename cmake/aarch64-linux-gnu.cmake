# Cross-compiling for 64-bit ARM Linux (Raspberry Pi 4/5, Jetson) from x86-64 with
# Debian's g++-aarch64-linux-gnu. The binaries run on the board or under
# qemu-aarch64 (native/run_arm64_tests.sh). Use with EDGEMOE_NATIVE_ARCH=OFF: the
# build machine is not the target, so -march=native means nothing here; pass the
# board's -mcpu through CMAKE_CXX_FLAGS if wanted (docs/arm64.md).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
