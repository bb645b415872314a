// The fused G-SGD step on CPU tensors (GSGD's step for fp32 and fp64 weights), over the group
// layout of kernels/layout.py (each tensor a (G, R, S) view whose row and column class arrays give
// the denominator P_in[in] * M[out] as an outer product). One call, OpenMP over row chunks. A
// tensor "moves" where an input class's P_in depends on the carriers; the denominator of a
// "still" one is the same before and after the step. The passes:
//
//   1. step (moving tensors): reads dL/dW, V (and the momentum buffer) once and writes V (and the buffer):
//                  dL/dV = dL/dW / den_old,  reduced[in] += dL/dV * V  (V is 0 on the K and J slots),
//                  d = dL/dV + wd * V,  buf = mom * buf + d (buf = d on the first step),  V -= lr * buf,
//                  and V = buf = 0 again on the row's K and J slots;
//                and each J entry's direct gradient g = dL/dW_J / den_old goes to its carrier and
//                g * c to reduced (the dL/dW_J * W_J a reduction over W would have counted);
//   2. carriers: SGD on the carriers' path values c (O(H); optim/gsgd.py's _carrier_step), and
//                P_in from them (Allocation.path_in); stop here if one is zero or non-finite;
//   3. allocate: the moving tensors' W = V / den_new; the still tensors stepped as in 1 (no
//                reduction: P_in of their classes does not depend on it) with W written from each
//                row while it is in L1; in both, the row's K and J slots of W get their fixed value
//                or c / den_new as the row is written (the slots, one or two per row, would each
//                cost a cache miss in a loop of their own).
//
// Memory traffic: 3 + 2 tensor passes over a moving tensor and 4 over a still one (5 + 2 and 6
// with momentum) against torch.optim.SGD's 3 (5); W is written with streaming stores, so its
// lines are not read first. The reductions are summed per unit in double and folded in unit
// order: the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// the meta row's columns by name: cpu.py passes them from layout.META as -DIC_META_<NAME>=column
enum { G_ = IC_META_G, R_ = IC_META_R, S_ = IC_META_S, IN_R = IC_META_IN_R, IN_C = IC_META_IN_C,
       OUT_R = IC_META_OUT_R, OUT_C = IC_META_OUT_C, ROW_MODE = IC_META_ROW_MODE, NF = IC_META_COLUMNS };
const int64_t CHUNK = 1 << 17;          // entries per unit of work (measured: 1 << 15 was slower)
const int64_t STREAM_BYTES = 1 << 22;   // smaller weights may stay in cache for the next forward

// A unit of work: rows [r0, r1) of block g of tensor t; its partial sums at scratch (< 0:
// nothing to reduce); its first K or J slot.
struct Unit { int64_t t, g, r0, r1, scratch, slot; };

struct Group {
  const int64_t *meta; const int32_t *cls; int64_t n;
  const int64_t *root;                // each class's carrier (n: none; Allocation.path_root)
  // the K and J slots sorted by tensor and flat index: tensor t's are [slot_start[t],
  // slot_start[t + 1]); slot_ref: a K entry's number, or -1 - a J entry's
  const int64_t *slot_start; const int32_t *slot_idx, *slot_ref;
  const int64_t *m(int64_t t) const { return meta + t * NF; }
  const int32_t *classes(int64_t t, int field, int64_t g, int64_t len) const {
    return cls + m(t)[field] + g * len;
  }
  bool row_mode(int64_t t) const { return m(t)[ROW_MODE] != 0; }
  // does the tensor's denominator move with the carriers (an input class with a carrier root)?
  bool moves(int64_t t) const {
    const int64_t *mt = m(t);
    for (int field : {IN_R, IN_C}) {
      int64_t len = mt[G_] * mt[field == IN_R ? R_ : S_];
      const int32_t *in = cls + mt[field];
      for (int64_t i = 0; i < len; ++i)
        if (in[i] != n && root[in[i]] < n) return true;
    }
    return false;
  }
  bool reduces(int64_t t) const {     // does any entry read a class?
    const int64_t *mt = m(t);
    int64_t len = row_mode(t) ? mt[G_] * mt[R_] : mt[G_] * mt[S_];
    const int32_t *in = cls + mt[row_mode(t) ? IN_R : IN_C];
    for (int64_t i = 0; i < len; ++i)
      if (in[i] != n) return true;
    return false;
  }
};

