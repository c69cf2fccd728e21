#pragma once

namespace edgemoe {
const char* simd_name();
}
