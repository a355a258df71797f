// CPU paged decode attention for best-effort (BE) requests whose KV cache lives in host DRAM.
//
// Decode attention reads every KV element of a request once per token, so the kernel is bound by
// host memory bandwidth (fp32 KV) or by the cores' multiply-add rate (16-bit KV on few cores).
// Design, in the order the bytes flow:
//   * Work items are (sequence, kv head, token range) tasks. Long sequences are split into several
//     ranges so one long request spreads over all threads; the partial softmax states are merged
//     afterwards with log-sum-exp weights.
//   * A task walks its range in tiles of W tokens (W = SIMD width: 16 for AVX-512, 8 for AVX2). All
//     q heads that share the kv head (GQA group) are processed together, so each K/V row is read
//     from DRAM once per tile and reused from L1 for the other heads.
//   * q.K dot products keep one vector accumulator per (token, head) and reduce W of them into one
//     vector of W scores with a shuffle tree (about 3 shuffle/add ops per score instead of a full
//     horizontal sum each).
//   * Online softmax is blocked: one max/rescale per tile and head, exponentials in base 2 with the
//     softmax scale folded into q.
//   * 16-bit KV is widened in registers: fp16 with F16C vcvtph2ps, bf16 with one shift (even
//     elements) or one AND (odd elements) per 32-bit lane. The bf16 trick de-interleaves each group
//     of 2W elements, so q is stored in the same permuted order and the output is un-permuted once
//     per task.
//   * The op runs with the GIL released (torch.ops calls drop it) and uses its own OpenMP team.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#ifndef PB_NS
#define PB_NS piggyback_cpu
#endif
#define PB_STR2(x) #x
#define PB_STR(x) PB_STR2(x)

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "cpu_attention.cpp needs AVX2, FMA and F16C (the Python loader falls back to torch otherwise)"
#endif

namespace pb {

enum class Kv { F32, F16, BF16 };

// Cephes exp2f polynomial for f in [-0.5, 0.5]; relative error ~2e-7, enough for softmax in fp32.
constexpr float kP0 = 1.535336188319500e-4f, kP1 = 1.339887440266574e-3f, kP2 = 9.618437357674640e-3f,
                kP3 = 5.550332471162809e-2f, kP4 = 2.402264791363012e-1f, kP5 = 6.931472028550421e-1f;

#if defined(__AVX512F__) && !defined(PB_FORCE_AVX2)
struct Isa {
  using V = __m512;
  static constexpr int W = 16;   // lanes per vector = tokens per tile
  static constexpr int GT = 4;   // q heads per register group (QK: 4 tokens x 4 heads accumulators)
  static constexpr int PVV = 4;  // vectors of head_dim per PV piece for GT heads (GT * PVV = 16 acc)
  static constexpr const char* name = "avx512";
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  // Lanes >= n take `fill` (partial last tile).
  static V keep_first(V v, int n, float fill) {
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    return _mm512_mask_blend_ps(m, _mm512_set1_ps(fill), v);
  }
  static V exp2(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const V r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, r);
    V p = _mm512_set1_ps(kP0);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, r);
  }
  // Load 2W consecutive cache elements as two fp32 vectors.
  template <Kv T>
  static void load2(const void* base, int64_t off, V& a, V& b) {
    if constexpr (T == Kv::F32) {
      const float* p = static_cast<const float*>(base) + off;
      a = _mm512_loadu_ps(p);
      b = _mm512_loadu_ps(p + 16);
    } else if constexpr (T == Kv::F16) {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    } else {
      // bf16 is the top half of fp32: even elements sit in the low 16 bits of each 32-bit lane.
      const __m512i x = _mm512_loadu_si512(static_cast<const uint16_t*>(base) + off);
      a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
    }
  }
  // 4 per-token accumulators -> one vector whose 128-bit quarter t holds 4 partial sums of token t.
  static V partial4(V a0, V a1, V a2, V a3) {
    const V b01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const V b23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(b01, b23, 0x88), _mm512_shuffle_f32x4(b01, b23, 0xDD));
  }
  // W/4 partial vectors (tokens 4k..4k+3 in c[k]) -> W scores in token order.
  static V finish(const V* c) {
    const V d01 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const V d23 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const __m512d x = _mm512_castps_pd(d01), y = _mm512_castps_pd(d23);
    const V e = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    // Lane 4L + k of e holds token 4k + L.
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, e);
  }
};
#else
struct Isa {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int GT = 2;   // 16 ymm registers: 4 tokens x 2 heads accumulators
  static constexpr int PVV = 4;  // 2 heads x 4 vectors = 8 accumulators
  static constexpr const char* name = "avx2";
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static float hmax(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static V keep_first(V v, int n, float fill) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const V m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, m);
  }
  static V exp2(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    const V r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(x, r);
    V p = _mm256_set1_ps(kP0);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    // Multiply by 2^r by adding r to the exponent field (r >= -126 keeps the result normal).
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(r), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  template <Kv T>
  static void load2(const void* base, int64_t off, V& a, V& b) {
    if constexpr (T == Kv::F32) {
      const float* p = static_cast<const float*>(base) + off;
      a = _mm256_loadu_ps(p);
      b = _mm256_loadu_ps(p + 8);
    } else if constexpr (T == Kv::F16) {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    } else {
      const __m256i x =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + off));
      a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
    }
  }
  // 4 per-token accumulators -> one vector: 128-bit half L holds tokens L and 2+L, 2 partials each.
  static V partial4(V a0, V a1, V a2, V a3) {
    const V b01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    const V b23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    return _mm256_add_ps(_mm256_unpacklo_ps(b01, b23), _mm256_unpackhi_ps(b01, b23));
  }
  static V finish(const V* c) {
    const __m256d x = _mm256_castps_pd(c[0]), y = _mm256_castps_pd(c[1]);
    const V e = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                              _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    // Lane 4L + j of e holds token 2j + L.
    const __m256i idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    return _mm256_permutevar8x32_ps(e, idx);
  }
};
#endif

