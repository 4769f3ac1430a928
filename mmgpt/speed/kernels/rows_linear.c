/* y = x W + b for a few rows of x (decoding), fp32, AVX2 + FMA, OpenMP threads.
 *
 * W is packed once into panels of 16 output columns, (P, K, 16) with P = ceil(N / 16), so that each
 * panel is one contiguous stream. One row: four panels at a time (8 accumulators, 64 columns), the
 * panels split between threads. Several rows: per panel, rows in groups of four (4 rows x 16
 * columns), the panel staying in L1/L2 while each group reads it. Plain C, no torch headers: built in
 * well under a second on first use (mmgpt/kernels/__init__.py) and called through ctypes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define W16 16

static void mmgpt_rows_linear_avx2(const float *x, int64_t R, int64_t K, const float *w, int64_t P,
                                   const float *bias, int64_t N, float *out, int threads);
static void mmgpt_rows_linear_i8_avx2(const float *x, int64_t R, int64_t K, const int8_t *q, int64_t P,
                                      const float *scale, const float *bias, int64_t N, float *out, int threads);

static inline void one_row(int np, const float *x, int64_t K, const float *w, float *y) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t s = K * W16;
  if (np == 4) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 xk = _mm256_broadcast_ss(x + k);
      const float *wk = w + k * W16;
      a0 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk), a0);
      a1 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + 8), a1);
      a2 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + s), a2);
      a3 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + s + 8), a3);
      a4 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + 2 * s), a4);
      a5 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + 2 * s + 8), a5);
      a6 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + 3 * s), a6);
      a7 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + 3 * s + 8), a7);
    }
    _mm256_storeu_ps(y, a0); _mm256_storeu_ps(y + 8, a1); _mm256_storeu_ps(y + 16, a2);
    _mm256_storeu_ps(y + 24, a3); _mm256_storeu_ps(y + 32, a4); _mm256_storeu_ps(y + 40, a5);
    _mm256_storeu_ps(y + 48, a6); _mm256_storeu_ps(y + 56, a7);
    return;
  }
  for (int p = 0; p < np; ++p) {  /* the last 1-3 panels of a matrix */
    const float *wp = w + p * s;
    a0 = _mm256_setzero_ps(); a1 = a0; a2 = a0; a3 = a0;
    int64_t k = 0;
    for (; k + 1 < K; k += 2) {
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wp + k * W16), a0);
      a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wp + k * W16 + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(wp + (k + 1) * W16), a2);
      a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(wp + (k + 1) * W16 + 8), a3);
    }
    for (; k < K; ++k) {
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wp + k * W16), a0);
      a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wp + k * W16 + 8), a1);
    }
    _mm256_storeu_ps(y + p * W16, _mm256_add_ps(a0, a2));
    _mm256_storeu_ps(y + p * W16 + 8, _mm256_add_ps(a1, a3));
  }
}

/* `nr` (1..4) rows of x (row stride ldx) against one panel (K x 16) -> y (nr x 16). */
static inline void rows_panel(int nr, const float *x, int64_t ldx, int64_t K, const float *w, float *y) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const float *x0 = x, *x1 = x + (nr > 1 ? ldx : 0), *x2 = x + (nr > 2 ? 2 * ldx : 0),
              *x3 = x + (nr > 3 ? 3 * ldx : 0);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * W16), w1 = _mm256_loadu_ps(w + k * W16 + 8);
    __m256 xr = _mm256_broadcast_ss(x0 + k);
    a0 = _mm256_fmadd_ps(xr, w0, a0); a1 = _mm256_fmadd_ps(xr, w1, a1);
    xr = _mm256_broadcast_ss(x1 + k);
    a2 = _mm256_fmadd_ps(xr, w0, a2); a3 = _mm256_fmadd_ps(xr, w1, a3);
    xr = _mm256_broadcast_ss(x2 + k);
    a4 = _mm256_fmadd_ps(xr, w0, a4); a5 = _mm256_fmadd_ps(xr, w1, a5);
    xr = _mm256_broadcast_ss(x3 + k);
    a6 = _mm256_fmadd_ps(xr, w0, a6); a7 = _mm256_fmadd_ps(xr, w1, a7);
  }
  _mm256_storeu_ps(y, a0); _mm256_storeu_ps(y + 8, a1);
  _mm256_storeu_ps(y + 16, a2); _mm256_storeu_ps(y + 24, a3);
  _mm256_storeu_ps(y + 32, a4); _mm256_storeu_ps(y + 40, a5);
  _mm256_storeu_ps(y + 48, a6); _mm256_storeu_ps(y + 56, a7);
}

static inline void finish(const float *src, const float *bias, int64_t col0, int64_t cols, float *out) {
  if (bias)
    for (int64_t c = 0; c < cols; ++c) out[c] = src[c] + bias[col0 + c];
  else
    for (int64_t c = 0; c < cols; ++c) out[c] = src[c];
}

