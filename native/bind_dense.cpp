// edgemoe._core: next-token sampling, the dense ops around the matmuls (dense.h),
// and one decode token through one decoder layer (layer.h).
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "cache.h"
#include "dense.h"
#include "layer.h"

namespace edgemoe::python {

namespace {

// A DecodeLayer and the arrays its views point into.
struct PyDecodeLayer {
  DecodeLayer L;
  std::vector<py::object> keep;
};

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

using FloatBuffer = py::array_t<float, py::array::c_style>;

bool is_half(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 2; }

// The arguments step() and attend() share: h [hidden] and the KV cache, keys and values
// [kv_heads, capacity > pos, head_dim] each, C-contiguous, both float32 or both float16.
LayerKV step_args(const char* who, const DecodeLayer& L, const FloatBuffer& h, py::array& kc, py::array& vc,
                  int64_t pos) {
  const std::string at = std::string("DecodeLayer.") + who + ": ";
  if (h.ndim() != 1 || h.shape(0) != int64_t(L.hidden)) throw std::invalid_argument(at + "h must be float32 [hidden]");
  const bool half = is_half(kc);
  for (const py::array* c : {&kc, &vc})
    if (c->ndim() != 3 || c->shape(0) != int64_t(L.kv_heads) || c->shape(2) != int64_t(L.head_dim) ||
        c->shape(1) != kc.shape(1) || !(c->flags() & py::array::c_style) || !c->writeable() ||
        !(half ? is_half(*c) : c->dtype().is(py::dtype::of<float>())))
      throw std::invalid_argument(at +
                                  "the KV cache must be writable C-contiguous [kv_heads, capacity, head_dim] arrays, "
                                  "keys and values alike, float32 or float16");
  if (pos < 0 || kc.shape(1) <= pos)
    throw std::invalid_argument(at + "position " + std::to_string(pos) + " is outside the KV cache's capacity");
  return LayerKV{kc.mutable_data(), vc.mutable_data(), int64_t(kc.shape(1)), half};
}

// A key or value array [S, kv_heads, hd] as attention() reads it: float16 or float32 rows of
// hd contiguous values, in place when its strides allow (the decode cache's [kv_heads,
// capacity, hd] seen as [S, kv_heads, hd]), else a packed copy (other dtypes: float32).
py::array kv_rows(const py::array& a) {
  const bool half = is_half(a);
  const py::ssize_t e = half ? 2 : 4;
  if ((half || a.dtype().is(py::dtype::of<float>())) && a.ndim() == 3 && a.strides(2) == e && a.strides(0) > 0 &&
      a.strides(1) > 0 && a.strides(0) % e == 0 && a.strides(1) % e == 0)
    return a;
  if (half) return py::array::ensure(a, py::array::c_style);
  return py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
}

}  // namespace

void bind_sampler(py::module_& m) {
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
}

void bind_dense_ops(py::module_& m) {
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
      [](const FloatArray& q, const py::array& k_in, const py::array& v_in, int64_t start, int64_t window,
         const std::optional<FloatArray>& sinks) {
        py::array k = kv_rows(k_in), v = kv_rows(v_in);
        if (!k || !v) throw std::invalid_argument("attention: k and v must be arrays of float32 or float16");
        if (is_half(k) != is_half(v))
          throw std::invalid_argument("attention: k and v must have one dtype, float32 or float16");
        if (k.ndim() == 3 && v.ndim() == 3 && (k.strides(0) != v.strides(0) || k.strides(1) != v.strides(1))) {
          k = py::array::ensure(k, py::array::c_style);  // one layout for both
          v = py::array::ensure(v, py::array::c_style);
        }
        if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
          throw std::invalid_argument(
              "attention: q, k, v must be [T, heads, hd], [S, kv_heads, hd], [S, kv_heads, hd]");
        const int64_t T = q.shape(0), heads = q.shape(1), hd = q.shape(2), S = k.shape(0), kvh = k.shape(1);
        if (k.shape(2) != hd || v.shape(0) != S || v.shape(1) != kvh || v.shape(2) != hd || kvh == 0 || heads % kvh)
          throw std::invalid_argument("attention: k and v must be [S, kv_heads, hd] with kv_heads dividing heads");
        if (start < 0 || S != start + T)
          throw std::invalid_argument("attention: the cache holds " + std::to_string(S) +
                                      " positions, expected start + T = " + std::to_string(start + T));
        if (sinks && (sinks->ndim() != 1 || sinks->shape(0) != heads))
          throw std::invalid_argument("attention: sinks must be [heads] = [" + std::to_string(heads) + "]");
        FloatArray out({T, heads * hd});
        const float *qp = q.data(), *sp = sinks ? sinks->data() : nullptr;
        const void *kp = k.data(), *vp = v.data();
        const int64_t e = k.itemsize();
        const KVLayout kv{int64_t(k.strides(0)) / e, int64_t(k.strides(1)) / e, is_half(k)};
        float* op = out.mutable_data();
        py::gil_scoped_release nogil;
        attention(qp, T, heads, hd, kp, vp, S, kvh, start, window, op, sp, kv);
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("start"), py::arg("window") = 0, py::arg("sinks") = py::none(),
      "Causal grouped-query attention: q [T, heads, hd] at positions start.., k and v the whole\n"
      "cache [start + T, kv_heads, hd], float32 or float16, read in place when each row's head_dim\n"
      "values are contiguous. window > 0: a query sees only its last `window` keys.\n"
      "sinks [heads] float32: a logit per head added to each softmax's denominator (attention sinks).\n"
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
}

void bind_decode_layer(py::module_& m) {
  py::class_<PyDecodeLayer>(
      m, "DecodeLayer",
      "One MoE decoder layer's weights for the one-call decode step (native/layer.h): the same ops\n"
      "and arithmetic as DecoderLM.block for one token. Linears are (array, kind) pairs: kind\n"
      "'qmatrix' (a U8 QMatrix buffer) or 'f32' / 'f16' / 'bf16' (a float matrix [out, in]).")
      .def(py::init([](uint32_t layer, const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& o,
                       const py::tuple& router, const FloatArray& attn_norm, const FloatArray& ffn_norm,
                       const FloatArray& inv_freq, uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t top_k,
                       int64_t window, float eps, bool normalize) {
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
          [](const PyDecodeLayer& self, ExpertCache& cache, FloatBuffer h, py::array kc, py::array vc, int64_t pos) {
            const DecodeLayer& L = self.L;
            const LayerKV kv = step_args("step", L, h, kc, vc, pos);
            if (L.layer >= cache.store().num_layers())
              throw std::invalid_argument("DecodeLayer.step: layer " + std::to_string(L.layer) +
                                          " is out of range for the experts file");
            float* hp = h.mutable_data();
            py::gil_scoped_release nogil;
            decode_layer(L, cache, hp, kv, pos);
          },
          py::arg("cache"), py::arg("h").noconvert(), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
          py::arg("pos"),
          "The token at position pos through this layer: h [hidden] += attention + MoE, in place;\n"
          "writes position pos of k_cache / v_cache [kv_heads, capacity, head_dim] (float32, or\n"
          "float16 rounded to nearest) and attends to positions 0..pos.")
      .def(
          "attend",
          [](const PyDecodeLayer& self, FloatBuffer h, py::array kc, py::array vc, int64_t pos) {
            const DecodeLayer& L = self.L;
            const LayerKV kv = step_args("attend", L, h, kc, vc, pos);
            py::array_t<float> x({int64_t(1), int64_t(L.hidden)});
            py::array_t<int32_t> ids({int64_t(1), int64_t(L.top_k)});
            py::array_t<float> w({int64_t(1), int64_t(L.top_k)});
            float* hp = h.mutable_data();
            float* xp = x.mutable_data();
            int32_t* ip = ids.mutable_data();
            float* wp = w.mutable_data();
            {
              py::gil_scoped_release nogil;
              decode_attend(L, hp, kv, pos, xp, ip, wp);
            }
            return py::make_tuple(x, ids, w);
          },
          py::arg("h").noconvert(), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(), py::arg("pos"),
          "step() up to the experts, for a caller that computes them elsewhere (a cluster): h [hidden]\n"
          "+= attention, in place, and the KV cache as step() writes it; returns the MoE's input x\n"
          "[1, hidden] float32 and the token's experts, ids [1, top_k] int32 and weights [1, top_k]\n"
          "float32. step() is this, the experts' weighted sum, and h += it.");
}

}  // namespace edgemoe::python
