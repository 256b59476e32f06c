// CPU fast paths of the CLIP, SigLIP and DINO losses (fastenc._C); Python glue and autograd in
// fastenc/losses/native.py, torch references in fastenc/losses/{contrastive,sigmoid,dino}.py.
//
// Shapes: B = local rows, N = columns (N = B in one process), D = feature dim, R = rows per tile (chunk),
// C = student crops, G = global (teacher) crops, K = prototypes. Tiles S = X_r Y^T [R, N] are computed with
// at::mm (BLAS) in the features' dtype; every exp / log / sum runs in fp32 (loss totals in double) on values
// upcast from the tile, and tile gradients are cast back to the features' dtype for the gradient products,
// as autograd does through the references' `.float()`.
//
// Memory: one [R, N] tile in the features' dtype (R * N * 4 <= ~16 MiB by default, chosen in native.py) plus
// O(B + N) fp32 statistics; nothing of size B x N exists at any time, and forward hands backward only softmax
// statistics (max and 1 / sum-exp: 2 floats per row or column) for CLIP and DINO, nothing for SigLIP.
//
// CLIP, z = t S (t = logit scale), w = dL/dloss / (2B), P_row = softmax over columns, P_col = over rows.
//   Shared tile (one process: columns are the same B rows, offset 0): L = (sum_i lse_row_i + sum_j lse_col_j
//   - 2 sum_i z_ii) / (2B). Forward computes each tile once: row max / sum-exp within the tile, column max /
//   sum-exp online across tiles (each column block owned by one thread, so no merge depends on the thread
//   count). Backward recomputes each tile once and forms, in one fused pass,
//       dS_ij = t * w * (P_row_ij + P_col_ij - 2 [i == j]),   dt = sum_ij (dS_ij / t) * S_ij,
//   then dI_r = dS @ T and dT += dS^T @ I_r. Tile products per step: 1 (forward) + 3 (backward) = 4 B*B*D,
//   against 6 in open_clip's ClipLoss (2 logits matmuls forward, 4 gradient matmuls backward).
//   General (B rows vs N gathered columns, row i's positive at column offset + i): each direction separately,
//   as fastenc/losses/chunked.py but with fused elementwise passes: 2 (forward) + 6 (backward) B*N*D products.
// SigLIP, z = t S + b, label l_ij = +1 on the diagonal iff `positives`, else -1:
//   L = sum_ij softplus(-l_ij z_ij), softplus(x) = max(x, 0) + log1p(exp(-|x|));
//   dz_ij = g * (sigmoid(z_ij) - [l_ij = +1]); dS = t dz, dt = sum dz * S, db = sum dz.
//   Forward keeps only the inputs; products: 1 (forward) + 3 (backward) B*M*D.
// DINO, per batch row b (parallel over b), q_ib = softmax((teacher_ib - center) / tau_t) (no gradient),
//   log p_vb = log_softmax(student_vb / tau_s); with n_terms = G*C - G:
//   L = -(1 / (B n_terms)) sum_b [ (sum_i q_ib) . (sum_v log p_vb) - sum_{i<G} q_ib . log p_ib ],
//   d student_vb = -(sum_{i != v} q_ib - n_v p_vb) * dL / (tau_s B n_terms), n_v = #{i < G : i != v}.
//   Forward: a max pass and a sum-exp pass per view row, then the cross terms streamed over K in blocks;
//   backward recomputes q and p from the saved per-row statistics. No [crops, B, K] temporary.
//
// Determinism: fixed partitions (rows, column blocks, fixed-size summation blocks) and fixed-order merges, so
// two calls give bitwise equal results (the DINO teacher sum merges per-thread partials in thread order:
// deterministic for a given thread count). BLAS products are repeatable for fixed shapes and threads.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using BF16 = c10::BFloat16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 256;  // column block (CLIP column statistics), K block (DINO), summation block

// Hot loops are compiled twice on x86-64, for AVX2 and for the baseline (SSE2), chosen at load time by CPU feature
// (an "arch=" clone would be chosen by CPU model, and skipped on AMD), so one build runs everywhere and still uses
// 8-wide vectors where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTENC_NO_CLONES)
#define FASTENC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTENC_CLONES
#endif
#define FASTENC_INLINE inline __attribute__((always_inline))

// Branch-free helpers, always inlined into the clones (a plain inline function is not inlined into a clone compiled
// for another -march, which keeps its loop scalar); same NaN behaviour as std::min / std::max.
FASTENC_INLINE float min_f(float a, float b) { return b < a ? b : a; }
FASTENC_INLINE float max_f(float a, float b) { return a < b ? b : a; }
FASTENC_INLINE float abs_f(float a) { return a < 0.0f ? -a : a; }
FASTENC_INLINE int64_t min_i(int64_t a, int64_t b) { return b < a ? b : a; }