using V = Isa::V;
constexpr int W = Isa::W;

struct Params {
  const float* q;  // [S, Hq, D], scale not applied
  const void* k;
  const void* v;
  float* out;  // [S, Hq, D]
  const int32_t* bt;
  const int32_t* lens;
  int64_t bt_stride, row_stride, block_size, hq, hkv, d, g;
  float scale_log2;  // softmax scale * log2(e): scores live in base 2
};

struct Task {
  int32_t seq, kvh, t0, t1;
  int64_t part;  // index of its partial-state slot, -1 when the task covers the whole sequence
};

// Per-thread scratch, allocated once per call (never in the hot loop).
struct Scratch {
  std::vector<float> qb, acc, m, l, p, red;
  const char* k_rows[W];
  const char* v_rows[W];
  void init(int64_t g, int64_t d) {
    qb.assign(g * d, 0.f);
    acc.assign(g * d, 0.f);
    m.assign(g, 0.f);
    l.assign(g, 0.f);
    p.assign(g * W, 0.f);
    red.assign(size_t(Isa::GT) * (W / 4) * W, 0.f);
  }
};

// Position of logical element e (within a head row) in the register layout of T.
template <Kv T>
inline int64_t lane_pos(int64_t e) {
  if constexpr (T == Kv::BF16) {
    const int64_t grp = e / (2 * W), r = e % (2 * W);
    return grp * 2 * W + (r % 2) * W + r / 2;
  } else {
    return e;
  }
}

// q.K for one tile, heads [g0, g0 + GN) of the group, GN <= GT. Writes W scores per head into red.
template <Kv T, int GN>
inline void tile_scores(const Params& P, Scratch& S, int64_t g0, V* scores) {
  const int64_t np = P.d / (2 * W);
  alignas(64) V parts[GN][W / 4];
  for (int sub = 0; sub < W / 4; ++sub) {
    V acc[4][GN];
    for (int t = 0; t < 4; ++t)
      for (int h = 0; h < GN; ++h) acc[t][h] = Isa::zero();
    for (int64_t j = 0; j < np; ++j) {
      V ka[4], kb[4];
      for (int t = 0; t < 4; ++t) {
        Isa::load2<T>(S.k_rows[sub * 4 + t], j * 2 * W, ka[t], kb[t]);
      }
      for (int h = 0; h < GN; ++h) {
        const float* qh = S.qb.data() + (g0 + h) * P.d + j * 2 * W;
        const V qa = Isa::load(qh), qc = Isa::load(qh + W);
        for (int t = 0; t < 4; ++t) {
          acc[t][h] = Isa::fma(qa, ka[t], acc[t][h]);
          acc[t][h] = Isa::fma(qc, kb[t], acc[t][h]);
        }
      }
    }
    for (int h = 0; h < GN; ++h) parts[h][sub] = Isa::partial4(acc[0][h], acc[1][h], acc[2][h], acc[3][h]);
  }
  for (int h = 0; h < GN; ++h) scores[h] = Isa::finish(parts[h]);
}