/* ---- AVX-512: up to 16 rows against a panel in one pass (several rows, when the CPU has it) ----------
 *
 * Sixteen rows x 16 columns are sixteen zmm accumulators: each panel (fp32, or int8 widened in
 * registers) is read from memory once per step for all the rows, while the AVX2 code reads it once per
 * group of four, the first read waiting on memory and the next three finding it in cache. Built with
 * the target attribute and chosen at run time (`mmgpt_set_avx512`, default: the CPU's cpuid); the same
 * products, summed in the same order over k as the AVX2 code for fp32 weights.
 */
#define T512 __attribute__((target("avx512f")))
#ifndef PF_AHEAD
#define PF_AHEAD 64
#endif

static int avx512_on = -1;

/* on: 1 use AVX-512 where the CPU has it, 0 never. Returns whether it is used. */
int mmgpt_set_avx512(int on) {
  __builtin_cpu_init();
  avx512_on = on && __builtin_cpu_supports("avx512f");
  return avx512_on;
}

static inline int use_avx512(void) {
  if (avx512_on < 0) mmgpt_set_avx512(1);
  return avx512_on;
}

static inline __attribute__((always_inline)) T512 __m512 panel_row(const void *w, int i8, int64_t k, int64_t ldw) {
  if (i8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + k * ldw))));
  return _mm512_loadu_ps((const float *)w + k * ldw);
}

/* NR rows (x, row stride ldx) against one panel of 16 columns whose K rows lie ldw elements apart (W16
 * for a packed panel) -> y (NR x 16, row stride ldy). The panel's rows are prefetched PF_AHEAD lines on:
 * a packed panel comes from memory once per decoding step. */
static inline __attribute__((always_inline)) T512 void rows_panel512(const int NR, const int i8, const float *x,
                                                                      int64_t ldx, int64_t K, const void *w,
                                                                      int64_t ldw, float *y, int64_t ldy) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (!i8)
      _mm_prefetch((const char *)((const float *)w + (k + PF_AHEAD) * ldw), _MM_HINT_T0);
    else if ((k & 3) == 0)
      _mm_prefetch((const char *)w + k * ldw + PF_AHEAD * 64, _MM_HINT_T0);
    const __m512 wk = panel_row(w, i8, k, ldw);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wk, a[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(y + r * ldy, a[r]);
}

#define ROWS512(NR, I8)                                                                                    \
  static T512 void rows512_##NR##_##I8(const float *x, int64_t ldx, int64_t K, const void *w, float *y) { \
    rows_panel512(NR, I8, x, ldx, K, w, W16, y, W16);                                                      \
  }
ROWS512(4, 0) ROWS512(8, 0) ROWS512(16, 0) ROWS512(4, 1) ROWS512(8, 1) ROWS512(16, 1)

static inline int64_t group_rows(int64_t nr) { return nr <= 4 ? 4 : nr <= 8 ? 8 : 16; }

/* x (R, K), R >= 2; w (P, K, 16) fp32 or int8 (i8); scale (N) for int8; bias (N) or NULL; out (R, N).
 * Rows go in groups of 16; the last group runs as 4, 8 or 16 rows, x padded with zero rows to fill it. */
static T512 void rows_linear512(const float *x, int64_t R, int64_t K, const void *w, int i8, int64_t P,
                                const float *scale, const float *bias, int64_t N, float *out, int threads) {
  const int64_t panel = K * W16 * (i8 ? 1 : 4); /* bytes */
  const int64_t last = R / 16 * 16, rpad = R == last ? R : last + group_rows(R - last);
  float *xp = NULL;
  if (rpad > R) {
    xp = (float *)calloc((size_t)(rpad * K), sizeof(float));
    if (!xp) { /* no memory for the padding: the AVX2 code, which needs none */
      if (i8) mmgpt_rows_linear_i8_avx2(x, R, K, (const int8_t *)w, P, scale, bias, N, out, threads);
      else mmgpt_rows_linear_avx2(x, R, K, (const float *)w, P, bias, N, out, threads);
      return;
    }
    memcpy(xp, x, (size_t)(R * K) * sizeof(float));
    x = xp;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {
    float buf[16 * W16] __attribute__((aligned(64)));
    const void *wp = (const char *)w + p * panel;
    const int64_t col0 = p * W16, cols = W16 < N - col0 ? W16 : N - col0;
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
      const int64_t nr = R - r0 < 16 ? R - r0 : 16, g = group_rows(nr);
      const float *xr = x + r0 * K;
      if (g == 4) (i8 ? rows512_4_1 : rows512_4_0)(xr, K, K, wp, buf);
      else if (g == 8) (i8 ? rows512_8_1 : rows512_8_0)(xr, K, K, wp, buf);
      else (i8 ? rows512_16_1 : rows512_16_0)(xr, K, K, wp, buf);
      for (int64_t i = 0; i < nr; ++i) {
        float *o = out + (r0 + i) * N + col0;
        const float *src = buf + i * W16;
        for (int64_t c = 0; c < cols; ++c)
          o[c] = (i8 ? src[c] * scale[col0 + c] : src[c]) + (bias ? bias[col0 + c] : 0.0f);
      }
    }
  }
  free(xp);
}

