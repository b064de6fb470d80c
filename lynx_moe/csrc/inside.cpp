// The fused CPU step of lynx_moe.routing.route, as one torch operator:
//
//     torch.ops.lynx_moe.route(x, vote, native_w, native_ids, bias, top_k, scoring, renormalize,
//                              n_group, topk_group, scale, policy, p, n0, n1, flag)
//         -> (weights [T, K] f32, ids [T, K] i64, native ids [T, K] i64)
//
// x [T, E]: route()'s sanitised fp32 logits; vote [T] or None (every row votes); native_w/ids:
// an engine's own native result or None; the rest route()'s routing keywords and the policy's
// code and parameters (lynx_moe/fused.py). One call does the whole step: native routing as
// routing._native does it, the policy's decision (keep[E] for set policies, per-row counts
// for row policies), then the shared step (each voting row's tiered top-K inside keep, its
// weights). lynx_moe/fused.py builds it with torch.utils.cpp_extension and says which
// policies it may take.
//
// Same decisions as the torch reference, bit for bit, by construction:
// - everything order-sensitive or transcendental is done with the reference's own ATen calls
//   on tensors of the same shape (softmax, sigmoid, logit, every topk, exp of the chosen
//   logits, the row sums, Confidence's half sums, AffinityBinning's float64 pow and column
//   sum when it cannot be exact);
// - everything else is integer logic or single IEEE operations in the reference's precision
//   (float32 where torch casts a Python scalar to float32; built with -ffp-contract=off);
// - ties break as the reference's stable sorts and unique keys do: higher key first, then
//   lower expert index.
//
// Legend: T router rows, E experts, K top-k.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/logit.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

// Policy codes; lynx_moe/fused.py holds the same table.
enum Policy : int64_t { AFFINITY = 0, CONFIDENCE = 1, OEA = 2, TOP_MASS = 3, STATIC_K = 4, SER = 5 };

constexpr int64_t kGrain = 32;  // rows per parallel task: small batches stay on one thread

// The best K of a stream of (key, index) pairs fed in increasing index order, best first.
// A key equal to one already held ranks after it: ties go to the lower index, as a stable
// descending sort orders them.
template <typename Key>
struct Best {
  int64_t k, n = 0;
  Key* key;
  int64_t* idx;
  void push(Key v, int64_t e) {
    if (n == k && !(v > key[k - 1])) return;
    int64_t i = n < k ? n++ : k - 1;
    for (; i > 0 && v > key[i - 1]; --i) {
      key[i] = key[i - 1];
      idx[i] = idx[i - 1];
    }
    key[i] = v;
    idx[i] = e;
  }
};

// A float's bits as an int32 with the float's order (routing._tiered_topk's key; -0 < +0).
inline int64_t float_order(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return static_cast<int64_t>(b ^ ((b >> 31) & 0x7FFFFFFF));
}

