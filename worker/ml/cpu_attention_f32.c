/* Bidirectional attention over a key-padding mask in fp32, forward and backward, for CPUs with
   AVX2 and FMA: the attention of an fp32 fine-tune, heads of 32 or 64.

   One task per (batch row, head), so that the keys' and values' gradients are summed by one
   thread. The head's keys (and, for the backward, values) are packed transposed, so that a
   query row's scores against 16 keys are two vectors; a block of query rows gets its scores
   for every key (a block × keys buffer in L2: the whole score matrix is never written), an
   exact softmax over the row, then its weighted sum of values. The forward keeps each row's
   log-sum-exp; the backward recomputes the probabilities from it (as flash attention does)
   and makes dQ, dK and dV from them without storing anything of the size of the scores:
     dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
   Threads: the OpenMP pool of the process, torch's own (its libgomp is loaded first and this
   library takes it by soname), as many as torch's thread budget, which the caller passes (as
   to the dropout kernel) rather than leaving it to OpenMP's per-thread setting.

   Built and loaded at run time by cpu_attention_f32.py, which says why it is here. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 48 /* query rows whose scores are held at once (48 and 6 were the fastest of 24-64 and 4-6) */
#define SROWS 6  /* query rows sharing each load of 16 keys' scores */
#define MASKED (-INFINITY)

/* exp(x) for x <= 0 (scores minus their row's max): 2^n · 2^f with f in [-0.5, 0.5], 2^f by
   its Taylor series in f·ln 2 to the sixth power (relative error under 2e-7); 0 below -87. */
static inline __m256 exp_neg(__m256 x) {
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 y = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
    const __m256 live = _mm256_cmp_ps(t, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* C[r][j] = alpha · Σc A[r][c] · BT[c][j] + bias[j] for R (at most SROWS) rows of A (row stride
   lda) and n keys (a multiple of 16) of BT, packed [D][n]. */
static inline __attribute__((always_inline)) void scores_rows(
    const float *a, long lda, const float *bt, long n, const float *bias, float alpha, float *c,
    long ldc, const int R, const int D) {
    for (long j = 0; j < n; j += 16) {
        __m256 acc[SROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            const __m256 b0 = _mm256_loadu_ps(bt + d * n + j), b1 = _mm256_loadu_ps(bt + d * n + j + 8);
            for (int r = 0; r < R; r++) {
                const __m256 x = _mm256_broadcast_ss(a + r * lda + d);
                acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
            }
        }
        const __m256 s = _mm256_set1_ps(alpha);
        const __m256 c0 = _mm256_loadu_ps(bias + j), c1 = _mm256_loadu_ps(bias + j + 8);
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(c + r * ldc + j, _mm256_fmadd_ps(acc[r][0], s, c0));
            _mm256_storeu_ps(c + r * ldc + j + 8, _mm256_fmadd_ps(acc[r][1], s, c1));
        }
    }
}

static inline __attribute__((always_inline)) void scores(
    const float *a, long lda, long m, const float *bt, long n, const float *bias, float alpha,
    float *c, long ldc, const int D) {
    long r = 0;
    for (; r + SROWS <= m; r += SROWS) scores_rows(a + r * lda, lda, bt, n, bias, alpha, c + r * ldc, ldc, SROWS, D);
    for (; r < m; r++) scores_rows(a + r * lda, lda, bt, n, bias, alpha, c + r * ldc, ldc, 1, D);
}

/* C[r][0:32] (+)= Σk A(r, k) · B[k][0:32] for R rows, A(r, k) = a[r·ars + k·acs], B's rows
   of stride ldb; the result times `scale`, added to C where `add`. */
static inline __attribute__((always_inline)) void weighted_rows(
    const float *a, long ars, long acs, long kn, const float *b, long ldb, float *c, long ldc,
    float scale, int add, const int R) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
    for (long k = 0; k < kn; k++) {
        __m256 x[3];
        for (int r = 0; r < R; r++) x[r] = _mm256_broadcast_ss(a + r * ars + k * acs);
        for (int v = 0; v < 4; v++) {
            const __m256 y = _mm256_loadu_ps(b + k * ldb + 8 * v);
            for (int r = 0; r < R; r++) acc[r][v] = _mm256_fmadd_ps(x[r], y, acc[r][v]);
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) {
            float *out = c + r * ldc + 8 * v;
            const __m256 y = _mm256_mul_ps(acc[r][v], s);
            _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), y) : y);
        }
}

static inline __attribute__((always_inline)) void weighted(
    const float *a, long ars, long acs, long m, long kn, const float *b, long ldb, float *c,
    long ldc, float scale, int add, const int D) {
    for (int half = 0; half < D; half += 32) {
        long r = 0;
        for (; r + 3 <= m; r += 3)
            weighted_rows(a + r * ars, ars, acs, kn, b + half, ldb, c + r * ldc + half, ldc, scale, add, 3);
        for (; r < m; r++)
            weighted_rows(a + r * ars, ars, acs, kn, b + half, ldb, c + r * ldc + half, ldc, scale, add, 1);
    }
}

