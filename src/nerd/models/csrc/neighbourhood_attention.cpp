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

// acc[0:d] += sum_j w[j] * rows[j * d : j * d + d] over n rows, for any d (a head size that is not a multiple of
// the vector width; `group_accumulate` is the vectorised form).
template <typename T>
inline void accumulate(const T* w, const T* rows, int64_t n, int64_t d, T* acc) {
  for (int64_t j = 0; j < n; ++j) {
    const T wj = w[j];
    for (int64_t c = 0; c < d; ++c) acc[c] += wj * rows[j * d + c];
  }
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

// rows[j * d : j * d + d] += sum_t w[t][j] * a[t] for G vectors a[t] (length d) over n rows: the scatter of the
// backward (each key row gathers from the G queries of a group), the G vectors held in registers.
template <typename T, int NV, int G>
inline void group_scatter(const T* const* w, const T* const* a, int64_t n, int64_t d, T* rows) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if constexpr (NV == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int t = 0; t < G; ++t)
        for (int64_t c = 0; c < d; ++c) rows[j * d + c] += w[t][j] * a[t][c];
  } else {
    Vec av[G][NV];
#pragma GCC unroll 4
    for (int t = 0; t < G; ++t)
#pragma GCC unroll 8
      for (int m = 0; m < NV; ++m) av[t][m] = Vec::loadu(a[t] + m * V);
    for (int64_t j = 0; j < n; ++j) {
      Vec o[NV];
#pragma GCC unroll 8
      for (int m = 0; m < NV; ++m) o[m] = Vec::loadu(rows + j * d + m * V);
#pragma GCC unroll 4
      for (int t = 0; t < G; ++t) {
        const Vec x(w[t][j]);
#pragma GCC unroll 8
        for (int m = 0; m < NV; ++m) o[m] = at::vec::fmadd(x, av[t][m], o[m]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < NV; ++m) o[m].store(rows + j * d + m * V);
    }
  }
}

// acc[t][0:d] += sum_j w[t][off + j] * rows[j * d : j * d + d] for the g <= G queries of a group (acc rows of
// length d from acc0).
template <typename T, int NV, int G>
inline void gather(int64_t g, T* const* w, int64_t off, const T* rows, int64_t n, int64_t d, T* acc0) {
  if constexpr (NV == 0) {
    for (int64_t t = 0; t < g; ++t) accumulate<T>(w[t] + off, rows, n, d, acc0 + t * d);
  } else {
    const T* wt[G];
    T* at[G];
    for (int64_t t = 0; t < g; ++t) {
      wt[t] = w[t] + off;
      at[t] = acc0 + t * d;
    }
    if (g == G) return group_accumulate<T, NV, G>(wt, rows, n, d, at);
    for (int64_t t = 0; t < g; ++t) group_accumulate<T, NV, 1>(wt + t, rows, n, d, at + t);
  }
}

// rows[j * d : j * d + d] += sum_t w[t][off + j] * a0[t * d : t * d + d] for the g <= G queries of a group.
template <typename T, int NV, int G>
inline void scatter(int64_t g, T* const* w, int64_t off, const T* a0, int64_t n, int64_t d, T* rows) {
  const T* wt[G];
  const T* at[G];
  for (int64_t t = 0; t < g; ++t) {
    wt[t] = w[t] + off;
    at[t] = a0 + t * d;
  }
  if (g == G) return group_scatter<T, NV, G>(wt, at, n, d, rows);
  for (int64_t t = 0; t < g; ++t) group_scatter<T, NV, 1>(wt + t, at + t, n, d, rows);
}

// Both passes visit the queries of an image row in blocks of TQ neighbours. Their windows share one run of keys
// (2r + TQ wide), so each key row is brought into L1 once for the block rather than once per query: a query's
// whole window (33 x 33 keys of 16 numbers, ~70 KB each for K and V) does not fit in L1 and was read from L2 for
// every query. Each query's scores span the block's run and are masked outside its own window.
//
// Queries per block, and the accumulation groups within a block (G queries x NV vectors in registers).
constexpr int64_t TQ = 8;

template <int NV>
constexpr int group_size() {
  return NV == 0 ? 1 : (NV >= 8 ? 1 : (NV >= 4 ? 2 : 4));
}