FASTENC_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
FASTENC_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FASTENC_INLINE float load(const float* p, int64_t i) { return p[i]; }
FASTENC_INLINE float load(const BF16* p, int64_t i) {
  return bits_to_float(uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
FASTENC_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
FASTENC_INLINE void store(BF16* p, int64_t i, float v) {  // round to nearest even, as c10::BFloat16(float)
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = uint16_t(v != v ? 0x7FC0u : rounded);
}

// exp(x) in fp32 (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial; ~1 ulp), written branch-free
// so that loops over it vectorize. Arguments below -87 (where fp32 results turn subnormal) return 0, -inf too;
// NaN propagates. All callers pass x <= 0 (a value minus its maximum, or -|x|).
FASTENC_INLINE float fast_exp(float x) {
  const float xc = min_f(x, 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds x / ln2 to an integer in the low mantissa bits
  float nf = xc * 1.44269504088896341f + magic;
  const int32_t n = int32_t(float_to_bits(nf)) - int32_t(0x4B400000);
  nf -= magic;
  float r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float res = y * bits_to_float(uint32_t(n + 127) << 23);
  return x < -87.0f ? 0.0f : res;
}

// log(1 + e) for e in [0, 1], accurate also for tiny e (Goldberg: log(u) * e / (u - 1) with u = fl(1 + e)), with
// Cephes' logf polynomial on the mantissa of u in [sqrt(1/2), sqrt(2)).
FASTENC_INLINE float log1p_unit(float e) {
  const float u = 1.0f + e;
  const bool hi = u > 1.41421356f;
  const float m = hi ? u * 0.5f : u;
  const float k = hi ? 1.0f : 0.0f;
  const float x = m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  const float lg = x + y + 0.693359375f * k;
  const float d = u - 1.0f;
  return d == 0.0f ? e : lg * (e / d);
}

// softplus(x) = -log sigmoid(-x) = max(x, 0) + log1p(exp(-|x|))
FASTENC_INLINE float softplus(float x) { return max_f(x, 0.0f) + log1p_unit(fast_exp(-abs_f(x))); }

FASTENC_INLINE float sigmoid(float z) {
  const float e = fast_exp(-abs_f(z));
  const float inv = 1.0f / (1.0f + e);
  return z >= 0.0f ? inv : e * inv;
}

// ---------------------------------------------------------------------------------------------------------------
// Row and block kernels (one row or one column block of a tile; the OpenMP loops below call them).

// Softmax statistics of one row: max m and sum_j exp(z_j - m). Kept apart rather than folded into one
// log-sum-exp: a probability is then exp(z - m) * (1 / sum), with z - m exact, instead of exp(z - lse) with lse
// rounded to an ulp of |z| (up to 100 for CLIP logits, 150 for DINO teacher logits: 1e-5 relative error).
struct RowStats {
  float max;
  double sum;
};

// Statistics of t * s_j over one row of N; fp32 terms summed in blocks of kBlock, blocks summed in double.
template <typename T>
FASTENC_INLINE RowStats row_stats_impl(const T* s, int64_t N, float t) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < N; ++j) m = max_f(m, t * load(s, j));
  double total = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
    const int64_t j1 = min_i(N, j0 + kBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = j0; j < j1; ++j) acc += fast_exp(t * load(s, j) - m);
    total += acc;
  }
  return {m, total};
}
FASTENC_CLONES RowStats row_stats(const float* s, int64_t N, float t) { return row_stats_impl(s, N, t); }
FASTENC_CLONES RowStats row_stats(const BF16* s, int64_t N, float t) { return row_stats_impl(s, N, t); }

// Online column statistics over one column block [j0, j0 + W) of an [R, N] tile: running max and sum-exp of
// t s_ij over rows, merged into (col_max, col_sum), which hold the statistics of all earlier tiles.
template <typename T>
FASTENC_INLINE void col_update_impl(const T* S, int64_t R, int64_t N, int64_t j0, int64_t W, float t,
                                    float* col_max, float* col_sum) {
  float m[kBlock], acc[kBlock];
  for (int64_t jj = 0; jj < W; ++jj) m[jj] = col_max[j0 + jj];
  for (int64_t i = 0; i < R; ++i) {
    const T* s = S + i * N + j0;
#pragma omp simd
    for (int64_t jj = 0; jj < W; ++jj) m[jj] = max_f(m[jj], t * load(s, jj));
  }
  for (int64_t jj = 0; jj < W; ++jj) acc[jj] = 0.0f;
  for (int64_t i = 0; i < R; ++i) {
    const T* s = S + i * N + j0;
#pragma omp simd
    for (int64_t jj = 0; jj < W; ++jj) acc[jj] += fast_exp(t * load(s, jj) - m[jj]);
  }
  for (int64_t jj = 0; jj < W; ++jj) {
    // earlier tiles' sum rescaled to the new max (exp(-inf) = 0 before the first tile)
    col_sum[j0 + jj] = col_sum[j0 + jj] * fast_exp(col_max[j0 + jj] - m[jj]) + acc[jj];
    col_max[j0 + jj] = m[jj];
  }
}
FASTENC_CLONES void col_update(const float* S, int64_t R, int64_t N, int64_t j0, int64_t W, float t, float* cm,
                               float* cs) {
  col_update_impl(S, R, N, j0, W, t, cm, cs);
}
FASTENC_CLONES void col_update(const BF16* S, int64_t R, int64_t N, int64_t j0, int64_t W, float t, float* cm,
                               float* cs) {
  col_update_impl(S, R, N, j0, W, t, cm, cs);
}

