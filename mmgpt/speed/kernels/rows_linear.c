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

#define W16 16

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

/* x (R, K) contiguous; w (P, K, 16) packed; bias (N) or NULL; out (R, N); on `threads` threads. */
void mmgpt_rows_linear(const float *x, int64_t R, int64_t K, const float *w, int64_t P, const float *bias,
                       int64_t N, float *out, int threads) {
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
void mmgpt_rows_linear_i8(const float *x, int64_t R, int64_t K, const int8_t *q, int64_t P, const float *scale,
                          const float *bias, int64_t N, float *out, int threads) {
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