// acc[h] = acc[h] * alpha[h] + sum_t p[h][t] * V_t for the NV vectors of head_dim starting at vec0.
template <Kv T, int GN, int NV>
inline void tile_pv_piece(const Params& P, Scratch& S, int64_t g0, int n, const float* alpha,
                          int64_t vec0) {
  static_assert(NV % 2 == 0, "pieces are whole load2 pairs");
  V acc[GN][NV];
  for (int h = 0; h < GN; ++h) {
    const V a = Isa::set1(alpha[h]);
    float* src = S.acc.data() + (g0 + h) * P.d + vec0 * W;
    for (int i = 0; i < NV; ++i) acc[h][i] = Isa::mul(Isa::load(src + i * W), a);
  }
  for (int t = 0; t < n; ++t) {
    V vv[NV];
    for (int i = 0; i < NV; i += 2) Isa::load2<T>(S.v_rows[t], (vec0 + i) * W, vv[i], vv[i + 1]);
    for (int h = 0; h < GN; ++h) {
      const V pb = Isa::set1(S.p[(g0 + h) * W + t]);
      for (int i = 0; i < NV; ++i) acc[h][i] = Isa::fma(pb, vv[i], acc[h][i]);
    }
  }
  for (int h = 0; h < GN; ++h) {
    float* dst = S.acc.data() + (g0 + h) * P.d + vec0 * W;
    for (int i = 0; i < NV; ++i) Isa::store(dst + i * W, acc[h][i]);
  }
}

template <Kv T, int GN>
inline void tile_group(const Params& P, Scratch& S, int64_t g0, int n) {
  V scores[GN];
  tile_scores<T, GN>(P, S, g0, scores);
  float alpha[GN];
  for (int h = 0; h < GN; ++h) {
    const V s = Isa::keep_first(scores[h], n, -std::numeric_limits<float>::infinity());
    const float m_old = S.m[g0 + h];
    const float m_new = std::max(m_old, Isa::hmax(s));
    alpha[h] = std::exp2(m_old - m_new);  // 0 on the first tile (m_old = -inf)
    const V p = Isa::keep_first(Isa::exp2(Isa::sub(s, Isa::set1(m_new))), n, 0.f);
    S.l[g0 + h] = S.l[g0 + h] * alpha[h] + Isa::hsum(p);
    S.m[g0 + h] = m_new;
    Isa::store(S.p.data() + (g0 + h) * W, p);
  }
  // Pieces of head_dim sized so GN * NV accumulators stay in registers.
  constexpr int NV = Isa::PVV * (Isa::GT / GN);
  const int64_t nvec = P.d / W;
  int64_t vec0 = 0;
  for (; vec0 + NV <= nvec; vec0 += NV) tile_pv_piece<T, GN, NV>(P, S, g0, n, alpha, vec0);
  for (; vec0 < nvec; vec0 += 2) tile_pv_piece<T, GN, 2>(P, S, g0, n, alpha, vec0);
}