/* The 8 × 8 block r[0..7] transposed in place. */
static inline void transpose8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* t[d][j] = x[j][d] for j < n, zero to `width` (a multiple of 16) past it; 8 × 8 blocks at a
   time (one element at a time, each store to another line, took a tenth of the forward). */
static inline void pack_transposed(const float *x, long stride, long n, long width, float *t, const int D) {
    for (long j = 0; j < width; j += 8)
        for (int d = 0; d < D; d += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = j + i < n ? _mm256_loadu_ps(x + (j + i) * stride + d) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(t + (d + i) * width + j, r[i]);
        }
}

/* 0 for an attended key, -inf for a padded one or one past the last key. */
static inline void key_bias(const unsigned char *keep, long lk, long width, float *bias) {
    for (long j = 0; j < width; j++) bias[j] = (j < lk && (!keep || keep[j])) ? 0.0f : MASKED;
}

/* Row i of s (n scores, a multiple of 8) turned into exp(s - shift[i]) in place; returns the
   row's sum. */
static inline float exp_row(float *s, long n, float shift) {
    const __m256 m = _mm256_set1_ps(shift);
    __m256 sum = _mm256_setzero_ps();
    for (long j = 0; j < n; j += 8) {
        const __m256 p = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, p);
        sum = _mm256_add_ps(sum, p);
    }
    return hsum(sum);
}

static inline float row_max(const float *s, long n) {
    __m256 m = _mm256_set1_ps(MASKED);
    for (long j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    return hmax(m);
}

static inline __attribute__((always_inline)) void forward_head(
    const float *qh, long qs, const float *kh, long ks, const float *vh, long vs, float *oh,
    long os, float *lse, const unsigned char *keep, long lq, long lk, float scale, float *kt,
    float *bias, float *s, const int D) {
    const long width = (lk + 15) / 16 * 16;
    pack_transposed(kh, ks, lk, width, kt, D);
    key_bias(keep, lk, width, bias);
    for (long row0 = 0; row0 < lq; row0 += BLOCK) {
        const long m = lq - row0 < BLOCK ? lq - row0 : BLOCK;
        scores(qh + row0 * qs, qs, m, kt, width, bias, scale, s, width, D);
        float inverse[BLOCK];
        for (long r = 0; r < m; r++) {
            const float top = row_max(s + r * width, width);
            const float shift = top == MASKED ? 0.0f : top; /* a row with no key: all zero */
            const float sum = exp_row(s + r * width, width, shift);
            inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
            if (lse) lse[row0 + r] = sum > 0.0f ? shift + logf(sum) : INFINITY;
        }
        weighted(s, width, 1, m, lk, vh, vs, oh + row0 * os, os, 1.0f, 0, D);
        for (long r = 0; r < m; r++) {
            float *o = oh + (row0 + r) * os;
            const __m256 f = _mm256_set1_ps(inverse[r]);
            for (int d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), f));
        }
    }
}

static inline __attribute__((always_inline)) void backward_head(
    const float *qh, long qs, const float *kh, long ks, const float *vh, long vs,
    const float *oh, const float *doh, long os, const float *lse, float *dqh, float *dkh,
    float *dvh, const unsigned char *keep, long lq, long lk, float scale, float *kt, float *vt,
    float *bias, float *p, float *dp, float *dk, float *dv, const int D) {
    const long width = (lk + 15) / 16 * 16;
    pack_transposed(kh, ks, lk, width, kt, D);
    pack_transposed(vh, vs, lk, width, vt, D);
    key_bias(keep, lk, width, bias);
    memset(dk, 0, lk * D * sizeof(float));
    memset(dv, 0, lk * D * sizeof(float));
    for (long row0 = 0; row0 < lq; row0 += BLOCK) {
        const long m = lq - row0 < BLOCK ? lq - row0 : BLOCK;
        scores(qh + row0 * qs, qs, m, kt, width, bias, scale, p, width, D);
        for (long r = 0; r < m; r++) exp_row(p + r * width, width, lse[row0 + r]);
        scores(doh + row0 * os, os, m, vt, width, bias, 1.0f, dp, width, D); /* dP (−inf: dead) */
        for (long r = 0; r < m; r++) {
            const float *o = oh + (row0 + r) * os, *g = doh + (row0 + r) * os;
            __m256 dot = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8)
                dot = _mm256_fmadd_ps(_mm256_loadu_ps(o + d), _mm256_loadu_ps(g + d), dot);
            const __m256 delta = _mm256_set1_ps(hsum(dot));
            float *pr = p + r * width, *dr = dp + r * width;
            for (long j = 0; j < width; j += 8) {
                const __m256 pj = _mm256_loadu_ps(pr + j);
                const __m256 live = _mm256_cmp_ps(pj, _mm256_setzero_ps(), _CMP_NEQ_OQ);
                const __m256 ds = _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(dr + j), delta));
                _mm256_storeu_ps(dr + j, _mm256_and_ps(live, ds)); /* dS, 0 where P is */
            }
        }
        weighted(dp, width, 1, m, lk, kh, ks, dqh + row0 * os, os, scale, 0, D);
        weighted(dp + 0, 1, width, lk, m, qh + row0 * qs, qs, dk, D, scale, 1, D);
        weighted(p + 0, 1, width, lk, m, doh + row0 * os, os, dv, D, 1.0f, 1, D);
    }
    for (long j = 0; j < lk; j++) {
        memcpy(dkh + j * os, dk + j * D, D * sizeof(float));
        memcpy(dvh + j * os, dv + j * D, D * sizeof(float));
    }
}