/* x (R, K) contiguous; w (P, K, 16) packed; bias (N) or NULL; out (R, N); on `threads` threads. */
static void mmgpt_rows_linear_avx2(const float *x, int64_t R, int64_t K, const float *w, int64_t P,
                                   const float *bias, int64_t N, float *out, int threads) {
  const int64_t panel = K * W16;
  if (R == 1) {
    const int64_t units = (P + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t u = 0; u < units; ++u) {
      float buf[64] __attribute__((aligned(32)));
      const int64_t p = 4 * u, np = P - p < 4 ? P - p : 4;
      one_row((int)np, x, K, w + p * panel, buf);
      const int64_t col0 = p * W16, cols = np * W16 < N - col0 ? np * W16 : N - col0;
      finish(buf, bias, col0, cols, out + col0);
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {
    float buf[4 * W16] __attribute__((aligned(32)));
    const float *wp = w + p * panel;
    const int64_t col0 = p * W16, cols = W16 < N - col0 ? W16 : N - col0;
    for (int64_t r = 0; r < R; r += 4) {
      const int nr = R - r < 4 ? (int)(R - r) : 4;
      rows_panel(nr, x + r * K, K, K, wp, buf);
      for (int i = 0; i < nr; ++i) finish(buf + i * W16, bias, col0, cols, out + (r + i) * N + col0);
    }
  }
}

/* ---- int8 weights (weight-only quantization): y = (x Q) * scale + b ----------------------------
 *
 * Q is packed like W, (P, K, 16) int8, one scale per output column. The products run in fp32: each
 * int8 is widened and converted in registers (vpmovsxbd + vcvtdq2ps), the scale applied once per
 * column at the end. A quarter of the fp32 bytes: the small decoder's 62 MB become 15.5 MB.
 */

static inline __m256 q8(const int8_t *p) {  /* 8 int8 -> 8 floats */
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline void one_row_i8(int np, const float *x, int64_t K, const int8_t *w, float *y) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t s = K * W16;
  if (np == 4) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 xk = _mm256_broadcast_ss(x + k);
      const int8_t *wk = w + k * W16;
      a0 = _mm256_fmadd_ps(xk, q8(wk), a0);
      a1 = _mm256_fmadd_ps(xk, q8(wk + 8), a1);
      a2 = _mm256_fmadd_ps(xk, q8(wk + s), a2);
      a3 = _mm256_fmadd_ps(xk, q8(wk + s + 8), a3);
      a4 = _mm256_fmadd_ps(xk, q8(wk + 2 * s), a4);
      a5 = _mm256_fmadd_ps(xk, q8(wk + 2 * s + 8), a5);
      a6 = _mm256_fmadd_ps(xk, q8(wk + 3 * s), a6);
      a7 = _mm256_fmadd_ps(xk, q8(wk + 3 * s + 8), a7);
    }
    _mm256_storeu_ps(y, a0); _mm256_storeu_ps(y + 8, a1); _mm256_storeu_ps(y + 16, a2);
    _mm256_storeu_ps(y + 24, a3); _mm256_storeu_ps(y + 32, a4); _mm256_storeu_ps(y + 40, a5);
    _mm256_storeu_ps(y + 48, a6); _mm256_storeu_ps(y + 56, a7);
    return;
  }
  for (int p = 0; p < np; ++p) {  /* the last 1-3 panels of a matrix */
    const int8_t *wp = w + p * s;
    a0 = _mm256_setzero_ps(); a1 = a0; a2 = a0; a3 = a0;
    int64_t k = 0;
    for (; k + 1 < K; k += 2) {
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), q8(wp + k * W16), a0);
      a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), q8(wp + k * W16 + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), q8(wp + (k + 1) * W16), a2);
      a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), q8(wp + (k + 1) * W16 + 8), a3);
    }
    for (; k < K; ++k) {
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), q8(wp + k * W16), a0);
      a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), q8(wp + k * W16 + 8), a1);
    }
    _mm256_storeu_ps(y + p * W16, _mm256_add_ps(a0, a2));
    _mm256_storeu_ps(y + p * W16 + 8, _mm256_add_ps(a1, a3));
  }
}

static inline void finish_i8(const float *src, const float *scale, const float *bias, int64_t col0, int64_t cols,
                             float *out) {
  for (int64_t c = 0; c < cols; ++c) out[c] = src[c] * scale[col0 + c] + (bias ? bias[col0 + c] : 0.0f);
}