// Eight levels (bytes <= 7) in one word: a byte's top bit marks level > c; count_bytes counts them.
inline uint64_t word(const uint8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline uint64_t above(uint64_t x, int64_t c) {
  return (x + 0x0101010101010101ULL * static_cast<uint64_t>(127 - c)) & 0x8080808080808080ULL;
}
inline int64_t count_bytes(uint64_t mask) {
  return static_cast<int64_t>(((mask >> 7) * 0x0101010101010101ULL) >> 56);
}

// max over a row; eight running maxima so that the loop vectorises (max is exact in any order).
inline float row_max(const float* L, int64_t E) {
  float m[8];
  for (int i = 0; i < 8; ++i) m[i] = L[0];
  int64_t e = 0;
  for (; e + 8 <= E; e += 8)
    for (int i = 0; i < 8; ++i) m[i] = m[i] > L[e + i] ? m[i] : L[e + i];
  for (; e < E; ++e) m[0] = m[0] > L[e] ? m[0] : L[e];
  float top = m[0];
  for (int i = 1; i < 8; ++i) top = top > m[i] ? top : m[i];
  return top;
}

struct Rows {
  int64_t T, E, K;
  const float* sel;    // [T, E]
  const int64_t* nat;  // [T, K]
  const bool* vote;    // [T]; nullptr: every row votes
  bool votes(int64_t t) const { return vote == nullptr || vote[t]; }
  double n_votes() const {
    if (vote == nullptr) return static_cast<double>(T);
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += vote[t];
    return static_cast<double>(std::max<int64_t>(n, 1));
  }
  // keep[e] |= e is among the first counts[t] native experts of a voting row.
  void union_first(const int64_t* counts, int64_t same, uint8_t* keep) const {
    for (int64_t t = 0; t < T; ++t) {
      if (!votes(t)) continue;
      int64_t c = counts ? counts[t] : same;
      for (int64_t j = 0; j < c; ++j) keep[nat[t * K + j]] = 1;
    }
  }
};

// AffinityBinning (policies.AffinityBinning.keep): bins, batch popularity, each voting row's
// top-K by (bin, popularity among the other rows, lower index); keep = their union.
void affinity_keep(const Rows& r, const Tensor& sel_t, double alpha, int64_t beta, bool protect,
                   uint8_t* keep) {
  const int64_t T = r.T, E = r.E, K = r.K;
  const float a = static_cast<float>(alpha);  // torch casts the Python scalar to float32
  const double B = r.n_votes();
  const bool exact = beta >= 0 &&
      static_cast<double>(beta + 1) * std::pow(static_cast<double>(T), static_cast<double>(beta + 1)) *
          static_cast<double>(E) < 4503599627370496.0;  // 2**52
  // y = alpha * (L - rowmax) <= 0, the bin is ceil(y); with the clamp, level = bin + beta.
  std::vector<float> q(exact ? 0 : T * E);
  const int64_t Ep = (E + 7) / 8 * 8;  // level rows padded with level 0 to whole 8-byte words
  std::vector<uint8_t> level(exact ? T * Ep : 0, 0);
  const float floor_bin = static_cast<float>(-beta - 1);
  for (int64_t t = 0; t < T; ++t) {
    const float* L = r.sel + t * E;
    const float top = row_max(L, E);
    if (exact) {
      // ceil(y) >= -beta iff y > -beta - 1, and there ceil(y) is y truncated (y <= 0); below,
      // the truncation of max(y, -beta - 1) gives level -1, clamped to 0. Vectorises.
      uint8_t* lv = level.data() + t * Ep;
      const int32_t b32 = static_cast<int32_t>(beta);
      for (int64_t e = 0; e < E; ++e) {
        float y = a * (L[e] - top);
        int32_t v = static_cast<int32_t>(y > floor_bin ? y : floor_bin) + b32;
        lv[e] = static_cast<uint8_t>(v > 0 ? v : 0);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        float b = std::ceil(a * (L[e] - top));
        q[t * E + e] = beta >= 0 ? std::max(b, static_cast<float>(-beta)) : b;
      }
    }
  }
  std::vector<double> others(E);
  std::vector<int64_t> picks(T * K);
  if (exact) {
    // Integers in float64: H = B**level with level = bin + beta in [0, beta] (fused.py allows
    // beta <= 6, so torch's pow of the powers is scalar std::pow too, exact). The key
    // (level * B**(beta+1) + S - H) * E + reversed index is exact and ranks by level first,
    // then, inside one level of one row (H fixed), by S alone: one global order of the
    // experts by (S, lower index) serves every row.
    std::vector<double> powers(beta + 1);
    for (int64_t j = 0; j <= beta; ++j) powers[j] = std::pow(B, static_cast<double>(j));
    // S[e] = sum over voting rows of B**level: count each level per expert (vectorised byte
    // compares), then the exact integer sum.
    std::vector<int32_t> at_level((beta + 1) * E, 0);
    int32_t voters = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!r.votes(t)) continue;
      ++voters;
      const uint8_t* lv = level.data() + t * Ep;
      for (int64_t j = 1; j <= beta; ++j) {
        int32_t* c = at_level.data() + j * E;
        const uint8_t lj = static_cast<uint8_t>(j);
        for (int64_t e = 0; e < E; ++e) c[e] += lv[e] == lj;
      }
    }
    for (int64_t e = 0; e < E; ++e) {
      int32_t rest = voters;
      double sum = 0.0;
      for (int64_t j = beta; j >= 1; --j) {
        sum += static_cast<double>(at_level[j * E + e]) * powers[j];
        rest -= at_level[j * E + e];
      }
      others[e] = sum + static_cast<double>(rest) * powers[0];
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return others[a] > others[b] || (others[a] == others[b] && a < b);
    });
    for (int64_t t = 0; t < T; ++t) {
      if (!r.votes(t)) continue;
      const uint8_t* lv = level.data() + t * Ep;
      // The level the row's K-th pick falls in: the highest with at least K experts at or above.
      int64_t cut = 0;
      for (int64_t c = beta; c >= 1 && cut == 0; --c) {
        int64_t n_at_least = 0;
        for (int64_t w = 0; w < Ep; w += 8) n_at_least += count_bytes(above(word(lv + w), c - 1));
        if (n_at_least >= K) cut = c;
      }
      int64_t* pick = picks.data() + t * K;
      int64_t n = 0;
      for (int64_t w = 0; w < Ep; w += 8)  // every expert above the cut (fewer than K)
        for (uint64_t m = above(word(lv + w), cut); m != 0; m &= m - 1)
          pick[n++] = w + __builtin_ctzll(m) / 8;
      for (int64_t i = 0; n < K; ++i) {  // then the cut level's best by S (branch-free append)
        pick[n] = order[i];
        n += lv[order[i]] == cut;
      }
    }
  } else {
    // No clamp, or too large for exact integers: the reference's float64 pow and sorted column sum
    // (same ATen calls on the same shapes), then a stable top-K of M.
    Tensor qd = at::empty({T, E}, sel_t.options().dtype(at::kDouble));
    double* qp = qd.data_ptr<double>();
    for (int64_t i = 0; i < T * E; ++i) qp[i] = static_cast<double>(q[i]);
    Tensor ht = r.vote == nullptr ? at::pow(c10::Scalar(B), qd)
                                  : at::pow(at::scalar_tensor(B, qd.options()), qd);
    double* hp = ht.data_ptr<double>();
    if (r.vote != nullptr)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) hp[t * E + e] *= static_cast<double>(r.vote[t]);
    Tensor sum = at::sum(std::get<0>(at::sort(ht, 0)), {0}, true);   // sorted columns, as the reference
    const double* sp = sum.data_ptr<double>();
    at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
      std::vector<double> key(K);
      for (int64_t t = t0; t < t1; ++t) {
        if (!r.votes(t)) continue;
        Best<double> best{K, 0, key.data(), picks.data() + t * K};
        for (int64_t e = 0; e < E; ++e)
          best.push(qp[t * E + e] + (sp[e] - hp[t * E + e]) / B, e);
      }
    });
  }
  for (int64_t t = 0; t < T; ++t) {
    if (!r.votes(t)) continue;
    for (int64_t j = 0; j < K; ++j) keep[picks[t * K + j]] = 1;
    if (protect) keep[r.nat[t * K]] = 1;
  }
}

