#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "edgemoe native core";
  m.def("simd", &edgemoe::simd_name, "Which kernel path this build uses.");
}
