// Exact q x q neighbourhood attention on the CPU: forward and backward, computing only the keys of each window.
//
// The blocked SDPA path (attention.py) computes every query tile against its whole halo and masks what lies
// outside each window: with the shipped q = 33 and 16 x 16 tiles that is 2.1x the useful scores, plus the copies
// that build the halos. Here each query visits the keys of its (truncated) window row by row, with the scores of
// one key row computed as one vectorised pass over a contiguous run of keys (keys stored as (d, W) per image row, so
// consecutive keys are consecutive floats). The forward takes the queries of an image row in blocks of TQ = 8 that
// share one run of 2r + 8 keys (5 vectors of 8 for r = 16, as one query's 33 keys already took), so each key and
// value row is read from memory once per block. Heads of dimension 16 make each score cheap (16 multiply-adds), so
// the softmax's exponentials weigh as much as the products: they use ATen's vectorised exp.
//
// Layout: every tensor is (P, H, W, d) with P = batch x heads, contiguous; "_t" tensors are (P, H, d, W).
// Shapes and the window radius r are checked in Python (nerd/models/attention_kernel.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using at::vec::Vectorized;

namespace {

inline void bounds(int64_t c, int64_t r, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, c - r);
  hi = std::min<int64_t>(n, c + r + 1);
}

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // exp(-inf) = 0, relative error ~1e-6
  } else {
    return x.map(std::exp);
  }
}

// out[0 : ceil(n / V) V] = scale * sum_c a[c] * b[c * stride + j]: one vector a (length d) against n consecutive
// columns of b (rows of length `stride`, padded by at least V, so whole vectors may be loaded); the lanes past n
// are set to -inf. Accumulators stay in registers, up to four vectors at a time.
template <typename T>
inline void run_scores(const T* a, const T* b, int64_t stride, int64_t d, int64_t n, T scale, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec sv(scale);
  int64_t j = 0;
  for (; j + 3 * V < n; j += 4 * V) {
    Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t c = 0; c < d; ++c) {
      const Vec x(a[c]);
      const T* row = b + c * stride + j;
      a0 = at::vec::fmadd(x, Vec::loadu(row), a0);
      a1 = at::vec::fmadd(x, Vec::loadu(row + V), a1);
      a2 = at::vec::fmadd(x, Vec::loadu(row + 2 * V), a2);
      a3 = at::vec::fmadd(x, Vec::loadu(row + 3 * V), a3);
    }
    (a0 * sv).store(out + j);
    (a1 * sv).store(out + j + V);
    (a2 * sv).store(out + j + 2 * V);
    (a3 * sv).store(out + j + 3 * V);
  }
  for (; j < n; j += V) {  // two accumulators: one chain of d dependent multiply-adds is latency-bound
    Vec a0(T(0)), a1(T(0));
    int64_t c = 0;
    for (; c + 1 < d; c += 2) {
      a0 = at::vec::fmadd(Vec(a[c]), Vec::loadu(b + c * stride + j), a0);
      a1 = at::vec::fmadd(Vec(a[c + 1]), Vec::loadu(b + (c + 1) * stride + j), a1);
    }
    if (c < d) a0 = at::vec::fmadd(Vec(a[c]), Vec::loadu(b + c * stride + j), a0);
    ((a0 + a1) * sv).store(out + j);
  }
  for (int64_t t = n; t < j; ++t) out[t] = -std::numeric_limits<T>::infinity();
}