#define KC 256 /* k rows of a panel widened to fp32 at a time for several rows: 16 KB, in L1 */

/* x (R, K) contiguous; q (P, K, 16) int8 packed; scale (N); bias (N) or NULL; out (R, N). Several rows:
 * per panel, KC rows of it at a time are widened to fp32 once (in L1) and every group of 4 rows runs
 * the fp32 panel product on them, so the conversion is paid once per panel, not once per row. */
static void mmgpt_rows_linear_i8_avx2(const float *x, int64_t R, int64_t K, const int8_t *q, int64_t P,
                                      const float *scale, const float *bias, int64_t N, float *out, int threads) {
  const int64_t panel = K * W16;
  if (R == 1) {
    const int64_t units = (P + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t u = 0; u < units; ++u) {
      float buf[64] __attribute__((aligned(32)));
      const int64_t p = 4 * u, np = P - p < 4 ? P - p : 4;
      one_row_i8((int)np, x, K, q + p * panel, buf);
      const int64_t col0 = p * W16, cols = np * W16 < N - col0 ? np * W16 : N - col0;
      finish_i8(buf, scale, bias, col0, cols, out + col0);
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {
    float wf[KC * W16] __attribute__((aligned(32)));
    float acc[4 * W16] __attribute__((aligned(32)));
    float tot[32 * W16] __attribute__((aligned(32))); /* R <= 32 (MAX_ROWS) */
    const int8_t *qp = q + p * panel;
    const int64_t col0 = p * W16, cols = W16 < N - col0 ? W16 : N - col0;
    for (int64_t i = 0; i < R * W16; ++i) tot[i] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      for (int64_t k = 0; k < kc; ++k) {
        _mm256_store_ps(wf + k * W16, q8(qp + (k0 + k) * W16));
        _mm256_store_ps(wf + k * W16 + 8, q8(qp + (k0 + k) * W16 + 8));
      }
      for (int64_t r = 0; r < R; r += 4) {
        const int nr = R - r < 4 ? (int)(R - r) : 4;
        rows_panel(nr, x + r * K + k0, K, kc, wf, acc);
        for (int i = 0; i < nr * W16; ++i) tot[r * W16 + i] += acc[i];
      }
    }
    for (int64_t r = 0; r < R; ++r) finish_i8(tot + r * W16, scale, bias, col0, cols, out + r * N + col0);
  }
}

/* ---- int8 x int8 (AVX-512 VNNI): the activations rounded to int8 too, one scale per row ----------
 *
 * With VNNI (vpdpbusd: 64 byte products summed into 16 int32 lanes per instruction) a product on int8
 * weights does a quarter of the instructions of widening them to fp32. Each row of x is rounded to int8
 * with its own scale (max |x| / 127, round half to even), stored as unsigned bytes (+128); the weights are
 * packed as (P, K4, 16, 4): 4 consecutive k of 16 columns in one 64-byte line. Per output column,
 * y = (acc - 128 * colsum) * row_scale * col_scale + bias, acc the exact int32 sum.
 */
#define TVNNI __attribute__((target("avx512f,avx512vnni")))

static int vnni_on = -1;

/* on: 1 use VNNI for int8 weights where the CPU has it, 0 never. Returns whether it is used. */
int mmgpt_set_vnni(int on) {
  __builtin_cpu_init();
  vnni_on = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
  return vnni_on;
}

static inline int use_vnni(void) {
  if (vnni_on < 0) mmgpt_set_vnni(1);
  return vnni_on;
}

static inline __attribute__((always_inline)) TVNNI void rows_panel_vnni(const int NR, const uint8_t *x, int64_t ldx,
                                                                         int64_t K4, const int8_t *w, int32_t *y) {
  __m512i a[16];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) a[r] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    _mm_prefetch((const char *)w + (k4 + PF_AHEAD) * 64, _MM_HINT_T0);
    const __m512i wk = _mm512_loadu_si512((const void *)(w + k4 * 64));
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      int32_t v;
      memcpy(&v, x + r * ldx + 4 * k4, 4);
      a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(v), wk);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) _mm512_storeu_si512((void *)(y + r * W16), a[r]);
}

#define ROWSVNNI(NR)                                                                                         \
  static TVNNI void rows_vnni_##NR(const uint8_t *x, int64_t ldx, int64_t K4, const int8_t *w, int32_t *y) { \
    rows_panel_vnni(NR, x, ldx, K4, w, y);                                                                   \
  }
ROWSVNNI(1) ROWSVNNI(4) ROWSVNNI(8) ROWSVNNI(16)

/* Row r of x (K floats) -> K4 * 4 unsigned bytes (int8 + 128, zero-padded to 128) and its scale. */
static void quantize_row(const float *x, int64_t K, int64_t K4, uint8_t *q, float *scale) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *scale = amax / 127.0f;
  for (int64_t k = 0; k < K; ++k) {
    float v = nearbyintf(x[k] * inv);
    v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
    q[k] = (uint8_t)((int)v + 128);
  }
  for (int64_t k = K; k < 4 * K4; ++k) q[k] = 128;
}