// CLIP backward, one tile row, in place: s_j <- t * g_j with z = t s and
//   g_j = w * (P_row_j [+ P_col_j] - k [j == diag]),
//   P_row_j = exp(z_j - m_row) r_row,  P_col_j = exp(z_j - m_col_j) r_col_j  (m: max, r: 1 / sum-exp);
// returns sum_j g_j s_j (the row's share of dL/dt). `m_col` null: row softmax only
// (general path, k = 1); else both softmaxes (shared tile, k = 2).
template <typename T>
FASTENC_INLINE double clip_grad_row_impl(T* s, int64_t N, float t, float w, float m_row, float r_row,
                                         const float* m_col, const float* r_col, int64_t diag) {
  double dt = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
    const int64_t j1 = min_i(N, j0 + kBlock);
    float acc = 0.0f;
    if (m_col) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) {
        const float sv = load(s, j), z = t * sv;
        const float p = fast_exp(z - m_row) * r_row + fast_exp(z - m_col[j]) * r_col[j];
        const float g = (p - (j == diag ? 2.0f : 0.0f)) * w;
        acc += g * sv;
        store(s, j, g * t);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) {
        const float sv = load(s, j);
        const float g = (fast_exp(t * sv - m_row) * r_row - (j == diag ? 1.0f : 0.0f)) * w;
        acc += g * sv;
        store(s, j, g * t);
      }
    }
    dt += acc;
  }
  return dt;
}
FASTENC_CLONES double clip_grad_row(float* s, int64_t N, float t, float w, float m, float r, const float* mc,
                                    const float* rc, int64_t d) {
  return clip_grad_row_impl(s, N, t, w, m, r, mc, rc, d);
}
FASTENC_CLONES double clip_grad_row(BF16* s, int64_t N, float t, float w, float m, float r, const float* mc,
                                    const float* rc, int64_t d) {
  return clip_grad_row_impl(s, N, t, w, m, r, mc, rc, d);
}

// SigLIP forward, one tile row: sum_j softplus(-l_j z_j), z = t s + b, l_j = +1 at j == diag (-1: none), else -1.
template <typename T>
FASTENC_INLINE double siglip_row_impl(const T* s, int64_t N, float t, float b, int64_t diag) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
    const int64_t j1 = min_i(N, j0 + kBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = j0; j < j1; ++j) {
      const float z = t * load(s, j) + b;
      acc += softplus(j == diag ? -z : z);
    }
    total += acc;
  }
  return total;
}
FASTENC_CLONES double siglip_row(const float* s, int64_t N, float t, float b, int64_t d) {
  return siglip_row_impl(s, N, t, b, d);
}
FASTENC_CLONES double siglip_row(const BF16* s, int64_t N, float t, float b, int64_t d) {
  return siglip_row_impl(s, N, t, b, d);
}

// SigLIP backward, one tile row, in place: s_j <- t * dz_j, dz_j = g (sigmoid(z_j) - [j == diag]); stores the row's
// sums sum_j dz_j s_j (its share of dL/dt) in *dt and sum_j dz_j in *db.
template <typename T>
FASTENC_INLINE void siglip_grad_row_impl(T* s, int64_t N, float t, float b, float g, int64_t diag, double* dt,
                                         double* db) {
  double sum_t = 0.0, sum_b = 0.0;
  for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
    const int64_t j1 = min_i(N, j0 + kBlock);
    float acc_t = 0.0f, acc_b = 0.0f;
#pragma omp simd reduction(+ : acc_t, acc_b)
    for (int64_t j = j0; j < j1; ++j) {
      const float sv = load(s, j);
      const float dz = (sigmoid(t * sv + b) - (j == diag ? 1.0f : 0.0f)) * g;
      acc_t += dz * sv;
      acc_b += dz;
      store(s, j, dz * t);
    }
    sum_t += acc_t;
    sum_b += acc_b;
  }
  *dt = sum_t;
  *db = sum_b;
}
FASTENC_CLONES void siglip_grad_row(float* s, int64_t N, float t, float b, float g, int64_t d, double* dt,
                                    double* db) {
  siglip_grad_row_impl(s, N, t, b, g, d, dt, db);
}
FASTENC_CLONES void siglip_grad_row(BF16* s, int64_t N, float t, float b, float g, int64_t d, double* dt,
                                    double* db) {
  siglip_grad_row_impl(s, N, t, b, g, d, dt, db);
}

// DINO: softmax statistics of (x_k - c_k) / tau over one row (c null: no center); the row is in L2 for the 2nd pass.
// (x - c) / tau is computed as a division, as the reference does, so logits match it bitwise.
template <typename T>
FASTENC_INLINE RowStats dino_row_stats_impl(const T* x, const float* c, int64_t K, float tau) {
  float m = kNegInf;
  if (c) {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) m = max_f(m, (load(x, k) - c[k]) / tau);
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) m = max_f(m, load(x, k) / tau);
  }
  double total = 0.0;
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = min_i(K, k0 + kBlock);
    float acc = 0.0f;
    if (c) {
#pragma omp simd reduction(+ : acc)
      for (int64_t k = k0; k < k1; ++k) acc += fast_exp((load(x, k) - c[k]) / tau - m);
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t k = k0; k < k1; ++k) acc += fast_exp(load(x, k) / tau - m);
    }
    total += acc;
  }
  return {m, total};
}
FASTENC_CLONES RowStats dino_row_stats(const float* x, const float* c, int64_t K, float tau) {
  return dino_row_stats_impl(x, c, K, tau);
}
FASTENC_CLONES RowStats dino_row_stats(const BF16* x, const float* c, int64_t K, float tau) {
  return dino_row_stats_impl(x, c, K, tau);
}