// Units of about CHUNK entries (whole rows of one block) of the tensors whose denominator moves
// (or of those whose does not); with_scratch: where each unit's partial sums go (S per unit by
// columns, one per row by rows).
std::vector<Unit> units(const Group &grp, int64_t count, bool moving, bool with_scratch, int64_t *scratch_size) {
  std::vector<Unit> out;
  int64_t off = 0;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t *mt = grp.m(t);
    if (grp.moves(t) != moving) continue;
    int64_t G = mt[G_], R = mt[R_], S = mt[S_];
    if (G * R * S == 0) continue;                     // an empty parameter
    int64_t rows = S >= CHUNK ? 1 : CHUNK / S;
    bool red = with_scratch && grp.reduces(t);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r0 = 0; r0 < R; r0 += rows) {
        int64_t r1 = r0 + rows < R ? r0 + rows : R;
        const int32_t *first = std::lower_bound(grp.slot_idx + grp.slot_start[t],
                                                grp.slot_idx + grp.slot_start[t + 1], (g * R + r0) * S);
        out.push_back({t, g, r0, r1, red ? off : -1, first - grp.slot_idx});
        if (red) off += grp.row_mode(t) ? r1 - r0 : S;
      }
  }
  *scratch_size = off;
  return out;
}

// 1 / (p[in] * M[out]) of every row and column of every block, computed once per pass (a unit
// would otherwise redo its block's columns): rows of tensor t at rows[t] + g * R, columns at
// cols[t] + g * S.
template <typename T>
struct Factors {
  std::vector<T> data;
  std::vector<int64_t> rows, cols;
  Factors(const Group &grp, int64_t count, const T *p, const T *M) : rows(count), cols(count) {
    int64_t size = 0;
    for (int64_t t = 0; t < count; ++t) {
      const int64_t *mt = grp.m(t);
      rows[t] = size;
      cols[t] = size + mt[G_] * mt[R_];
      size = cols[t] + mt[G_] * mt[S_];
    }
    data.resize(size);
    for (int64_t t = 0; t < count; ++t) {
      const int64_t *mt = grp.m(t);
      for (int side = 0; side < 2; ++side) {
        int64_t len = mt[G_] * mt[side ? S_ : R_];
        const int32_t *in = grp.cls + mt[side ? IN_C : IN_R], *out = grp.cls + mt[side ? OUT_C : OUT_R];
        T *f = data.data() + (side ? cols[t] : rows[t]);
        for (int64_t i = 0; i < len; ++i) f[i] = T(1) / (p[in[i]] * M[out[i]]);
      }
    }
  }
  const T *row(const Group &grp, int64_t t, int64_t g) const { return data.data() + rows[t] + g * grp.m(t)[R_]; }
  const T *col(const Group &grp, int64_t t, int64_t g) const { return data.data() + cols[t] + g * grp.m(t)[S_]; }
};

// The entries before each unit, and the total last.
std::vector<int64_t> starts(const Group &grp, const std::vector<Unit> &us) {
  std::vector<int64_t> out(us.size() + 1);
  for (size_t u = 0; u < us.size(); ++u) out[u + 1] = out[u] + (us[u].r1 - us[u].r0) * grp.m(us[u].t)[S_];
  return out;
}

// The calling thread's units [lo, hi) of a parallel pass: a contiguous share of about equal
// entries (units range from a bias to CHUNK entries), the same in every pass over the same units.
struct Share {
  int64_t lo, hi;
  explicit Share(const std::vector<int64_t> &starts) {
    int64_t nt = omp_get_num_threads(), i = omp_get_thread_num(), total = starts.back();
    auto first_at = [&](int64_t k) {        // the first unit that starts at or after total * k / nt
      return std::lower_bound(starts.begin(), starts.end() - 1, total * k / nt) - starts.begin();
    };
    lo = first_at(i);
    hi = first_at(i + 1);
  }
};

enum Reduce { NONE, BY_COLUMNS, BY_ROWS };