template <Kv T>
void run_task(const Params& P, Scratch& S, const Task& task, float* part_acc, float* part_ml) {
  const int64_t G = P.g, D = P.d;
  const size_t esize = T == Kv::F32 ? 4 : 2;
  // q for this kv head's group, scaled into base-2 logits and laid out like the widened K.
  for (int64_t h = 0; h < G; ++h) {
    const float* src = P.q + (int64_t(task.seq) * P.hq + task.kvh * G + h) * D;
    float* dst = S.qb.data() + h * D;
    for (int64_t e = 0; e < D; ++e) dst[lane_pos<T>(e)] = src[e] * P.scale_log2;
  }
  std::fill(S.acc.begin(), S.acc.end(), 0.f);
  std::fill(S.m.begin(), S.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(S.l.begin(), S.l.end(), 0.f);

  const int32_t* bt = P.bt + int64_t(task.seq) * P.bt_stride;
  const char* kbase = static_cast<const char*>(P.k) + task.kvh * D * esize;
  const char* vbase = static_cast<const char*>(P.v) + task.kvh * D * esize;
  const int64_t row_bytes = P.row_stride * esize;
  const int64_t line_count = (D * int64_t(esize) + 63) / 64;
  int64_t blk = task.t0 / P.block_size, off = task.t0 % P.block_size;

  for (int64_t t0 = task.t0; t0 < task.t1; t0 += W) {
    const int n = int(std::min<int64_t>(W, task.t1 - t0));
    for (int i = 0; i < W; ++i) {
      if (i < n) {
        const int64_t row = (int64_t(bt[blk]) * P.block_size + off) * row_bytes;
        S.k_rows[i] = kbase + row;
        S.v_rows[i] = vbase + row;
        if (++off == P.block_size) {
          off = 0;
          ++blk;
        }
      } else {
        // Padding lanes read a valid row; their scores are masked out.
        S.k_rows[i] = S.k_rows[n - 1];
        S.v_rows[i] = S.v_rows[n - 1];
      }
    }
    // Prefetch the next tile's rows: page boundaries defeat the hardware prefetcher.
    if (t0 + W < task.t1) {
      int64_t b2 = blk, o2 = off;
      const int n2 = int(std::min<int64_t>(W, task.t1 - t0 - W));
      for (int i = 0; i < n2; ++i) {
        const int64_t row = (int64_t(bt[b2]) * P.block_size + o2) * row_bytes;
        for (int64_t c = 0; c < line_count; ++c) {
          _mm_prefetch(kbase + row + c * 64, _MM_HINT_T0);
          _mm_prefetch(vbase + row + c * 64, _MM_HINT_T0);
        }
        if (++o2 == P.block_size) {
          o2 = 0;
          ++b2;
        }
      }
    }
    int64_t g0 = 0;
    for (; g0 + Isa::GT <= G; g0 += Isa::GT) tile_group<T, Isa::GT>(P, S, g0, n);
    if constexpr (Isa::GT > 2) {
      for (; g0 + 2 <= G; g0 += 2) tile_group<T, 2>(P, S, g0, n);
    }
    for (; g0 < G; ++g0) tile_group<T, 1>(P, S, g0, n);
  }

  // Write the normalized output, or the unnormalized partial state for the log-sum-exp merge.
  for (int64_t h = 0; h < G; ++h) {
    const float* a = S.acc.data() + h * D;
    if (task.part < 0) {
      float* dst = P.out + (int64_t(task.seq) * P.hq + task.kvh * G + h) * D;
      const float inv = 1.f / S.l[h];
      for (int64_t e = 0; e < D; ++e) dst[e] = a[lane_pos<T>(e)] * inv;
    } else {
      float* dst = part_acc + (task.part * G + h) * D;
      for (int64_t e = 0; e < D; ++e) dst[e] = a[lane_pos<T>(e)];
      part_ml[(task.part * G + h) * 2] = S.m[h];
      part_ml[(task.part * G + h) * 2 + 1] = S.l[h];
    }
  }
}

Kv kv_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Kv::F32;
    case at::kHalf:
      return Kv::F16;
    case at::kBFloat16:
      return Kv::BF16;
    default:
      TORCH_CHECK(false, "cpu paged attention: unsupported KV dtype ", t.scalar_type());
  }
}

void paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            const at::Tensor& out, int64_t num_threads) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "query must be a contiguous float32 [seqs, q_heads, head_dim] tensor");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "key/value caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && key_cache.scalar_type() == value_cache.scalar_type(),
              "key and value caches must match in shape and dtype");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == query.sizes(),
              "out must be a contiguous float32 tensor shaped like query");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables must be int32 [seqs, max_blocks] with unit inner stride");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "context_lens must be a contiguous int32 tensor");
  const int64_t S = query.size(0), HQ = query.size(1), D = query.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), HKV = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "head_dim of query and cache differ");
  TORCH_CHECK(HKV > 0 && HQ % HKV == 0, "num_q_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(D % (2 * W) == 0, "head_dim must be a multiple of ", 2 * W);
  TORCH_CHECK(block_tables.size(0) == S && context_lens.size(0) == S, "one block table row and length per seq");
  const Kv kt = kv_type(key_cache);

  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t bt_stride = block_tables.stride(0), MB = block_tables.size(1);
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = lens[s];
    TORCH_CHECK(len >= 1 && len <= MB * BS, "context_lens[", s, "] = ", len, " is outside [1, ", MB * BS, "]");
    for (int64_t j = 0; j < (len + BS - 1) / BS; ++j) {
      const int32_t b = bt[s * bt_stride + j];
      TORCH_CHECK(b >= 0 && b < NB, "block_tables[", s, "][", j, "] = ", b, " is outside [0, ", NB, ")");
    }
    total += len * HKV;
  }
  if (S == 0) return;
  const int nt = int(std::max<int64_t>(1, num_threads > 0 ? num_threads : omp_get_max_threads()));

  // Split sequences into token ranges so there are about 4 tasks per thread, but no range shorter
  // than 256 tokens (the merge and the per-task setup must stay small next to the range's reads).
  int64_t chunk = std::max<int64_t>(256, (total + 4 * nt - 1) / (4 * nt));
  chunk = (chunk + 15) / 16 * 16;  // tiles never straddle two tasks
  std::vector<Task> tasks;
  std::vector<int64_t> part_base(S, -1), nsplit(S, 1);
  int64_t nparts = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = lens[s];
    nsplit[s] = (len + chunk - 1) / chunk;
    if (nsplit[s] > 1) {
      part_base[s] = nparts;
      nparts += nsplit[s] * HKV;
    }
    for (int64_t h = 0; h < HKV; ++h)
      for (int64_t i = 0; i < nsplit[s]; ++i) {
        const int64_t t0 = i * chunk, t1 = std::min(len, t0 + chunk);
        const int64_t part = nsplit[s] > 1 ? part_base[s] + h * nsplit[s] + i : -1;
        tasks.push_back({int32_t(s), int32_t(h), int32_t(t0), int32_t(t1), part});
      }
  }
  // Longest first, so the dynamic schedule ends with short tasks that fill the gaps.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return (a.t1 - a.t0) > (b.t1 - b.t0); });

  const int64_t G = HQ / HKV;
  std::vector<float> part_acc(size_t(nparts) * G * D), part_ml(size_t(nparts) * G * 2);
  Params P{query.data_ptr<float>(),
           key_cache.data_ptr(),
           value_cache.data_ptr(),
           out.data_ptr<float>(),
           bt,
           lens,
           bt_stride,
           HKV * D,
           BS,
           HQ,
           HKV,
           D,
           G,
           float(scale * 1.4426950408889634)};
  const int64_t ntasks = int64_t(tasks.size());