// DINO layout of one batch row b: teacher view i at teacher + (i * B + b) * K, student view v likewise.
struct DinoRow {
  int64_t B, K, C, G, b;
  float tau_s, tau_t;
  const float* center;
  const float* stats_s;  // [2, C * B]: max, 1 / sum-exp of each student row's logits student / tau_s
  const float* stats_t;  // [2, G * B]: the same for (teacher - center) / tau_t
  const float* logsum_s; // [C * B]: log sum-exp - max (forward only)
  FASTENC_INLINE float max_s(int64_t v) const { return stats_s[v * B + b]; }
  FASTENC_INLINE float inv_s(int64_t v) const { return stats_s[C * B + v * B + b]; }
  FASTENC_INLINE float max_t(int64_t i) const { return stats_t[i * B + b]; }
  FASTENC_INLINE float inv_t(int64_t i) const { return stats_t[G * B + i * B + b]; }
};

// Cross terms of one batch row: (sum_i q_i) . (sum_v log p_v) - sum_{i<G} q_i . log p_i, streamed over K blocks.
template <typename T>
FASTENC_INLINE double dino_cross_impl(const T* student, const T* teacher, const DinoRow& r) {
  float Q[kBlock], L[kBlock];
  double cross = 0.0, self = 0.0;
  for (int64_t k0 = 0; k0 < r.K; k0 += kBlock) {
    const int64_t n = min_i(r.K - k0, kBlock);
    for (int64_t kk = 0; kk < n; ++kk) Q[kk] = L[kk] = 0.0f;
    for (int64_t v = 0; v < r.C; ++v) {
      const T* s = student + (v * r.B + r.b) * r.K + k0;
      const float m = r.max_s(v), ls = r.logsum_s[v * r.B + r.b];
#pragma omp simd
      for (int64_t kk = 0; kk < n; ++kk) L[kk] += (load(s, kk) / r.tau_s - m) - ls;  // log p_v
    }
    for (int64_t i = 0; i < r.G; ++i) {
      const T* tch = teacher + (i * r.B + r.b) * r.K + k0;
      const T* s = student + (i * r.B + r.b) * r.K + k0;
      const float* c = r.center + k0;
      const float mt = r.max_t(i), it = r.inv_t(i), ms = r.max_s(i), ls = r.logsum_s[i * r.B + r.b];
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t kk = 0; kk < n; ++kk) {
        const float q = fast_exp((load(tch, kk) - c[kk]) / r.tau_t - mt) * it;
        Q[kk] += q;
        acc += q * ((load(s, kk) / r.tau_s - ms) - ls);
      }
      self += acc;
    }
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t kk = 0; kk < n; ++kk) acc += Q[kk] * L[kk];
    cross += acc;
  }
  return cross - self;
}
FASTENC_CLONES double dino_cross(const float* s, const float* t, const DinoRow& r) { return dino_cross_impl(s, t, r); }
FASTENC_CLONES double dino_cross(const BF16* s, const BF16* t, const DinoRow& r) { return dino_cross_impl(s, t, r); }

// Student gradient of one batch row: d_vk = (sum_{i != v} q_ik - n_v p_vk) * scale, scale = -dL / (tau_s B n_terms).
// qbuf: G * kBlock floats of scratch.
template <typename T>
FASTENC_INLINE void dino_grad_impl(const T* student, const T* teacher, T* grad, const DinoRow& r, float scale,
                                   float* qbuf) {
  float Q[kBlock];
  for (int64_t k0 = 0; k0 < r.K; k0 += kBlock) {
    const int64_t n = min_i(r.K - k0, kBlock);
    for (int64_t kk = 0; kk < n; ++kk) Q[kk] = 0.0f;
    for (int64_t i = 0; i < r.G; ++i) {
      const T* tch = teacher + (i * r.B + r.b) * r.K + k0;
      const float* c = r.center + k0;
      const float mt = r.max_t(i), it = r.inv_t(i);
      float* q = qbuf + i * kBlock;
#pragma omp simd
      for (int64_t kk = 0; kk < n; ++kk) {
        q[kk] = fast_exp((load(tch, kk) - c[kk]) / r.tau_t - mt) * it;
        Q[kk] += q[kk];
      }
    }
    for (int64_t v = 0; v < r.C; ++v) {
      const int64_t row = (v * r.B + r.b) * r.K + k0;
      const T* s = student + row;
      T* d = grad + row;
      const float ms = r.max_s(v), is = r.inv_s(v);
      if (v < r.G) {
        const float* q = qbuf + v * kBlock;
        const float nv = float(r.G - 1);
#pragma omp simd
        for (int64_t kk = 0; kk < n; ++kk)
          store(d, kk, ((Q[kk] - q[kk]) - nv * (fast_exp(load(s, kk) / r.tau_s - ms) * is)) * scale);
      } else {
        const float nv = float(r.G);
#pragma omp simd
        for (int64_t kk = 0; kk < n; ++kk)
          store(d, kk, (Q[kk] - nv * (fast_exp(load(s, kk) / r.tau_s - ms) * is)) * scale);
      }
    }
  }
}
FASTENC_CLONES void dino_grad(const float* s, const float* t, float* g, const DinoRow& r, float scale, float* q) {
  dino_grad_impl(s, t, g, r, scale, q);
}
FASTENC_CLONES void dino_grad(const BF16* s, const BF16* t, BF16* g, const DinoRow& r, float scale, float* q) {
  dino_grad_impl(s, t, g, r, scale, q);
}

// ---------------------------------------------------------------------------------------------------------------
// Tile drivers: one OpenMP loop each, over tile rows or column blocks (static partitions, results per row/block).