/* x (R, K) fp32; w4 (P, K4, 16, 4) int8; colsum (P * 16) int32 column sums of the weights; scale (N);
 * bias (N) or NULL; out (R, N). Returns 0, or -1 (nothing written) when the CPU lacks VNNI or memory ran out. */
int mmgpt_rows_linear_vnni(const float *x, int64_t R, int64_t K, const int8_t *w4, const int32_t *colsum,
                           int64_t P, const float *scale, const float *bias, int64_t N, float *out, int threads) {
  if (!use_vnni()) return -1;
  const int64_t K4 = (K + 3) / 4, ldq = 4 * K4, panel = K4 * 64;
  const int64_t last = R / 16 * 16, rpad = R == 1 ? 1 : R == last ? R : last + group_rows(R - last);
  uint8_t *xq = (uint8_t *)malloc((size_t)(rpad * ldq));
  float *xs = (float *)malloc((size_t)rpad * sizeof(float));
  if (!xq || !xs) { free(xq); free(xs); return -1; }
  for (int64_t r = 0; r < R; ++r) quantize_row(x + r * K, K, K4, xq + r * ldq, xs + r);
  memset(xq + R * ldq, 128, (size_t)((rpad - R) * ldq));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {
    int32_t buf[16 * W16] __attribute__((aligned(64)));
    const int8_t *wp = w4 + p * panel;
    const int64_t col0 = p * W16, cols = W16 < N - col0 ? W16 : N - col0;
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
      const int64_t nr = R - r0 < 16 ? R - r0 : 16, g = R == 1 ? 1 : group_rows(nr);
      const uint8_t *xr = xq + r0 * ldq;
      if (g == 1) rows_vnni_1(xr, ldq, K4, wp, buf);
      else if (g == 4) rows_vnni_4(xr, ldq, K4, wp, buf);
      else if (g == 8) rows_vnni_8(xr, ldq, K4, wp, buf);
      else rows_vnni_16(xr, ldq, K4, wp, buf);
      for (int64_t i = 0; i < nr; ++i) {
        float *o = out + (r0 + i) * N + col0;
        const int32_t *src = buf + i * W16;
        const float rs = xs[r0 + i];
        for (int64_t c = 0; c < cols; ++c)
          o[c] = (float)(src[c] - 128 * colsum[col0 + c]) * rs * scale[col0 + c] + (bias ? bias[col0 + c] : 0.0f);
      }
    }
  }
  free(xq);
  free(xs);
  return 0;
}

/* The public products: several rows take the AVX-512 code where it is on, else the AVX2 code. */
void mmgpt_rows_linear(const float *x, int64_t R, int64_t K, const float *w, int64_t P, const float *bias,
                       int64_t N, float *out, int threads) {
  if (R >= 2 && use_avx512()) rows_linear512(x, R, K, w, 0, P, NULL, bias, N, out, threads);
  else mmgpt_rows_linear_avx2(x, R, K, w, P, bias, N, out, threads);
}

void mmgpt_rows_linear_i8(const float *x, int64_t R, int64_t K, const int8_t *q, int64_t P, const float *scale,
                          const float *bias, int64_t N, float *out, int threads) {
  if (R >= 2 && use_avx512()) rows_linear512(x, R, K, q, 1, P, scale, bias, N, out, threads);
  else mmgpt_rows_linear_i8_avx2(x, R, K, q, P, scale, bias, N, out, threads);
}

/* ---- the whole one-token step of a GPT-2 decoder with cross-attention ---------------------------
 *
 * One call per generated token instead of ~20 torch ops per layer: per layer, layer norm -> qkv ->
 * k and v written into the cache -> one-query attention over the cache -> projection + residual ->
 * (cross-attention layers) layer norm -> q -> attention over the image's keys and values ->
 * projection + residual -> layer norm -> MLP (GELU) -> residual; then the final layer norm and the
 * LM head. The products are the kernels above (fp32 or int8 weights); the rest is plain C on (B, D)
 * rows, attention heads split between the threads. Same math as the torch path (mmgpt/speed/decode.py
 * `one_token_step`), to float rounding.
 */
#include <math.h>

typedef struct {
  const void *w;        /* (P, K, 16) packed panels: fp32, or int8 when int8 != 0 */
  const float *scale;   /* (N) per output column, int8 only */
  const float *bias;    /* (N) or NULL */
  int64_t K, N, P, int8;
  const int8_t *w4;      /* int8 only: the weights packed for VNNI, (P, K4, 16, 4), or NULL */
  const int32_t *colsum; /* (P * 16) their column sums */
} Lin;