// acc[0:d] += sum_j w[j] * rows[j * d : j * d + d] over n rows; NV = d / V vectors held in registers (NV = 0: any d).
template <typename T, int NV>
inline void accumulate(const T* w, const T* rows, int64_t n, int64_t d, T* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if constexpr (NV == 0) {
    for (int64_t j = 0; j < n; ++j) {
      const T wj = w[j];
      for (int64_t c = 0; c < d; ++c) acc[c] += wj * rows[j * d + c];
    }
  } else {
    // U independent sets of accumulators over consecutive rows: one set would wait on its own multiply-add
    // latency at every row.
    constexpr int U = NV >= 4 ? 2 : 4;
    Vec r[U][NV];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) {
      r[0][t] = Vec::loadu(acc + t * V);
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) r[u][t] = Vec(T(0));
    }
    int64_t j = 0;
    for (; j + U <= n; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const Vec wj(w[j + u]);
#pragma GCC unroll 8
        for (int t = 0; t < NV; ++t) r[u][t] = at::vec::fmadd(wj, Vec::loadu(rows + (j + u) * d + t * V), r[u][t]);
      }
    }
    for (; j < n; ++j) {
      const Vec wj(w[j]);
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) r[0][t] = at::vec::fmadd(wj, Vec::loadu(rows + j * d + t * V), r[0][t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) {
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) r[0][t] = r[0][t] + r[u][t];
      r[0][t].store(acc + t * V);
    }
  }
}

// Scores of one vector a against the window [y0, y1) x [x0, x1) of b_t ((H, d, Wp) per plane), row after row
// with a row stride of ns = ceil((x1 - x0) / V) V in s.
template <typename T>
inline void window_scores(const T* a, const T* b_t, int64_t y0, int64_t y1, int64_t x0, int64_t x1, int64_t Wp,
                          int64_t d, int64_t ns, T scale, T* s) {
  for (int64_t ky = y0; ky < y1; ++ky) run_scores(a, b_t + ky * d * Wp + x0, Wp, d, x1 - x0, scale, s + (ky - y0) * ns);
}

template <typename T>
inline int64_t row_stride(int64_t n) {
  constexpr int64_t V = Vectorized<T>::size();
  return (n + V - 1) / V * V;
}

// Scores of QB queries (a[t], each of length d) against M vectors of consecutive keys at b (d rows of stride
// `stride`): out[t][0 : M V] = scale * a[t] . b[:, j]. Each key vector loaded is used by QB queries, and the
// QB x M accumulators stay in registers.
template <typename T, int QB, int M>
inline void block_scores(const T* const* a, const T* b, int64_t stride, int64_t d, T scale, T* const* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[QB][M];
#pragma GCC unroll 4
  for (int t = 0; t < QB; ++t)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[t][m] = Vec(T(0));
  for (int64_t c = 0; c < d; ++c) {
    Vec kv[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) kv[m] = Vec::loadu(b + c * stride + m * V);
#pragma GCC unroll 4
    for (int t = 0; t < QB; ++t) {
      const Vec x(a[t][c]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[t][m] = at::vec::fmadd(x, kv[m], acc[t][m]);
    }
  }
  const Vec sv(scale);
#pragma GCC unroll 4
  for (int t = 0; t < QB; ++t)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) (acc[t][m] * sv).store(out[t] + m * V);
}

// block_scores over ns (a multiple of V) consecutive keys, four vectors at a time.
template <typename T, int QB>
inline void row_block_scores(const T* const* a, const T* b, int64_t stride, int64_t d, int64_t ns, T scale,
                             T* const* out) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t j = 0;
  T* o[QB];
  for (; j + 4 * V <= ns; j += 4 * V) {
    for (int t = 0; t < QB; ++t) o[t] = out[t] + j;
    block_scores<T, QB, 4>(a, b + j, stride, d, scale, o);
  }
  for (int t = 0; t < QB; ++t) o[t] = out[t] + j;
  switch ((ns - j) / V) {
    case 3: block_scores<T, QB, 3>(a, b + j, stride, d, scale, o); break;
    case 2: block_scores<T, QB, 2>(a, b + j, stride, d, scale, o); break;
    case 1: block_scores<T, QB, 1>(a, b + j, stride, d, scale, o); break;
    default: break;
  }
}