// Confidence (policies.Confidence.keep): each row keeps clamp(floor(c*K*beta) + alpha, 1, K).
void confidence_keep(const Rows& r, const Tensor& native_w, double beta, int64_t alpha, uint8_t* keep) {
  const int64_t K = r.K, half = K / 2;
  // The reference's own half sums (order-sensitive), on the same views.
  Tensor head = at::sum(native_w.slice(1, 0, half), {-1});
  Tensor tail = at::sum(native_w.slice(1, half, K), {-1});
  const float* hp = head.data_ptr<float>();
  const float* tp = tail.data_ptr<float>();
  std::vector<int64_t> counts(r.T);
  for (int64_t t = 0; t < r.T; ++t) {
    float c = hp[t] > 0.f ? (hp[t] - tp[t]) / std::max(hp[t], 1e-30f) : 1.f;
    float v = std::floor(c * static_cast<float>(K) * static_cast<float>(beta)) + static_cast<float>(alpha);
    v = std::min(std::max(v, 1.f), static_cast<float>(K));
    counts[t] = static_cast<int64_t>(v);
  }
  r.union_first(counts.data(), 0, keep);
}

// BatchTopN / XShare (policies._top_mass): the n experts of largest summed native weight,
// the forced ones (each voting row's first k0) first, zero-mass experts never.
void top_mass_keep(const Rows& r, const Tensor& native_w, int64_t n, int64_t k0, uint8_t* keep) {
  const int64_t T = r.T, E = r.E, K = r.K;
  Tensor w = native_w.contiguous();
  const float* wp = w.data_ptr<float>();
  std::vector<double> mass(E, 0.0);
  for (int64_t t = 0; t < T; ++t)  // scatter_add's order: row-major over (row, slot)
    for (int64_t j = 0; j < K; ++j) {
      float v = r.votes(t) ? wp[t * K + j] : wp[t * K + j] * 0.f;
      mass[r.nat[t * K + j]] += static_cast<double>(v);
    }
  std::vector<uint8_t> forced(E, 0);
  int64_t n_forced = 0;
  if (k0 > 0) {
    r.union_first(nullptr, k0, forced.data());
    for (int64_t e = 0; e < E; ++e) n_forced += forced[e];
  }
  // Forced experts outrank every other (mass + total + 1 > any mass), so the rest of the
  // budget goes to the best unforced ones by (mass, lower index).
  const int64_t room = n - n_forced;
  if (room > 0) {
    std::vector<double> key(room);
    std::vector<int64_t> idx(room);
    Best<double> best{room, 0, key.data(), idx.data()};
    for (int64_t e = 0; e < E; ++e)
      if (!forced[e] && mass[e] > 0.0) best.push(mass[e], e);
    for (int64_t i = 0; i < best.n; ++i) keep[idx[i]] = 1;
  }
  for (int64_t e = 0; e < E; ++e) keep[e] |= forced[e];
}

