#include "kernels.h"

namespace edgemoe {

const char* simd_name() {
#if defined(__AVX2__) && defined(__F16C__)
  return "avx2+f16c";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "portable";
#endif
}

}  // namespace edgemoe