// acc[t][0:d] += sum_j w[t][j] * rows[j * d : j * d + d] for G queries over the same n rows, NV = d / V vectors
// per row: each row loaded once for the G queries.
template <typename T, int NV, int G>
inline void group_accumulate(const T* const* w, const T* rows, int64_t n, int64_t d, T* const* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec r[G][NV];
#pragma GCC unroll 4
  for (int t = 0; t < G; ++t)
#pragma GCC unroll 8
    for (int m = 0; m < NV; ++m) r[t][m] = Vec::loadu(acc[t] + m * V);
  for (int64_t j = 0; j < n; ++j) {
    Vec vj[NV];
#pragma GCC unroll 8
    for (int m = 0; m < NV; ++m) vj[m] = Vec::loadu(rows + j * d + m * V);
#pragma GCC unroll 4
    for (int t = 0; t < G; ++t) {
      const Vec x(w[t][j]);
#pragma GCC unroll 8
      for (int m = 0; m < NV; ++m) r[t][m] = at::vec::fmadd(x, vj[m], r[t][m]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < G; ++t)
#pragma GCC unroll 8
    for (int m = 0; m < NV; ++m) r[t][m].store(acc[t] + m * V);
}

// The forward visits the queries of an image row in blocks of TQ neighbours. Their windows share one run of keys
// (2r + TQ wide), so each key row is brought into L1 once for the block rather than once per query: a query's
// whole window (33 x 33 keys of 16 numbers, ~70 KB each for K and V) does not fit in L1 and was read from L2 for
// every query. Each query's scores span the block's run and are masked outside its own window.
constexpr int64_t TQ = 8;

template <typename T, int NV>
void forward_impl(const T* q, const T* kt, const T* v, T* o, T* lse, int64_t P, int64_t H, int64_t W, int64_t Wp,
                  int64_t d, int64_t r, T scale) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int G = NV == 0 ? 1 : (NV >= 8 ? 1 : (NV >= 4 ? 2 : 4));  // queries per accumulation group
  const int64_t side = std::min<int64_t>(2 * r + 1, H);
  const int64_t ns_max = row_stride<T>(std::min<int64_t>(W, 2 * r + TQ));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, P * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(TQ * side * ns_max);
    std::vector<T> acc(TQ * d);
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, y = ph % H;
      int64_t y0, y1;
      bounds(y, r, H, y0, y1);
      const int64_t rows = y1 - y0;
      const T* kt_p = kt + p * H * d * Wp;
      const T* v_p = v + p * H * W * d;
      for (int64_t x = 0; x < W; x += TQ) {
        const int64_t nq = std::min(TQ, W - x), i0 = (p * H + y) * W + x;
        const int64_t X0 = std::max<int64_t>(0, x - r), X1 = std::min<int64_t>(W, x + nq + r);
        const int64_t ns = row_stride<T>(X1 - X0), st = rows * ns;  // st: one query's scores
        T* sq[TQ];
        for (int64_t t = 0; t < nq; ++t) sq[t] = s.data() + t * st;
        for (int64_t ky = y0; ky < y1; ++ky) {
          const T* krow = kt_p + ky * d * Wp + X0;
          int64_t t = 0;
          for (; t + 2 <= nq; t += 2) {
            const T* a[2] = {q + (i0 + t) * d, q + (i0 + t + 1) * d};
            T* out[2] = {sq[t] + (ky - y0) * ns, sq[t + 1] + (ky - y0) * ns};
            row_block_scores<T, 2>(a, krow, Wp, d, ns, scale, out);
          }
          if (t < nq) {
            const T* a[1] = {q + (i0 + t) * d};
            T* out[1] = {sq[t] + (ky - y0) * ns};
            row_block_scores<T, 1>(a, krow, Wp, d, ns, scale, out);
          }
        }
        T sum[TQ], mx[TQ];
        int64_t lo_j[TQ], hi_j[TQ];
        for (int64_t t = 0; t < nq; ++t) {
          int64_t x0, x1;
          bounds(x + t, r, W, x0, x1);
          lo_j[t] = x0 - X0;
          hi_j[t] = x1 - X0;
          for (int64_t row = 0; row < rows; ++row) {  // outside this query's window (and the padding): -inf
            T* sr = sq[t] + row * ns;
            for (int64_t j = 0; j < lo_j[t]; ++j) sr[j] = neg_inf;
            for (int64_t j = hi_j[t]; j < ns; ++j) sr[j] = neg_inf;
          }
          Vec mv(neg_inf);
          for (int64_t j = 0; j < st; j += V) mv = at::vec::maximum(mv, Vec::loadu(sq[t] + j));
          const T m = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mv);
          Vec sum_v(T(0));
          for (int64_t j = 0; j < st; j += V) {
            const Vec e = vexp(Vec::loadu(sq[t] + j) - Vec(m));
            e.store(sq[t] + j);
            sum_v = sum_v + e;
          }
          sum[t] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, sum_v);
          mx[t] = m;
        }
        std::fill(acc.begin(), acc.begin() + nq * d, T(0));
        for (int64_t t0 = 0; t0 < nq; t0 += G) {
          const int64_t g = std::min<int64_t>(G, nq - t0);
          const int64_t j0 = lo_j[t0], j1 = hi_j[t0 + g - 1];  // the group's keys: windows move right with t
          for (int64_t ky = y0; ky < y1; ++ky) {
            const T* vrow = v_p + (ky * W + X0 + j0) * d;
            const int64_t off = (ky - y0) * ns + j0;
            if constexpr (NV == 0) {
              for (int64_t t = t0; t < t0 + g; ++t)
                accumulate<T, 0>(sq[t] + off, vrow, j1 - j0, d, acc.data() + t * d);
            } else if (g == G) {
              const T* w[G];
              T* a[G];
              for (int u = 0; u < G; ++u) {
                w[u] = sq[t0 + u] + off;
                a[u] = acc.data() + (t0 + u) * d;
              }
              group_accumulate<T, NV, G>(w, vrow, j1 - j0, d, a);
            } else {
              for (int64_t t = t0; t < t0 + g; ++t) {
                const T* w[1] = {sq[t] + off};
                T* a[1] = {acc.data() + t * d};
                group_accumulate<T, NV, 1>(w, vrow, j1 - j0, d, a);
              }
            }
          }
        }
        for (int64_t t = 0; t < nq; ++t) {
          const T inv = T(1) / sum[t];
          for (int64_t c = 0; c < d; ++c) o[(i0 + t) * d + c] = acc[t * d + c] * inv;
          lse[i0 + t] = mx[t] + std::log(sum[t]);
        }
      }
    }
  });
}

