// Shared by the files that bind the native core as edgemoe._core (bindings.cpp
// holds the module; bind_*.cpp one concern each): array types, argument
// helpers, and one bind_* function per concern, which the module calls in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>

#include "kernels.h"

namespace edgemoe::python {

namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

// x as [T, cols] (a 1-D x is one token); returns T. Errors start with `what`.
int64_t tokens_of(const FloatArray& x, uint32_t cols, const char* what);

// A new float32 array for n outputs per token of x: [n] for a 1-D x, else [T, n].
FloatArray output_like(const FloatArray& x, int64_t T, int64_t n);

// A float weight w [out, in] of kind 'f32' (float32), 'f16' (float16 or uint16 bits) or
// 'bf16' (uint16 bits), viewed in place; errors start with `what`.
QMatrix float_matrix(const py::array& w, const std::string& kind, const std::string& what);

// The bytes of a C-contiguous buffer: (first byte, length).
std::pair<const uint8_t*, uint64_t> bytes_of(const py::buffer& b);

// Each adds one concern's functions and classes to the module m.
void bind_errors(py::module_& m);        // bindings.cpp: CorruptExpertError, BudgetError, ModelDirectoryError
void bind_threads(py::module_& m);       // bindings.cpp: the kernels' thread pool
void bind_kernels(py::module_& m);       // bind_kernels.cpp: matmuls, the SwiGLU expert, stream_read
void bind_sampler(py::module_& m);       // bind_dense.cpp: next-token sampling
void bind_dense_ops(py::module_& m);     // bind_dense.cpp: RMSNorm, RoPE, attention, routing
void bind_store(py::module_& m);         // bind_cache.cpp: CRC-32C, ExpertStore
void bind_cache(py::module_& m);         // bind_cache.cpp: ExpertCache, moe_forward
void bind_decode_layer(py::module_& m);  // bind_dense.cpp: DecodeLayer (after bind_cache)
void bind_link(py::module_& m);          // bind_link.cpp: LinkSwitch (the link emulator's loop)

}  // namespace edgemoe::python
