// pybind11 binding of the native core as the private module edgemoe._core.
// Every call that does real work releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "common.h"
#include "crc32c.h"
#include "dense.h"
#include "cache.h"
#include "kernels.h"
#include "layer.h"
#include "moe.h"
#include "policy.h"
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

// A DecodeLayer and the arrays its views point into.
struct PyDecodeLayer {
  DecodeLayer L;
  std::vector<py::object> keep;
};

// A float weight w [out, in] of kind 'f32' (float32), 'f16' (float16 or uint16 bits) or
// 'bf16' (uint16 bits), viewed in place; errors start with `what`.
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

// A linear given as (array, kind): 'qmatrix' (U8 QMatrix buffer) or a float kind (float_matrix).
QMatrix linear_of(const py::tuple& t, std::vector<py::object>& keep) {
  if (t.size() != 2) throw std::invalid_argument("DecodeLayer: a linear is an (array, kind) pair");
  const py::array w = t[0].cast<py::array>();
  const std::string kind = t[1].cast<std::string>();
  keep.push_back(w);
  if (kind != "qmatrix") return float_matrix(w, kind, "DecodeLayer");
  if (!(w.flags() & py::array::c_style)) throw std::invalid_argument("DecodeLayer: w must be C-contiguous");
  if (w.dtype().kind() != 'u' || w.itemsize() != 1) throw std::invalid_argument("DecodeLayer: a QMatrix is uint8");
  return parse_qmatrix(static_cast<const uint8_t*>(w.data()), uint64_t(w.nbytes()));
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

// ExpertStore's verify: True / "first read", "every read", False / "never".
Verify verify_mode(const py::object& v) {
  if (py::isinstance<py::bool_>(v)) return v.cast<bool>() ? Verify::kFirstRead : Verify::kNever;
  if (py::isinstance<py::str>(v)) {
    const auto name = v.cast<std::string>();
    if (name == "first read") return Verify::kFirstRead;
    if (name == "every read") return Verify::kEveryRead;
    if (name == "never") return Verify::kNever;
  }
  throw std::invalid_argument("verify must be True, False, 'first read', 'every read' or 'never', got " +
                              py::repr(v).cast<std::string>());
}

py::dict layer_dict(const LayerStats& s) {
  py::dict d;
  d["hits"] = double(s.hits);
  d["misses"] = double(s.misses);
  d["loads"] = double(s.loads);
  d["evictions"] = double(s.evictions);
  d["fallback_uses"] = double(s.fallback_uses);
  d["fallback_loads"] = double(s.fallback_loads);
  d["fallback_bytes"] = double(s.fallback_bytes);
  d["fallback_bytes_saved"] = double(s.fallback_bytes_saved);
  d["bytes_read"] = double(s.bytes_read);
  d["read_seconds"] = s.read_seconds;
  d["demand_bytes"] = double(s.demand_bytes);
  d["prefetch_issued"] = double(s.prefetch_issued);
  d["prefetch_loads"] = double(s.prefetch_loads);
  d["prefetch_bytes"] = double(s.prefetch_bytes);
  d["prefetch_hits"] = double(s.prefetch_hits);
  d["prefetch_cancelled"] = double(s.prefetch_cancelled);
  d["prefetch_dropped"] = double(s.prefetch_dropped);
  d["wasted_prefetch_bytes"] = double(s.wasted_prefetch_bytes);
  d["stall_seconds"] = s.stall_seconds;
  d["compute_seconds"] = s.compute_seconds;
  return d;
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
        return run_matmul(float_matrix(w, kind, "linear"), x, "linear");
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
      "matrix rounds x per 32 values first: to int8 for 4-bit codes (error <= 1/254 of each block's\n"
      "max |x|), to int16 for 2/3/8-bit ones (<= 2^-16); every other case uses x as given.");

  m.def(
      "qmatrix_matmul_many",
      [](const FloatArray& x, const std::vector<ByteArray>& bufs) {
        if (bufs.empty()) throw std::invalid_argument("qmatrix_matmul_many: give at least one matrix");
        std::vector<QMatrix> ws;
        for (const ByteArray& b : bufs) ws.push_back(parse_qmatrix(b.data(), uint64_t(b.size())));
        const int64_t T = tokens_of(x, ws[0].cols, "qmatrix_matmul_many");
        py::list out;
        std::vector<float*> ys;
        for (const QMatrix& w : ws) {
          if (w.cols != ws[0].cols)
            throw std::invalid_argument("qmatrix_matmul_many: the matrices have " + std::to_string(ws[0].cols) + " and " +
                                        std::to_string(w.cols) + " columns; they must share x");
          FloatArray y = output_like(x, T, w.rows);
          ys.push_back(y.mutable_data());
          out.append(y);
        }
        const float* xp = x.data();
        {
          py::gil_scoped_release nogil;
          matmul_many(ws.data(), ws.size(), xp, T, ys.data());
        }
        return out;
      },
      py::arg("x"), py::arg("bufs"),
      "[x @ W.T for W in bufs]: several QMatrix buffers (offset 0) of the same cols applied to\n"
      "one x (a layer's q, k and v) in one call; for one token x is rounded once per width and\n"
      "one pass over the threads covers every matrix. The same numbers as qmatrix_matmul each.");

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

  // -- next-token sampling (dense.h) --
  m.def(
      "sample",
      [](const FloatArray& logits, double temperature, int64_t top_k, double top_p, double u) {
        if (logits.ndim() != 1) throw std::invalid_argument("sample: logits must be 1-D [vocab]");
        const float* lp = logits.data();
        const int64_t n = logits.shape(0);
        py::gil_scoped_release nogil;
        return sample_logits(lp, n, temperature, top_k, top_p, u);
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("u"),
      "The token drawn from logits [vocab] at temperature > 0 with top_k (0: all) and top_p\n"
      "(nucleus; 1: all), u a uniform draw in [0, 1): the inverse of the kept tokens' cumulative\n"
      "weights in token-id order (native/dense.h gives the exact rule).");

  // -- the dense ops around the matmuls (dense.h) --
  m.def(
      "rms_norm",
      [](const FloatArray& x, const FloatArray& w, float eps) {
        if (x.ndim() < 1 || w.ndim() != 1 || x.shape(x.ndim() - 1) != w.shape(0))
          throw std::invalid_argument("rms_norm: w must be 1-D with as many values as x's last axis");
        const int64_t n = w.shape(0), rows = n ? x.size() / n : 0;
        FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        const float *xp = x.data(), *wp = w.data();
        float* yp = y.mutable_data();
        py::gil_scoped_release nogil;
        rms_norm(xp, wp, rows, n, eps, yp);
        return y;
      },
      py::arg("x"), py::arg("w"), py::arg("eps"),
      "x / sqrt(mean(x^2) + eps) * w over x's last axis; a new array shaped like x.");
  m.def(
      "rope",
      [](py::array_t<float, py::array::c_style> x, int64_t start, const FloatArray& inv_freq) {
        if (x.ndim() != 3 || x.shape(2) % 2 || inv_freq.ndim() != 1 || inv_freq.shape(0) * 2 != x.shape(2))
          throw std::invalid_argument("rope: x must be [T, heads, head_dim] and inv_freq [head_dim / 2]");
        if (start < 0) throw std::invalid_argument("rope: start must be >= 0");
        float* xp = x.mutable_data();
        const float* fp = inv_freq.data();
        const int64_t T = x.shape(0), heads = x.shape(1), hd = x.shape(2);
        py::gil_scoped_release nogil;
        rope(xp, T, heads, hd, start, fp);
      },
      py::arg("x").noconvert(), py::arg("start"), py::arg("inv_freq"),
      "Rotary embedding in place (rotate-half convention) on float32 x [T, heads, head_dim] at\n"
      "positions start..start+T-1.");
  m.def(
      "attention",
      [](const FloatArray& q, const FloatArray& k, const FloatArray& v, int64_t start, int64_t window) {
        if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
          throw std::invalid_argument("attention: q, k, v must be [T, heads, hd], [S, kv_heads, hd], [S, kv_heads, hd]");
        const int64_t T = q.shape(0), heads = q.shape(1), hd = q.shape(2), S = k.shape(0), kvh = k.shape(1);
        if (k.shape(2) != hd || v.shape(0) != S || v.shape(1) != kvh || v.shape(2) != hd || kvh == 0 ||
            heads % kvh)
          throw std::invalid_argument("attention: k and v must be [S, kv_heads, hd] with kv_heads dividing heads");
        if (start < 0 || S != start + T)
          throw std::invalid_argument("attention: the cache holds " + std::to_string(S) + " positions, expected start + T = " +
                                      std::to_string(start + T));
        FloatArray out({T, heads * hd});
        const float *qp = q.data(), *kp = k.data(), *vp = v.data();
        float* op = out.mutable_data();
        py::gil_scoped_release nogil;
        attention(qp, T, heads, hd, kp, vp, S, kvh, start, window, op);
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("start"), py::arg("window") = 0,
      "Causal grouped-query attention: q [T, heads, hd] at positions start.., k and v the whole\n"
      "cache [start + T, kv_heads, hd]. window > 0: a query sees only its last `window` keys.\n"
      "Returns [T, heads * hd].");
  m.def(
      "softmax_topk",
      [](const FloatArray& logits, int64_t k, bool normalize) {
        if (logits.ndim() != 2) throw std::invalid_argument("softmax_topk: logits must be [T, experts]");
        const int64_t T = logits.shape(0), E = logits.shape(1);
        if (k < 1 || k > E) throw std::invalid_argument("softmax_topk: k must be in 1.." + std::to_string(E));
        py::array_t<int32_t> ids({T, k});
        FloatArray w({T, k});
        const float* lp = logits.data();
        int32_t* ip = ids.mutable_data();
        float* wp = w.mutable_data();
        {
          py::gil_scoped_release nogil;
          softmax_topk(lp, T, E, k, normalize, ip, wp);
        }
        return py::make_tuple(ids, w);
      },
      py::arg("logits"), py::arg("k"), py::arg("normalize"),
      "Softmax over each row of logits [T, E], then its k largest (largest first, lower id on a\n"
      "tie), renormalized to sum 1 if normalize: (ids int32 [T, k], weights float32 [T, k]).");

  py::class_<ExpertStore, std::shared_ptr<ExpertStore>>(
      m, "ExpertStore",
      "Reads expert blobs from the experts file: one pread per expert, O_DIRECT into 4 KiB aligned\n"
      "buffers when the filesystem allows it (buffered otherwise).\n\n"
      "offsets/sizes/checksums are [num_layers, num_experts]; size 0 marks 'no expert'.\n"
      "A blob whose CRC-32C differs raises CorruptExpertError naming layer and expert; a blob\n"
      "beyond the end of the file raises ModelDirectoryError at construction.\n"
      "verify: True or 'first read' (default) checks each blob's CRC-32C on its first read by\n"
      "this store; 'every read' on every read; False never.\n"
      "read_bytes_per_s / read_latency_s > 0 emulate a slower device's storage (see set_throttle).")
      .def(py::init([](const std::string& path, const py::array& offsets, const py::array& sizes,
                       const py::array& checksums, bool direct, const py::object& verify, double bps,
                       double latency) {
             const Verify v = verify_mode(verify);
             if (offsets.ndim() != 2) throw std::invalid_argument("offsets must be [num_layers, num_experts]");
             const auto L = uint32_t(offsets.shape(0)), E = uint32_t(offsets.shape(1));
             auto o = table<uint64_t>(offsets, L, E, "offsets");
             auto s = table<uint64_t>(sizes, L, E, "sizes");
             auto c = table<uint32_t>(checksums, L, E, "checksums");
             py::gil_scoped_release nogil;
             return std::make_shared<ExpertStore>(path, L, E, std::move(o), std::move(s), std::move(c), direct,
                                                  v, bps, latency);
           }),
           py::arg("path"), py::arg("offsets"), py::arg("sizes"), py::arg("checksums"), py::arg("direct") = true,
           py::arg("verify") = true, py::arg("read_bytes_per_s") = 0.0, py::arg("read_latency_s") = 0.0)
      .def_property_readonly("direct", &ExpertStore::direct, "True when reads use O_DIRECT.")
      .def_property_readonly(
          "verify", [](const ExpertStore& st) { return std::string(verify_name(st.verify())); },
          "When reads check a blob's CRC-32C: 'first read' (each blob's first read by this store), "
          "'every read' or 'never'.")
      .def_property_readonly("path", &ExpertStore::path)
      .def_property_readonly("num_layers", &ExpertStore::num_layers)
      .def_property_readonly("num_experts", &ExpertStore::num_experts)
      .def_property_readonly("file_bytes", &ExpertStore::file_bytes)
      .def_property_readonly("read_bytes_per_s", &ExpertStore::read_bytes_per_s, "Emulated bandwidth (0 = off).")
      .def_property_readonly("read_latency_s", &ExpertStore::read_latency_s, "Emulated latency per read (0 = off).")
      .def("set_throttle", &ExpertStore::set_throttle, py::arg("read_bytes_per_s"), py::arg("read_latency_s") = 0.0,
           "Emulate a device's storage: a read of n bytes takes at least read_latency_s + n / read_bytes_per_s.\n"
           "Concurrent reads overlap their latency and share the bandwidth; a read that finishes early\n"
           "sleeps until its slot ends. 0 turns either part off. Figures: devices/profiles/*.json.")
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
      "Expert blobs resident in RAM under a byte budget (0 = unbounded), read by io_threads I/O\n"
      "threads, evicted by `policy`: 'lru', 'lfu' (demand uses, ties by recency) or 'edgemoe'\n"
      "(decayed activation rate / MoE layers until the expert's layer runs again).\n\n"
      "The budget bounds every buffer the cache holds, in flight included: each blob is charged\n"
      "its size rounded up to 4 KiB before it is read. Experts in use by moe_forward are pinned\n"
      "and never evicted. Demand reads go before prefetches. Thread-safe.\n\n"
      "fallback: an ExpertStore of low-bit copies of the experts (the model's experts.fallback.bin),\n"
      "or None. With fallback_threshold > 0, moe_forward serves a miss on an expert whose |gate\n"
      "weight| is below the threshold for every token of the call from its low-bit copy: its own\n"
      "cache entry, charged its own bytes. A use above the threshold always takes the full copy.")
      .def(py::init([](std::shared_ptr<ExpertStore> store, uint64_t budget_bytes, const std::string& policy,
                       int io_threads, std::shared_ptr<ExpertStore> fallback, float threshold) {
             const Policy p = policy_from_name(policy);
             auto c = std::make_shared<ExpertCache>(std::move(store), budget_bytes, p, io_threads, std::move(fallback));
             c->set_fallback_threshold(threshold);
             return c;
           }),
           py::arg("store"), py::arg("budget_bytes") = 0, py::arg("policy") = "lru", py::arg("io_threads") = 2,
           py::arg("fallback") = nullptr, py::arg("fallback_threshold") = 0.0f)
      .def_property_readonly("budget_bytes", &ExpertCache::budget_bytes)
      .def_property_readonly("resident_bytes", &ExpertCache::resident_bytes)
      .def_property_readonly("policy", [](const ExpertCache& c) { return std::string(policy_name(c.policy())); })
      .def_property_readonly("io_threads", &ExpertCache::io_threads)
      .def_property_readonly_static("entry_overhead_bytes", [](py::object) { return ExpertCache::kEntryBytes; },
                                    "Fixed bytes the cache keeps per (layer, expert) of the file, beyond the budget.")
      .def("contains", &ExpertCache::contains, py::arg("layer"), py::arg("expert"), py::arg("low_bit") = false,
           "True if the expert's full copy (low_bit: its low-bit copy) is resident.")
      .def_property("fallback_threshold", &ExpertCache::fallback_threshold, &ExpertCache::set_fallback_threshold,
                    "Gate weight below which a miss reads the low-bit copy (0 = off; > 0 needs a fallback store).")
      .def_property_readonly("has_fallback", py::overload_cast<>(&ExpertCache::has_fallback, py::const_),
                             "True when the cache was given a store of low-bit copies.")
      .def("load", &ExpertCache::load, py::arg("layer"), py::arg("expert"), py::call_guard<py::gil_scoped_release>(),
           "Make the expert resident now, without pinning it (may evict); blocks until it is.\n"
           "True if it was not resident. Not counted as a hit or miss; counted in loads and bytes_read.")
      .def("prefetch", &ExpertCache::load, py::arg("layer"), py::arg("expert"),
           py::call_guard<py::gil_scoped_release>(), "Blocking, one expert: the same as load(layer, expert).")
      .def("prefetch",
           [](ExpertCache& c, uint32_t layer, const std::vector<uint32_t>& experts, uint64_t max_bytes) {
             py::gil_scoped_release nogil;
             return c.prefetch(layer, experts, max_bytes);
           },
           py::arg("layer"), py::arg("experts"), py::arg("max_bytes") = 0,
           "Non-blocking: queue reads of `experts` of `layer`, most likely first; returns how many\n"
           "were queued. Skips experts resident, queued or being read, and stops before the bytes\n"
           "queued by this call would pass max_bytes (0: no cap). A queued read starts after every\n"
           "demand read; when it starts it evicts only unpinned experts the policy values less, never\n"
           "one of the layer computing now or of a layer that runs before it, else it is dropped.\n"
           "A wrong guess costs bandwidth, never correctness. Queues nothing when io_threads is 0.")
      .def("cancel_prefetches", &ExpertCache::cancel_prefetches, py::arg("layer") = -1,
           "Drop queued prefetches that have not started (all, or those of `layer`); returns how many.")
      .def("set_current_layer", &ExpertCache::set_current_layer, py::arg("layer"),
           "The layer computing now (moe_forward sets it): the edgemoe policy's distances, the layers\n"
           "a prefetch may not evict from, and token boundaries.")
      .def("wait_idle", &ExpertCache::wait_idle, py::call_guard<py::gil_scoped_release>(),
           "Block until no read is queued or in flight.")
      .def("clear", &ExpertCache::clear, "Cancel queued prefetches and evict every unpinned expert.")
      .def(
          "stats",
          [](const ExpertCache& c) {
            const CacheStats s = c.stats();
            py::dict d = layer_dict(s);
            d["resident_bytes"] = double(s.resident_bytes);
            d["peak_resident_bytes"] = double(s.peak_resident_bytes);
            d["direct_io"] = s.direct_io ? 1.0 : 0.0;
            return d;
          },
          "Totals over layers (see layer_stats) and resident_bytes (charged now: resident, in flight,\n"
          "reserved), peak_resident_bytes (<= budget), direct_io (1.0/0.0). All values are floats.")
      .def(
          "layer_stats",
          [](const ExpertCache& c) {
            py::list out;
            uint32_t layer = 0;
            for (const LayerStats& s : c.layer_stats()) {
              py::dict d = layer_dict(s);
              d["layer"] = layer++;
              out.append(d);
            }
            return out;
          },
          "One dict per layer of the experts file (model layer index), floats:\n"
          "hits / misses: demanded experts found resident / not; loads, bytes_read: reads (demand and\n"
          "prefetch) and their blob bytes; demand_bytes: read because a computation needed them;\n"
          "prefetch_issued (queued), prefetch_loads, prefetch_bytes (read), prefetch_hits (demanded\n"
          "while resident or in flight because of a prefetch), prefetch_cancelled (before starting),\n"
          "prefetch_dropped (no room worth taking), wasted_prefetch_bytes (prefetched, evicted unused);\n"
          "evictions; read_seconds (inside reads, all threads), stall_seconds (moe_forward waiting\n"
          "for reads), compute_seconds (moe_forward computing); fallback_uses (demands served by a\n"
          "low-bit copy, also in hits/misses), fallback_loads and fallback_bytes (its reads, also in\n"
          "loads/bytes_read), fallback_bytes_saved (per fallback use, the full copy's bytes minus the\n"
          "bytes read for it).")
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
      "for all tokens that chose it and pinned for the call: the missing ones are read by the I/O\n"
      "threads at once (a prefetch already reading one is waited for, not repeated) while the\n"
      "resident ones compute, then each missing one computes as it lands. The weighted sum runs in\n"
      "slot order, so y does not depend on what was cached. Sets the cache's current layer. An\n"
      "out-of-range expert id raises ValueError.\n\n"
      "With cache.fallback_threshold > 0, a missing expert whose |weights| are all below it (every\n"
      "token of the call) is computed from its low-bit copy instead; y then depends on the cache.");

  // -- one decode token through one decoder layer (layer.h) --
  py::class_<PyDecodeLayer>(
      m, "DecodeLayer",
      "One MoE decoder layer's weights for the one-call decode step (native/layer.h): the same ops\n"
      "and arithmetic as DecoderLM.block for one token. Linears are (array, kind) pairs: kind\n"
      "'qmatrix' (a U8 QMatrix buffer) or 'f32' / 'f16' / 'bf16' (a float matrix [out, in]).")
      .def(py::init([](uint32_t layer, const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& o,
                       const py::tuple& router, const FloatArray& attn_norm, const FloatArray& ffn_norm,
                       const FloatArray& inv_freq, uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                       uint32_t top_k, int64_t window, float eps, bool normalize) {
             auto self = std::make_unique<PyDecodeLayer>();
             DecodeLayer& L = self->L;
             L.layer = layer;
             L.q = linear_of(q, self->keep);
             L.k = linear_of(k, self->keep);
             L.v = linear_of(v, self->keep);
             L.o = linear_of(o, self->keep);
             L.router = linear_of(router, self->keep);
             L.hidden = L.q.cols;
             L.experts = L.router.rows;
             L.heads = heads;
             L.kv_heads = kv_heads;
             L.head_dim = head_dim;
             L.top_k = top_k;
             L.window = window;
             L.eps = eps;
             L.normalize = normalize;
             for (const FloatArray* a : {&attn_norm, &ffn_norm})
               if (a->ndim() != 1 || a->shape(0) != int64_t(L.hidden))
                 throw std::invalid_argument("DecodeLayer: norm weights must be [hidden]");
             if (inv_freq.ndim() != 1 || 2 * inv_freq.shape(0) != int64_t(head_dim))
               throw std::invalid_argument("DecodeLayer: inv_freq must be [head_dim / 2]");
             self->keep.push_back(attn_norm);
             self->keep.push_back(ffn_norm);
             self->keep.push_back(inv_freq);
             L.attn_norm = attn_norm.data();
             L.ffn_norm = ffn_norm.data();
             L.inv_freq = inv_freq.data();
             check_decode_layer(L);
             return self;
           }),
           py::arg("layer"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("router"),
           py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("inv_freq"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("top_k"), py::arg("window"), py::arg("eps"), py::arg("normalize"))
      .def(
          "step",
          [](const PyDecodeLayer& self, ExpertCache& cache, py::array_t<float, py::array::c_style> h,
             py::array_t<float, py::array::c_style> kc, py::array_t<float, py::array::c_style> vc, int64_t pos) {
            const DecodeLayer& L = self.L;
            if (h.ndim() != 1 || h.shape(0) != int64_t(L.hidden))
              throw std::invalid_argument("DecodeLayer.step: h must be float32 [hidden]");
            for (const auto* c : {&kc, &vc})
              if (c->ndim() != 3 || c->shape(1) != int64_t(L.kv_heads) || c->shape(2) != int64_t(L.head_dim))
                throw std::invalid_argument("DecodeLayer.step: the KV cache must be float32 [capacity, kv_heads, head_dim]");
            if (pos < 0 || kc.shape(0) <= pos || vc.shape(0) <= pos)
              throw std::invalid_argument("DecodeLayer.step: position " + std::to_string(pos) +
                                          " is outside the KV cache's capacity");
            if (L.layer >= cache.store().num_layers())
              throw std::invalid_argument("DecodeLayer.step: layer " + std::to_string(L.layer) +
                                          " is out of range for the experts file");
            float* hp = h.mutable_data();
            float* kp = kc.mutable_data();
            float* vp = vc.mutable_data();
            py::gil_scoped_release nogil;
            decode_layer(L, cache, hp, kp, vp, pos);
          },
          py::arg("cache"), py::arg("h").noconvert(), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
          py::arg("pos"),
          "The token at position pos through this layer: h [hidden] += attention + MoE, in place;\n"
          "writes position pos of k_cache / v_cache [capacity, kv_heads, head_dim] and attends to\n"
          "positions 0..pos.");
}