// In place over a window's padded rows: s = scale * exp(s - lse) * (dp - D), with per-position lse and D
// (per key for the query-centric pass: scalars; per query for the key-centric pass: rows of lse and D).
template <typename T>
inline void softmax_grad(T* s, T* dp, int64_t total, const Vectorized<T>& lse, const Vectorized<T>& D, T scale) {
  using Vec = Vectorized<T>;
  for (int64_t j = 0; j < total; j += Vec::size()) {
    const Vec p = vexp(Vec::loadu(s + j) - lse);
    p.store(s + j);                                                // p
    (p * (Vec::loadu(dp + j) - D) * Vec(scale)).store(dp + j);     // dS
  }
}

// dq_i = scale sum_j p_ij (dO_i . v_j - D_i) k_j    (query-centric: each query writes only its own row)
template <typename T, int NV>
void backward_q_impl(const T* q, const T* kt, const T* k, const T* vt, const T* dout, const T* lse, const T* D,
                     T* dq, int64_t P, int64_t H, int64_t W, int64_t Wp, int64_t d, int64_t r, T scale) {
  const int64_t side = std::min<int64_t>(2 * r + 1, std::max(H, W));
  at::parallel_for(0, P * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(side * row_stride<T>(side)), dp(side * row_stride<T>(side));
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, y = ph % H;
      int64_t y0, y1;
      bounds(y, r, H, y0, y1);
      const T* kt_p = kt + p * H * d * Wp;
      const T* vt_p = vt + p * H * d * Wp;
      const T* k_p = k + p * H * W * d;
      for (int64_t x = 0; x < W; ++x) {
        int64_t x0, x1;
        bounds(x, r, W, x0, x1);
        const int64_t i = (p * H + y) * W + x, nx = x1 - x0, ns = row_stride<T>(nx);
        window_scores(q + i * d, kt_p, y0, y1, x0, x1, Wp, d, ns, scale, s.data());
        window_scores(dout + i * d, vt_p, y0, y1, x0, x1, Wp, d, ns, T(1), dp.data());
        softmax_grad(s.data(), dp.data(), (y1 - y0) * ns, Vectorized<T>(lse[i]), Vectorized<T>(D[i]), scale);
        T* dqi = dq + i * d;
        std::fill(dqi, dqi + d, T(0));
        for (int64_t ky = y0; ky < y1; ++ky)
          accumulate<T, NV>(dp.data() + (ky - y0) * ns, k_p + (ky * W + x0) * d, nx, d, dqi);
      }
    }
  });
}