#pragma omp parallel num_threads(nt)
  {
    Scratch scratch;
    scratch.init(G, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ntasks; ++i) {
      switch (kt) {
        case Kv::F32:
          run_task<Kv::F32>(P, scratch, tasks[i], part_acc.data(), part_ml.data());
          break;
        case Kv::F16:
          run_task<Kv::F16>(P, scratch, tasks[i], part_acc.data(), part_ml.data());
          break;
        case Kv::BF16:
          run_task<Kv::BF16>(P, scratch, tasks[i], part_acc.data(), part_ml.data());
          break;
      }
    }
    // Log-sum-exp merge of split sequences: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i.
    if (nparts > 0) {
#pragma omp for schedule(static)
      for (int64_t sh = 0; sh < S * HKV; ++sh) {
        const int64_t s = sh / HKV, h = sh % HKV;
        if (nsplit[s] <= 1) continue;
        for (int64_t g = 0; g < G; ++g) {
          float M = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < nsplit[s]; ++i)
            M = std::max(M, part_ml[((part_base[s] + h * nsplit[s] + i) * G + g) * 2]);
          float* dst = P.out + (s * HQ + h * G + g) * D;
          std::fill(dst, dst + D, 0.f);
          float denom = 0.f;
          for (int64_t i = 0; i < nsplit[s]; ++i) {
            const int64_t pi = (part_base[s] + h * nsplit[s] + i) * G + g;
            const float w = std::exp2(part_ml[pi * 2] - M);
            denom += w * part_ml[pi * 2 + 1];
            const float* a = part_acc.data() + pi * D;
            for (int64_t e = 0; e < D; ++e) dst[e] += w * a[e];
          }
          const float inv = 1.f / denom;
          for (int64_t e = 0; e < D; ++e) dst[e] *= inv;
        }
      }
    }
  }
}

// Single pass over a buffer with all threads: the read-bandwidth limit of the roofline.
double stream_read(const at::Tensor& buf, int64_t num_threads) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous(), "buf must be contiguous float32");
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel() / (4 * W) * (4 * W);
  const int nt = int(std::max<int64_t>(1, num_threads > 0 ? num_threads : omp_get_max_threads()));
  double total = 0.0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total)
  for (int64_t i = 0; i < n; i += 64 * W) {
    V a0 = Isa::zero(), a1 = Isa::zero(), a2 = Isa::zero(), a3 = Isa::zero();
    const int64_t end = std::min(n, i + 64 * W);
    for (int64_t j = i; j < end; j += 4 * W) {
      a0 = Isa::add(a0, Isa::load(p + j));
      a1 = Isa::add(a1, Isa::load(p + j + W));
      a2 = Isa::add(a2, Isa::load(p + j + 2 * W));
      a3 = Isa::add(a3, Isa::load(p + j + 3 * W));
    }
    total += Isa::hsum(Isa::add(Isa::add(a0, a1), Isa::add(a2, a3)));
  }
  return total;
}

std::string isa_name() { return Isa::name; }

}  // namespace pb

#define PB_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
PB_LIBRARY(PB_NS, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out, int num_threads) -> ()",
      &pb::paged_decode_attention);
  m.def("stream_read(Tensor buf, int num_threads) -> float", &pb::stream_read);
  m.def("isa() -> str", &pb::isa_name);
}