// Row softmax statistics of a tile: max, 1 / sum-exp (saved for backward) and the log-sum-exp in double (for the
// loss value).
template <typename T>
void tile_row_stats(const at::Tensor& S, float t, float* max, float* inv, double* lse) {
  const int64_t R = S.size(0), N = S.size(1);
  const T* p = S.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < R; ++i) {
    const RowStats st = row_stats(p + i * N, N, t);
    max[i] = st.max;
    inv[i] = float(1.0 / st.sum);
    lse[i] = double(st.max) + std::log(st.sum);
  }
}

template <typename T>
void tile_col_update(const at::Tensor& S, float t, float* col_max, float* col_sum) {
  const int64_t R = S.size(0), N = S.size(1);
  const int64_t num_blocks = (N + kBlock - 1) / kBlock;
  const T* p = S.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t cb = 0; cb < num_blocks; ++cb) {
    const int64_t j0 = cb * kBlock;
    col_update(p, R, N, j0, std::min(kBlock, N - j0), t, col_max, col_sum);
  }
}

// m_row, r_row: this tile's rows' statistics; m_col, r_col: all columns' (null: row softmax only).
template <typename T>
void tile_clip_grad(at::Tensor& S, float t, float w, const float* m_row, const float* r_row, const float* m_col,
                    const float* r_col, int64_t diag0, double* dt_rows) {
  const int64_t R = S.size(0), N = S.size(1);
  T* p = S.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < R; ++i)
    dt_rows[i] = clip_grad_row(p + i * N, N, t, w, m_row[i], r_row[i], m_col, r_col, diag0 + i);
}

template <typename T>
void tile_siglip(const at::Tensor& S, float t, float b, int64_t diag0, double* rows) {
  const int64_t R = S.size(0), N = S.size(1);
  const T* p = S.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < R; ++i) rows[i] = siglip_row(p + i * N, N, t, b, diag0 < 0 ? -1 : diag0 + i);
}

template <typename T>
void tile_siglip_grad(at::Tensor& S, float t, float b, float g, int64_t diag0, double* dt_rows, double* db_rows) {
  const int64_t R = S.size(0), N = S.size(1);
  T* p = S.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < R; ++i)
    siglip_grad_row(p + i * N, N, t, b, g, diag0 < 0 ? -1 : diag0 + i, dt_rows + i, db_rows + i);
}

double sum_in_order(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Checks

// Features reach the kernels only through at::mm, so any strides do (a column slice of gathered features, say);
// DINO reads its rows directly and needs them contiguous.
void check_features(const at::Tensor& x, const char* name, bool contiguous = false) {
  TORCH_CHECK(x.device().is_cpu(), "fastenc._C: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "fastenc._C: ", name, " must be a non-empty 2-D tensor, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fastenc._C: ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!contiguous || x.is_contiguous(), "fastenc._C: ", name, " must be contiguous");
}

void check_pair(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastenc._C: features must share a dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.size(1) == y.size(1), "fastenc._C: features must share D, got ", x.sizes(), " and ", y.sizes());
}

bool is_bf16(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16; }

// The right-hand operand of the row-gradient product dX_r = dS @ Y. torch's CPU bf16 GEMM is an order of magnitude
// slower when both operands are row-major (measured on AVX2 without AVX512-BF16, torch 2.14: [1024, 4096] x
// [4096, 512] at 0.9 GFLOPS, 9 with Y column-major; fp32: 60), so bf16 features get a column-major copy (B * D).
at::Tensor row_grad_operand(const at::Tensor& Y) { return is_bf16(Y) ? Y.t().contiguous().t() : Y; }

// S = X_r Y^T into a tile the row kernels read with row stride N = S.size(1).
void tile_product(at::Tensor& S, const at::Tensor& X_r, const at::Tensor& Y) {
  at::mm_out(S, X_r, Y.t());
  TORCH_INTERNAL_ASSERT(S.is_contiguous(), "fastenc._C: tile product must be contiguous");
}

at::Tensor scalar(double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat)); }

// ---------------------------------------------------------------------------------------------------------------
// CLIP, shared tile (one process): returns (loss, row_stats [2, B], col_stats [2, B]); stats rows: max, 1 / sum-exp.

std::vector<at::Tensor> clip_shared_fwd(const at::Tensor& I, const at::Tensor& T, double scale, int64_t chunk) {
  check_features(I, "img_BD");
  check_features(T, "txt_BD");
  check_pair(I, T);
  TORCH_CHECK(I.size(0) == T.size(0), "fastenc._C: shared-tile CLIP needs as many text as image rows");
  TORCH_CHECK(chunk >= 1, "fastenc._C: chunk must be >= 1, got ", chunk);
  const int64_t B = I.size(0), R = std::min(chunk, B);
  const float t = float(scale);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor row_stats = at::empty({2, B}, f32), col_stats = at::empty({2, B}, f32);
  float* row_max = row_stats.data_ptr<float>();
  float* col_max = col_stats.data_ptr<float>();
  std::fill(col_max, col_max + B, kNegInf);
  std::vector<float> col_sum(B, 0.0f);
  std::vector<double> lse(R);
  double total = 0.0;  // sum_i lse_row_i - 2 sum_i z_ii (the column log-sum-exps are added at the end)
  at::Tensor tile = at::empty({R, B}, I.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    at::Tensor S = tile.narrow(0, 0, r);
    tile_product(S, I.narrow(0, r0, r), T);
    if (is_bf16(I)) {
      tile_row_stats<BF16>(S, t, row_max + r0, row_max + B + r0, lse.data());
      tile_col_update<BF16>(S, t, col_max, col_sum.data());
      const BF16* p = S.data_ptr<BF16>();
      for (int64_t i = 0; i < r; ++i) total += lse[i] - 2.0 * double(t * load(p, i * B + r0 + i));
    } else {
      tile_row_stats<float>(S, t, row_max + r0, row_max + B + r0, lse.data());
      tile_col_update<float>(S, t, col_max, col_sum.data());
      const float* p = S.data_ptr<float>();
      for (int64_t i = 0; i < r; ++i) total += lse[i] - 2.0 * double(t * p[i * B + r0 + i]);
    }
  }
  for (int64_t j = 0; j < B; ++j) {
    total += double(col_max[j]) + std::log(double(col_sum[j]));
    col_max[B + j] = float(1.0 / double(col_sum[j]));
  }
  return {scalar(total / (2.0 * B)), row_stats, col_stats};
}