typedef struct {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b, *lnc_w, *lnc_b;
  Lin qkv, proj, fc, fc_proj, cq, cproj;
  float *k_cache, *v_cache; /* (B, H, T, hd) of this layer */
  const float *ck, *cv;     /* cross-attention keys (B, H, hd, M), transposed, and values (B, H, M, hd); or NULL */
  int64_t n_mem;
  float ln1_eps, ln2_eps, lnc_eps, scale, cscale, pad_;
} Layer;

static void lin_rows(const Lin *l, const float *x, int64_t R, float *out, int threads) {
  if (l->int8 && l->w4 &&
      mmgpt_rows_linear_vnni(x, R, l->K, l->w4, l->colsum, l->P, l->scale, l->bias, l->N, out, threads) == 0)
    return;
  if (l->int8)
    mmgpt_rows_linear_i8(x, R, l->K, (const int8_t *)l->w, l->P, l->scale, l->bias, l->N, out, threads);
  else
    mmgpt_rows_linear(x, R, l->K, (const float *)l->w, l->P, l->bias, l->N, out, threads);
}

static void layer_norm_rows(const float *x, int64_t R, int64_t D, const float *w, const float *b, float eps,
                            float *out) {
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * D;
    float *o = out + r * D;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < D; ++i) mean += xr[i];
    mean /= (double)D;
    for (int64_t i = 0; i < D; ++i) { const double c = xr[i] - mean; var += c * c; }
    const float inv = (float)(1.0 / sqrt(var / (double)D + (double)eps)), m = (float)mean;
    for (int64_t i = 0; i < D; ++i) o[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

/* One query against n keys: q (hd), keys/values rows of `stride` floats; bias (n) or NULL; s scratch. */
static inline float dot_hd(const float *a, const float *b, int64_t hd) {
  int64_t i = 0;
  float r = 0.0f;
  if (hd >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (i = 8; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    r = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
  }
  for (; i < hd; ++i) r += a[i] * b[i];
  return r;
}

/* e^x for 8 floats: x = n ln2 + r (Cody-Waite), e^r by Cephes' degree-6 polynomial, 2^n from the exponent
 * bits; relative error ~1e-7 on [-88, 88], the input clamped there. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Softmax of s[0:n] in place (max subtracted, e^x eight at a time); returns 1 / sum. */
static inline float softmax_unnormed(float *s, int64_t n) {
  float mx = -INFINITY;
  int64_t t0 = 0;
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(s);
    for (t0 = 8; t0 + 8 <= n; t0 += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t0));
    float buf[8] __attribute__((aligned(32)));
    _mm256_store_ps(buf, m);
    for (int i = 0; i < 8; ++i) mx = buf[i] > mx ? buf[i] : mx;
  }
  for (int64_t t = t0; t < n; ++t) mx = s[t] > mx ? s[t] : mx;
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float buf[8] __attribute__((aligned(32)));
  _mm256_store_ps(buf, acc);
  float sum = buf[0] + buf[1] + buf[2] + buf[3] + buf[4] + buf[5] + buf[6] + buf[7];
  for (; t < n; ++t) { s[t] = expf(s[t] - mx); sum += s[t]; }
  return 1.0f / sum;
}

/* o (hd) = inv * sum_t s[t] v[t] over n value rows of hd floats. hd = 64: eight accumulators, one per
 * 8 columns, so that the adds of consecutive t do not wait on each other. */
static inline void weighted_values(const float *s, float inv, const float *v, int64_t n, int64_t hd, float *o) {
  if (hd == 64) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t t = 0; t < n; ++t) {
      const __m256 w = _mm256_set1_ps(s[t]);
      const float *vt = v + t * 64;
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt), a0); a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 16), a2); a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 24), a3);
      a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 32), a4); a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 40), a5);
      a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 48), a6); a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 56), a7);
    }
    const __m256 iv = _mm256_set1_ps(inv);
    _mm256_storeu_ps(o, _mm256_mul_ps(a0, iv)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(a1, iv));
    _mm256_storeu_ps(o + 16, _mm256_mul_ps(a2, iv)); _mm256_storeu_ps(o + 24, _mm256_mul_ps(a3, iv));
    _mm256_storeu_ps(o + 32, _mm256_mul_ps(a4, iv)); _mm256_storeu_ps(o + 40, _mm256_mul_ps(a5, iv));
    _mm256_storeu_ps(o + 48, _mm256_mul_ps(a6, iv)); _mm256_storeu_ps(o + 56, _mm256_mul_ps(a7, iv));
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= hd; i += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) acc = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(v + t * hd + i), acc);
    _mm256_storeu_ps(o + i, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
  }
  for (; i < hd; ++i) {
    float acc = 0.0f;
    for (int64_t t = 0; t < n; ++t) acc += s[t] * v[t * hd + i];
    o[i] = acc * inv;
  }
}