// One row: S entries with row factor fr and column factors fc; the reduction into col_acc (column
// sums in T over at most 32 rows) or row_acc (the row's one sum, in double).
template <typename T, bool MOM, bool FIRST, Reduce RED>
void step_row(const T *gw, T *v, T *buf, int64_t S, T fr, const T *fc, T lr, T mom, T wd,
              T *col_acc, double *row_acc) {
  double racc = 0;
#pragma omp simd reduction(+ : racc)
  for (int64_t s = 0; s < S; ++s) {
    T gv = gw[s] * (fr * fc[s]);
    T x = v[s];
    if (RED == BY_COLUMNS) col_acc[s] += gv * x;
    if (RED == BY_ROWS) racc += double(gv * x);
    T d = gv + wd * x;
    if (MOM) {
      if (!FIRST) d += mom * buf[s];
      buf[s] = d;
    }
    v[s] = x - lr * d;
  }
  if (RED == BY_ROWS) *row_acc = racc;
}

// Fold the units' partial sums into reduced by class, in unit order.
void fold(const Group &grp, const std::vector<Unit> &us, const double *scratch, double *reduced) {
  for (const Unit &un : us) {
    if (un.scratch < 0) continue;
    const int64_t *mt = grp.m(un.t);
    const double *acc = scratch + un.scratch;
    if (grp.row_mode(un.t)) {
      const int32_t *in = grp.classes(un.t, IN_R, un.g, mt[R_]);
      for (int64_t r = un.r0; r < un.r1; ++r)
        if (in[r] != grp.n) reduced[in[r]] += acc[r - un.r0];
    } else {
      const int32_t *in = grp.classes(un.t, IN_C, un.g, mt[S_]);
      for (int64_t s = 0; s < mt[S_]; ++s)
        if (in[s] != grp.n) reduced[in[s]] += acc[s];
    }
  }
}

template <typename T>
struct Step {
  int64_t count; const int64_t *meta; const int32_t *cls; int64_t n;    // the group layout
  T *const *gws; T *const *vs; T *const *bufs; T *const *ws;             // pointer tables
  const T *M; const T *path_scale; const int64_t *path_root;            // classes (n + 1)
  T *carriers; T *carriers_buf; int64_t nc;
  const T *k_val; int64_t nk;                                            // fixed entries
  const int32_t *j_tensor, *j_idx, *j_in, *j_out, *j_cls; int64_t nj;    // carrier entries
  const int64_t *slot_start; const int32_t *slot_idx, *slot_ref;        // the K and J slots (Group)
  double lr, mom, wd; int momentum, first, threads;
};

