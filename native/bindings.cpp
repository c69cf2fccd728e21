// pybind11 binding of the native core as the private module edgemoe._core.
// Every call that does real work releases the GIL. The module calls one bind_*
// function per concern (bindings.h); the docstrings are written in each binding.
#include "bindings.h"

#include <exception>
#include <stdexcept>
#include <string>

#include "common.h"
#include "threadpool.h"

namespace edgemoe::python {

int64_t tokens_of(const FloatArray& x, uint32_t cols, const char* what) {
  if (x.ndim() != 1 && x.ndim() != 2) throw std::invalid_argument(std::string(what) + ": x must be 1-D or 2-D");
  const int64_t last = x.shape(x.ndim() - 1);
  if (last != int64_t(cols))
    throw std::invalid_argument(std::string(what) + ": x has " + std::to_string(last) +
                                " features but the weight has " + std::to_string(cols) + " columns");
  return x.ndim() == 1 ? 1 : x.shape(0);
}

FloatArray output_like(const FloatArray& x, int64_t T, int64_t n) {
  if (x.ndim() == 1) return FloatArray({n});
  return FloatArray({T, n});
}

QMatrix float_matrix(const py::array& w, const std::string& kind, const std::string& what) {
  if (w.ndim() != 2) throw std::invalid_argument(what + ": w must be 2-D [out, in]");
  if (!(w.flags() & py::array::c_style)) throw std::invalid_argument(what + ": w must be C-contiguous");
  Kind k;
  if (kind == "f32") {
    if (!py::isinstance<py::array_t<float>>(w)) throw std::invalid_argument(what + ": kind 'f32' needs a float32 w");
    k = kF32;
  } else if (kind == "f16" || kind == "bf16") {
    if (w.itemsize() != 2 || !(w.dtype().kind() == 'f' || w.dtype().kind() == 'u'))
      throw std::invalid_argument(what + ": kind '" + kind + "' needs a float16 or uint16 w");
    if (kind == "bf16" && w.dtype().kind() != 'u')
      throw std::invalid_argument(what + ": kind 'bf16' needs w as uint16 bf16 bits");
    k = kind == "f16" ? kF16 : kBF16;
  } else {
    throw std::invalid_argument(what + ": kind must be 'f32', 'f16' or 'bf16', got '" + kind + "'");
  }
  return float_view(w.data(), uint32_t(w.shape(0)), uint32_t(w.shape(1)), k);
}

std::pair<const uint8_t*, uint64_t> bytes_of(const py::buffer& b) {
  py::buffer_info info = b.request();
  if (info.ndim > 1 && !(info.strides.back() == info.itemsize))
    throw std::invalid_argument("buffer must be C-contiguous");
  return {static_cast<const uint8_t*>(info.ptr), uint64_t(info.size) * uint64_t(info.itemsize)};
}

void bind_errors(py::module_& m) {
  // Python classes from edgemoe.errors are the bases users catch.
  py::module_ errors = py::module_::import("edgemoe.errors");
  static py::exception<CorruptExpertError> corrupt(m, "CorruptExpertError", errors.attr("CorruptExpertError"));
  static py::exception<BudgetError> budget(m, "BudgetError", errors.attr("BudgetError"));
  static py::object model_dir_error = errors.attr("ModelDirectoryError");
  static py::object read_error = errors.attr("ExpertReadError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ExpertReadError& e) {
      py::set_error(read_error, e.what());
    } catch (const ModelDirectoryError& e) {
      py::set_error(model_dir_error, e.what());
    } catch (const CorruptExpertError& e) {
      py::set_error(corrupt, e.what());
    } catch (const BudgetError& e) {
      py::set_error(budget, e.what());
    }
  });
}

void bind_threads(py::module_& m) {
  m.def(
      "set_num_threads", [](int n) { ThreadPool::instance().set_num_threads(n); }, py::arg("n"),
      "Threads used by the compute kernels (default: hardware threads).");
  m.def(
      "get_num_threads", [] { return ThreadPool::instance().num_threads(); }, "Threads used by the compute kernels.");
  m.def(
      "set_thread_spin", [](int us) { ThreadPool::instance().set_spin_microseconds(us); }, py::arg("microseconds"),
      "How long the kernels' idle threads spin before sleeping (default 200): decode's matmuls come back\n"
      "to back; a process that computes now and then (a device's expert server) sets 0.");
  m.def(
      "wake_threads", [] { ThreadPool::instance().wake(); },
      "Wake the kernels' sleeping threads to spin (for the spin time) ready for the next matmul:\n"
      "called as a wait on something else ends (a cluster's answers), so that matmul does not pay\n"
      "their wake-up.");
  m.def(
      "get_thread_spin", [] { return ThreadPool::instance().spin_microseconds(); },
      "How long the kernels' idle threads spin before sleeping, microseconds.");
}

}  // namespace edgemoe::python

PYBIND11_MODULE(_core, m) {
  using namespace edgemoe::python;
  m.doc() = "edgemoe native core: expert store, cache, MoE layer and quantized kernels.";
  bind_errors(m);
  bind_threads(m);
  bind_kernels(m);
  bind_sampler(m);
  bind_dense_ops(m);
  bind_store(m);
  bind_cache(m);
  bind_decode_layer(m);
  bind_link(m);
}
