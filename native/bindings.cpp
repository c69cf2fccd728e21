// pybind11 binding of the native core as the private module edgemoe._core.
// Every call that does real work releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "common.h"
#include "crc32c.h"
#include "kernels.h"
#include "store.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace edgemoe;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

// x as [T, cols] (a 1-D x is one token); returns T.
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

FloatArray run_matmul(const QMatrix& w, const FloatArray& x, const char* what) {
  const int64_t T = tokens_of(x, w.cols, what);
  FloatArray y = output_like(x, T, w.rows);
  const float* xp = x.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    matmul(w, xp, T, yp);
  }
  return y;
}

std::pair<const uint8_t*, uint64_t> bytes_of(const py::buffer& b) {
  py::buffer_info info = b.request();
  if (info.ndim > 1 && !(info.strides.back() == info.itemsize))
    throw std::invalid_argument("buffer must be C-contiguous");
  return {static_cast<const uint8_t*>(info.ptr), uint64_t(info.size) * uint64_t(info.itemsize)};
}

template <class T>
std::vector<T> table(const py::array& a, uint32_t L, uint32_t E, const char* name) {
  auto arr = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!arr || arr.ndim() != 2 || arr.shape(0) != int64_t(L) || arr.shape(1) != int64_t(E))
    throw std::invalid_argument(std::string(name) + " must be a [num_layers, num_experts] array");
  return std::vector<T>(arr.data(), arr.data() + arr.size());
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "edgemoe native core: expert store, cache, MoE layer and quantized kernels.";

  // Python classes from edgemoe.errors are the bases users catch.
  py::module_ errors = py::module_::import("edgemoe.errors");
  static py::exception<CorruptExpertError> corrupt(m, "CorruptExpertError", errors.attr("CorruptExpertError"));
  static py::exception<BudgetError> budget(m, "BudgetError", errors.attr("BudgetError"));
  static py::object model_dir_error = errors.attr("ModelDirectoryError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ModelDirectoryError& e) {
      py::set_error(model_dir_error, e.what());
    } catch (const CorruptExpertError& e) {
      py::set_error(corrupt, e.what());
    } catch (const BudgetError& e) {
      py::set_error(budget, e.what());
    }
  });

  m.def("simd", &simd_name,
        "Which kernel path this build uses: 'avx2+fma+f16c' (x86-64 built with -march=native) "
        "or 'portable' (plain C++, auto-vectorized; ARM builds). Chosen at build time.");
  m.def(
      "set_num_threads", [](int n) { ThreadPool::instance().set_num_threads(n); }, py::arg("n"),
      "Threads used by the compute kernels (default: hardware threads).");
  m.def(
      "get_num_threads", [] { return ThreadPool::instance().num_threads(); }, "Threads used by the compute kernels.");

  m.def(
      "crc32c",
      [](const py::buffer& data, uint32_t seed) {
        auto [p, n] = bytes_of(data);
        py::gil_scoped_release nogil;
        return crc32c(p, size_t(n), seed);
      },
      py::arg("data"), py::arg("seed") = 0,
      "CRC-32C (Castagnoli) of a buffer, as stored in the manifest. Chain with seed=previous result.");
  m.def(
      "stream_read",
      [](const py::buffer& data) {
        auto [p, n] = bytes_of(data);
        py::gil_scoped_release nogil;
        return stream_read(p, n);
      },
      py::arg("data"),
      "Read every byte of a buffer once on the kernel threads (returns a checksum of it):\n"
      "the memory bandwidth the kernels can hope for. For benchmarks.");
  m.def("crc32c_impl", &crc32c_impl, "Which CRC-32C implementation this build uses.");

  m.def(
      "linear",
      [](const FloatArray& x, const py::array& w, const std::string& kind) {
        if (w.ndim() != 2) throw std::invalid_argument("linear: w must be 2-D [out, in]");
        if (!(w.flags() & py::array::c_style)) throw std::invalid_argument("linear: w must be C-contiguous");
        Kind k;
        if (kind == "f32") {
          if (!py::isinstance<py::array_t<float>>(w)) throw std::invalid_argument("linear: kind 'f32' needs a float32 w");
          k = kF32;
        } else if (kind == "f16" || kind == "bf16") {
          if (w.itemsize() != 2 || !(w.dtype().kind() == 'f' || w.dtype().kind() == 'u'))
            throw std::invalid_argument("linear: kind '" + kind + "' needs a float16 or uint16 w");
          if (kind == "bf16" && w.dtype().kind() != 'u')
            throw std::invalid_argument("linear: kind 'bf16' needs w as uint16 bf16 bits");
          k = kind == "f16" ? kF16 : kBF16;
        } else {
          throw std::invalid_argument("linear: kind must be 'f32', 'f16' or 'bf16', got '" + kind + "'");
        }
        const QMatrix qm = float_view(w.data(), uint32_t(w.shape(0)), uint32_t(w.shape(1)), k);
        return run_matmul(qm, x, "linear");
      },
      py::arg("x"), py::arg("w"), py::arg("kind"),
      "y[T, out] = x[T, in] @ w[out, in].T for a float weight, read in place (no copy).\n\n"
      "kind: 'f32' (w float32), 'f16' (w float16 or uint16 bits), 'bf16' (w uint16 bits). "
      "A 1-D x is one token and gives a 1-D y.");

  m.def(
      "qmatrix_matmul",
      [](const FloatArray& x, const ByteArray& buf, uint64_t offset) {
        if (offset > uint64_t(buf.size())) throw std::invalid_argument("qmatrix_matmul: offset beyond the buffer");
        const QMatrix qm = parse_qmatrix(buf.data() + offset, uint64_t(buf.size()) - offset);
        return run_matmul(qm, x, "qmatrix_matmul");
      },
      py::arg("x"), py::arg("buf"), py::arg("offset") = 0,
      "y[T, rows] = x[T, cols] @ W.T for the QMatrix (any kind) stored in buf at offset.\n\n"
      "Numerics: f32 accumulation. On the AVX2 path a single token (T=1) times a group-quantized\n"
      "matrix rounds x to int16 per 32 values first (error <= 2^-16 of each block's max |x|); every\n"
      "other case uses x as given.");

  m.def(
      "expert_forward",
      [](const FloatArray& x, const ByteArray& blob) {
        const Expert e = parse_expert(blob.data(), uint64_t(blob.size()));
        const int64_t T = tokens_of(x, e.hidden(), "expert_forward");
        FloatArray y = output_like(x, T, e.hidden());
        const float* xp = x.data();
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          expert_forward(e, xp, T, yp);
        }
        return y;
      },
      py::arg("x"), py::arg("blob"),
      "SwiGLU of one expert blob: down(silu(gate x) * up x), x [T, hidden] -> [T, hidden].");

  py::class_<ExpertStore, std::shared_ptr<ExpertStore>>(
      m, "ExpertStore",
      "Reads expert blobs from the experts file: one pread per expert, O_DIRECT into 4 KiB aligned\n"
      "buffers when the filesystem allows it (buffered otherwise).\n\n"
      "offsets/sizes/checksums are [num_layers, num_experts]; size 0 marks 'no expert'.\n"
      "A blob whose CRC-32C differs raises CorruptExpertError naming layer and expert; a blob\n"
      "beyond the end of the file raises ModelDirectoryError at construction.")
      .def(py::init([](const std::string& path, const py::array& offsets, const py::array& sizes,
                       const py::array& checksums, bool direct, bool verify) {
             if (offsets.ndim() != 2) throw std::invalid_argument("offsets must be [num_layers, num_experts]");
             const auto L = uint32_t(offsets.shape(0)), E = uint32_t(offsets.shape(1));
             auto o = table<uint64_t>(offsets, L, E, "offsets");
             auto s = table<uint64_t>(sizes, L, E, "sizes");
             auto c = table<uint32_t>(checksums, L, E, "checksums");
             py::gil_scoped_release nogil;
             return std::make_shared<ExpertStore>(path, L, E, std::move(o), std::move(s), std::move(c), direct,
                                                  verify);
           }),
           py::arg("path"), py::arg("offsets"), py::arg("sizes"), py::arg("checksums"), py::arg("direct") = true,
           py::arg("verify") = true)
      .def_property_readonly("direct", &ExpertStore::direct, "True when reads use O_DIRECT.")
      .def_property_readonly("verify", &ExpertStore::verify, "True when reads check the CRC-32C.")
      .def_property_readonly("path", &ExpertStore::path)
      .def_property_readonly("num_layers", &ExpertStore::num_layers)
      .def_property_readonly("num_experts", &ExpertStore::num_experts)
      .def_property_readonly("file_bytes", &ExpertStore::file_bytes)
      .def("blob_size", &ExpertStore::blob_size, py::arg("layer"), py::arg("expert"),
           "The blob's exact byte length (0: no such expert).")
      .def(
          "read",
          [](const ExpertStore& s, uint32_t layer, uint32_t expert) {
            std::shared_ptr<Blob> b;
            {
              py::gil_scoped_release nogil;
              b = s.read(layer, expert);
            }
            ByteArray out(int64_t(b->size));
            std::memcpy(out.mutable_data(), b->data, size_t(b->size));
            return out;
          },
          py::arg("layer"), py::arg("expert"), "The blob's bytes (a copy), checksum verified.")
      .def("drop_page_cache", &ExpertStore::drop_page_cache,
           "Evict the experts file from the OS page cache (posix_fadvise DONTNEED), for benchmarks.");

  py::class_<ExpertCache, std::shared_ptr<ExpertCache>>(
      m, "ExpertCache",
      "Expert blobs resident in RAM under a byte budget (0 = unbounded), LRU.\n\n"
      "The budget counts each resident blob's buffer (its size rounded up to 4 KiB). Experts in use\n"
      "by moe_forward are pinned and never evicted. Thread-safe.")
      .def(py::init<std::shared_ptr<ExpertStore>, uint64_t>(), py::arg("store"), py::arg("budget_bytes") = 0)
      .def_property_readonly("budget_bytes", &ExpertCache::budget_bytes)
      .def_property_readonly("resident_bytes", &ExpertCache::resident_bytes)
      .def("contains", &ExpertCache::contains, py::arg("layer"), py::arg("expert"))
      .def("prefetch", &ExpertCache::prefetch, py::arg("layer"), py::arg("expert"),
           py::call_guard<py::gil_scoped_release>(),
           "Make the expert resident without pinning it (may evict). True if this call read it.\n"
           "Not counted as a hit or miss; counted in loads and bytes_read.")
      .def("clear", &ExpertCache::clear, "Evict every unpinned expert.")
      .def(
          "stats",
          [](const ExpertCache& c) {
            const CacheStats s = c.stats();
            py::dict d;
            d["hits"] = double(s.hits);
            d["misses"] = double(s.misses);
            d["loads"] = double(s.loads);
            d["evictions"] = double(s.evictions);
            d["bytes_read"] = double(s.bytes_read);
            d["read_seconds"] = s.read_seconds;
            d["resident_bytes"] = double(s.resident_bytes);
            d["peak_resident_bytes"] = double(s.peak_resident_bytes);
            d["direct_io"] = s.direct_io ? 1.0 : 0.0;
            return d;
          },
          "hits, misses (requests by moe_forward), loads (reads from the file), evictions,\n"
          "bytes_read (blob bytes loaded), read_seconds, resident_bytes, peak_resident_bytes,\n"
          "direct_io (1.0/0.0).")
      .def("reset_stats", &ExpertCache::reset_stats, "Zero the counters (resident bytes stay).");

  m.def(
      "moe_forward",
      [](ExpertCache& cache, int64_t layer, const FloatArray& x, const py::array& expert_ids,
         const FloatArray& weights) {
        auto ids = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(expert_ids);
        if (!ids) throw std::invalid_argument("moe_forward: expert_ids must be an integer array");
        if (x.ndim() != 2) throw std::invalid_argument("moe_forward: x must be [T, hidden]");
        const int64_t T = x.shape(0), H = x.shape(1);
        if (ids.ndim() != 2 || ids.shape(0) != T)
          throw std::invalid_argument("moe_forward: expert_ids must be [T, k] with T = " + std::to_string(T));
        const int64_t K = ids.shape(1);
        if (weights.ndim() != 2 || weights.shape(0) != T || weights.shape(1) != K)
          throw std::invalid_argument("moe_forward: weights must be [T, k] like expert_ids");
        if (layer < 0 || layer >= int64_t(cache.store().num_layers()))
          throw std::invalid_argument("moe_forward: layer " + std::to_string(layer) + " is out of range: the experts file has " +
                                      std::to_string(cache.store().num_layers()) + " layers");
        FloatArray y({T, H});
        const float* xp = x.data();
        const int32_t* ip = ids.data();
        const float* wp = weights.data();
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          moe_forward(cache, uint32_t(layer), xp, T, H, ip, wp, K, yp);
        }
        return y;
      },
      py::arg("cache"), py::arg("layer"), py::arg("x"), py::arg("expert_ids"), py::arg("weights"),
      "sum_k weights[t, k] * expert[expert_ids[t, k]](x[t]) for every token t.\n\n"
      "x [T, hidden], expert_ids/weights [T, k]. Each distinct expert is fetched from the cache once\n"
      "for all tokens that chose it (loaded on a miss, pinned while it computes). An out-of-range\n"
      "expert id raises ValueError.");
}