// One block: the nq <= TQ queries x .. x + nq - 1 of image row y, their key rows [y0, y1) and the run of keys
// [X0, X0 + ns) their windows share; query t's own window is lanes [lo[t], hi[t]) of each row of that run.
struct Block {
  int64_t nq, i0, y0, y1, rows, X0, ns, st, lo[TQ], hi[TQ];
  Block(int64_t p, int64_t y, int64_t x, int64_t H, int64_t W, int64_t r, int64_t V) {
    bounds(y, r, H, y0, y1);
    rows = y1 - y0;
    nq = std::min(TQ, W - x);
    i0 = (p * H + y) * W + x;
    X0 = std::max<int64_t>(0, x - r);
    const int64_t X1 = std::min<int64_t>(W, x + nq + r);
    ns = (X1 - X0 + V - 1) / V * V;
    st = rows * ns;  // one query's scores
    for (int64_t t = 0; t < nq; ++t) {
      int64_t x0, x1;
      bounds(x + t, r, W, x0, x1);
      lo[t] = x0 - X0;
      hi[t] = x1 - X0;
    }
  }
};

// sq[t][(ky - y0) * ns + j] = scale * a_t . b_t[ky][:, X0 + j] for the block's queries a_t (rows of a0, length d)
// and every key row of b_t ((H, d, Wp) per plane), queries in pairs; -inf outside each query's window when `mask`.
template <typename T>
inline void block_scores_all(const Block& b, const T* a0, const T* b_t, int64_t Wp, int64_t d, T scale, T* const* sq,
                             bool mask) {
  for (int64_t ky = b.y0; ky < b.y1; ++ky) {
    const T* krow = b_t + ky * d * Wp + b.X0;
    const int64_t off = (ky - b.y0) * b.ns;
    int64_t t = 0;
    for (; t + 2 <= b.nq; t += 2) {
      const T* a[2] = {a0 + t * d, a0 + (t + 1) * d};
      T* out[2] = {sq[t] + off, sq[t + 1] + off};
      row_block_scores<T, 2>(a, krow, Wp, d, b.ns, scale, out);
    }
    if (t < b.nq) {
      const T* a[1] = {a0 + t * d};
      T* out[1] = {sq[t] + off};
      row_block_scores<T, 1>(a, krow, Wp, d, b.ns, scale, out);
    }
  }
  if (!mask) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t t = 0; t < b.nq; ++t)
    for (int64_t row = 0; row < b.rows; ++row) {
      T* sr = sq[t] + row * b.ns;
      for (int64_t j = 0; j < b.lo[t]; ++j) sr[j] = neg_inf;
      for (int64_t j = b.hi[t]; j < b.ns; ++j) sr[j] = neg_inf;
    }
}

// For each group of G queries of the block and each key row: fn(G or 1, first query t0, offset of the group's
// keys in a score row, first key row index ky * W + X0 + j0, number of keys). A group's keys are the union of its
// windows, [lo[t0], hi[t0 + g - 1]): the windows move right with t.
template <int G, typename F>
inline void for_groups(const Block& b, int64_t W, F&& fn) {
  for (int64_t t0 = 0; t0 < b.nq; t0 += G) {
    const int64_t g = std::min<int64_t>(G, b.nq - t0);
    const int64_t j0 = b.lo[t0], j1 = b.hi[t0 + g - 1];
    for (int64_t ky = b.y0; ky < b.y1; ++ky) fn(g, t0, (ky - b.y0) * b.ns + j0, ky * W + b.X0 + j0, j1 - j0);
  }
}

template <typename T, int NV>
void forward_impl(const T* q, const T* kt, const T* v, T* o, T* lse, int64_t P, int64_t H, int64_t W, int64_t Wp,
                  int64_t d, int64_t r, T scale) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int G = group_size<NV>();
  const int64_t side = std::min<int64_t>(2 * r + 1, H);
  const int64_t ns_max = row_stride<T>(std::min<int64_t>(W, 2 * r + TQ));
  at::parallel_for(0, P * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(TQ * side * ns_max);
    std::vector<T> acc(TQ * d);
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, y = ph % H;
      const T* kt_p = kt + p * H * d * Wp;
      const T* v_p = v + p * H * W * d;
      for (int64_t x = 0; x < W; x += TQ) {
        const Block b(p, y, x, H, W, r, V);
        T* sq[TQ];
        for (int64_t t = 0; t < b.nq; ++t) sq[t] = s.data() + t * b.st;
        block_scores_all(b, q + b.i0 * d, kt_p, Wp, d, scale, sq, true);
        T sum[TQ], mx[TQ];
        for (int64_t t = 0; t < b.nq; ++t) {
          Vec mv(-std::numeric_limits<T>::infinity());
          for (int64_t j = 0; j < b.st; j += V) mv = at::vec::maximum(mv, Vec::loadu(sq[t] + j));
          const T m = at::vec::vec_reduce_all<T>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, mv);
          Vec sum_v(T(0));
          for (int64_t j = 0; j < b.st; j += V) {
            const Vec e = vexp(Vec::loadu(sq[t] + j) - Vec(m));
            e.store(sq[t] + j);
            sum_v = sum_v + e;
          }
          sum[t] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& c) { return a + c; }, sum_v);
          mx[t] = m;
        }
        std::fill(acc.begin(), acc.begin() + b.nq * d, T(0));
        for_groups<G>(b, W, [&](int64_t g, int64_t t0, int64_t off, int64_t key, int64_t n) {
          gather<T, NV, G>(g, sq + t0, off, v_p + key * d, n, d, acc.data() + t0 * d);
        });
        for (int64_t t = 0; t < b.nq; ++t) {
          const T inv = T(1) / sum[t];
          for (int64_t c = 0; c < d; ++c) o[(b.i0 + t) * d + c] = acc[t * d + c] * inv;
          lse[b.i0 + t] = mx[t] + std::log(sum[t]);
        }
      }
    }
  });
}