/* One query against n keys (rows of hd floats) and values; bias (n) or NULL; s scratch (n). */
static void attend(const float *q, const float *k, const float *v, int64_t n, int64_t hd, float scale,
                   const float *bias, float *s, float *o) {
  for (int64_t t = 0; t < n; ++t) s[t] = dot_hd(q, k + t * hd, hd) * scale + (bias ? bias[t] : 0.0f);
  weighted_values(s, softmax_unnormed(s, n), v, n, hd, o);
}

/* The same with the keys transposed, kt (hd, n): the scores come 32 keys at a time, no horizontal sums
 * (the image's keys in cross-attention, made once per call). */
static void attend_t(const float *q, const float *kt, const float *v, int64_t n, int64_t hd, float scale,
                     float *s, float *o) {
  int64_t t = 0;
  const __m256 sc = _mm256_set1_ps(scale);
  for (; t + 32 <= n; t += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < hd; ++i) {
      const __m256 qi = _mm256_set1_ps(q[i]);
      const float *r = kt + i * n + t;
      a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r), a0); a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + 8), a1);
      a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + 16), a2); a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(r + 24), a3);
    }
    _mm256_storeu_ps(s + t, _mm256_mul_ps(a0, sc)); _mm256_storeu_ps(s + t + 8, _mm256_mul_ps(a1, sc));
    _mm256_storeu_ps(s + t + 16, _mm256_mul_ps(a2, sc)); _mm256_storeu_ps(s + t + 24, _mm256_mul_ps(a3, sc));
  }
  for (; t + 8 <= n; t += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; ++i) a0 = _mm256_fmadd_ps(_mm256_set1_ps(q[i]), _mm256_loadu_ps(kt + i * n + t), a0);
    _mm256_storeu_ps(s + t, _mm256_mul_ps(a0, sc));
  }
  for (; t < n; ++t) {
    float acc = 0.0f;
    for (int64_t i = 0; i < hd; ++i) acc += q[i] * kt[i * n + t];
    s[t] = acc * scale;
  }
  weighted_values(s, softmax_unnormed(s, n), v, n, hd, o);
}

static void gelu_rows(float *x, int64_t n, int64_t tanh_form, int threads) {
  if (tanh_form) { /* 0.5 u (1 + tanh(z)) = u / (1 + e^(-2z)), z = sqrt(2/pi) (u + 0.044715 u^3) */
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 4096)
    for (int64_t i = 0; i < n8; i += 8) {
      const __m256 u = _mm256_loadu_ps(x + i);
      const __m256 u3 = _mm256_mul_ps(_mm256_mul_ps(u, u), u);
      const __m256 z2 = _mm256_mul_ps(_mm256_fmadd_ps(u3, _mm256_set1_ps(0.044715f), u),
                                      _mm256_set1_ps(-1.5957691216057308f)); /* -2z */
      _mm256_storeu_ps(x + i, _mm256_div_ps(u, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(z2))));
    }
    for (int64_t i = n8; i < n; ++i) {
      const float u = x[i];
      x[i] = 0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 4096)
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.7071067811865476f));
  }
}

/* ---- a ViT's self-attention on AVX-512 (inference) -------------------------------------------------
 *
 * For each (image, head): the keys transposed once into a scratch (hd, Np) block, then per block of 16
 * queries the scores (16 x Np) as 16 rows against 16-key panels, the softmax, and the output (16 x hd)
 * as 16 rows of weights against 16-column panels of the values; the results written straight into the
 * (B*N, D) layout the output projection reads. The products are rows_panel512 on strided panels.
 */

/* qkv (B*N, 3D): q | k | v, head h at columns h*hd of each; out (B*N, D). hd a multiple of 16.
 * Returns 0, or -1 (nothing written) without AVX-512 or memory. */