// The backward loop both CLIP paths share: recompute each [R, N] tile S = X_r Y^T, turn it into dL/ds in place
// (tile_clip_grad: row-softmax term from row_stats [2, B], column-softmax term from col_stats [2, N] when given, the
// positive of row i at column offset + i), then dX_r = dS Y and dY += dS^T X_r.
// Returns (dX or undefined, dY or undefined, dt (0-dim fp32)).
static std::vector<at::Tensor> clip_tiles_bwd(const at::Tensor& X, const at::Tensor& Y, float t, float w,
                                              const float* row_stats, const float* col_stats, int64_t offset,
                                              int64_t chunk, bool need_x, bool need_y) {
  const int64_t B = X.size(0), N = Y.size(0), R = std::min(chunk, B);
  const float* col_max = col_stats ? col_stats : nullptr;
  const float* col_rsum = col_stats ? col_stats + N : nullptr;
  at::Tensor dX = need_x ? at::empty_like(X) : at::Tensor();
  // dY accumulates over tiles: in place in fp32; through a bf16 product per tile (added in fp32) for bf16.
  at::Tensor dY = need_y ? at::zeros(Y.sizes(), Y.options().dtype(at::kFloat)) : at::Tensor();
  const at::Tensor Y_rhs = need_x ? row_grad_operand(Y) : Y;
  std::vector<double> dt_rows(R);
  double dt = 0.0;
  at::Tensor tile = at::empty({R, N}, X.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    at::Tensor S = tile.narrow(0, 0, r);
    at::Tensor X_r = X.narrow(0, r0, r);
    tile_product(S, X_r, Y);
    if (is_bf16(X))
      tile_clip_grad<BF16>(S, t, w, row_stats + r0, row_stats + B + r0, col_max, col_rsum, offset + r0,
                           dt_rows.data());
    else
      tile_clip_grad<float>(S, t, w, row_stats + r0, row_stats + B + r0, col_max, col_rsum, offset + r0,
                            dt_rows.data());
    for (int64_t i = 0; i < r; ++i) dt += dt_rows[i];
    if (need_x) {
      at::Tensor out = dX.narrow(0, r0, r);
      at::mm_out(out, S, Y_rhs);
    }
    if (need_y) {
      if (is_bf16(X))
        dY.add_(at::mm(S.t(), X_r));
      else
        dY.addmm_(S.t(), X_r);
    }
  }
  if (need_y && is_bf16(Y)) dY = dY.to(Y.scalar_type());
  return {dX, dY, scalar(dt)};
}

// Returns (dI or undefined, dT or undefined, dt (0-dim fp32)); grad_scale = dL/dloss.
std::vector<at::Tensor> clip_shared_bwd(const at::Tensor& I, const at::Tensor& T, double scale,
                                        const at::Tensor& row_stats, const at::Tensor& col_stats, double grad_scale,
                                        int64_t chunk, bool need_i, bool need_t) {
  const int64_t B = I.size(0);
  return clip_tiles_bwd(I, T, float(scale), float(grad_scale / (2.0 * B)), row_stats.data_ptr<float>(),
                        col_stats.data_ptr<float>(), 0, chunk, need_i, need_t);
}

// ---------------------------------------------------------------------------------------------------------------
// CLIP, one direction of the general path: rows X [B, D] against columns Y [N, D], row i's positive at column
// offset + i. Forward returns (sum_i (lse_i - z_i,pos) (0-dim fp32), row_stats [2, B]).