// dk_j = scale sum_i p_ij (dO_i . v_j - D_i) q_i,  dv_j = sum_i p_ij dO_i    (key-centric: the windows are
// symmetric, so the queries that see key j are the window of j, truncated at the border alike)
template <typename T, int NV>
void backward_kv_impl(const T* qt, const T* q, const T* k, const T* v, const T* dout_t, const T* dout,
                      const T* lse, const T* D, T* dk, T* dv, int64_t P, int64_t H, int64_t W, int64_t Wp, int64_t d,
                      int64_t r, T scale) {
  using Vec = Vectorized<T>;
  const int64_t side = std::min<int64_t>(2 * r + 1, std::max(H, W));
  at::parallel_for(0, P * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(side * row_stride<T>(side)), dp(side * row_stride<T>(side));
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, y = ph % H;
      int64_t y0, y1;
      bounds(y, r, H, y0, y1);
      const T* qt_p = qt + p * H * d * Wp;
      const T* dt_p = dout_t + p * H * d * Wp;
      const T* q_p = q + p * H * W * d;
      const T* do_p = dout + p * H * W * d;
      const T* lse_p = lse + p * H * Wp;  // lse and D: (P, H, Wp), padded like the transposed tensors
      const T* D_p = D + p * H * Wp;
      for (int64_t x = 0; x < W; ++x) {
        int64_t x0, x1;
        bounds(x, r, W, x0, x1);
        const int64_t j = (p * H + y) * W + x, nx = x1 - x0, ns = row_stride<T>(nx);
        window_scores(k + j * d, qt_p, y0, y1, x0, x1, Wp, d, ns, scale, s.data());
        window_scores(v + j * d, dt_p, y0, y1, x0, x1, Wp, d, ns, T(1), dp.data());
        for (int64_t qy = y0; qy < y1; ++qy) {
          T* sr = s.data() + (qy - y0) * ns;
          T* dr = dp.data() + (qy - y0) * ns;
          for (int64_t t = 0; t < ns; t += Vec::size()) {
            const Vec p = vexp(Vec::loadu(sr + t) - Vec::loadu(lse_p + qy * Wp + x0 + t));
            p.store(sr + t);
            (p * (Vec::loadu(dr + t) - Vec::loadu(D_p + qy * Wp + x0 + t)) * Vec(scale)).store(dr + t);
          }
        }
        T* dkj = dk + j * d;
        T* dvj = dv + j * d;
        std::fill(dkj, dkj + d, T(0));
        std::fill(dvj, dvj + d, T(0));
        for (int64_t qy = y0; qy < y1; ++qy) {
          accumulate<T, NV>(dp.data() + (qy - y0) * ns, q_p + (qy * W + x0) * d, nx, d, dkj);
          accumulate<T, NV>(s.data() + (qy - y0) * ns, do_p + (qy * W + x0) * d, nx, d, dvj);
        }
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 4, name,
              " must be a contiguous CPU (P, H, W, d) tensor");
}

// (P, H, W, d) -> (P, H, d, W + pad), zero-padded: the layout in which consecutive keys are consecutive numbers.
torch::Tensor transposed(const torch::Tensor& x, int64_t pad) {
  auto out = torch::zeros({x.size(0), x.size(1), x.size(3), x.size(2) + pad}, x.options());
  out.narrow(3, 0, x.size(2)).copy_(x.transpose(2, 3));
  return out;
}

// (P, H, W) -> (P, H, W + pad), padded with `value`.
torch::Tensor padded(const torch::Tensor& x, int64_t pad, double value) {
  auto out = torch::full({x.size(0), x.size(1), x.size(2) + pad}, value, x.options());
  out.narrow(2, 0, x.size(2)).copy_(x);
  return out;
}

// Calls f.template operator()<NV>() with NV = d / V when that is a small power of two, else NV = 0 (any d).
template <typename T, typename F>
void with_nv(int64_t d, F&& f) {
  constexpr int64_t V = Vectorized<T>::size();
  if (d % V == 0 && d / V == 1) return f(std::integral_constant<int, 1>{});
  if (d % V == 0 && d / V == 2) return f(std::integral_constant<int, 2>{});
  if (d % V == 0 && d / V == 4) return f(std::integral_constant<int, 4>{});
  if (d % V == 0 && d / V == 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, 0>{});
}

}  // namespace