// Row policies: how many of its native experts each row keeps (StaticK, SER).
std::vector<int64_t> row_counts(const Rows& r, const Tensor& native_w, int64_t policy, int64_t n0,
                                double threshold) {
  std::vector<int64_t> counts(r.T, n0);
  if (policy == SER) {
    Tensor w = native_w.contiguous();
    const float* wp = w.data_ptr<float>();
    const float thr = static_cast<float>(threshold);
    for (int64_t t = 0; t < r.T; ++t) {
      const float* row = wp + t * r.K;
      const float bar = thr * row[0];
      for (int64_t j = n0; j < r.K; ++j) counts[t] += row[j] > bar;
    }
  }
  return counts;
}

// Steps 2-4 for the voting rows, given the native routing: the decision, the tiered top-K
// inside it, the weights. Rows that do not vote get the native weights and ids.
std::tuple<Tensor, Tensor> inside(const Tensor& x, const Tensor& sel, const Tensor& native_w,
                                  const Tensor& native_ids, const Tensor& mass,
                                  const std::optional<Tensor>& vote, int64_t policy, double p,
                                  int64_t n0, int64_t n1, bool flag, bool sigmoid, bool renormalize,
                                  double scale, bool grouped) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && sel.sizes() == x.sizes() &&
              sel.scalar_type() == at::kFloat, "lynx_moe.route: x and sel must be float32 [T, E]");
  const int64_t T = x.size(0), E = x.size(1), K = native_ids.size(1);
  TORCH_CHECK(native_ids.scalar_type() == at::kLong && native_w.scalar_type() == at::kFloat &&
              native_w.sizes() == native_ids.sizes() && native_ids.size(0) == T,
              "lynx_moe.route: native weights float32 and ids int64, both [T, K]");
  Tensor xc = x.contiguous(), sc = sel.contiguous(), nat = native_ids.contiguous();
  Tensor mc = mass.contiguous(), vc = vote ? vote->contiguous() : Tensor();
  const float* xp = xc.data_ptr<float>();
  Rows r{T, E, K, sc.data_ptr<float>(), nat.data_ptr<int64_t>(), vote ? vc.data_ptr<bool>() : nullptr};

  // 1. The decision: in[e] (keep, or the experts the batch uses for row policies), own counts.
  std::vector<uint8_t> in(E, 0);
  std::vector<int64_t> own;
  switch (policy) {
    case AFFINITY: affinity_keep(r, sc, p, n0, flag, in.data()); break;
    case CONFIDENCE: confidence_keep(r, native_w, p, n0, in.data()); break;
    case OEA: r.union_first(nullptr, n0, in.data()); break;
    case TOP_MASS: top_mass_keep(r, native_w, n0, n1, in.data()); break;
    case STATIC_K:
    case SER:
      own = row_counts(r, native_w, policy, n0, p);
      r.union_first(own.data(), 0, in.data());
      break;
    default: TORCH_CHECK(false, "lynx_moe.route: unknown policy code ", policy);
  }
  const bool row_policy = !own.empty();

  // 2. Each voting row's top-K by (tier, selection logit, lower index): kept native experts,
  //    other kept ones, then its own native ones (row policies: own experts above all).
  std::vector<int64_t> in_list;
  for (int64_t e = 0; e < E; ++e)
    if (in[e]) in_list.push_back(e);
  Tensor ids = at::empty({T, K}, nat.options());
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* np = r.nat;
  // The reference ranks by one key, tier * 2**44 + float order * 2**12 + reversed index, so
  // the picks are the tiers in turn, each by (logit, lower index): own experts (tier 7), the
  // other native ones in `in` (3), other experts in `in` (2), native ones not in it (1), the
  // rest (0; grouped routing puts every expert outside the row's groups there).
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> mark(E, 0);  // 1: native expert of the row; 2: already picked
    std::vector<int64_t> key(3 * K), idx(3 * K), best_key(K);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* out = ip + t * K;
      if (!r.votes(t)) {
        std::copy(np + t * K, np + (t + 1) * K, out);
        continue;
      }
      const float* row = r.sel + t * E;
      auto in_group = [&](int64_t e) { return !grouped || std::isfinite(row[e]); };
      auto key_of = [&](int64_t e) { return float_order(row[e]) * 4096 + (E - 1 - e); };
      // Native experts by tier: [0, K) own, [K, 2K) in `in`, [2K, 3K) not in `in`.
      Best<int64_t> tiers[3] = {{K, 0, key.data(), idx.data()}, {K, 0, key.data() + K, idx.data() + K},
                                {K, 0, key.data() + 2 * K, idx.data() + 2 * K}};
      for (int64_t j = 0; j < K; ++j) {
        int64_t e = np[t * K + j];
        mark[e] = 1;
        if (in_group(e)) tiers[row_policy && j < own[t] ? 0 : in[e] ? 1 : 2].push(key_of(e), e);
      }
      int64_t n = 0;
      auto take = [&](const Best<int64_t>& b) {
        for (int64_t i = 0; i < b.n && n < K; ++i) {
          out[n++] = b.idx[i];
          mark[b.idx[i]] |= 2;
        }
      };
      take(tiers[0]);
      take(tiers[1]);
      if (n < K) {  // tier 2: the best experts of `in` that the row did not choose natively
        Best<int64_t> other{K - n, 0, best_key.data(), out + n};
        for (int64_t e : in_list)
          if (!(mark[e] & 1) && in_group(e)) other.push(key_of(e), e);
        for (int64_t i = 0; i < other.n; ++i) mark[out[n + i]] |= 2;
        n += other.n;
      }
      take(tiers[2]);
      if (n < K) {  // tier 0: everything not picked yet
        Best<int64_t> rest{K - n, 0, best_key.data(), out + n};
        for (int64_t e = 0; e < E; ++e)
          if (!(mark[e] & 2)) rest.push(key_of(e), e);
        for (int64_t i = 0; i < rest.n; ++i) mark[out[n + i]] |= 2;
        n += rest.n;
      }
      for (int64_t j = 0; j < K; ++j) mark[np[t * K + j]] = 0;
      for (int64_t j = 0; j < K; ++j) mark[out[j]] = 0;
    }
  });

  // 3. Weights: the native rule on the chosen logits, with the reference's exp/sigmoid and
  //    row sums on [T, K] tensors laid out as its own.
  Tensor nw = native_w.contiguous();
  const float* nwp = nw.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  Tensor chosen = at::empty({T, K}, xc.options());
  float* cp = chosen.data_ptr<float>();
  std::vector<uint8_t> real(row_policy ? T * K : 0, 1);
  for (int64_t t = 0; t < T; ++t) {
    if (row_policy && r.votes(t))
      for (int64_t j = 0; j < K; ++j) {  // a slot is real if its expert is one of the row's own
        int64_t e = ip[t * K + j];
        bool is_own = false;
        for (int64_t i = 0; i < own[t]; ++i) is_own |= np[t * K + i] == e;
        real[t * K + j] = is_own;
      }
    float top = -INFINITY;
    for (int64_t j = 0; j < K; ++j) {
      float v = r.votes(t) ? xp[t * E + ip[t * K + j]] : 0.f;
      cp[t * K + j] = v;
      if (!row_policy || real[t * K + j]) top = std::max(top, v);
    }
    if (!sigmoid)
      for (int64_t j = 0; j < K; ++j) cp[t * K + j] -= top;
  }
  Tensor raw = sigmoid ? at::sigmoid_(chosen) : at::exp_(chosen);  // in place: the same kernel
  float* rp = raw.data_ptr<float>();
  if (row_policy)
    for (int64_t i = 0; i < T * K; ++i) rp[i] *= static_cast<float>(real[i]);
  Tensor total = at::sum(raw, {-1}, true);
  const float* tp = total.data_ptr<float>();
  Tensor weights = raw;  // each weight is written over its own raw value
  float* wp = rp;
  const float fscale = static_cast<float>(scale);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < K; ++j) {
      if (!r.votes(t)) {
        wp[t * K + j] = nwp[t * K + j];
        continue;
      }
      float w = sigmoid ? rp[t * K + j] / (tp[t] + 1e-20f) : rp[t * K + j] / tp[t];
      if (!renormalize) w = w * mp[t];
      if (scale != 1.0) w = w * fscale;
      wp[t * K + j] = w;
    }
  return {weights, ids};
}


