// edgemoe._core: CRC-32C, the expert store (store.h), the expert cache over it
// (cache.h) and the MoE layer that runs on the cache (moe.h), whole or as slot
// outputs and their weighted sum.
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "cache.h"
#include "crc32c.h"
#include "moe.h"
#include "policy.h"
#include "store.h"

namespace edgemoe::python {

namespace {

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

// One layer's counters (or the totals) as a dict: counts are ints, durations floats.
py::dict layer_dict(const LayerStats& s) {
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["loads"] = s.loads;
  d["evictions"] = s.evictions;
  d["fallback_uses"] = s.fallback_uses;
  d["fallback_loads"] = s.fallback_loads;
  d["fallback_bytes"] = s.fallback_bytes;
  d["fallback_bytes_saved"] = s.fallback_bytes_saved;
  d["bytes_read"] = s.bytes_read;
  d["read_seconds"] = s.read_seconds;
  d["demand_bytes"] = s.demand_bytes;
  d["prefetch_issued"] = s.prefetch_issued;
  d["prefetch_loads"] = s.prefetch_loads;
  d["prefetch_bytes"] = s.prefetch_bytes;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetch_cancelled"] = s.prefetch_cancelled;
  d["prefetch_dropped"] = s.prefetch_dropped;
  d["wasted_prefetch_bytes"] = s.wasted_prefetch_bytes;
  d["stall_seconds"] = s.stall_seconds;
  d["compute_seconds"] = s.compute_seconds;
  return d;
}

// The checked arguments shared by moe_forward and moe_forward_slots.
struct MoEArgs {
  int64_t T, H, K;
  py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids;
};

MoEArgs moe_args(const char* what, const ExpertCache& cache, int64_t layer, const FloatArray& x,
                 const py::array& expert_ids) {
  const std::string fn(what);
  auto ids = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(expert_ids);
  if (!ids) throw std::invalid_argument(fn + ": expert_ids must be an integer array");
  if (x.ndim() != 2) throw std::invalid_argument(fn + ": x must be [T, hidden]");
  const int64_t T = x.shape(0), H = x.shape(1);
  if (ids.ndim() != 2 || ids.shape(0) != T)
    throw std::invalid_argument(fn + ": expert_ids must be [T, k] with T = " + std::to_string(T));
  if (layer < 0 || layer >= int64_t(cache.store().num_layers()))
    throw std::invalid_argument(fn + ": layer " + std::to_string(layer) + " is out of range: the experts file has " +
                                std::to_string(cache.store().num_layers()) + " layers");
  return {T, H, ids.shape(1), std::move(ids)};
}

// A [T, k] float array like expert_ids (`name` in the message).
void check_slots(const char* what, const char* name, const FloatArray& a, const MoEArgs& m) {
  if (a.ndim() != 2 || a.shape(0) != m.T || a.shape(1) != m.K)
    throw std::invalid_argument(std::string(what) + ": " + name + " must be [T, k] like expert_ids");
}

}  // namespace

void bind_store(py::module_& m) {
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.def(
      "crc32c",
      [](const py::buffer& data, uint32_t seed) {
        auto [p, n] = bytes_of(data);
        py::gil_scoped_release nogil;
        return crc32c(p, size_t(n), seed);
      },
      py::arg("data"), py::arg("seed") = 0,
      "CRC-32C (Castagnoli) of a buffer, as stored in the manifest. Chain with seed=previous result.");
  m.def("crc32c_impl", &crc32c_impl, "Which CRC-32C implementation this build uses.");

  py::class_<ExpertStore, std::shared_ptr<ExpertStore>>(
      m, "ExpertStore",
      "Reads expert blobs from the experts file: one pread per expert, O_DIRECT into 4 KiB aligned\n"
      "buffers when the filesystem allows it (buffered otherwise).\n\n"
      "offsets/sizes/checksums are [num_layers, num_experts]; size 0 marks 'no expert'.\n"
      "A blob whose CRC-32C differs raises CorruptExpertError naming layer and expert; a blob\n"
      "beyond the end of the file raises ModelDirectoryError at construction; a failed read\n"
      "(an I/O error, a file shrunk since) raises ExpertReadError and leaves the store usable.\n"
      "verify: True or 'first read' (default) checks each blob's CRC-32C on its first read by\n"
      "this store, and again once the file's size or timestamps change; 'every read' on every\n"
      "read; False never.\n"
      "read_bytes_per_s / read_latency_s > 0 emulate a slower device's storage (see set_throttle).")
      .def(py::init([](const std::string& path, const py::array& offsets, const py::array& sizes,
                       const py::array& checksums, bool direct, const py::object& verify, double bps, double latency) {
             const Verify v = verify_mode(verify);
             if (offsets.ndim() != 2) throw std::invalid_argument("offsets must be [num_layers, num_experts]");
             const auto L = uint32_t(offsets.shape(0)), E = uint32_t(offsets.shape(1));
             auto o = table<uint64_t>(offsets, L, E, "offsets");
             auto s = table<uint64_t>(sizes, L, E, "sizes");
             auto c = table<uint32_t>(checksums, L, E, "checksums");
             py::gil_scoped_release nogil;
             return std::make_shared<ExpertStore>(path, L, E, std::move(o), std::move(s), std::move(c), direct, v, bps,
                                                  latency);
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
}

void bind_cache(py::module_& m) {
  m.attr("EVICTION_DECAY") = kEvictionDecay;
  py::class_<ExpertCache, std::shared_ptr<ExpertCache>>(
      m, "ExpertCache",
      "Expert blobs resident in RAM under a byte budget (0 = unbounded), read by io_threads I/O\n"
      "threads, evicted by `policy`: 'lru', 'lfu' (demand uses, ties by recency) or 'structure'\n"
      "(structure-aware: decayed activation rate / MoE layers until the expert's layer runs again).\n\n"
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
      .def_property_readonly_static(
          "entry_overhead_bytes", [](py::object) { return ExpertCache::kEntryBytes; },
          "Fixed bytes the cache keeps per (layer, expert) of the file, beyond the budget.")
      .def("contains", &ExpertCache::contains, py::arg("layer"), py::arg("expert"), py::arg("low_bit") = false,
           "True if the expert's full copy (low_bit: its low-bit copy) is resident.")
      .def_property("fallback_threshold", &ExpertCache::fallback_threshold, &ExpertCache::set_fallback_threshold,
                    "Gate weight below which a miss reads the low-bit copy (0 = off; > 0 needs a fallback store).")
      .def_property_readonly("has_fallback", py::overload_cast<>(&ExpertCache::has_fallback, py::const_),
                             "True when the cache was given a store of low-bit copies.")
      .def("load", &ExpertCache::load, py::arg("layer"), py::arg("expert"), py::call_guard<py::gil_scoped_release>(),
           "Blocking, one expert: make it resident now, without pinning it (may evict); returns when\n"
           "it is. True if it was not resident. Not counted as a hit or miss; counted in loads and\n"
           "bytes_read. prefetch() is the non-blocking read of a list of experts.")
      .def(
          "prefetch",
          [](ExpertCache& c, uint32_t layer, const std::vector<uint32_t>& experts, uint64_t max_bytes) {
            py::gil_scoped_release nogil;
            return c.prefetch(layer, experts, max_bytes);
          },
          py::arg("layer"), py::arg("experts"), py::arg("max_bytes") = 0,
          "Non-blocking: queue reads of `experts` (a list) of `layer`, most likely first; returns how many\n"
          "were queued. Skips experts resident, queued or being read, and stops before the bytes\n"
          "queued by this call would pass max_bytes (0: no cap). A queued read starts after every\n"
          "demand read; when it starts it evicts only unpinned experts the policy values less, never\n"
          "one of the layer computing now or of a layer that runs before it, else it is dropped.\n"
          "A wrong guess costs bandwidth, never correctness. Queues nothing when io_threads is 0.\n"
          "load() is the blocking read of one expert.")
      .def("cancel_prefetches", &ExpertCache::cancel_prefetches, py::arg("layer") = -1,
           "Drop queued prefetches that have not started (all, or those of `layer`); returns how many.")
      .def("set_current_layer", &ExpertCache::set_current_layer, py::arg("layer"),
           "The layer computing now (moe_forward sets it): the structure policy's distances, the layers\n"
           "a prefetch may not evict from, and token boundaries.")
      .def("wait_idle", &ExpertCache::wait_idle, py::call_guard<py::gil_scoped_release>(),
           "Block until no read is queued or in flight.")
      .def("clear", &ExpertCache::clear, "Cancel queued prefetches and evict every unpinned expert.")
      .def(
          "stats",
          [](const ExpertCache& c) {
            const CacheStats s = c.stats();
            py::dict d = layer_dict(s);
            d["resident_bytes"] = s.resident_bytes;
            d["peak_resident_bytes"] = s.peak_resident_bytes;
            d["direct_io"] = s.direct_io;
            return d;
          },
          "Totals over layers (see layer_stats) and resident_bytes (charged now: resident, in flight,\n"
          "reserved), peak_resident_bytes (<= budget), direct_io (a bool). Counts and bytes are ints,\n"
          "the *_seconds floats.")
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
          "One dict per layer of the experts file (model layer index); counts and bytes are ints, the\n"
          "*_seconds floats:\n"
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
         const FloatArray& weights, bool per_token) {
        const MoEArgs a = moe_args("moe_forward", cache, layer, x, expert_ids);
        check_slots("moe_forward", "weights", weights, a);
        FloatArray y({a.T, a.H});
        const float* xp = x.data();
        const float* wp = weights.data();
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          moe_forward(cache, uint32_t(layer), xp, a.T, a.H, a.ids.data(), wp, a.K, yp, per_token);
        }
        return y;
      },
      py::arg("cache"), py::arg("layer"), py::arg("x"), py::arg("expert_ids"), py::arg("weights"),
      py::kw_only(), py::arg("per_token") = false,
      "sum_k weights[t, k] * expert[expert_ids[t, k]](x[t]) for every token t.\n\n"
      "x [T, hidden], expert_ids/weights [T, k]. Each distinct expert is fetched from the cache once\n"
      "for all tokens that chose it and pinned for the call: the missing ones are read by the I/O\n"
      "threads at once (a prefetch already reading one is waited for, not repeated) while the\n"
      "resident ones compute, then each missing one computes as it lands. The weighted sum runs in\n"
      "slot order, so y does not depend on what was cached. Sets the cache's current layer. An\n"
      "out-of-range expert id raises ValueError.\n\n"
      "With cache.fallback_threshold > 0, a missing expert whose |weights| are all below it (every\n"
      "token of the call) is computed from its low-bit copy instead; y then depends on the cache.\n\n"
      "per_token=True (rows that are decode steps of different sequences): each expert is still\n"
      "fetched once for all its rows, but each row runs through the one-token kernels, so y[t] is\n"
      "bit for bit what a call with x[t] alone gives (without fallback).\n\n"
      "Bit for bit combine_slots(moe_forward_slots(cache, layer, x, expert_ids, weights=weights), weights).");

  m.def(
      "moe_forward_slots",
      [](ExpertCache& cache, int64_t layer, const FloatArray& x, const py::array& expert_ids, const py::object& mask,
         const py::object& weights) {
        const MoEArgs a = moe_args("moe_forward_slots", cache, layer, x, expert_ids);
        py::array_t<uint8_t, py::array::c_style | py::array::forcecast> picked;
        if (!mask.is_none()) {
          picked = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(mask);
          if (!picked || picked.ndim() != 2 || picked.shape(0) != a.T || picked.shape(1) != a.K)
            throw std::invalid_argument("moe_forward_slots: mask must be a bool array [T, k] like expert_ids");
        }
        FloatArray w;
        if (!weights.is_none()) {
          w = FloatArray::ensure(weights);
          if (!w) throw std::invalid_argument("moe_forward_slots: weights must be a float array");
          check_slots("moe_forward_slots", "weights", w, a);
        }
        FloatArray ys({a.T, a.K, a.H});
        float* yp = ys.mutable_data();
        std::memset(yp, 0, size_t(a.T * a.K * a.H) * sizeof(float));
        const float* xp = x.data();
        const uint8_t* mp = mask.is_none() ? nullptr : picked.data();
        const float* wp = weights.is_none() ? nullptr : w.data();
        {
          py::gil_scoped_release nogil;
          moe_forward_slots(cache, uint32_t(layer), xp, a.T, a.H, a.ids.data(), wp, a.K, mp, yp);
        }
        return ys;
      },
      py::arg("cache"), py::arg("layer"), py::arg("x"), py::arg("expert_ids"), py::arg("mask") = py::none(),
      py::arg("weights") = py::none(),
      "Each slot's expert output ys [T, k, hidden]: ys[t, j] = expert[expert_ids[t, j]](x[t]) for the\n"
      "slots where mask [T, k] (bool; None: every slot) is True; the others are zero. Each expert\n"
      "computes all its slots in one call through the cache as moe_forward does (pinned once, reads\n"
      "overlapping compute), so combine_slots(ys, weights) is moe_forward's result bit for bit.\n"
      "weights [T, k] only decide the low-bit fallback (as in moe_forward); None: no slot falls\n"
      "back. Every expert id is checked, masked out or not (ValueError). Sets the cache's current layer.");

  m.def(
      "combine_slots",
      [](const FloatArray& ys, const FloatArray& weights) {
        if (ys.ndim() != 3) throw std::invalid_argument("combine_slots: ys must be [T, k, hidden]");
        const int64_t T = ys.shape(0), K = ys.shape(1), H = ys.shape(2);
        if (weights.ndim() != 2 || weights.shape(0) != T || weights.shape(1) != K)
          throw std::invalid_argument("combine_slots: weights must be [T, k] = [" + std::to_string(T) + ", " +
                                      std::to_string(K) + "] like ys");
        FloatArray y({T, H});
        const float* sp = ys.data();
        const float* wp = weights.data();
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          combine_slots(sp, wp, T, K, H, yp);
        }
        return y;
      },
      py::arg("ys"), py::arg("weights"),
      "y [T, hidden] = sum_j weights[t, j] * ys[t, j] for ys [T, k, hidden], in slot order from 0:\n"
      "the weighted sum that ends moe_forward, with the same arithmetic.");
}

}  // namespace edgemoe::python