// The backward of one pass over the query blocks, recomputing the scores s and dO . v of each block:
//   p_ij = exp(s_ij - lse_i),  dS_ij = scale p_ij (dO_i . v_j - D_i),
//   dq_i = sum_j dS_ij k_j (gathered per query),  dk_j = sum_i dS_ij q_i and dv_j = sum_i p_ij dO_i (scattered to
//   the keys of the block's run).
// The planes run in parallel and each is one thread's, so the scattered dk and dv have a single writer.
template <typename T, int NV>
void backward_impl(const T* q, const T* k, const T* kt, const T* vt, const T* dout, const T* lse, const T* D, T* dq,
                   T* dk, T* dv, int64_t P, int64_t H, int64_t W, int64_t Wp, int64_t d, int64_t r, T scale) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int G = group_size<NV>();
  const int64_t side = std::min<int64_t>(2 * r + 1, H);
  const int64_t ns_max = row_stride<T>(std::min<int64_t>(W, 2 * r + TQ));
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(TQ * side * ns_max), dp(TQ * side * ns_max);
    for (int64_t p = begin; p < end; ++p) {
      const T* kt_p = kt + p * H * d * Wp;
      const T* vt_p = vt + p * H * d * Wp;
      const T* k_p = k + p * H * W * d;
      T* dk_p = dk + p * H * W * d;
      T* dv_p = dv + p * H * W * d;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; x += TQ) {
          const Block b(p, y, x, H, W, r, V);
          T* sq[TQ];
          T* dq_s[TQ];
          for (int64_t t = 0; t < b.nq; ++t) {
            sq[t] = s.data() + t * b.st;
            dq_s[t] = dp.data() + t * b.st;
          }
          block_scores_all(b, q + b.i0 * d, kt_p, Wp, d, scale, sq, true);
          block_scores_all(b, dout + b.i0 * d, vt_p, Wp, d, T(1), dq_s, false);
          for (int64_t t = 0; t < b.nq; ++t) {  // s <- p, dp <- dS (0 outside the window, where p is)
            const Vec l(lse[b.i0 + t]), Di(D[b.i0 + t]), sc(scale);
            for (int64_t j = 0; j < b.st; j += V) {
              const Vec pj = vexp(Vec::loadu(sq[t] + j) - l);
              pj.store(sq[t] + j);
              (pj * (Vec::loadu(dq_s[t] + j) - Di) * sc).store(dq_s[t] + j);
            }
          }
          T* dq_b = dq + b.i0 * d;
          std::fill(dq_b, dq_b + b.nq * d, T(0));
          for_groups<G>(b, W, [&](int64_t g, int64_t t0, int64_t off, int64_t key, int64_t n) {
            gather<T, NV, G>(g, dq_s + t0, off, k_p + key * d, n, d, dq_b + t0 * d);
            scatter<T, NV, G>(g, dq_s + t0, off, q + (b.i0 + t0) * d, n, d, dk_p + key * d);
            scatter<T, NV, G>(g, sq + t0, off, dout + (b.i0 + t0) * d, n, d, dv_p + key * d);
          });
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
  auto dq = torch::empty_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  lse = lse.contiguous();
  D = D.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nerd_na_backward", [&] {
    constexpr int64_t V = Vectorized<scalar_t>::size();
    auto k_t = transposed(k, V), v_t = transposed(v, V);
    with_nv<scalar_t>(d, [&](auto nv) {
      backward_impl<scalar_t, decltype(nv)::value>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), k_t.data_ptr<scalar_t>(), v_t.data_ptr<scalar_t>(),
          dout.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), P, H, W, W + V, d, r, scalar_t(scale));
    });
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "exact neighbourhood attention, forward (CPU)");
  m.def("backward", &backward, "exact neighbourhood attention, backward (CPU)");
}
