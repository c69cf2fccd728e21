#include "layer.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dense.h"
#include "moe.h"

namespace edgemoe {

void check_decode_layer(const DecodeLayer& L) {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("DecodeLayer: " + what);
  };
  need(L.hidden > 0 && L.heads > 0 && L.kv_heads > 0 && L.head_dim > 0 && L.head_dim % 2 == 0,
       "hidden, heads, kv_heads and an even head_dim must be positive");
  need(L.heads % L.kv_heads == 0, "kv_heads must divide heads");
  need(L.top_k >= 1 && L.top_k <= L.experts, "top_k must be in 1..experts");
  need(L.attn_norm && L.ffn_norm && L.inv_freq, "norm weights and inv_freq are required");
  const uint32_t qn = L.heads * L.head_dim, kn = L.kv_heads * L.head_dim;
  need(L.q.rows == qn && L.q.cols == L.hidden, "q must be [heads * head_dim, hidden]");
  need(L.k.rows == kn && L.k.cols == L.hidden, "k must be [kv_heads * head_dim, hidden]");
  need(L.v.rows == kn && L.v.cols == L.hidden, "v must be [kv_heads * head_dim, hidden]");
  need(L.o.rows == L.hidden && L.o.cols == qn, "o must be [hidden, heads * head_dim]");
  need(L.router.rows == L.experts && L.router.cols == L.hidden, "router must be [experts, hidden]");
}

void decode_attend(const DecodeLayer& L, float* h, const LayerKV& kv, int64_t pos, float* x, int32_t* ids, float* w) {
  const int64_t H = L.hidden, qn = int64_t(L.heads) * L.head_dim, kn = int64_t(L.kv_heads) * L.head_dim;
  const size_t hs = static_cast<size_t>(H), qs = static_cast<size_t>(qn), ks = static_cast<size_t>(kn);
  std::vector<float> q(qs), k(ks), v(ks), att(qs), y(hs), logits(L.experts);

  // attention: h += o(attn(rope(q), rope(k), v)) of rms_norm(h)
  rms_norm(h, L.attn_norm, 1, H, L.eps, x);
  if (L.q.quantized() && L.k.quantized() && L.v.quantized()) {  // as LinearGroup: one call when all are
    const QMatrix ws[3] = {L.q, L.k, L.v};
    float* ys[3] = {q.data(), k.data(), v.data()};
    matmul_many(ws, 3, x, 1, ys);
  } else {
    matmul(L.q, x, 1, q.data());
    matmul(L.k, x, 1, k.data());
    matmul(L.v, x, 1, v.data());
  }
  rope(q.data(), 1, L.heads, L.head_dim, pos, L.inv_freq);
  rope(k.data(), 1, L.kv_heads, L.head_dim, pos, L.inv_freq);
  const int64_t hd = L.head_dim;
  const KVLayout layout{hd, kv.capacity * hd, kv.half};  // [kv_heads, capacity, head_dim]
  for (int64_t g = 0; g < int64_t(L.kv_heads); ++g) {    // the token's row of each kv head
    const int64_t at = g * layout.head + pos * layout.pos;
    if (kv.half) {
      floats_to_halves(k.data() + g * hd, hd, static_cast<uint16_t*>(kv.k) + at);
      floats_to_halves(v.data() + g * hd, hd, static_cast<uint16_t*>(kv.v) + at);
    } else {
      std::memcpy(static_cast<float*>(kv.k) + at, k.data() + g * hd, size_t(hd) * sizeof(float));
      std::memcpy(static_cast<float*>(kv.v) + at, v.data() + g * hd, size_t(hd) * sizeof(float));
    }
  }
  attention(q.data(), 1, L.heads, L.head_dim, kv.k, kv.v, pos + 1, L.kv_heads, pos, L.window, att.data(), nullptr,
            layout);
  matmul(L.o, att.data(), 1, y.data());
  for (size_t i = 0; i < hs; ++i) h[i] = h[i] + y[i];

  // the MoE's input and the token's experts
  rms_norm(h, L.ffn_norm, 1, H, L.eps, x);
  matmul(L.router, x, 1, logits.data());
  softmax_topk(logits.data(), 1, L.experts, L.top_k, L.normalize, ids, w);
}

void decode_layer(const DecodeLayer& L, ExpertCache& cache, float* h, const LayerKV& kv, int64_t pos) {
  const size_t hs = static_cast<size_t>(L.hidden);
  std::vector<float> x(hs), y(hs), w(L.top_k);
  std::vector<int32_t> ids(L.top_k);
  decode_attend(L, h, kv, pos, x.data(), ids.data(), w.data());
  // MoE: h += sum of the routed experts of rms_norm(h)
  moe_forward(cache, L.layer, x.data(), 1, L.hidden, ids.data(), w.data(), L.top_k, y.data());
  for (size_t i = 0; i < hs; ++i) h[i] = h[i] + y[i];
}

}  // namespace edgemoe