enum Scoring : int64_t { SOFTMAX = 0, SOFTMAX_TOPK = 1, SIGMOID = 2 };

struct Native {
  Tensor w, ids, sel, mass;  // [T, K] f32, [T, K] i64, [T, E] f32, [T] f32
};

// out[t, j] = src[t, ids[t, j]] as a new contiguous [T, K] tensor (torch's gather).
Tensor gather_rows(const Tensor& src, const Tensor& ids) {
  Tensor s = src.contiguous(), i = ids.contiguous();
  const int64_t T = i.size(0), K = i.size(1), E = s.size(1);
  Tensor out = at::empty({T, K}, s.options());
  const float* sp = s.data_ptr<float>();
  const int64_t* idp = i.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < K; ++j) op[t * K + j] = sp[t * E + idp[t * K + j]];
  return out;
}

// routing._native, op for op (the same ATen kernels on the same shapes where order or
// transcendental functions matter, single IEEE operations elsewhere).
Native native_routing(const Tensor& x, int64_t K, int64_t scoring, bool renormalize,
                      const std::optional<Tensor>& bias, int64_t n_group, int64_t topk_group, double scale,
                      const std::optional<Tensor>& given_w, const std::optional<Tensor>& given_ids) {
  const int64_t T = x.size(0), E = x.size(1);
  const Tensor ones = at::ones({T}, x.options());
  // The score that chooses, biased if a bias is given, in logit space (clamped to (0, 1)).
  auto biased = [&](const Tensor& scores, Tensor& choice) {
    Tensor b = bias->to(at::kFloat).contiguous();
    choice = at::empty_like(scores);
    Tensor clamped = at::empty_like(scores);
    const float *sp = scores.data_ptr<float>(), *bp = b.data_ptr<float>();
    float *cp = choice.data_ptr<float>(), *kp = clamped.data_ptr<float>();
    const float lo = static_cast<float>(1e-12), hi = static_cast<float>(1 - 1e-7);
    for (int64_t i = 0; i < T * E; ++i) {
      cp[i] = sp[i] + bp[i % E];
      kp[i] = std::min(std::max(cp[i], lo), hi);
    }
    return at::logit(clamped);
  };
  if (given_w && n_group == 0) {
    // ids are returned as the native ids: a copy, never the caller's tensor (an operator's
    // outputs must not alias its inputs; torch.compile reuses output buffers).
    Tensor w = given_w->to(at::kFloat), ids = given_ids->to(at::kLong, false, true);
    Tensor choice, sel = scoring == SIGMOID && bias ? biased(at::sigmoid(x), choice) : x;
    if (renormalize) return {w, ids, sel, ones};
    Tensor probs = scoring == SOFTMAX ? at::softmax(x, -1) : at::sigmoid(x);
    return {w, ids, sel, at::sum(gather_rows(probs, ids), {-1})};
  }
  if (given_w) {  // grouped: the row's groups are needed, so route and keep the engine's result
    Native n = native_routing(x, K, scoring, renormalize, bias, n_group, topk_group, scale, {}, {});
    return {given_w->to(at::kFloat), given_ids->to(at::kLong, false, true), n.sel, n.mass};
  }
  if (scoring == SOFTMAX) {
    auto [w, ids] = at::topk(at::softmax(x, -1), K, -1);
    Tensor mass = at::sum(w, {-1});
    if (renormalize) {
      float* wp = w.data_ptr<float>();
      const float* mp = mass.data_ptr<float>();
      for (int64_t i = 0; i < T * K; ++i) wp[i] = wp[i] / mp[i / K];
    }
    return {w, ids, x, mass};
  }
  if (scoring == SOFTMAX_TOPK) {
    auto [vals, ids] = at::topk(x, K, -1);
    return {at::softmax(vals, -1), ids, x, ones};
  }
  Tensor scores = at::sigmoid(x);
  Tensor choice = scores, sel = x;
  if (bias) sel = biased(scores, choice);
  if (n_group > 0) {
    // DeepSeek-V3: groups by the sum of their best two biased scores; outside the row's
    // chosen groups the choice is 0 and the selection logit -inf.
    const int64_t size = E / n_group;
    Tensor group_scores = at::sum(std::get<0>(at::topk(choice.view({T, n_group, size}),
                                                       std::min<int64_t>(2, size), -1)), {-1});
    Tensor groups = std::get<1>(at::topk(group_scores, topk_group, -1)).contiguous();
    Tensor masked = choice.clone(), sel_masked = sel.contiguous().clone();
    float *cp = masked.data_ptr<float>(), *lp = sel_masked.data_ptr<float>();
    const int64_t* gp = groups.data_ptr<int64_t>();
    std::vector<uint8_t> allowed(n_group);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int64_t j = 0; j < topk_group; ++j) allowed[gp[t * topk_group + j]] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!allowed[e / size]) {
          cp[t * E + e] = 0.f;
          lp[t * E + e] = -INFINITY;
        }
    }
    choice = masked;
    sel = sel_masked;
  }
  Tensor ids = std::get<1>(at::topk(choice, K, -1));
  Tensor w = gather_rows(scores, ids);
  Tensor mass = at::sum(w, {-1});
  float* wp = w.data_ptr<float>();
  const float* mp = mass.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  for (int64_t i = 0; i < T * K; ++i) {
    if (renormalize) wp[i] = wp[i] / (mp[i / K] + 1e-20f);
    wp[i] = wp[i] * fscale;
  }
  return {w, ids, sel, mass};
}