/* q, k, v: [batch][head][row][dim] by the given strides (in elements, dim contiguous); out:
   [batch][row][head][dim] contiguous; lse: [batch][head][lq] contiguous, or NULL where no
   backward follows; keep: [batch][lk] (1: attend), or NULL. D: 32 or 64. Returns 0, 1 for
   another head size, 2 where buffers could not be allocated. */
int tuneq_attention_f32_forward(const float *q, const float *k, const float *v, float *out,
                                float *lse, const unsigned char *keep, long batch, long heads,
                                long lq, long lk, long D, const long *qst, const long *kst,
                                const long *vst, float scale, int threads) {
    if (D != 32 && D != 64) return 1;
    const long width = (lk + 15) / 16 * 16, tasks = batch * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *kt = malloc(width * D * sizeof(float)), *bias = malloc(width * sizeof(float));
        float *s = malloc(BLOCK * width * sizeof(float));
        if (!kt || !bias || !s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            const long b = task / heads, h = task % heads;
            const float *qh = q + b * qst[0] + h * qst[1], *kh = k + b * kst[0] + h * kst[1];
            const float *vh = v + b * vst[0] + h * vst[1];
            float *oh = out + (b * lq * heads + h) * D, *lh = lse ? lse + task * lq : NULL;
            const unsigned char *kb = keep ? keep + b * lk : NULL;
            if (D == 32)
                forward_head(qh, qst[2], kh, kst[2], vh, vst[2], oh, heads * D, lh, kb, lq, lk,
                             scale, kt, bias, s, 32);
            else
                forward_head(qh, qst[2], kh, kst[2], vh, vst[2], oh, heads * D, lh, kb, lq, lk,
                             scale, kt, bias, s, 64);
        }
        free(kt); free(bias); free(s);
    }
    return failed ? 2 : 0;
}

/* The gradients of the forward above. out, dout, dq: [batch][lq][head][dim] contiguous; dk,
   dv: [batch][lk][head][dim] contiguous; lse: the forward's. */
int tuneq_attention_f32_backward(const float *q, const float *k, const float *v,
                                 const float *out, const float *dout, const float *lse,
                                 float *dq, float *dk, float *dv, const unsigned char *keep,
                                 long batch, long heads, long lq, long lk, long D,
                                 const long *qst, const long *kst, const long *vst, float scale,
                                 int threads) {
    if (D != 32 && D != 64) return 1;
    const long width = (lk + 15) / 16 * 16, tasks = batch * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *kt = malloc(width * D * sizeof(float)), *vt = malloc(width * D * sizeof(float));
        float *bias = malloc(width * sizeof(float));
        float *p = malloc(BLOCK * width * sizeof(float)), *dp = malloc(BLOCK * width * sizeof(float));
        float *gk = malloc(lk * D * sizeof(float)), *gv = malloc(lk * D * sizeof(float));
        if (!kt || !vt || !bias || !p || !dp || !gk || !gv) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            const long b = task / heads, h = task % heads;
            const float *qh = q + b * qst[0] + h * qst[1], *kh = k + b * kst[0] + h * kst[1];
            const float *vh = v + b * vst[0] + h * vst[1];
            const long qo = (b * lq * heads + h) * D, ko = (b * lk * heads + h) * D;
            const unsigned char *kb = keep ? keep + b * lk : NULL;
            if (D == 32)
                backward_head(qh, qst[2], kh, kst[2], vh, vst[2], out + qo, dout + qo, heads * D,
                              lse + task * lq, dq + qo, dk + ko, dv + ko, kb, lq, lk, scale, kt,
                              vt, bias, p, dp, gk, gv, 32);
            else
                backward_head(qh, qst[2], kh, kst[2], vh, vst[2], out + qo, dout + qo, heads * D,
                              lse + task * lq, dq + qo, dk + ko, dv + ko, kb, lq, lk, scale, kt,
                              vt, bias, p, dp, gk, gv, 64);
        }
        free(kt); free(vt); free(bias); free(p); free(dp); free(gk); free(gv);
    }
    return failed ? 2 : 0;
}