#if defined(__AVX__)
// 32-byte vectors of T
inline __m256 load(const float *p) { return _mm256_loadu_ps(p); }
inline __m256d load(const double *p) { return _mm256_loadu_pd(p); }
inline __m256 mul(__m256 x, __m256 y) { return _mm256_mul_ps(x, y); }
inline __m256d mul(__m256d x, __m256d y) { return _mm256_mul_pd(x, y); }
inline __m256 splat(float x) { return _mm256_set1_ps(x); }
inline __m256d splat(double x) { return _mm256_set1_pd(x); }
inline void store(float *p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store(double *p, __m256d x) { _mm256_storeu_pd(p, x); }
inline void stream(float *p, __m256 x) { _mm256_stream_ps(p, x); }
inline void stream(double *p, __m256d x) { _mm256_stream_pd(p, x); }
#endif

// One row of W (flat entries [base, base + S) of tensor t): V * (fr * fc), its slots [k, end) set
// to their fixed value or c / den_new. With AVX and stream_w, streaming stores: W is written,
// not read, and a store that bypasses the cache saves the read of its line; a slot is set in the
// vector before it is stored (a store of its own would fetch the line).
template <typename T>
void write_row(const Step<T> &a, const Group &grp, int64_t t, int64_t base, int64_t S, T fr, const T *fc,
               int64_t k, int64_t end, const T *p_new, bool stream_w) {
  const T *v = a.vs[t] + base;
  T *w = a.ws[t] + base;
  auto col = [&](int64_t j) { return grp.slot_idx[j] - base; };
  auto value = [&](int64_t j) -> T {
    int32_t ref = grp.slot_ref[j], e = -1 - ref;
    return ref >= 0 ? a.k_val[ref] : a.carriers[a.j_cls[e]] / (p_new[a.j_in[e]] * a.M[a.j_out[e]]);
  };
  int64_t s = 0;
#if defined(__AVX__)
  if (stream_w) {
    constexpr int L = 32 / sizeof(T);
    for (; s < S && (reinterpret_cast<uintptr_t>(w + s) & 31); ++s) w[s] = v[s] * (fr * fc[s]);
    for (; k < end && col(k) < s; ++k) w[col(k)] = value(k);
    for (; s + L <= S; s += L) {
      auto x = mul(load(v + s), mul(splat(fr), load(fc + s)));
      if (k < end && col(k) < s + L) {
        alignas(32) T lanes[L];
        store(lanes, x);
        for (; k < end && col(k) < s + L; ++k) lanes[col(k) - s] = value(k);
        x = load(lanes);
      }
      stream(w + s, x);
    }
  }
#endif
#pragma omp simd
  for (int64_t i = s; i < S; ++i) w[i] = v[i] * (fr * fc[i]);
  for (; k < end; ++k) w[col(k)] = value(k);
}

// The end of the slots of the row that ends at flat index row_end, from its first one k.
inline int64_t row_slots(const Group &grp, int64_t t, int64_t k, int64_t row_end) {
  int64_t last = grp.slot_start[t + 1];
  while (k < last && grp.slot_idx[k] < row_end) ++k;
  return k;
}

// W of one unit's rows from V (write_row), with P_in = p.
template <typename T>
void write_unit(const Step<T> &a, const Group &grp, const Unit &un, const Factors<T> &fac, const T *p,
                bool stream_w) {
  int64_t R = grp.m(un.t)[R_], S = grp.m(un.t)[S_];
  const T *fc = fac.col(grp, un.t, un.g), *fr = fac.row(grp, un.t, un.g);
  for (int64_t r = un.r0, k = un.slot; r < un.r1; ++r) {
    int64_t base = (un.g * R + r) * S, end = row_slots(grp, un.t, k, base + S);
    write_row(a, grp, un.t, base, S, fr[r], fc, k, end, p, stream_w);
    k = end;
  }
}

// One unit of the step: V (and the buffer) in place, 0 on the slots, its reduction into scratch;
// with p_new, W from the new V too (row by row, while the row is in L1).
template <typename T, bool MOM, bool FIRST>
void step_unit(const Step<T> &a, const Group &grp, const Unit &un, const Factors<T> &fac, double *scratch,
               const T *p_new, bool stream_w) {
  int64_t R = grp.m(un.t)[R_], S = grp.m(un.t)[S_];
  const T *fc = fac.col(grp, un.t, un.g), *fr = fac.row(grp, un.t, un.g);
  T lr = T(a.lr), mom = T(a.mom), wd = T(a.wd);
  bool by_rows = grp.row_mode(un.t);
  double *acc = un.scratch >= 0 ? scratch + un.scratch : nullptr;
  std::vector<T> cols(acc && !by_rows ? S : 0);
  for (int64_t r = un.r0, k = un.slot; r < un.r1; ++r) {
    int64_t base = (un.g * R + r) * S, end = row_slots(grp, un.t, k, base + S);
    const T *gw = a.gws[un.t] + base;
    T *v = a.vs[un.t] + base, *buf = MOM ? a.bufs[un.t] + base : nullptr;
    if (!acc) step_row<T, MOM, FIRST, NONE>(gw, v, buf, S, fr[r], fc, lr, mom, wd, nullptr, nullptr);
    else if (by_rows) step_row<T, MOM, FIRST, BY_ROWS>(gw, v, buf, S, fr[r], fc, lr, mom, wd, nullptr, acc + (r - un.r0));
    else step_row<T, MOM, FIRST, BY_COLUMNS>(gw, v, buf, S, fr[r], fc, lr, mom, wd, cols.data(), nullptr);
    if (!cols.empty() && ((r - un.r0) % 32 == 31 || r == un.r1 - 1))
      for (int64_t s = 0; s < S; ++s) {          // into double every 32 rows (scratch starts at 0)
        acc[s] += cols[s];
        cols[s] = 0;
      }
    for (int64_t j = k; j < end; ++j) {           // slots are no coordinates
      v[grp.slot_idx[j] - base] = 0;
      if (MOM) buf[grp.slot_idx[j] - base] = 0;
    }
    if (p_new) write_row(a, grp, un.t, base, S, fr[r], fc, k, end, p_new, stream_w);
    k = end;
  }
}

// f(MOM, FIRST) with the step's flags as compile-time constants.
template <typename T, typename F>
void with_flags(const Step<T> &a, F f) {
  if (!a.momentum) f(std::false_type{}, std::false_type{});
  else if (a.first) f(std::true_type{}, std::true_type{});
  else f(std::true_type{}, std::false_type{});
}

template <typename T>
void path_in(const Step<T> &a, T *p) {
  for (int64_t c = 0; c <= a.n; ++c)
    p[c] = a.path_scale[c] * (a.path_root[c] < a.n ? a.carriers[a.path_root[c]] : T(1));
}

// The J entries' direct gradient dL/dW_J / den into their carriers (a gather), and dL/dW_J * W_J
// = that times c into reduced, where a reduction over W would have counted it.
template <typename T>
void carrier_gradients(const Step<T> &a, const T *p, double *reduced, double *g_car) {
  std::vector<double> g(a.nj);
#pragma omp parallel for num_threads(a.threads)
  for (int64_t e = 0; e < a.nj; ++e)
    g[e] = double(a.gws[a.j_tensor[e]][a.j_idx[e]]) / (double(p[a.j_in[e]]) * double(a.M[a.j_out[e]]));
  for (int64_t e = 0; e < a.nj; ++e) {
    g_car[a.j_cls[e]] += g[e];
    if (a.j_in[e] != a.n) reduced[a.j_in[e]] += g[e] * double(a.carriers[a.j_cls[e]]);
  }
}

// Pass 1 over the moving tensors' units.
template <typename T>
void step_pass(const Step<T> &a, const Group &grp, const std::vector<Unit> &us, const T *p_old,
               std::vector<double> &reduced, std::vector<double> &g_car, int64_t scratch_size) {
  std::vector<double> scratch(scratch_size);
  Factors<T> fac(grp, a.count, p_old, a.M);
  std::vector<int64_t> at = starts(grp, us);
  with_flags(a, [&](auto mom_flag, auto first_flag) {
#pragma omp parallel num_threads(a.threads)
    {
      Share sh(at);
      for (int64_t u = sh.lo; u < sh.hi; ++u)
        step_unit<T, decltype(mom_flag)::value, decltype(first_flag)::value>(
            a, grp, us[u], fac, scratch.data(), nullptr, false);
    }
  });
  fold(grp, us, scratch.data(), reduced.data());
  carrier_gradients(a, p_old, reduced.data(), g_car.data());
}

// SGD on the carriers from dL/dc = direct + (path_in's backward of dL/dP_in = -reduced / P_in).
template <typename T>
void carrier_pass(const Step<T> &a, const T *p_old, const std::vector<double> &reduced, std::vector<double> &g_car) {
  for (int64_t c = 0; c <= a.n; ++c)
    if (a.path_root[c] < a.n)
      g_car[a.path_root[c]] += -reduced[c] / double(p_old[c]) * double(a.path_scale[c]);
  for (int64_t k = 0; k < a.nc; ++k) {
    double d = g_car[k] + a.wd * double(a.carriers[k]);
    if (a.momentum) {
      d = a.first ? d : a.mom * double(a.carriers_buf[k]) + d;
      a.carriers_buf[k] = T(d);
    }
    a.carriers[k] = T(double(a.carriers[k]) - a.lr * d);
  }
}

// Pass 3: the moving tensors' W from their new V, and the still tensors stepped with their W (their
// denominator is the same before and after; left to this pass so that a failed check leaves
// them untouched too).
template <typename T>
void allocate_pass(const Step<T> &a, const Group &grp, const std::vector<Unit> &moving,
                   const std::vector<Unit> &still, const T *p_new) {
  std::vector<int64_t> at_moving = starts(grp, moving), at_still = starts(grp, still);
  bool stream_w = (at_moving.back() + at_still.back()) * int64_t(sizeof(T)) >= STREAM_BYTES;
  Factors<T> fac(grp, a.count, p_new, a.M);
  with_flags(a, [&](auto mom_flag, auto first_flag) {
#pragma omp parallel num_threads(a.threads)
    {
      // the moving units pass 1 gave this thread, last first: the end of the V this core has
      // just written is still in its cache
      Share sh(at_moving);
      for (int64_t u = sh.hi - 1; u >= sh.lo; --u) write_unit(a, grp, moving[u], fac, p_new, stream_w);
      Share st(at_still);
      for (int64_t u = st.lo; u < st.hi; ++u)
        step_unit<T, decltype(mom_flag)::value, decltype(first_flag)::value>(
            a, grp, still[u], fac, nullptr, p_new, stream_w);
#if defined(__AVX__)
      _mm_sfence();
#endif
    }
  });
}

// Returns 0, or 1 where the new P_in has a zero or non-finite entry (W is then left as it was).
template <typename T>
int run_step(const Step<T> &a) {
  Group grp{a.meta, a.cls, a.n, a.path_root, a.slot_start, a.slot_idx, a.slot_ref};
  std::vector<double> reduced(a.n + 1), g_car(a.nc);
  std::vector<T> p_old(a.n + 1), p_new(a.n + 1);
  int64_t scratch_size = 0, none = 0;
  std::vector<Unit> moving = units(grp, a.count, true, true, &scratch_size);
  std::vector<Unit> still = units(grp, a.count, false, false, &none);
  path_in(a, p_old.data());
  step_pass(a, grp, moving, p_old.data(), reduced, g_car, scratch_size);
  carrier_pass(a, p_old.data(), reduced, g_car);
  path_in(a, p_new.data());
  for (T p : p_new)
    if (!std::isfinite(p) || p == 0) return 1;
  allocate_pass(a, grp, moving, still, p_new.data());
  return 0;
}

// ---- The compiled module's WA (forward) and ICR (backward) on CPU tensors (kernels/wa.py,
// kernels/icr.py): one pass each over the group with P_in given, the same units, rows and slots
// as the step. WA reads V and writes W (2 tensor passes, the reference's division makes the same
// 2); ICR reads dL/dW and V and writes dL/dV with the per-class reduction in the same pass (3,
// where the reference's division, product and sum make 6).

// Every tensor's units, those whose denominator moves first (the split means nothing here).
std::vector<Unit> all_units(const Group &grp, int64_t count, bool with_scratch, int64_t *scratch_size) {
  int64_t moving_size = 0, still_size = 0;
  std::vector<Unit> us = units(grp, count, true, with_scratch, &moving_size);
  std::vector<Unit> still = units(grp, count, false, with_scratch, &still_size);
  for (Unit &un : still)
    if (un.scratch >= 0) un.scratch += moving_size;
  us.insert(us.end(), still.begin(), still.end());
  *scratch_size = moving_size + still_size;
  return us;
}

template <typename T>
void run_wa(const Step<T> &a, const T *p) {
  Group grp{a.meta, a.cls, a.n, a.path_root, a.slot_start, a.slot_idx, a.slot_ref};
  int64_t none = 0;
  std::vector<Unit> us = all_units(grp, a.count, false, &none);
  std::vector<int64_t> at = starts(grp, us);
  bool stream_w = at.back() * int64_t(sizeof(T)) >= STREAM_BYTES;
  Factors<T> fac(grp, a.count, p, a.M);
#pragma omp parallel num_threads(a.threads)
  {
    Share sh(at);
    for (int64_t u = sh.lo; u < sh.hi; ++u) write_unit(a, grp, us[u], fac, p, stream_w);
#if defined(__AVX__)
    _mm_sfence();
#endif
  }
}

// One row of ICR: dL/dV = dL/dW * (fr * fc), its reduction with V into col_acc or row_acc.
template <typename T, Reduce RED>
void icr_row(const T *gw, const T *v, T *gv, int64_t S, T fr, const T *fc, T *col_acc, double *row_acc) {
  double racc = 0;
#pragma omp simd reduction(+ : racc)
  for (int64_t s = 0; s < S; ++s) {
    T g = gw[s] * (fr * fc[s]);
    gv[s] = g;
    if (RED == BY_COLUMNS) col_acc[s] += g * v[s];
    if (RED == BY_ROWS) racc += double(g * v[s]);
  }
  if (RED == BY_ROWS) *row_acc = racc;
}

// gvs: dL/dV (0 on the K and J slots, which are no coordinates and take no part in the
// reduction); reduced (n + 1, double): Σ dL/dV * V by input class, plus each J entry's
// dL/dW_J * W_J as in the reference; g_car (nc, double): the J entries' direct gradient.
template <typename T>
void run_icr(const Step<T> &a, const T *p, T *const *gvs, double *reduced, double *g_car) {
  Group grp{a.meta, a.cls, a.n, a.path_root, a.slot_start, a.slot_idx, a.slot_ref};
  int64_t scratch_size = 0;
  std::vector<Unit> us = all_units(grp, a.count, true, &scratch_size);
  std::vector<int64_t> at = starts(grp, us);
  std::vector<double> scratch(scratch_size);
  Factors<T> fac(grp, a.count, p, a.M);
#pragma omp parallel num_threads(a.threads)
  {
    Share sh(at);
    for (int64_t u = sh.lo; u < sh.hi; ++u) {
      const Unit &un = us[u];
      int64_t R = grp.m(un.t)[R_], S = grp.m(un.t)[S_];
      const T *fc = fac.col(grp, un.t, un.g), *fr = fac.row(grp, un.t, un.g);
      bool by_rows = grp.row_mode(un.t);
      double *acc = un.scratch >= 0 ? scratch.data() + un.scratch : nullptr;
      std::vector<T> cols(acc && !by_rows ? S : 0);
      for (int64_t r = un.r0, k = un.slot; r < un.r1; ++r) {
        int64_t base = (un.g * R + r) * S, end = row_slots(grp, un.t, k, base + S);
        const T *gw = a.gws[un.t] + base, *v = a.vs[un.t] + base;
        T *gv = gvs[un.t] + base;
        double *racc = acc && by_rows ? acc + (r - un.r0) : nullptr;
        if (!acc) icr_row<T, NONE>(gw, v, gv, S, fr[r], fc, nullptr, nullptr);
        else if (by_rows) icr_row<T, BY_ROWS>(gw, v, gv, S, fr[r], fc, nullptr, racc);
        else icr_row<T, BY_COLUMNS>(gw, v, gv, S, fr[r], fc, cols.data(), nullptr);
        for (int64_t j = k; j < end; ++j) {          // the slots: out of the reduction, 0 in dL/dV
          int64_t c = grp.slot_idx[j] - base;
          if (racc) *racc -= double(gv[c] * v[c]);
          else if (!cols.empty()) cols[c] -= gv[c] * v[c];
          gv[c] = 0;
        }
        if (!cols.empty() && ((r - un.r0) % 32 == 31 || r == un.r1 - 1))
          for (int64_t s = 0; s < S; ++s) {          // into double every 32 rows (scratch starts at 0)
            acc[s] += cols[s];
            cols[s] = 0;
          }
        k = end;
      }
    }
  }
  fold(grp, us, scratch.data(), reduced);
  carrier_gradients(a, p, reduced, g_car);
}

}  // namespace

extern "C" {
int gsgd_cpu_step_f32(const Step<float> *a) { return run_step(*a); }
int gsgd_cpu_step_f64(const Step<double> *a) { return run_step(*a); }
void ic_cpu_wa_f32(const Step<float> *a, const float *p) { run_wa(*a, p); }
void ic_cpu_wa_f64(const Step<double> *a, const double *p) { run_wa(*a, p); }
void ic_cpu_icr_f32(const Step<float> *a, const float *p, float *const *gvs, double *reduced, double *g_car) {
  run_icr(*a, p, gvs, reduced, g_car);
}
void ic_cpu_icr_f64(const Step<double> *a, const double *p, double *const *gvs, double *reduced, double *g_car) {
  run_icr(*a, p, gvs, reduced, g_car);
}
}
