// The AVX-512 kernels built a second time against SIMDe (SIMD Everywhere), whose
// portable versions of the AVX-512 intrinsics run on any x86-64 CPU: the same
// source as the core's kernels_avx512.cpp, as namespace avx512_simde, so the native
// tests check it against the portable kernels where the CPU lacks AVX-512.
#define EDGEMOE_AVX512_SIMDE 1
#include "../kernels_avx512.cpp"