static T512 int vit_attention512(const float *qkv, int64_t B, int64_t N, int64_t H, int64_t hd, float scale,
                                 float *out, int threads) {
  const int64_t D = H * hd, ld = 3 * D, Np = (N + 15) / 16 * 16;
  const int nt = threads > 1 ? threads : 1;
  /* per thread: keys transposed (hd x Np), a query block (16 x hd), scores (16 x Np), output (16 x hd) */
  const int64_t per = hd * Np + 16 * hd + 16 * Np + 16 * hd;
  float *scratch = (float *)aligned_alloc(64, (size_t)(nt * per) * sizeof(float) / 64 * 64 + 64);
  if (!scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float *kt = scratch + tid * per, *qb = kt + hd * Np, *sb = qb + 16 * hd, *ob = sb + 16 * Np;
    const int64_t b = bh / H, h = bh % H;
    const float *base = qkv + b * N * ld;
    for (int64_t j = 0; j < N; ++j) { /* key j's row read whole, written down column j */
      const float *kj = base + j * ld + D + h * hd;
      for (int64_t d = 0; d < hd; ++d) kt[d * Np + j] = kj[d];
    }
    for (int64_t d = 0; d < hd; ++d)
      for (int64_t j = N; j < Np; ++j) kt[d * Np + j] = 0.0f;
    for (int64_t r0 = 0; r0 < N; r0 += 16) {
      const int64_t nr = N - r0 < 16 ? N - r0 : 16;
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t i = 0; i < hd; ++i) qb[r * hd + i] = r < nr ? base[(r0 + r) * ld + h * hd + i] * scale : 0.0f;
      for (int64_t j = 0; j < Np; j += 16) rows_panel512(16, 0, qb, hd, hd, kt + j, Np, sb + j, Np);
      float inv[16];
      for (int64_t r = 0; r < 16; ++r) inv[r] = softmax_unnormed(sb + r * Np, N); /* over the N real keys */
      for (int64_t c = 0; c < hd; c += 16) rows_panel512(16, 0, sb, Np, N, base + 2 * D + h * hd + c, ld, ob + c, hd);
      for (int64_t r = 0; r < nr; ++r) {
        float *o = out + (b * N + r0 + r) * D + h * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] = ob[r * hd + i] * inv[r];
      }
    }
  }
  free(scratch);
  return 0;
}

int mmgpt_vit_attention(const float *qkv, int64_t B, int64_t N, int64_t H, int64_t hd, float scale, float *out,
                        int threads) {
  if (!use_avx512() || hd % 16 != 0 || N < 1) return -1;
  return vit_attention512(qkv, B, N, H, hd, scale, out, threads);
}

/* One product as the decoding step runs it (for the Python side's own calls). */
void mmgpt_lin(const Lin *l, const float *x, int64_t R, float *out, int threads) { lin_rows(l, x, R, out, threads); }

/* h (B, D): the token + position embeddings in, overwritten; logits (B, V) out. key_bias (B, T)
 * additive (padding) or NULL. work: B * (D + max(3D, F)) floats; scores: B * H * max(T, M) floats. */
void mmgpt_decode_step(const Layer *layers, int64_t L, int64_t B, int64_t D, int64_t H, int64_t T, int64_t pos,
                       float *h, const float *key_bias, const float *lnf_w, const float *lnf_b, float lnf_eps,
                       const Lin *head, float *logits, float *work, float *tmp, float *scores, int64_t gelu_tanh,
                       int threads) {
  const int64_t hd = D / H, n = pos + 1;
  float *x = work, *big = work + B * D; /* (B, D) normed rows; (B, 3D) qkv or (B, F) MLP hidden */
  for (int64_t li = 0; li < L; ++li) {
    const Layer *l = layers + li;
    layer_norm_rows(h, B, D, l->ln1_w, l->ln1_b, l->ln1_eps, x);
    lin_rows(&l->qkv, x, B, big, threads); /* (B, 3D): q | k | v */
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t c = ((b * H + hh) * T + pos) * hd;
        for (int64_t i = 0; i < hd; ++i) {
          l->k_cache[c + i] = big[b * 3 * D + D + hh * hd + i];
          l->v_cache[c + i] = big[b * 3 * D + 2 * D + hh * hd + i];
        }
      }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H > 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, hh = bh % H;
      attend(big + b * 3 * D + hh * hd, l->k_cache + bh * T * hd, l->v_cache + bh * T * hd, n, hd, l->scale,
             key_bias ? key_bias + b * T : NULL, scores + bh * (T > l->n_mem ? T : l->n_mem), x + b * D + hh * hd);
    }
    lin_rows(&l->proj, x, B, tmp, threads);
    for (int64_t i = 0; i < B * D; ++i) h[i] += tmp[i];
    if (l->ck) {
      const int64_t M = l->n_mem;
      layer_norm_rows(h, B, D, l->lnc_w, l->lnc_b, l->lnc_eps, x);
      lin_rows(&l->cq, x, B, big, threads); /* (B, D) queries */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H > 1)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, hh = bh % H;
        attend_t(big + b * D + hh * hd, l->ck + bh * hd * M, l->cv + bh * M * hd, M, hd, l->cscale,
                 scores + bh * (T > M ? T : M), x + b * D + hh * hd);
      }
      lin_rows(&l->cproj, x, B, tmp, threads);
      for (int64_t i = 0; i < B * D; ++i) h[i] += tmp[i];
    }
    layer_norm_rows(h, B, D, l->ln2_w, l->ln2_b, l->ln2_eps, x);
    lin_rows(&l->fc, x, B, big, threads); /* (B, F) */
    gelu_rows(big, B * l->fc.N, gelu_tanh, threads);
    lin_rows(&l->fc_proj, big, B, tmp, threads);
    for (int64_t i = 0; i < B * D; ++i) h[i] += tmp[i];
  }
  layer_norm_rows(h, B, D, lnf_w, lnf_b, lnf_eps, x);
  lin_rows(head, x, B, logits, threads);
}