std::vector<at::Tensor> clip_rows_fwd(const at::Tensor& X, const at::Tensor& Y, double scale, int64_t offset,
                                      int64_t chunk) {
  check_features(X, "rows");
  check_features(Y, "columns");
  check_pair(X, Y);
  const int64_t B = X.size(0), N = Y.size(0);
  TORCH_CHECK(offset >= 0 && offset + B <= N, "fastenc._C: offset ", offset, " + B ", B, " exceeds N ", N);
  TORCH_CHECK(chunk >= 1, "fastenc._C: chunk must be >= 1, got ", chunk);
  const int64_t R = std::min(chunk, B);
  const float t = float(scale);
  at::Tensor stats = at::empty({2, B}, at::TensorOptions().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  std::vector<double> lse(R);
  double total = 0.0;
  at::Tensor tile = at::empty({R, N}, X.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    at::Tensor S = tile.narrow(0, 0, r);
    tile_product(S, X.narrow(0, r0, r), Y);
    if (is_bf16(X)) {
      tile_row_stats<BF16>(S, t, st + r0, st + B + r0, lse.data());
      const BF16* p = S.data_ptr<BF16>();
      for (int64_t i = 0; i < r; ++i) total += lse[i] - double(t * load(p, i * N + offset + r0 + i));
    } else {
      tile_row_stats<float>(S, t, st + r0, st + B + r0, lse.data());
      const float* p = S.data_ptr<float>();
      for (int64_t i = 0; i < r; ++i) total += lse[i] - double(t * p[i * N + offset + r0 + i]);
    }
  }
  return {scalar(total), stats};
}

// Gradients of w * sum_i (lse_i - z_i,pos): (dX or undefined, dY or undefined, dt).
std::vector<at::Tensor> clip_rows_bwd(const at::Tensor& X, const at::Tensor& Y, double scale,
                                      const at::Tensor& stats, int64_t offset, double w, int64_t chunk, bool need_x,
                                      bool need_y) {
  return clip_tiles_bwd(X, Y, float(scale), float(w), stats.data_ptr<float>(), nullptr, offset, chunk, need_x,
                        need_y);
}

// ---------------------------------------------------------------------------------------------------------------
// SigLIP block X [B, D] x Y [M, D]: forward returns the loss sum (0-dim fp32).

at::Tensor siglip_fwd(const at::Tensor& X, const at::Tensor& Y, double scale, double bias, bool positives,
                      int64_t chunk) {
  check_features(X, "img_BD");
  check_features(Y, "txt_MD");
  check_pair(X, Y);
  const int64_t B = X.size(0), M = Y.size(0);
  TORCH_CHECK(!positives || B == M, "fastenc._C: a SigLIP block with positives must be square, got ", B, " x ", M);
  TORCH_CHECK(chunk >= 1, "fastenc._C: chunk must be >= 1, got ", chunk);
  const int64_t R = std::min(chunk, B);
  std::vector<double> rows(R);
  double total = 0.0;
  at::Tensor tile = at::empty({R, M}, X.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    at::Tensor S = tile.narrow(0, 0, r);
    tile_product(S, X.narrow(0, r0, r), Y);
    if (is_bf16(X))
      tile_siglip<BF16>(S, float(scale), float(bias), positives ? r0 : -1, rows.data());
    else
      tile_siglip<float>(S, float(scale), float(bias), positives ? r0 : -1, rows.data());
    for (int64_t i = 0; i < r; ++i) total += rows[i];
  }
  return scalar(total);
}

// (dX or undefined, dY or undefined, dt, db) for the loss sum times grad_scale.
std::vector<at::Tensor> siglip_bwd(const at::Tensor& X, const at::Tensor& Y, double scale, double bias,
                                   bool positives, double grad_scale, int64_t chunk, bool need_x, bool need_y) {
  const int64_t B = X.size(0), M = Y.size(0), R = std::min(chunk, B);
  at::Tensor dX = need_x ? at::empty_like(X) : at::Tensor();
  at::Tensor dY = need_y ? at::zeros(Y.sizes(), Y.options().dtype(at::kFloat)) : at::Tensor();
  const at::Tensor Y_rhs = need_x ? row_grad_operand(Y) : Y;
  std::vector<double> dt_rows(R), db_rows(R);
  double dt = 0.0, db = 0.0;
  at::Tensor tile = at::empty({R, M}, X.options());
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    at::Tensor S = tile.narrow(0, 0, r);
    at::Tensor X_r = X.narrow(0, r0, r);
    tile_product(S, X_r, Y);
    const int64_t d0 = positives ? r0 : -1;
    if (is_bf16(X))
      tile_siglip_grad<BF16>(S, float(scale), float(bias), float(grad_scale), d0, dt_rows.data(), db_rows.data());
    else
      tile_siglip_grad<float>(S, float(scale), float(bias), float(grad_scale), d0, dt_rows.data(), db_rows.data());
    for (int64_t i = 0; i < r; ++i) dt += dt_rows[i], db += db_rows[i];
    if (need_x) {
      at::Tensor out = dX.narrow(0, r0, r);
      at::mm_out(out, S, Y_rhs);
    }
    if (need_y) {
      if (is_bf16(X))
        dY.add_(at::mm(S.t(), X_r));
      else
        dY.addmm_(S.t(), X_r);
    }
  }
  if (need_y && is_bf16(Y)) dY = dY.to(Y.scalar_type());
  return {dX, dY, scalar(dt), scalar(db)};
}

// ---------------------------------------------------------------------------------------------------------------
// DINO: student [C * B, K], teacher [G * B, K] crop-major, center fp32 [K]. Forward returns (loss,
// stats_student [2, C * B], stats_teacher [2, G * B], teacher_sum [1, K] fp32 or undefined); stats rows: max and
// 1 / sum-exp of each row's logits.

