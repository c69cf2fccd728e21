// edgemoe._core: the matmul kernels, the SwiGLU expert and stream_read (kernels.h).
#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "bindings.h"
#include "kernels.h"
#include "kernels_impl.h"
#include "threadpool.h"

namespace edgemoe::python {

namespace {

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

}  // namespace

void bind_kernels(py::module_& m) {
  m.def("simd", &simd_name,
        "Which kernel path runs: 'avx2+fma+f16c' (x86-64 built with -march=native), 'neon', "
        "'neon+dotprod' or 'neon+dotprod+i8mm' (every aarch64 build; the level is read from the "
        "CPU's features at run time) or 'portable' (plain C++); x86 CPUs with AVX-512 F/BW/VL/VNNI "
        "append '+avx512vnni' (those kernels are chosen at run time).");
  m.attr("GEMM_MIN_TOKENS") = kernels::kGemmMinTokens;
  m.def(
      "prefill_int8",
      [](const ByteArray& buf, uint64_t offset, bool expert) {
        if (offset > uint64_t(buf.size())) throw std::invalid_argument("prefill_int8: offset beyond the buffer");
        const QMatrix w = parse_qmatrix(buf.data() + offset, uint64_t(buf.size()) - offset);
        return expert ? prefill_int8_expert(w) : prefill_int8(w);
      },
      py::arg("buf"), py::arg("offset") = 0, py::arg("expert") = false,
      "Whether GEMM_MIN_TOKENS or more tokens times this QMatrix run the integer prefill kernels\n"
      "(x rounded per 32 values: to int8 for 4-bit codes, as one token's x; to int16 for 8-bit\n"
      "ones): 4- and 8-bit codes on the AVX2 path (and AVX-512); expert=True asks the same of an\n"
      "expert's matrix (the same answer).");
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
      "Numerics: f32 accumulation. On the AVX2 and NEON paths a single token (T=1) times a group-quantized\n"
      "matrix rounds x per 32 values first: to int8 for 4-bit codes (error <= 1/254 of each block's\n"
      "max |x|), to int16 for 2/3/8-bit ones (<= 2^-16); GEMM_MIN_TOKENS or more tokens times a matrix\n"
      "for which prefill_int8 holds round x per 32 values too (int8; int16 for 8-bit codes); every\n"
      "other case uses x as given.");

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
            throw std::invalid_argument("qmatrix_matmul_many: the matrices have " + std::to_string(ws[0].cols) +
                                        " and " + std::to_string(w.cols) + " columns; they must share x");
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
      "One expert blob: down(silu(gate x) * up x) (SwiGLU) or down(relu(up x)) (two matrices),\n"
      "x [T, hidden] -> [T, hidden].");

  m.def(
      "round_rows_x8",
      [](const FloatArray& x, float min_amax) -> py::object {
        if (x.ndim() != 2) throw std::invalid_argument("round_rows_x8: x must be [tokens, hidden]");
        const int64_t T = x.shape(0);
        const auto H = uint32_t(x.shape(1));
        py::array_t<int8_t> q({T, int64_t(H)});
        FloatArray amax({T, int64_t(H / 32)});
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = round_rows_x8(x.data(), T, H, min_amax, q.mutable_data(), amax.mutable_data());
        }
        if (!ok) return py::none();
        return py::make_tuple(q, amax);
      },
      py::arg("x"), py::arg("min_amax"),
      "x [T, hidden] float32 -> (q int8 [T, hidden], amax float32 [T, hidden / 32]), each block of\n"
      "32 rounded as the one-token decode kernels round a 4-bit matrix's input (step amax / 127,\n"
      "nearest, ties to even), or None where that cannot be undone exactly (hidden not a multiple\n"
      "of 32, a value not finite, a block maximum below min_amax).");

  m.def(
      "unround_rows_x8",
      [](const py::array_t<int8_t, py::array::c_style | py::array::forcecast>& q, const FloatArray& amax) {
        if (q.ndim() != 2 || amax.ndim() != 2 || q.shape(1) % 32 || amax.shape(0) != q.shape(0) ||
            amax.shape(1) != q.shape(1) / 32)
          throw std::invalid_argument("unround_rows_x8: q must be [T, hidden] (hidden a multiple of 32) and amax "
                                      "[T, hidden / 32]");
        const int64_t T = q.shape(0);
        const auto H = uint32_t(q.shape(1));
        FloatArray x({T, int64_t(H)});
        {
          py::gil_scoped_release nogil;
          unround_rows_x8(q.data(), amax.data(), T, H, x.mutable_data());
        }
        return x;
      },
      py::arg("q"), py::arg("amax"),
      "round_rows_x8's (q, amax) -> x [T, hidden] float32 that the decode kernels round to the same\n"
      "q and step: q * (amax / 127), and exactly +-amax where |q| is 127.");

  m.def(
      "experts_forward",
      [](const std::vector<FloatArray>& xs, const std::vector<ByteArray>& blobs) {
        if (xs.size() != blobs.size())
          throw std::invalid_argument("experts_forward: " + std::to_string(xs.size()) + " inputs for " +
                                      std::to_string(blobs.size()) + " experts");
        std::vector<Expert> es;
        std::vector<int64_t> ts;
        std::vector<const float*> xp;
        std::vector<float*> yp;
        py::list out;
        for (size_t i = 0; i < blobs.size(); ++i) {
          es.push_back(parse_expert(blobs[i].data(), uint64_t(blobs[i].size())));
          ts.push_back(tokens_of(xs[i], es.back().hidden(), "experts_forward"));
          FloatArray y = output_like(xs[i], ts.back(), es.back().hidden());
          xp.push_back(xs[i].data());
          yp.push_back(y.mutable_data());
          out.append(y);
        }
        ThreadPool& pool = ThreadPool::instance();
        // one token through each: whole experts, one per thread, when that shares the bytes
        // evenly (the rule decode's layer follows; a lone expert runs on the calling thread
        // alone), else each expert split over the threads
        bool whole = std::all_of(ts.begin(), ts.end(), [](int64_t t) { return t == 1; });
        if (whole && es.size() > 1) {
          std::vector<uint64_t> sizes;
          for (const auto& b : blobs) sizes.push_back(uint64_t(b.size()));
          whole = pool.whole_jobs_even(sizes);
        }
        {
          py::gil_scoped_release nogil;
          if (whole) {
            std::vector<std::exception_ptr> errors(es.size());
            pool.parallel_for(int64_t(es.size()), [&](int64_t i) {
              try {
                expert_forward(es[size_t(i)], xp[size_t(i)], 1, yp[size_t(i)]);
              } catch (...) {
                errors[size_t(i)] = std::current_exception();
              }
            });
            for (const auto& err : errors)
              if (err) std::rethrow_exception(err);
          } else {
            for (size_t i = 0; i < es.size(); ++i) expert_forward(es[i], xp[i], ts[i], yp[i]);
          }
        }
        return out;
      },
      py::arg("xs"), py::arg("blobs"),
      "[expert_forward(x, blob) for x, blob in zip(xs, blobs)] in one call: when each x is one\n"
      "token, whole experts run one per thread (if that shares the bytes evenly; one expert: on\n"
      "the calling thread alone), as decode's layer runs its resident experts. The same numbers\n"
      "as expert_forward each.");
}

}  // namespace edgemoe::python