// The operator: native routing, then the policy step. Returns (weights, ids, native ids).
std::tuple<Tensor, Tensor, Tensor> route(const Tensor& x, const std::optional<Tensor>& vote,
                                         const std::optional<Tensor>& given_w,
                                         const std::optional<Tensor>& given_ids,
                                         const std::optional<Tensor>& bias, int64_t top_k, int64_t scoring,
                                         bool renormalize, int64_t n_group, int64_t topk_group, double scale,
                                         int64_t policy, double p, int64_t n0, int64_t n1, bool flag) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lynx_moe.route: x must be float32 [T, E]");
  Tensor xc = x.contiguous();
  Native n = native_routing(xc, top_k, scoring, renormalize, bias, n_group, topk_group, scale, given_w, given_ids);
  auto [w, ids] = inside(xc, n.sel, n.w, n.ids, n.mass, vote, policy, p, n0, n1, flag, scoring == SIGMOID,
                         renormalize, scale, n_group > 0);
  return {w, ids, n.ids};
}

}  // namespace

TORCH_LIBRARY(lynx_moe, m) {
  m.def("route(Tensor x, Tensor? vote, Tensor? native_w, Tensor? native_ids, Tensor? bias, int top_k, "
        "int scoring, bool renormalize, int n_group, int topk_group, float scale, int policy, float p, "
        "int n0, int n1, bool flag) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lynx_moe, CPU, m) { m.impl("route", &route); }