std::vector<at::Tensor> dino_fwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                                 double student_temp, double teacher_temp, int64_t G, bool want_teacher_sum) {
  check_features(student, "student_output", true);
  check_features(teacher, "teacher_output", true);
  check_pair(student, teacher);
  TORCH_CHECK(center.scalar_type() == at::kFloat && center.is_contiguous() && center.numel() == teacher.size(1),
              "fastenc._C: center must be a contiguous fp32 tensor of K values");
  TORCH_CHECK(G >= 1 && teacher.size(0) % G == 0, "fastenc._C: teacher rows not a multiple of G");
  const int64_t K = teacher.size(1), B = teacher.size(0) / G;
  TORCH_CHECK(student.size(0) % B == 0 && student.size(0) / B >= std::max<int64_t>(G, 2),
              "fastenc._C: student rows must be C * B with C >= max(G, 2)");
  const int64_t C = student.size(0) / B;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor stats_s = at::empty({2, C * B}, f32), stats_t = at::empty({2, G * B}, f32);
  at::Tensor tsum = want_teacher_sum ? at::empty({1, K}, f32) : at::Tensor();
  const int max_threads = omp_get_max_threads();
  std::vector<float> partial(want_teacher_sum ? size_t(max_threads) * K : 0, 0.0f);
  std::vector<float> logsum_s(C * B);
  std::vector<double> rows(B);
  const bool bf16 = is_bf16(student);
  const float tau_s = float(student_temp), tau_t = float(teacher_temp);
  const float* c = center.data_ptr<float>();
  float* ss = stats_s.data_ptr<float>();
  float* st = stats_t.data_ptr<float>();
  const void* sp = student.data_ptr();
  const void* tp = teacher.data_ptr();
  int used_threads = 1;
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
#pragma omp single
    used_threads = omp_get_num_threads();
    float* mine = want_teacher_sum ? partial.data() + size_t(tid) * K : nullptr;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < G; ++i) {
        const int64_t row = i * B + b;
        RowStats rs;
        if (bf16) {
          const BF16* x = static_cast<const BF16*>(tp) + row * K;
          rs = dino_row_stats(x, c, K, tau_t);
          if (mine)
            for (int64_t k = 0; k < K; ++k) mine[k] += load(x, k);
        } else {
          const float* x = static_cast<const float*>(tp) + row * K;
          rs = dino_row_stats(x, c, K, tau_t);
          if (mine)
            for (int64_t k = 0; k < K; ++k) mine[k] += x[k];
        }
        st[row] = rs.max;
        st[G * B + row] = float(1.0 / rs.sum);
      }
      for (int64_t v = 0; v < C; ++v) {
        const int64_t row = v * B + b;
        const RowStats rs = bf16 ? dino_row_stats(static_cast<const BF16*>(sp) + row * K, nullptr, K, tau_s)
                                 : dino_row_stats(static_cast<const float*>(sp) + row * K, nullptr, K, tau_s);
        ss[row] = rs.max;
        ss[C * B + row] = float(1.0 / rs.sum);
        logsum_s[row] = float(std::log(rs.sum));
      }
      const DinoRow r{B, K, C, G, b, tau_s, tau_t, c, ss, st, logsum_s.data()};
      rows[b] = bf16 ? dino_cross(static_cast<const BF16*>(sp), static_cast<const BF16*>(tp), r)
                     : dino_cross(static_cast<const float*>(sp), static_cast<const float*>(tp), r);
    }
    // implicit barrier; then merge the per-thread teacher sums in thread order, columns split over threads
    if (want_teacher_sum) {
      float* out = tsum.data_ptr<float>();
#pragma omp for schedule(static)
      for (int64_t k = 0; k < K; ++k) {
        float s = 0.0f;
        for (int th = 0; th < used_threads; ++th) s += partial[size_t(th) * K + k];
        out[k] = s;
      }
    }
  }
  const double total = sum_in_order(rows);
  const double loss = -total / (double(B) * double(G * C - G));
  return {scalar(loss), stats_s, stats_t, tsum};
}

at::Tensor dino_bwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                    double student_temp, double teacher_temp, int64_t G, const at::Tensor& stats_s,
                    const at::Tensor& stats_t, double grad_scale) {
  const int64_t K = teacher.size(1), B = teacher.size(0) / G, C = student.size(0) / B;
  const float tau_s = float(student_temp), tau_t = float(teacher_temp);
  const float scale = float(-grad_scale / (double(tau_s) * double(B) * double(G * C - G)));
  at::Tensor grad = at::empty_like(student);
  const bool bf16 = is_bf16(student);
  const float* c = center.data_ptr<float>();
  const float* ss = stats_s.data_ptr<float>();
  const float* st = stats_t.data_ptr<float>();
#pragma omp parallel
  {
    std::vector<float> qbuf(size_t(G) * kBlock);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const DinoRow r{B, K, C, G, b, tau_s, tau_t, c, ss, st, nullptr};
      if (bf16)
        dino_grad(student.data_ptr<BF16>(), teacher.data_ptr<BF16>(), grad.data_ptr<BF16>(), r, scale, qbuf.data());
      else
        dino_grad(student.data_ptr<float>(), teacher.data_ptr<float>(), grad.data_ptr<float>(), r, scale,
                  qbuf.data());
    }
  }
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc native CPU loss kernels (CLIP, SigLIP, DINO); use them through fastenc.losses.native";
  // The kernels touch no Python object: let other Python threads (data loading) run meanwhile.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("clip_shared_fwd", &clip_shared_fwd, "CLIP, one process, shared tiles: (loss, row_stats, col_stats)", nogil);
  m.def("clip_shared_bwd", &clip_shared_bwd, "CLIP, one process, shared tiles: (d_img, d_txt, d_scale)", nogil);
  m.def("clip_rows_fwd", &clip_rows_fwd, "CLIP, one direction: (sum of row losses, row_stats)", nogil);
  m.def("clip_rows_bwd", &clip_rows_bwd, "CLIP, one direction: (d_rows, d_cols, d_scale)", nogil);
  m.def("siglip_fwd", &siglip_fwd, "SigLIP block: loss sum", nogil);
  m.def("siglip_bwd", &siglip_bwd, "SigLIP block: (d_img, d_txt, d_scale, d_bias)", nogil);
  m.def("dino_fwd", &dino_fwd, "DINO: (loss, stats_student, stats_teacher, teacher_sum)", nogil);
  m.def("dino_bwd", &dino_bwd, "DINO: d_student", nogil);
}