// q, v: (P, H, W, d), k: (P, H, W, d). Returns (o (P, H, W, d), lse (P, H, W)).
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t r, double scale) {
  for (auto* t : {&q, &k, &v}) check(*t, "q, k, v");
  const int64_t P = q.size(0), H = q.size(1), W = q.size(2), d = q.size(3);
  auto o = torch::empty_like(q);
  auto lse = torch::empty({P, H, W}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nerd_na_forward", [&] {
    constexpr int64_t V = Vectorized<scalar_t>::size();
    auto k_t = transposed(k, V);
    with_nv<scalar_t>(d, [&](auto nv) {
      forward_impl<scalar_t, decltype(nv)::value>(q.data_ptr<scalar_t>(), k_t.data_ptr<scalar_t>(),
                                                  v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                                  lse.data_ptr<scalar_t>(), P, H, W, W + V, d, r, scalar_t(scale));
    });
  });
  return {o, lse};
}

// Gradients of q, k, v from dout (P, H, W, d), given lse and D = sum(dout * o, -1), both (P, H, W).
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor dout,
                                    torch::Tensor lse, torch::Tensor D, int64_t r, double scale) {
  for (auto* t : {&q, &k, &v, &dout}) check(*t, "q, k, v, dout");
  const int64_t P = q.size(0), H = q.size(1), W = q.size(2), d = q.size(3);
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  lse = lse.contiguous();
  D = D.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nerd_na_backward", [&] {
    constexpr int64_t V = Vectorized<scalar_t>::size();
    auto q_t = transposed(q, V), k_t = transposed(k, V), v_t = transposed(v, V), dout_t = transposed(dout, V);
    auto lse_p = padded(lse, V, 0.0), D_p = padded(D, V, 0.0);
    with_nv<scalar_t>(d, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      backward_q_impl<scalar_t, NV>(q.data_ptr<scalar_t>(), k_t.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                    v_t.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                    D.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), P, H, W, W + V, d, r,
                                    scalar_t(scale));
      backward_kv_impl<scalar_t, NV>(q_t.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), dout_t.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                                     lse_p.data_ptr<scalar_t>(), D_p.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                     dv.data_ptr<scalar_t>(), P, H, W, W + V, d, r, scalar_t(scale));
    });
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "exact neighbourhood attention, forward (CPU)");
  m.def("backward", &backward, "exact neighbourhood attention, backward (CPU)");
}
